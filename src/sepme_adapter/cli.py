"""The `sepme` command. Each job's module registers its own subcommand (`register_cli`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import SepMEError

# module -> it defines `register_cli(subparsers)`; each added parser sets `func(args) -> int`
COMMAND_MODULES = ["training", "evaluation", "style_classifier", "verify", "hub", "demo.job"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sepme", description="Separable, reversible concept erasure (SepME) for Stable Diffusion."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"sepme_adapter.{name}").register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SepMEError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"sepme {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
