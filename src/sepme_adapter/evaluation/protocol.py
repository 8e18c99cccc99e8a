"""The evaluation protocol (paper Sec. 4.1, App. C-D): concepts and their prompts, the subsets of erasers
evaluated (Tables 1-5), and `evaluate`: ACC, image distance and exact-prompt drift for the original model and
every subset.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..generation import Job, canonical_jobs, generate_batched
from ..loader import erasure_runtime
from .metrics import ImageMetric, dtheta_p, image_metric, to_tensor
from .tables import generalisation_summary

# classify(concept name, images) -> for each image, whether the classifier recognises the concept
Classify = Callable[[str, Sequence[Image.Image]], Sequence[bool]]


@dataclass
class EvalConcept:
    """A concept under evaluation, with seeds, and its prompts in three measures:

    - `prompts`: the exact prompts (those the eraser was trained on);
    - `paraphrases`: held-out phrasings, never used in training;
    - `compositions`: `(prompt, partner)` pairs, prompts that combine this concept with another one
      ("a square by pimsa": pimsa with partner square); each image is judged for this concept and
      for the partner (the other half, which erasing this concept must keep).
    """

    name: str
    prompts: list[str]
    paraphrases: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    compositions: list[tuple[str, str]] = field(default_factory=list)


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


def generate(pipe: Any, prompt: str, seeds: Sequence[int], steps: int, guidance_scale: float,
             batch_size: int = 32) -> list[Image.Image]:
    """One image per seed of one prompt with the pipeline's current erased set (`generate_batched` for many)."""
    erased = tuple(pipe.get_erased()) if hasattr(pipe, "get_erased") else ()
    return generate_batched(pipe, [Job(prompt, int(s), erased) for s in seeds], steps, guidance_scale, batch_size)


MEASURES = ("accuracy", "paraphrase_accuracy", "composition_accuracy", "composition_partner_accuracy")
"""Per state and concept: ACC on the exact prompts, on held-out paraphrases, on compositions (this
concept's half) and of the partner concept in this concept's compositions (the other half)."""


@dataclass(frozen=True)
class _Use:
    """What one generated image is measured for: a state (0: original), a concept, a measure, and the
    concept the classifier is asked about (`judge`: the concept itself, or its partner in a composition)."""

    state: int
    concept: str
    measure: str
    judge: str


def measurement_plan(concepts: Sequence[EvalConcept], states: Sequence[tuple[str, ...]]) -> dict[Job, list[_Use]]:
    """Every image of the run (state 0 first) with what it is measured for; shared prompts are one job."""
    plan: dict[Job, list[_Use]] = {}
    for index, erased in enumerate(states):
        for c in concepts:
            prompts = [(p, "accuracy", c.name) for p in c.prompts]
            prompts += [(p, "paraphrase_accuracy", c.name) for p in c.paraphrases]
            for p, partner in c.compositions:
                prompts += [(p, "composition_accuracy", c.name), (p, "composition_partner_accuracy", partner)]
            for prompt, measure, judge in prompts:
                for seed in c.seeds:
                    plan.setdefault(Job(prompt, int(seed), erased), []).append(_Use(index, c.name, measure, judge))
    return plan


@dataclass
class _Tally:
    """Accumulates hits, image distances and pixel changes window by window (the original images are kept)."""

    classify: Classify
    metric: ImageMetric
    keep: dict[str, str]  # concept -> its first exact prompt (images kept for grids)
    hits: dict[tuple[int, str, str], list[bool]] = field(default_factory=dict)
    distances: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    change: dict[tuple[int, str], float] = field(default_factory=dict)
    originals: dict[tuple[str, int], Image.Image] = field(default_factory=dict)
    kept: dict[tuple[int, str], list[Image.Image]] = field(default_factory=dict)

    def add(self, jobs: Sequence[Job], images: Sequence[Image.Image], plan: dict[Job, list[_Use]]) -> None:
        verdicts = self._judge(jobs, images, plan)
        pairs: list[tuple[int, str, Image.Image, Image.Image]] = []
        for k, (job, image) in enumerate(zip(jobs, images)):
            for use in plan[job]:
                self.hits.setdefault((use.state, use.concept, use.measure), []).append(verdicts[(k, use.judge)])
                if use.measure != "accuracy":
                    continue
                if use.state == 0:
                    self.originals[(job.prompt, job.seed)] = image
                else:
                    pairs.append((use.state, use.concept, self.originals[(job.prompt, job.seed)], image))
                if self.keep.get(use.concept) == job.prompt:
                    self.kept.setdefault((use.state, use.concept), []).append(image)
        if pairs:
            distances = self.metric([p[2] for p in pairs], [p[3] for p in pairs])
            changes = (to_tensor([p[2] for p in pairs]) - to_tensor([p[3] for p in pairs])).abs().amax(dim=(1, 2, 3))
            for (state, concept, _, _), distance, change in zip(pairs, distances, changes.tolist()):
                self.distances.setdefault((state, concept), []).append(distance)
                self.change[(state, concept)] = max(self.change.get((state, concept), 0.0), change)

    def _judge(self, jobs: Sequence[Job], images: Sequence[Image.Image], plan: dict[Job, list[_Use]]
               ) -> dict[tuple[int, str], bool]:
        """One classifier call per concept asked about, over every image of the window that needs it."""
        wanted: dict[str, list[int]] = {}
        for k, job in enumerate(jobs):
            for judge in dict.fromkeys(use.judge for use in plan[job]):
                wanted.setdefault(judge, []).append(k)
        verdicts = {}
        for judge, indices in wanted.items():
            for k, hit in zip(indices, self.classify(judge, [images[k] for k in indices])):
                verdicts[(k, judge)] = bool(hit)
        return verdicts

    def entry(self, state: int, concepts: Sequence[EvalConcept]) -> dict[str, Any]:
        """One row of the tables: every measure of every concept in one state."""
        entry: dict[str, Any] = {measure: {} for measure in MEASURES}
        for c in concepts:
            for measure in MEASURES:
                found = self.hits.get((state, c.name, measure))
                if found:
                    entry[measure][c.name] = float(np.mean(found))
        if state > 0:
            measured = [c.name for c in concepts if (state, c.name) in self.distances]
            entry["distance"] = {name: float(np.mean(self.distances[(state, name)])) for name in measured}
            entry["max_pixel_change"] = {name: self.change[(state, name)] for name in measured}
        return entry


