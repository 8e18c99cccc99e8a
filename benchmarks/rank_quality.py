"""Erasure quality vs rank on the demo world: rank 1, 4, 16 and full, with the library defaults.

For each rank, trains the demo's three erasers (`demo.job.ERASED`, simultaneous mode, each knowing the
others) with `TrainConfig()` (only `rank` changed; `--demo-settings` uses the demo job's `DEMO_TRAINING`
instead), loads them, and measures with the demo classifier through `evaluation.evaluate`, one erased
concept at a time:

- `exact`: accuracy on the erased concept's exact prompt (lower is better);
- `paraphrase`: accuracy on its held-out paraphrases (lower is better);
- `other`: mean accuracy of every other demo concept on its exact prompt while it is erased (higher is
  better; the original model's figure is printed alongside).

Each figure is averaged over the three erased concepts. The smallest rank within 0.05 of full rank on
every column is reported as the candidate default.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rank_quality.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rank_quality.py --ranks 4 full --seeds 4 --max-iterations 50
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rank_quality.py --smoke   # rank 4, a few iterations: checks it runs

The last line is `RESULT rank1=exact/paraphrase/other rank4=... rank16=... full=... default=<rank>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from sepme_adapter.demo import CONCEPTS, demo_classifier, load_pipeline
from sepme_adapter.demo.job import DEMO_TRAINING, ERASED, GUIDANCE, KEPT, STEPS
from sepme_adapter.evaluation import EvalConcept, evaluate
from sepme_adapter.hub import file_size
from sepme_adapter.loader import attach
from sepme_adapter.training import TrainConfig, train_erasers

COLUMNS = ("exact", "paraphrase", "other")


def measure(pipe, rank: int | None, config: TrainConfig, seeds: int, cache: str, steps: int = STEPS
            ) -> dict[str, float]:
    """Train at `rank`, load the erasers, and return the three columns averaged over the erased concepts."""
    erasers = train_erasers(pipe, [f"{n}={CONCEPTS[n].prompt}" for n in ERASED], mode="simultaneous",
                            config=replace(config, rank=rank), cache_dir=cache, progress=False)
    for eraser in erasers:
        pipe.load_sepme(eraser, erase=False)
    try:
        concepts = [EvalConcept(n, [CONCEPTS[n].prompt], list(CONCEPTS[n].paraphrases[:1]) if n in ERASED else [],
                                list(range(seeds))) for n in (*ERASED, *KEPT)]
        results = evaluate(pipe, concepts, demo_classifier(), [[n] for n in ERASED], steps=steps,
                           guidance_scale=GUIDANCE, progress=False)
    finally:
        pipe.unload_sepme()
    rows = {"exact": [], "paraphrase": [], "other": []}
    for entry in results["subsets"]:
        (name,) = entry["erased"]
        rows["exact"].append(entry["accuracy"][name])
        rows["paraphrase"].append(entry["paraphrase_accuracy"][name])
        rows["other"].append(statistics.mean(v for c, v in entry["accuracy"].items() if c != name))
    figures = {column: statistics.mean(values) for column, values in rows.items()}
    figures["original_other"] = statistics.mean(results["original"]["accuracy"].values())
    figures["file_kb"] = statistics.mean(file_size(e) / 1e3 for e in erasers)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", nargs="+", default=["1", "4", "16", "full"], help="ranks (default 1 4 16 full)")
    parser.add_argument("--seeds", type=int, default=10, help="images per prompt (default 10)")
    parser.add_argument("--max-iterations", type=int, help="override TrainConfig.max_iterations")
    parser.add_argument("--demo-settings", action="store_true", help="train with demo.job.DEMO_TRAINING")
    parser.add_argument("--smoke", action="store_true", help="rank 4 only, 3 iterations, 1 seed, 2 steps: checks "
                        "the script runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = DEMO_TRAINING if args.demo_settings else TrainConfig()
    if args.max_iterations:
        config = replace(config, max_iterations=args.max_iterations)
    steps = STEPS
    if args.smoke:
        config, steps, args.seeds, args.ranks = (replace(config, max_iterations=3, images_per_concept=1, reference_steps=2),
                                                 2, 1, ["4"])
    pipe = attach(load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sepme-rank-") as cache:
        for label in args.ranks:
            started = time.monotonic()
            table[label] = measure(pipe, None if label == "full" else int(label), config, args.seeds, cache, steps)
            row = table[label]
            print(f"rank {label:>4}: exact {row['exact']:.2f}  paraphrase {row['paraphrase']:.2f}  other "
                  f"{row['other']:.2f} (original {row['original_other']:.2f})  file {row['file_kb']:.0f} kB  "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    default = "full"
    if "full" in table:
        for label in (r for r in args.ranks if r != "full"):
            if all(abs(table[label][c] - table["full"][c]) <= 0.05 for c in COLUMNS):
                default = label
                break
    cells = " ".join(f"rank{k}={'/'.join(f'{v[c]:.2f}' for c in COLUMNS)}" if k != "full"
                     else f"full={'/'.join(f'{v[c]:.2f}' for c in COLUMNS)}" for k, v in table.items())
    print(f"RESULT {cells} default={default}")


if __name__ == "__main__":
    main()
