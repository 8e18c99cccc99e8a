"""The evaluation protocol (paper Sec. 4.1, App. C-D): concepts and their prompts, the subsets of erasers
evaluated (Tables 1-5), and `evaluate`: ACC, LPIPS and exact-prompt drift for the original model and
every subset.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..loader import erasure_runtime
from .metrics import LPIPSMetric, dtheta_p, to_tensor

# classify(concept name, images) -> for each image, whether the classifier recognises the concept
Classify = Callable[[str, Sequence[Image.Image]], Sequence[bool]]


@dataclass
class EvalConcept:
    """A concept under evaluation: its exact (training) prompts and paraphrases, with seeds."""

    name: str
    prompts: list[str]
    paraphrases: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(range(10)))


def all_subsets(names: Sequence[str]) -> list[list[str]]:
    """Every non-empty subset, smallest first (the paper's restoration tables)."""
    return [list(s) for r in range(1, len(names) + 1) for s in itertools.combinations(names, r)]


def scenario_subsets(names: Sequence[str], scenario: str) -> list[list[str]]:
    """`single` (Table 1), `multi` (Table 2), `subsets` (Tables 3-5), `iterative` (SepME2 prefixes)."""
    if scenario == "single":
        return [[n] for n in names]
    if scenario == "multi":
        return [list(names)]
    if scenario == "subsets":
        return all_subsets(names)
    if scenario == "iterative":
        return [list(names[: i + 1]) for i in range(len(names))]
    raise ValueError(f"scenario must be single, multi, subsets or iterative, got {scenario!r}")


def concepts_from_csv(path: str | Path, images_per_prompt: int = 1) -> list[EvalConcept]:
    """Prompts from an ESD/SepME-style CSV (`prompt, evaluation_seed, case_number`, optional `concept`)."""
    by_concept: dict[str, EvalConcept] = {}
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with a 'prompt' column (and evaluation_seed, case_number)")
    for row in rows:
        name = row.get("concept") or row.get("artist") or row.get("class") or row["prompt"]
        concept = by_concept.setdefault(name, EvalConcept(name, [], seeds=[]))
        concept.prompts.append(row["prompt"])
        seed = int(row.get("evaluation_seed") or len(concept.seeds))
        concept.seeds.extend(seed + k for k in range(images_per_prompt) if seed + k not in concept.seeds)
    return list(by_concept.values())


TEMPLATES = ("a painting by {}", "{} style", "in the style of {}")


def default_prompt(name: str, prompts: Mapping[str, str] | None = None) -> str:
    """A concept's prompt when no eraser gives one: `prompts[name]` (e.g. the demo world's), else
    `a painting by NAME`."""
    return (prompts or {}).get(name) or TEMPLATES[0].format(name)


def concepts_from_names(names: Sequence[str], seeds: Sequence[int], templates: Sequence[str] = TEMPLATES
                        ) -> list[EvalConcept]:
    """Prompts generated from concept names: the first template is the exact one, the rest paraphrases."""
    return [EvalConcept(n, [templates[0].format(n)], [t.format(n) for t in templates[1:]], list(seeds))
            for n in names]


@torch.no_grad()
def generate(pipe: Any, prompt: str, seeds: Sequence[int], steps: int, guidance_scale: float) -> list[Image.Image]:
    """One image per seed; each image has its own generator, so it does not depend on the batch."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return pipe(prompt, num_images_per_prompt=len(generators), generator=generators,
                num_inference_steps=steps, guidance_scale=guidance_scale).images




@dataclass
class _Measurement:
    """Generates, classifies and compares the images of one evaluation run (originals kept for LPIPS)."""

    pipe: Any
    classify: Classify
    steps: int
    guidance_scale: float
    lpips: LPIPSMetric
    bar: Any
    keep_images: bool
    originals: dict[tuple[str, str], list[Image.Image]] = field(default_factory=dict)
    images: dict[str, dict[str, list[Image.Image]]] = field(default_factory=dict)

    def concept(self, concept: EvalConcept, erased: list[str], original: bool
                ) -> tuple[list[bool], list[bool], list[float], float]:
        """Hits on exact prompts and on paraphrases, LPIPS distances and the largest pixel change."""
        hits, para_hits, distances, change = [], [], [], 0.0
        for prompt in [*concept.prompts, *concept.paraphrases]:
            images = generate(self.pipe, prompt, concept.seeds, self.steps, self.guidance_scale)
            self.bar.update(len(images))
            (hits if prompt in concept.prompts else para_hits).extend(list(self.classify(concept.name, images)))
            if original:
                self.originals[(concept.name, prompt)] = images
            elif prompt in concept.prompts:
                reference = self.originals[(concept.name, prompt)]
                distances.extend(self.lpips(reference, images))
                change = max(change, float((to_tensor(reference) - to_tensor(images)).abs().max()))
            if self.keep_images and prompt == concept.prompts[0]:
                self.images.setdefault("+".join(erased) or "original", {})[concept.name] = images
        return hits, para_hits, distances, change

    def state(self, concepts: Sequence[EvalConcept], erased: list[str], original: bool) -> dict[str, Any]:
        """One row of the tables: every concept measured with `erased` erased (nothing: the original model)."""
        self.pipe.set_erased(erased)
        entry: dict[str, Any] = {"erased": erased, "accuracy": {}, "paraphrase_accuracy": {}, "lpips": {},
                                 "max_pixel_change": {}}
        for concept in concepts:
            hits, para_hits, distances, change = self.concept(concept, erased, original)
            entry["accuracy"][concept.name] = float(np.mean(hits))
            if para_hits:
                entry["paraphrase_accuracy"][concept.name] = float(np.mean(para_hits))
            if not original:
                entry["lpips"][concept.name] = float(np.mean(distances))
                entry["max_pixel_change"][concept.name] = change
        if original:
            entry.pop("lpips"), entry.pop("max_pixel_change"), entry.pop("erased")
        return entry


def evaluate(
    pipe: Any,
    concepts: Sequence[EvalConcept],
    classify: Classify,
    subsets: Sequence[Sequence[str]],
    steps: int = 25,
    guidance_scale: float = 7.5,
    lpips: LPIPSMetric | None = None,
    progress: bool = True,
    keep_images: bool = False,
) -> dict[str, Any]:
    """Accuracy, LPIPS against the original and exact-prompt drift for the original model and every subset.

    `pipe` must have the erasers loaded (`load_sepme`); the erased set is restored afterwards.
    Returns the `results.json` layout: `concepts`, `original`, `subsets` (each with `erased`,
    `accuracy`, `paraphrase_accuracy`, `lpips`, `max_pixel_change`, `dtheta_p`).
    """
    lpips = lpips or LPIPSMetric()
    before = pipe.get_erased()
    runtime = erasure_runtime(pipe)
    loaded = runtime.erasers if runtime is not None else {}
    total = sum(len(c.seeds) * (len(c.prompts) + len(c.paraphrases)) for c in concepts) * (len(subsets) + 1)
    bar = tqdm(total=total, desc="evaluating", unit="img", disable=not progress)
    disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    measure = _Measurement(pipe, classify, steps, guidance_scale, lpips, bar, keep_images)
    results: dict[str, Any] = {"concepts": [c.name for c in concepts], "erasers": list(loaded),
                               "lpips_backbone": lpips.backbone, "subsets": []}
    try:
        results["original"] = measure.state(concepts, [], original=True)
        for subset in subsets:
            entry = measure.state(concepts, list(subset), original=False)
            entry["dtheta_p"] = dtheta_p([loaded[n] for n in subset if n in loaded])
            results["subsets"].append(entry)
    finally:
        bar.close()
        pipe.set_erased(before)
        pipe.set_progress_bar_config(disable=disabled)
    if keep_images:
        results["_images"] = measure.images
    return results
