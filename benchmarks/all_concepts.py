"""All eight demo concepts erased together with the library defaults.

Each of the eight demo concepts (four objects, four styles) is given as its four phrasings and all
eight erasers train together (simultaneous mode: each basis excludes the other seven's 28 prompts,
which the 96-wide demo text space cannot hold exactly, so the bases are compact). Measured: each
eraser alone (its concept's four prompts, and the other seven), and the four style erasers together
(the objects must stay), with the leakage certificate of every eraser.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/all_concepts.py --seeds 5 --out /tmp/all-concepts
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/all_concepts.py --smoke   # 2 concepts, a few iterations: checks it runs
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import sepme_adapter
from sepme_adapter import demo
from sepme_adapter.demo.job import DEMO_TRAINING, GUIDANCE, STEPS, phrasings
from sepme_adapter.evaluation import EvalConcept, evaluate, image_metric, markdown_table, write_results
from sepme_adapter.training import Concept, train_erasers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="all-concepts")
    parser.add_argument("--smoke", action="store_true",
                        help="2 concepts, 3 iterations, 1 seed, 2 steps, output in a temporary folder: checks the script runs")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sepme-all-concepts-") if args.smoke else args.out)
    config, steps = DEMO_TRAINING, STEPS
    if args.smoke:
        config, steps, args.seeds = replace(config, max_iterations=3, images_per_concept=1, reference_steps=2), 2, 1
    pipe = sepme_adapter.attach(demo.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    names = list(demo.CONCEPTS)[:2] if args.smoke else list(demo.CONCEPTS)
    concepts = [Concept(n, prompts=tuple(phrasings(n, (0, 1, 2, 3)))) for n in names]
    erasers = train_erasers(pipe, concepts, config=config, cache_dir=out / "reference", progress=False)
    for eraser in erasers:
        pipe.load_sepme(eraser, erase=False)
        basis = eraser.metadata["basis"]
        print(f"{eraser.name}: basis {basis['kind']} ({basis['dimensions']} dims, energy bound "
              f"{basis['energy_bound']:.1e}), certificate {eraser.certificate:.2e}, "
              f"iterations {eraser.metadata['stats']['iterations']}")
    styles = [n for n in names if demo.CONCEPTS[n].family == "style"]
    measured = [EvalConcept(n, list(c.prompts), [], list(range(args.seeds))) for n, c in zip(names, concepts)]
    results = evaluate(pipe, measured, demo.demo_classifier(), [[n] for n in names] + [styles], steps=steps,
                       guidance_scale=GUIDANCE, metric=image_metric(), progress=False, batch_size=40)
    results["certificates"] = {e.name: e.certificate for e in erasers}
    write_results(results, out)
    print(markdown_table(results))
    print(f"RESULT max_certificate={max(e.certificate for e in erasers):.2e}")


if __name__ == "__main__":
    main()
