"""Train erasers for three demo styles, then measure every subset of them (accuracy and LPIPS, like the paper's
Tables 3-4) on the training prompts, held-out paraphrases and compositions; offline, minutes on a CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..demo.job import BATCH_SIZE, run_demo
from .options import add_generation_options, add_quiet_option, new_command


def register(subparsers: Any) -> None:
    parser = new_command(subparsers, "demo", __doc__, run,
                         help="erase, restore and measure on the built-in demo world")
    parser.add_argument("--out", "-o", default="sepme-demo", help="output folder (default ./sepme-demo)")
    parser.add_argument("--quick", action="store_true", help="a shorter run (used by the tests)")
    parser.add_argument("--seeds", type=int, help="seeds per prompt (default 10, quick 4)")
    add_generation_options(parser, BATCH_SIZE)
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, args.quick, args.seeds, not args.quiet, threads=args.threads, batch_size=args.batch_size)
    return 0
