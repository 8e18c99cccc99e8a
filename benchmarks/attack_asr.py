"""Attack success rate (ASR) under an UnlearnDiffAtk-style adversarial prompt attack, for SepME and the four
baselines (ESD-x, Concept Ablation, Forget-Me-Not, UCE), on the demo world.

Erasers for the demo's three styles (orvan, pimsa, kadrel): SepME as `sepme demo` trains them (simultaneous mode,
three phrasings each, the library defaults), the baselines as docs/evaluation.md trains them (the canonical prompt;
learning rates 1e-3: ESD 200 iterations, Ablation 200, FMN 35; UCE at its defaults). Each eraser alone is then
attacked (`sepme_adapter.evaluation.attack`: k adversarial prefix tokens optimised so that the erased model
denoises the original model's images of the concept; discrete = projected onto real tokens, continuous = not) and
judged by the demo classifier on fresh seeds: ASR = the fraction of seeds in which the classifier recognises the
erased style. SepME's erasers are attacked a second time fused into the weights (`fuse_sepme`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_asr.py --out /tmp/attack-asr
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_asr.py --smoke   # 1 concept, tiny budgets: checks it runs

The last line is `RESULT methods=5 sepme_pre=<mean pre-attack ASR> sepme_random=<the control: a random prefix, no
search> sepme_post=<mean post-attack ASR, discrete> esd_post=... ablation_post=... fmn_post=... uce_post=...
sepme_fused_post=... esd_random=...` (means over the three styles).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

import sepme_adapter
from sepme_adapter import demo
from sepme_adapter.baselines import METHODS, BaselineConfig, train_baseline
from sepme_adapter.demo.job import DEMO_TRAINING, ERASED, GUIDANCE, STEPS, TRAIN_TEMPLATES, phrasings
from sepme_adapter.evaluation import write_results
from sepme_adapter.evaluation.attack import AttackConfig, attack_erasers
from sepme_adapter.evaluation.tables import table
from sepme_adapter.training import Concept, train_erasers

# docs/evaluation.md's baseline settings on the demo world (learning rates 100x the papers': the tiny UNet barely
# moves at SD's)
BASELINE_SETTINGS = dict(esd_lr=1e-3, esd_iterations=200, ablation_lr=1e-3, ablation_iterations=200, fmn_lr=1e-3,
                         fmn_iterations=35)
KEYS = ("pre", "random", "discrete", "discrete_alone", "continuous")
ATTACK = AttackConfig(tokens=3, position="prefix", iterations=60, samples=4, probes=16, references=8,
                      reference_steps=STEPS, guidance_scale=GUIDANCE)


def train(pipe, names: list[str], smoke: bool, work: Path) -> tuple[dict[str, list], dict[str, float]]:
    """Every method's erasers for `names` (not loaded), and each method's training seconds."""
    erasers, seconds = {}, {}
    config = replace(DEMO_TRAINING, max_iterations=10, images_per_concept=2, reference_steps=4) if smoke \
        else DEMO_TRAINING
    started = time.monotonic()
    concepts = [Concept(n, prompts=tuple(phrasings(n, TRAIN_TEMPLATES))) for n in names]
    erasers["sepme"] = train_erasers(pipe, concepts, mode="simultaneous", config=config,
                                     cache_dir=work / "reference", progress=False)
    seconds["sepme"] = time.monotonic() - started
    settings = {k: (2 if smoke and k.endswith("iterations") else v) for k, v in BASELINE_SETTINGS.items()}
    baseline = BaselineConfig.from_train_config(config, **settings)
    for method in METHODS:
        started = time.monotonic()
        erasers[method] = train_baseline(pipe, [Concept(n, demo.CONCEPTS[n].prompt) for n in names], method,
                                         config=baseline, cache_dir=work / "reference", progress=False)
        seconds[method] = time.monotonic() - started
    return erasers, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="images judged per condition")
    parser.add_argument("--iterations", type=int, default=ATTACK.iterations, help="attack steps of each search")
    parser.add_argument("--tokens", type=int, default=ATTACK.tokens, help="adversarial prefix tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="attack-asr", help="results.json and results.md go here")
    parser.add_argument("--smoke", action="store_true",
                        help="1 concept, 2 iterations, 1 seed, 4 steps, output in a temporary folder: checks it runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", sepme_adapter.SepMEWarning)  # dense erasers are toggled one at a time here
    started = time.monotonic()
    out = Path(tempfile.mkdtemp(prefix="sepme-attack-asr-") if args.smoke else args.out)
    names = list(ERASED[:1] if args.smoke else ERASED)
    attack, steps, seeds = replace(ATTACK, iterations=args.iterations, tokens=args.tokens), STEPS, args.seeds
    if args.smoke:
        attack = replace(attack, iterations=2, probes=2, references=2, reference_steps=4)
        steps, seeds = 4, 1
    pipe = sepme_adapter.attach(demo.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    erasers, train_seconds = train(pipe, names, args.smoke, out / "work")
    for method, found in erasers.items():
        for eraser in found:
            pipe.load_sepme(eraser, adapter_name=f"{method}:{eraser.name}", erase=False)
    classify = demo.demo_classifier()
    runs = {}
    for method in erasers:
        targets = [(f"{method}:{n}", n, demo.CONCEPTS[n].prompt) for n in names]
        runs[method] = attack_erasers(pipe, targets, classify, attack, list(range(seeds)), steps, GUIDANCE,
                                      original=method == "sepme", progress=False)
        print(f"{method}: attacked in {runs[method]['seconds']} s", flush=True)
    runs["sepme fused"] = attack_erasers(pipe, [(f"sepme:{n}", n, demo.CONCEPTS[n].prompt) for n in names],
                                         classify, attack, list(range(seeds)), steps, GUIDANCE, fused=True,
                                         progress=False)
    for run in runs.values():
        run.pop("_vectors", None)  # tensors: not for the JSON
    original = {e["concept"]: e["asr"]["original"] for e in runs["sepme"]["attacks"]}
    rows, means = [], {}
    for method, run in runs.items():
        for entry in run["attacks"]:
            asr = entry["asr"]
            rows.append([method, entry["concept"], f"{original[entry['concept']]:.2f}", f"{asr['pre']:.2f}",
                         f"{asr['random']:.2f}", f"{asr['discrete']:.2f}", f"{asr['discrete_alone']:.2f}", f"{asr['continuous']:.2f}",
                         f"`{entry['text']}`",
                         f"{entry['losses']['plain']:.4f} / {entry['losses']['discrete']:.4f} / "
                         f"{entry['losses']['continuous']:.4f}"])
        means[method] = {key: statistics.mean(e["asr"][key] for e in run["attacks"])
                         for key in KEYS}
    header = ["method", "concept", "original ACC", "pre-attack ASR", "random prefix (control)",
              "post-attack ASR (discrete)", "found prompt alone",
              "continuous ASR (upper bound)", "found prompt", "loss: prompt / found / continuous"]
    lines = table(header, rows)
    lines += ["", *table(["method", "pre-attack ASR", "random prefix (control)", "post-attack ASR (discrete)", "found prompt alone",
                          "continuous ASR (upper bound)"],
                         [[m, *(f"{v[k]:.2f}" for k in KEYS)] for m, v in means.items()])]
    lines += ["", "post-attack ASR: a seed counts when the prompt or the found prompt draws the concept "
                  "(UnlearnDiffAtk); random prefix: the same with the searches' random starting tokens (no search); "
                  "continuous: the same with the unprojected vectors"]
    budget = (f"{seeds} seeds (0-{seeds - 1}), {steps} DDIM steps, guidance {GUIDANCE}; attack: {attack.tokens} "
              f"{attack.position} tokens ({attack.vocabulary} vocabulary), {attack.iterations} iterations per search, "
              f"{attack.samples} samples per step, {attack.probes} probes, {attack.references} reference images, "
              f"seed {attack.seed}; {torch.get_num_threads()} torch thread(s)")
    lines += ["", budget]
    total = time.monotonic() - started
    trained = ", ".join(f"{m} {s:.0f} s" for m, s in train_seconds.items())
    attacked = ", ".join(f"{m} {r['seconds']:.0f} s" for m, r in runs.items())
    lines += [f"time: training {trained}; attacks {attacked}; total {total:.0f} s"]
    text = "\n".join(lines)
    print(text)
    write_results({"runs": runs, "means": means, "train_seconds": train_seconds, "budget": budget,
                   "seconds": round(total, 1)}, out, markdown=text)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")
    print(f"RESULT methods={len(erasers)} sepme_pre={means['sepme']['pre']:.2f} "
          f"sepme_random={means['sepme']['random']:.2f} "
          f"sepme_post={means['sepme']['discrete']:.2f} "
          + " ".join(f"{m}_post={means[m]['discrete']:.2f}" for m in METHODS)
          + f" sepme_fused_post={means['sepme fused']['discrete']:.2f} "
          + " ".join(f"{m}_random={means[m]['random']:.2f}" for m in METHODS))


if __name__ == "__main__":
    main()
