"""The `sepme` command: the only place that parses arguments.

Each command is a small module with `register(subparsers)`, which adds its parser and sets
`func(args) -> int`; the command calls the library and prints. Commands are registered by the
explicit imports below, in the order `sepme --help` lists them.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import SepMEError
from . import demo, erase, evaluate, export_lora, push, train_classifier, verify

COMMANDS = (erase, evaluate, train_classifier, verify, push, export_lora, demo)


def build_parser() -> argparse.ArgumentParser:
    """The `sepme` parser with every command's subparser."""
    parser = argparse.ArgumentParser(
        prog="sepme", description="Separable, reversible concept erasure (SepME) for Stable Diffusion."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `sepme ARGV`; returns the exit status (2 with a message for bad input)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # report it with the command's own usage, not the top-level one
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SepMEError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"sepme {args.command}: error: {error}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "build_parser", "main"]
