"""The `sepme` command: the only place that parses arguments.

Each command is a small module with `register(parser, argv)`, which adds its arguments and sets
`func(args) -> int`; the command calls the library and prints. `COMMANDS` lists them in the order
`sepme --help` shows them. Only the command being run is imported (its module imports torch and diffusers
when it runs), so `sepme --help` answers at once.

Every failure a user can cause ends in one line, `sepme COMMAND: error: ...`, and a non-zero exit status;
`--debug` (or `SEPME_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

# name -> (module, one-line help); the modules are imported only when their command is run or asked for help
COMMANDS: dict[str, tuple[str, str]] = {
    "erase": ("erase", "train one eraser per concept (SepME / G-CiRs / ESD / ablation / FMN / UCE)"),
    "eval": ("evaluate", "paper-style accuracy / image-distance / ||dtheta||_p tables"),
    "attack": ("attack", "adversarial prompts against erasers (UnlearnDiffAtk-style): attack success rate"),
    "train-classifier": ("train_classifier", "fit the paper's ResNet18-head style classifier"),
    "verify": ("verify", "check erasers act on their concept and leak nowhere else"),
    "push": ("push", "upload eraser files, LoRA exports and a model card to a Hugging Face Hub repo"),
    "export-lora": ("export_lora", "write erasers as standard LoRA files (diffusers, ComfyUI, Automatic1111)"),
    "demo": ("demo", "erase, restore and measure on the built-in demo world"),
    "app": ("app", "a web page (Gradio) on 127.0.0.1 to toggle erasers live and compare images"),
}
DEBUG_HELP = "on an error, show the full traceback (also: SEPME_DEBUG=1)"


def command_module(name: str):  # noqa: ANN201 - a module
    return importlib.import_module(f".{COMMANDS[name][0]}", __name__)


def build_parser(argv: Sequence[str] | None = None, commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `sepme` parser. `commands`: the subcommands given their full arguments (default: all); the others
    get a bare parser, enough for `sepme --help`. `argv` lets a command adapt its help (`erase --method`)."""
    parser = argparse.ArgumentParser(
        prog="sepme", description="Separable, reversible concept erasure (SepME) for Stable Diffusion.",
        epilog="`sepme COMMAND --help` describes a command.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help) in COMMANDS.items():
        if commands is not None and name not in commands:
            subparsers.add_parser(name, help=help, add_help=False)
            continue
        module = command_module(name)
        sub = subparsers.add_parser(name, help=help, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(command_parser=sub)
        module.register(sub, list(argv or ()))
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _command_name(argv: Sequence[str]) -> str | None:
    """The first argument that names a command (options before it belong to `sepme` itself)."""
    for value in argv:
        if value in COMMANDS:
            return value
        if not value.startswith("-"):
            return None
    return None


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("SEPME_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `sepme ARGV`; returns the exit status (2 for bad input, 1 for other failures)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "torch" not in sys.modules:  # a busy machine: spin-waiting OpenMP threads slow every step (README)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    name = _command_name(argv)
    parser = build_parser(argv, commands=[name] if name else [])
    args, extra = parser.parse_known_args(argv) if argv else (argparse.Namespace(command=None), [])
    if args.command is None:  # bare `sepme` (or only `--debug`): usage, and the status of a usage error
        parser.print_usage(sys.stderr)
        print("sepme: error: give a COMMAND (`sepme --help` lists them)", file=sys.stderr)
        return 2
    if extra:  # report it with the command's own usage, not the top-level one
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .errors import describe_error  # after parsing: it may import the library's exceptions

    formatwarning = warnings.formatwarning
    if not debug_requested(args):  # the library's warnings as one line each, like the command's own
        warnings.formatwarning = lambda message, category, *rest, **kwargs: (
            f"sepme {args.command}: warning: {message}\n")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"sepme {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback on request
        if debug_requested(args):
            traceback.print_exc()
        message, status = describe_error(error, args)
        hint = "" if debug_requested(args) else " (--debug shows the traceback)" if status == 1 else ""
        print(f"sepme {args.command}: error: {message}{hint}", file=sys.stderr)
        return status
    finally:
        warnings.formatwarning = formatwarning


__all__ = ["COMMANDS", "build_parser", "main"]
