"""Build worlds (see `build.py`).

    python -m benchmarks.worlds build --seed N [--out DIR] [--quick]   # one world
    python -m benchmarks.worlds zoo [--seeds 12,13] [--jobs 2]         # every ZOO world, built or reused

`zoo` exits non-zero when a world fails its quality gate (a `--quick` build's gate is reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from . import ZOO, ensure_built, world_dir
from .build import QUICK, BuildSettings, build_world


def zoo(seeds: list[int], quick: bool = False, jobs: int = 1) -> int:
    """Build (or reuse) each world in its cache folder, `jobs` at a time (one thread each); print one line per
    world with its role, gate and build time; 1 if any world failed to build or failed its gate."""
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> tuple[int, str | None]:
        try:
            ensure_built(seed, quick=quick)
            return seed, None
        except RuntimeError as error:
            return seed, str(error)

    with ThreadPoolExecutor(max(1, jobs)) as pool:  # each build is its own subprocess
        outcomes = dict(pool.map(one, seeds))
    failed = 0
    print("| world | role | gate worst (>= min) | passed | build CPU s |\n|---|---|---|---|---|")
    for seed in seeds:
        recipe_path = world_dir(seed, quick) / "recipe.json"
        role = ZOO.get(seed, "unlisted") + ("-quick" if quick else "")
        if not recipe_path.exists():  # the build itself failed (its output is above)
            failed += 1
            print(f"| {seed} | {role} | - | build failed: {outcomes[seed]} | - |")
            continue
        recipe = json.loads(recipe_path.read_text())
        gate = recipe["quality_gate"]
        passed = bool(recipe["passed"])
        failed += not passed and not quick
        verdict = ("yes" if passed else "no") + (" (not enforced: --quick)" if quick and not passed else "")
        print(f"| {seed} | {role} | {gate['worst']:.2f} (>= {gate['min_accuracy']}) | {verdict} | "
              f"{recipe['build_cpu_s']} |")
    print(f"ZOO worlds={len(seeds)} failed={failed}")
    return 1 if failed else 0


def with_overrides(settings: BuildSettings, items: list[str]) -> BuildSettings:
    """`settings` with each `KEY=VALUE` of `--set` applied (a bool takes true / false / 1 / 0); ValueError names
    the bad item."""
    for item in items:
        key, _, value = item.partition("=")
        if key not in BuildSettings.__dataclass_fields__:
            raise ValueError(f"--set {item}: {key!r} is not a BuildSettings field")
        kind = type(getattr(settings, key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {item}: {key} takes true or false")
            parsed = value.lower() in ("true", "1")
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise ValueError(f"--set {item}: {key} takes a {kind.__name__}") from None
        settings = replace(settings, **{key: parsed})
    return settings


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
    z = sub.add_parser("zoo", help="build (or reuse) every ZOO world and check its quality gate")
    z.add_argument("--seeds", default=None, help="comma-separated seeds (default: every ZOO world)")
    z.add_argument("--quick", action="store_true", help="tiny builds (tests); gates reported, not enforced")
    z.add_argument("--jobs", type=int, default=1, help="worlds built at once, one CPU thread each")
    args = parser.parse_args(argv)
    if args.command == "zoo":
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(ZOO)
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 12,13")
        return zoo(seeds, quick=args.quick, jobs=args.jobs)
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else BuildSettings()
    try:
        settings = with_overrides(settings, args.set)
    except ValueError as error:
        parser.error(str(error))
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
