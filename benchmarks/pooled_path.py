"""How much of a concept reaches the SDXL demo world's images through the pooled path alone.

SDXL conditions its UNet on the prompt twice: the per-token embeddings every `attn2` reads, and the
pooled embedding (the second encoder's projected end-of-text token) that `add_embedding` adds to the
timestep embedding. SepME's `attn2` increments change only the first. This script generates each demo
concept's canonical prompt on the SDXL demo world (`demo.load_pipeline("sdxl")`, the sampler `sepme
demo` uses) with the two paths split apart, and measures the demo classifier's accuracy:

- `both`: the prompt on both paths (the original model);
- `tokens only`: the prompt's token embeddings, the blank prompt's pooled embedding;
- `pooled only`: the blank prompt's token embeddings, the prompt's pooled embedding;
- `neither`: the blank prompt on both paths (chance level for the concept).

A concept whose `pooled only` accuracy is well above `neither` can survive an `attn2`-only eraser.
The unconditional branch is SDXL's zeros (`force_zeros_for_empty_prompt`) throughout.

With `--erase NAME ...` it then trains erasers for those concepts as `sepme demo` does (simultaneous mode, the
demo's training phrasings, the library defaults) twice, with and without the pooled increment, and measures each
erased alone: ACC on its exact prompts and on its held-out phrasing, and the other concepts' exact-prompt ACC
relative to the original model. `--pipeline` measures another build of the world, e.g. the stress-test build
whose pooled path carries the objects (`python -m sepme_adapter.demo.build --model sdxl --sdxl-token-dropout 0.3`).

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/pooled_path.py --seeds 10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pooled_path.py --smoke   # 2 concepts, 1 seed: checks it runs
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/pooled_path.py \
        --pipeline WORLD/sdxl/pipeline --erase circle square triangle

The last lines are `RESULT pooled_only=<mean over concepts> tokens_only=... both=... neither=...` and, with
`--erase`, `RESULT erase attn2_only=<exact>/<held-out>/<others> with_pooled=<exact>/<held-out>/<others>` (means
over the erased concepts).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch
from diffusers import StableDiffusionXLPipeline

from sepme_adapter.demo import CONCEPTS, demo_classifier, load_pipeline
from sepme_adapter.demo.job import DEMO_TRAINING, GUIDANCE, STEPS, TRAIN_TEMPLATES, demo_concepts, phrasings
from sepme_adapter.evaluation import evaluate
from sepme_adapter.loader import attach
from sepme_adapter.text import encode_prompts_pooled
from sepme_adapter.training import Concept, train_erasers

CONDITIONS = ("both", "tokens only", "pooled only", "neither")


def accuracies(pipe, classify, prompt: str, name: str, seeds: list[int], steps: int = STEPS) -> dict[str, float]:
    """Classifier accuracy on `name` for each way of splitting `prompt` across the two paths."""
    (tokens, blank_tokens), (pooled, blank_pooled) = (x.split(1) for x in encode_prompts_pooled(pipe, [prompt, ""]))
    inputs = {"both": (tokens, pooled), "tokens only": (tokens, blank_pooled),
              "pooled only": (blank_tokens, pooled), "neither": (blank_tokens, blank_pooled)}
    result = {}
    for condition, (text, pooled_text) in inputs.items():
        n = len(seeds)
        images = pipe(prompt_embeds=text.expand(n, -1, -1), pooled_prompt_embeds=pooled_text.expand(n, -1),
                      num_inference_steps=steps, guidance_scale=GUIDANCE,
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        result[condition] = statistics.mean(classify(name, images))
    return result


def erase_and_measure(pipe, classify, names: list[str], pooled_increment: bool, seeds: int) -> dict[str, float]:
    """Train erasers for `names` (with or without the pooled increment), erase each alone, and average over them:
    exact-prompt ACC, held-out ACC, and the other concepts' exact ACC relative to the original model."""
    concepts = [Concept(n, prompts=tuple(phrasings(n, TRAIN_TEMPLATES))) for n in names]
    config = replace(DEMO_TRAINING, pooled_increment=pooled_increment)
    erasers = train_erasers(pipe, concepts, mode="simultaneous", config=config, progress=False)
    for eraser in erasers:
        pipe.load_sepme(eraser, erase=False)
    kept = [n for n in CONCEPTS if n not in names]
    results = evaluate(pipe, demo_concepts(names, kept, seeds, combined=()), classify, [[n] for n in names],
                       steps=STEPS, guidance_scale=GUIDANCE, progress=False, batch_size=40)
    pipe.unload_sepme()
    summaries = [s["summary"] for s in results["subsets"]]
    return {"exact": statistics.mean(s["erased_exact"] for s in summaries),
            "held_out": statistics.mean(s["erased_held_out"] for s in summaries),
            "others": statistics.mean(s["others_exact_ratio"] for s in summaries),
            "pooled_increments": sum(e.has_pooled for e in erasers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="images per concept and condition")
    parser.add_argument("--pipeline", help="another build of the SDXL demo world (its pipeline folder)")
    parser.add_argument("--erase", nargs="+", choices=list(CONCEPTS), help="also erase these, with and without "
                        "the pooled increment, and compare")
    parser.add_argument("--smoke", action="store_true", help="2 concepts, 1 seed, 2 steps: checks the script runs")
    args = parser.parse_args()
    steps, concepts = (2, dict(list(CONCEPTS.items())[:2])) if args.smoke else (STEPS, CONCEPTS)
    args.seeds = 1 if args.smoke else args.seeds
    pipe = load_pipeline("sdxl") if args.pipeline is None else StableDiffusionXLPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    classify = demo_classifier()
    seeds = list(range(args.seeds))
    print(f"torch threads: {torch.get_num_threads()}; {args.seeds} seeds, {steps} DDIM steps, guidance {GUIDANCE}")
    print("| concept | " + " | ".join(CONDITIONS) + " |")
    print("|---" * (len(CONDITIONS) + 1) + "|")
    table = {}
    for name, concept in concepts.items():
        table[name] = accuracies(pipe, classify, concept.prompt, name, seeds, steps)
        print(f"| {name} | " + " | ".join(f"{table[name][c]:.2f}" for c in CONDITIONS) + " |", flush=True)
    means = {c: statistics.mean(row[c] for row in table.values()) for c in CONDITIONS}
    styles = [n for n, c in concepts.items() if c.family == "style"]
    if styles:
        print(f"styles, pooled only: {statistics.mean(table[n]['pooled only'] for n in styles):.2f}")
    print("RESULT " + " ".join(f"{c.replace(' only', '_only')}={means[c]:.2f}" for c in CONDITIONS))
    if not args.erase:
        return
    pipe = attach(pipe)
    measured = {label: erase_and_measure(pipe, classify, args.erase, pooled, args.seeds)
                for label, pooled in (("attn2_only", False), ("with_pooled", True))}
    print(f"erasing {', '.join(args.erase)} one at a time ({args.seeds} seeds): exact ACC / held-out ACC / "
          f"others (x original)")
    for label, row in measured.items():
        print(f"  {label}: {row['exact']:.2f} / {row['held_out']:.2f} / {row['others']:.2f} "
              f"({row['pooled_increments']} erasers with a pooled increment)")
    print("RESULT erase " + " ".join(f"{label}={r['exact']:.2f}/{r['held_out']:.2f}/{r['others']:.2f}"
                                     for label, r in measured.items()))


if __name__ == "__main__":
    main()
