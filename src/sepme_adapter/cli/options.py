"""Options several commands share, declared once."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..pipelines import DTYPES


def new_command(subparsers: Any, name: str, description: str, run: Callable[[argparse.Namespace], int],
                help: str) -> argparse.ArgumentParser:
    """A subcommand's parser (`description`: its module's docstring); `run(args)` gets the parsed arguments."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run, command_parser=parser)
    return parser


def add_eraser_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="eraser .safetensors files")


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


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


def concept_list(values: Sequence[str] | None) -> list[str]:
    """Repeated flags; a value without `=` may also list several names separated by commas."""
    result = []
    for value in values or []:
        result.extend(v.strip() for v in value.split(",") if v.strip()) if "=" not in value else result.append(value)
    return result
