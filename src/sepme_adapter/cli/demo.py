"""Train erasers for three demo styles, then measure every subset of them (accuracy and LPIPS, like the paper's
Tables 3-4) on the training prompts, held-out paraphrases and compositions; offline, minutes on a CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import add_generation_options, add_quiet_option

MODELS = ("sd", "sdxl", "flux")  # = demo.MODELS (a test checks)
BATCH_SIZE = 40  # = demo.job.BATCH_SIZE (a test checks)


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    parser.add_argument("--model", choices=MODELS, default="sd",
                        help="the demo world: sd (SD v1 architecture, default), sdxl (SDXL's: two text encoders, "
                             "pooled embeddings and time ids) or flux (FLUX's: CLIP pooled + T5 into a flow-matching "
                             "transformer, sampled with true classifier-free guidance)")
    parser.add_argument("--out", "-o", help="output folder (default ./sepme-demo, ./sepme-demo-MODEL for --model sdxl / flux)")
    parser.add_argument("--pooled-increment", action=argparse.BooleanOptionalAction, default=True,
                        help="SDXL / FLUX: give each eraser its pooled increment (add_embedding / time_text_embed; "
                             "default on)")
    parser.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt (default 10, quick 4)")
    add_generation_options(parser, BATCH_SIZE)
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    from ..demo.job import run_demo
    from .options import silence_libraries

    if args.quiet:
        silence_libraries()
    out = args.out or ("sepme-demo" if args.model == "sd" else f"sepme-demo-{args.model}")
    run_demo(out, args.quick, args.seeds, not args.quiet, threads=args.threads, batch_size=args.batch_size,
             model=args.model, pooled_increment=args.pooled_increment)
    return 0
