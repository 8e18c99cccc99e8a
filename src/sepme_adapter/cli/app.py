"""A web page on 127.0.0.1 to toggle erasers live: type a prompt, tick erasers, compare the original and the
erased image side by side (with a pixel-difference map), or a grid of every subset of the ticked erasers.

Without --model: the built-in demo world and its three style erasers, taken from `sepme demo`'s output
folder (--demo-out) or trained there once, as `sepme demo --quick` trains them (a few CPU minutes), and
reused after. Needs the [app] extra: pip install "sepme-adapter[app]".
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

from .options import DTYPES, add_quiet_option


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    parser.add_argument("--model", help="local diffusers folder or Hub id of the base model (default: the "
                                        "built-in demo world and its erasers)")
    parser.add_argument("--erasers", nargs="+",
                        help="eraser files or folders to load onto --model (more can be loaded from the "
                             "page)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="load erasers trained on another base model anyway (erasure may be weaker), "
                             "also those loaded from the page")
    parser.add_argument("--port", type=int,
                        help="the port on 127.0.0.1 (default: the first free one from 7860)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="the model's weights (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--demo-out", default="sepme-demo",
                        help="without --model: `sepme demo`'s output folder, whose erasers/ the page reuses, "
                             "or where it trains and caches them on first use (default ./sepme-demo)")
    add_quiet_option(parser)


def check_port(port: int | None) -> None:
    """Refuse a port that cannot be served on 127.0.0.1, before any model is loaded."""
    if port is None:
        return
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is a number from 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"--port {port}: already in use on 127.0.0.1; pick another or leave --port "
                             f"out") from None


def serve(app: Any) -> None:
    """Serve until Ctrl+C (the tests replace this to drive the running page)."""
    app.block_thread()


def run(args: argparse.Namespace) -> int:
    from ..extras import require

    started = time.monotonic()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    require("gradio", "sepme app")
    if args.erasers and not args.model:
        raise ValueError("--erasers needs --model, the base model they were trained on (without --model the "
                         "page opens the demo world and its own erasers)")
    check_port(args.port)
    from .options import check_device, silence_libraries

    check_device(args.device)
    if args.quiet:
        silence_libraries()
    from .. import app as web

    def log(message: str) -> None:
        if not args.quiet:
            print(f"sepme app: {message}", flush=True)

    if args.model is None:
        page = web.demo_app(args.demo_out, args.device, args.dtype, not args.quiet, log,
                            args.allow_base_mismatch)
    else:
        from ..pipelines import load_pipeline

        pipe = load_pipeline(args.model, args.device, args.dtype)
        page = web.build_app(pipe, args.erasers or [], title=f"SepME: toggle erasers live on {args.model}",
                             allow_base_mismatch=args.allow_base_mismatch)
    _, url, _ = page.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True,
                            quiet=True, show_error=True, ssr_mode=False, theme=web.offline_theme())
    print(f"sepme app: {url.rstrip('/')} (up in {time.monotonic() - started:.0f} s; Ctrl+C stops it)",
          flush=True)
    try:
        serve(page)
    finally:
        page.close()
    return 0
