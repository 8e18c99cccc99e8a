"""For each eraser and modified layer: the leakage of the blank, known and protected prompts (should be ~0, Eq.
7) and the change of the concept's own keys and values (should be clearly > 0). Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..eraser import Eraser
from ..files import resolve_eraser_files
from ..pipelines import load_pipeline
from ..verify import MIN_EFFECT, verify_eraser, verify_fused
from .options import add_model_options, new_command


def register(subparsers: Any) -> None:
    parser = new_command(subparsers, "verify", __doc__, run,
                         help="check erasers act on their concept and leak nowhere else")
    add_model_options(parser, dtype=False, quiet=False)
    parser.add_argument("--erasers", nargs="+", required=True, help="eraser files or folders")
    parser.add_argument("--fused-model", help="a saved model that should equal base + the erasers' increments")
    parser.add_argument("--json", help="also write the full per-layer report here")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every layer")
    parser.add_argument("--min-effect", type=float, default=MIN_EFFECT,
                        help=f"fail an eraser whose relative change of its concept's keys / values is below this "
                             f"(default {MIN_EFFECT:g}: below half-precision round-off)")
    parser.add_argument("--max-leakage", type=float, default=None,
                        help="fail an eraser whose re-measured leakage certificate (the largest relative change of "
                             "any attn2 key / value over its known, protected and blank prompts) exceeds this "
                             "(default: only check that the file's own certificate holds)")


def _print_reports(reports: list[dict[str, Any]], fused_report: dict[str, Any] | None, verbose: bool) -> None:
    for report in reports:
        status = "ok" if report["ok"] else "FAIL: " + "; ".join(report["problems"])
        certificate = "-" if report["certificate"] is None else f"{report['certificate']:.2e}"
        print(f"{report['name']:>20}  leak {report['worst_leak']:.2e}  certificate {certificate}  concept change "
              f"{report['concept_change']:.2e}  {status}")
        if verbose:
            for layer, entry in report["layers"].items():
                print(f"    {layer}: " + ", ".join(f"{k} {v:.2e}" for k, v in entry.items()))
    if fused_report is not None:
        print(f"{'fused model':>20}  worst relative error {fused_report['worst_relative_error']:.2e}  "
              f"{'ok' if fused_report['ok'] else 'FAIL: weights are not base + increments'}")


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model, args.device, "float32")
    erasers = [Eraser.load(p) for source in args.erasers for p in resolve_eraser_files(source)]
    reports = [verify_eraser(pipe, e, min_effect=args.min_effect, max_leakage=args.max_leakage) for e in erasers]
    fused_report = None
    if args.fused_model:
        fused_report = verify_fused(pipe, load_pipeline(args.fused_model, args.device, "float32"), erasers)
    _print_reports(reports, fused_report, args.verbose)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"erasers": reports, "fused": fused_report}, stream, indent=2)
    ok = all(r["ok"] for r in reports) and (fused_report is None or fused_report["ok"])
    return 0 if ok else 1
