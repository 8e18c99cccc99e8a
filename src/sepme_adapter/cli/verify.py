"""For each eraser and modified layer: the leakage of the blank, known and protected prompts (should be ~0, Eq.
7) and the change of the concept's own keys and values (should be clearly > 0). Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .options import add_model_options, load_model

MIN_EFFECT = 1e-3  # = verify.MIN_EFFECT (a test checks); here so that `--help` needs no torch
LEGEND = (
    "leak: the largest change of a kept prompt's (blank, known, protected) keys / values, relative to the change "
    "of the concept's own, per layer; ~0 for an exact null-space basis (Eq. 7).\n"
    "certificate: the largest change of a kept prompt's keys / values relative to their own size, measured now on "
    "this model (a compact basis trades a small, bounded one for reach; the file stores the bound it promises).\n"
    "concept change: how much the eraser changes its concept's keys / values, relative to their size.\n"
    "collateral: the largest change of a held-out unlisted prompt's keys / values relative to their own size."
)


def register(parser: argparse.ArgumentParser, argv: Any = ()) -> None:
    parser.set_defaults(func=run)
    parser.epilog = LEGEND
    add_model_options(parser, dtype=False)
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
    parser.add_argument("--max-collateral", type=float, default=None,
                        help="fail an eraser whose re-measured collateral certificate (the largest relative change "
                             "of any attn2 key / value over the held-out unlisted prompts stored in its file) "
                             "exceeds this (default: report it only)")


def _print_reports(reports: list[dict[str, Any]], fused_report: dict[str, Any] | None, verbose: bool) -> None:
    print(LEGEND + "\n")
    for report in reports:
        status = "ok" if report["ok"] else "FAIL: " + "; ".join(report["problems"])
        certificate = "-" if report["certificate"] is None else f"{report['certificate']:.2e}"
        stored = report.get("stored_certificate")
        promised = "" if stored is None else f" (file promises <= {stored:.2e})"
        leak = f"{report['worst_leak']:.2e}" if report.get("separable", True) else "- (dense: not separable)"
        collateral = "" if report.get("collateral_max") is None else f"  collateral {report['collateral_max']:.2e}"
        print(f"{report['name']}  ({report['file']})\n    leak {leak}  certificate {certificate}{promised}  "
              f"concept change {report['concept_change']:.2e}{collateral}  {status}")
        if verbose:
            for layer, entry in report["layers"].items():
                print(f"    {layer}: " + ", ".join(f"{k} {v:.2e}" for k, v in entry.items()))
    if fused_report is not None:
        print(f"fused model  ({fused_report['file']})\n    worst relative error "
              f"{fused_report['worst_relative_error']:.2e}  "
              f"{'ok' if fused_report['ok'] else 'FAIL: weights are not base + increments'}")


def run(args: argparse.Namespace) -> int:
    from ..eraser import Eraser
    from ..files import resolve_eraser_files
    from ..verify import verify_eraser, verify_fused

    pipe = load_model(args, dtype="float32")
    paths = [Path(p) for source in args.erasers for p in resolve_eraser_files(source)]
    reports = []
    for path in paths:
        report = verify_eraser(pipe, Eraser.load(path), min_effect=args.min_effect, max_leakage=args.max_leakage,
                               max_collateral=args.max_collateral)
        reports.append({**report, "file": str(path)})
    fused_report = None
    if args.fused_model:
        erasers = [Eraser.load(path) for path in paths]
        fused = load_model(args, model=args.fused_model, dtype="float32")
        fused_report = {**verify_fused(pipe, fused, erasers), "file": args.fused_model}
    _print_reports(reports, fused_report, args.verbose)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"erasers": reports, "fused": fused_report}, stream, indent=2)
        print(f"written: {args.json}")
    ok = all(r["ok"] for r in reports) and (fused_report is None or fused_report["ok"])
    return 0 if ok else 1