def evaluate(
    pipe: Any,
    concepts: Sequence[EvalConcept],
    classify: Classify,
    subsets: Sequence[Sequence[str]],
    steps: int = 25,
    guidance_scale: float = 7.5,
    metric: ImageMetric | None = None,
    progress: bool = True,
    keep_images: bool = False,
    batch_size: int = 32,
) -> dict[str, Any]:
    """ACC (exact prompts, held-out paraphrases, compositions: both halves), the image distance
    (`metric`: LPIPS with its weights, else 1-SSIM; `metrics.image_metric`) against the original and
    exact-prompt drift, for the original model and every subset of erasers.

    `pipe` must have the erasers loaded (`load_sepme`); its erased set is left as it was. Images are made by
    `generate_batched`, `batch_size` per pipeline call, prompts, seeds and subsets mixed; the classifier and
    image metric run once per window of calls. Returns the `results.json` layout: `concepts`, `prompts`,
    `original` and `subsets` (each with `erased`, the `MEASURES`, `distance`, `max_pixel_change`, `dtheta_p`),
    `image_metric` (its name and description) and `generation` (images, seconds, images per second).
    """
    metric = metric or image_metric()
    runtime = erasure_runtime(pipe)
    loaded = runtime.erasers if runtime is not None else {}
    states = [()] + [canonical_jobs(pipe, [Job("", 0, tuple(s))])[0].erased for s in subsets]
    plan = measurement_plan(concepts, states)
    jobs = list(plan)
    tally = _Tally(classify, metric, {c.name: c.prompts[0] for c in concepts if c.prompts} if keep_images else {})
    bar = tqdm(total=len(jobs), desc="evaluating", unit="img", disable=not progress)
    window = batch_size * 4  # classifier and image-metric calls over several pipeline calls' images
    started = time.monotonic()
    try:
        for start in range(0, len(jobs), window):
            part = jobs[start : start + window]
            tally.add(part, generate_batched(pipe, part, steps, guidance_scale, batch_size, on_batch=bar.update),
                      plan)
    finally:
        bar.close()
    seconds = time.monotonic() - started
    results: dict[str, Any] = {
        "concepts": [c.name for c in concepts], "erasers": list(loaded),
        "image_metric": {"name": metric.name, "description": metric.description},
        "prompts": {c.name: {"exact": c.prompts, "held_out": c.paraphrases,
                             "compositions": [list(pair) for pair in c.compositions]} for c in concepts},
        "original": tally.entry(0, concepts), "subsets": [],
        "generation": {"images": len(jobs), "seconds": round(seconds, 1),
                       "images_per_second": round(len(jobs) / max(seconds, 1e-9), 2), "batch_size": batch_size,
                       "threads": torch.get_num_threads()},
    }
    for index, subset in enumerate(subsets, start=1):
        entry = {"erased": list(subset), **tally.entry(index, concepts)}
        entry["dtheta_p"] = dtheta_p([loaded[n] for n in subset if n in loaded])
        results["subsets"].append(entry)
    for entry in results["subsets"]:
        entry["summary"] = generalisation_summary(results, entry)
    if keep_images:
        results["_images"] = {"+".join(s) or "original": {c: tally.kept[(i, c)] for (i, c) in tally.kept if i == k}
                              for k, s in enumerate([[], *subsets])}
    return results
