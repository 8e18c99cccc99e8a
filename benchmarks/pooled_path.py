"""How much of a concept reaches the SDXL demo world's images through the pooled path alone (issue 15).

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

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/pooled_path.py --seeds 10

The last line is `RESULT pooled_only=<mean over concepts> tokens_only=... both=... neither=...`.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sepme_adapter.demo import CONCEPTS, demo_classifier, load_pipeline
from sepme_adapter.demo.job import GUIDANCE, STEPS
from sepme_adapter.text import encode_prompts_pooled

CONDITIONS = ("both", "tokens only", "pooled only", "neither")


def accuracies(pipe, classify, prompt: str, name: str, seeds: list[int]) -> dict[str, float]:
    """Classifier accuracy on `name` for each way of splitting `prompt` across the two paths."""
    (tokens, blank_tokens), (pooled, blank_pooled) = (x.split(1) for x in encode_prompts_pooled(pipe, [prompt, ""]))
    inputs = {"both": (tokens, pooled), "tokens only": (tokens, blank_pooled),
              "pooled only": (blank_tokens, pooled), "neither": (blank_tokens, blank_pooled)}
    result = {}
    for condition, (text, pooled_text) in inputs.items():
        n = len(seeds)
        images = pipe(prompt_embeds=text.expand(n, -1, -1), pooled_prompt_embeds=pooled_text.expand(n, -1),
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        result[condition] = statistics.mean(classify(name, images))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="images per concept and condition")
    args = parser.parse_args()
    pipe = load_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    classify = demo_classifier()
    seeds = list(range(args.seeds))
    print(f"torch threads: {torch.get_num_threads()}; {args.seeds} seeds, {STEPS} DDIM steps, guidance {GUIDANCE}")
    print("| concept | " + " | ".join(CONDITIONS) + " |")
    print("|---" * (len(CONDITIONS) + 1) + "|")
    table = {}
    for name, concept in CONCEPTS.items():
        table[name] = accuracies(pipe, classify, concept.prompt, name, seeds)
        print(f"| {name} | " + " | ".join(f"{table[name][c]:.2f}" for c in CONDITIONS) + " |", flush=True)
    means = {c: statistics.mean(row[c] for row in table.values()) for c in CONDITIONS}
    styles = [n for n, c in CONCEPTS.items() if c.family == "style"]
    print(f"styles, pooled only: {statistics.mean(table[n]['pooled only'] for n in styles):.2f}")
    print("RESULT " + " ".join(f"{c.replace(' only', '_only')}={means[c]:.2f}" for c in CONDITIONS))


if __name__ == "__main__":
    main()
