"""Options several commands share, declared once, and what commands do with them (load the model, be quiet).

Nothing here imports torch or diffusers at module level: `sepme --help` must stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")  # = pipelines.DTYPES (a test checks)


def warn(command: str, message: str) -> None:
    """A warning line a user should read: the result may not be what it looks like."""
    print(f"sepme {command}: warning: {message}", file=sys.stderr)


def add_eraser_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="eraser .safetensors files")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (also diffusers' and transformers' loading bars)")


def add_generation_options(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    """`--batch-size` (images per pipeline call) and `--threads` (torch CPU threads), for commands that generate."""
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images per pipeline call; prompts, seeds and erased subsets share calls (default "
                             f"{batch_size}; the UNet sees twice as many rows with guidance)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's, one per core)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads when `--threads` was given."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_model_options(parser: argparse.ArgumentParser, dtype: bool = True, quiet: bool = True) -> None:
    """`--model` (required), `--device`, and unless switched off `--dtype` and `--quiet`."""
    parser.add_argument("--model", required=True, help="local diffusers folder or Hub id of the base model")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    if dtype:
        parser.add_argument("--dtype", choices=list(DTYPES),
                            help="the model's weights (default: float16 on CUDA, float32 on CPU)")
    if quiet:
        add_quiet_option(parser)


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, in one line, before any model is loaded."""
    if device is None or device == "cpu":
        return
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             f"False); use --device cpu")
        index = int(device.split(":")[1]) if ":" in device and device.split(":")[1].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple MPS is not available here; use --device cpu")


def silence_libraries() -> None:
    """`--quiet`: no loading bars or info logs from diffusers, transformers and huggingface_hub."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - older huggingface_hub
        return
    disable_progress_bars()


def load_model(args: argparse.Namespace, model: str | None = None, dtype: str | None = None) -> Any:
    """The pipeline `--model` (or `model`) names, on `--device`, after checking both; `--quiet` silences its
    loading bars."""
    check_device(getattr(args, "device", None))
    if getattr(args, "quiet", False):
        silence_libraries()
    from ..pipelines import load_pipeline

    return load_pipeline(model or args.model, getattr(args, "device", None),
                         dtype if dtype is not None else getattr(args, "dtype", None))


def concept_list(values: Sequence[str] | None) -> list[str]:
    """Repeated flags; a value without `=` may also list several names separated by commas."""
    result = []
    for value in values or []:
        result.extend(v.strip() for v in value.split(",") if v.strip()) if "=" not in value else result.append(value)
    return result
