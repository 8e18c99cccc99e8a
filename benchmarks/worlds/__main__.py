"""`python -m benchmarks.worlds build --seed N [--out DIR] [--quick]` (see `build.py`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from . import world_dir
from .build import QUICK, BuildSettings, build_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worlds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build one world from its seed")
    b.add_argument("--seed", type=int, required=True)
    b.add_argument("--out", default=None, help="folder (default: $SEPME_WORLDS_DIR/<seed>)")
    b.add_argument("--quick", action="store_true", help="tiny steps (tests); the quality gate is reported, not enforced")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a BuildSettings field (experiments; the zoo's worlds use the defaults)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else BuildSettings()
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in BuildSettings.__dataclass_fields__:
            parser.error(f"--set {item}: {key!r} is not a BuildSettings field")
        settings = replace(settings, **{key: type(getattr(settings, key))(value)})
    out = args.out or world_dir(args.seed, quick=args.quick)
    report = build_world(args.seed, out, settings)
    gate = report["quality_gate"]
    print(json.dumps({k: report[k] for k in ("seed", "timings", "build_cpu_s", "total_cpu_s",
                                               "classifier_held_out_accuracy", "passed")}, indent=2))
    print(f"world {args.seed} -> {out}: build {report['build_cpu_s']} CPU s (+ gate "
          f"{report['timings']['quality_gate']['cpu_s']} s), gate worst {gate['worst']:.2f} "
          f"(>= {gate['min_accuracy']}) {'PASSED' if report['passed'] else 'FAILED'}")
    if not report["passed"] and settings.enforce_gate:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
