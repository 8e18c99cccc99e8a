"""`sepme demo`: the main job on the built-in demo world, offline, in minutes on 2 CPU cores.

Trains erasers for three demo styles in simultaneous mode (SepME1) on some phrasings of each
(`TRAIN_TEMPLATES`), then measures, like the paper's Tables 3-4, every subset of the three, for all
eight concepts, separately on: the exact training prompts (accuracy, image distance against the
original model, drift of restored concepts), held-out paraphrases never used in training
(`HELD_OUT_TEMPLATES`), and compositions with a concept of the other family ("a square by pimsa"),
judged for both halves. Every image goes through one batched engine (`generate_batched`: prompts,
seeds and erased subsets mixed in each pipeline call). Writes an image grid, `results.md` and
`results.json` to the output folder and prints the tables.

The same story runs on the SDXL and FLUX demo worlds (`model="sdxl"` / `"flux"`). On FLUX the erasers train with
flow matching (increments on `context_embedder` and the pooled `time_text_embed` layer) and `GUIDANCE` is true
classifier-free guidance against the blank prompt, for the reference images and the evaluation alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..eraser import Eraser
from ..evaluation import (
    EvalConcept,
    all_subsets,
    evaluate,
    image_grid,
    image_metric,
    markdown_table,
    write_results,
)
from ..files import eraser_filename
from ..loader import attach
from ..training import Concept, TrainConfig, train_erasers, write_report
from . import CONCEPTS, OBJECTS, STYLES, demo_classifier, load_pipeline
from .world import COMBINED_TEMPLATES

ERASED = ("orvan", "pimsa", "kadrel")
"""The three concepts the demo erases (styles, like the paper's Van Gogh / Picasso / Cezanne)."""
KEPT = ("selune", "circle", "square", "triangle", "cross")
"""Every other demo concept, measured for retention (in no eraser's known set)."""

TRAIN_TEMPLATES = (0, 1, 2)
"""The phrasings (indices into `world.STYLE_TEMPLATES` / `OBJECT_TEMPLATES`) erasers are trained on: the
exact prompts of the evaluation ("a painting by X", "in the style of X", "X style"). Measured with
`sepme demo`: training on three phrasings erases the fourth and the compositions far better than on two
(templates 0 and 2, holding out 1 and 3: held-out ACC 0.20-0.50 per eraser against 0.00 here)."""
HELD_OUT_TEMPLATES = (3,)
"""The phrasings never used in training: the held-out paraphrases of the evaluation ("a picture by X")."""
COMPOSITION_TEMPLATES = (0, 1)
"""`world.COMBINED_TEMPLATES` used for compositions (one partner of the other family per template)."""

DEMO_TRAINING = TrainConfig(images_per_concept=8, reference_steps=20, guidance_scale=5.0)
"""The library's defaults (scale-free step sizes, the stop on the relative correlation; nothing tuned
for the demo world); only the reference images are drawn with the sampler the demo evaluates with."""
STEPS, GUIDANCE = 20, 5.0
QUICK_STEPS, QUICK_ITERATIONS = 10, 250
"""`--quick` (a smoke run of every stage): sampler steps of the evaluation, training iterations per concept."""
BATCH_SIZE = 40
"""Images per pipeline call (80 UNet rows with guidance): measured fastest of 10 / 40 / 80 on 2 CPU cores."""


def phrasings(name: str, templates: Sequence[int]) -> list[str]:
    """A concept's prompts in the given templates of its family (0: the canonical prompt)."""
    concept = CONCEPTS[name]
    every = (concept.prompt, *concept.paraphrases)
    return [every[t] for t in templates]


def compositions(name: str, templates: Sequence[int]) -> list[tuple[str, str]]:
    """`(prompt, partner)` per combined template: style i with object (i + k) mod 4 in template k (and the
    same prompts seen from the object's side), so each composition prompt serves both of its concepts."""
    styles, objects = list(STYLES), list(OBJECTS)
    result = []
    for k in templates:
        if CONCEPTS[name].family == "style":
            style, partner = name, objects[(styles.index(name) + k) % len(objects)]
            result.append((COMBINED_TEMPLATES[k].format(object=partner, style=style), partner))
        else:
            partner = styles[(objects.index(name) - k) % len(styles)]
            result.append((COMBINED_TEMPLATES[k].format(object=name, style=partner), partner))
    return result


def demo_concepts(erased: Sequence[str], kept: Sequence[str], seeds: int, train: Sequence[int] = TRAIN_TEMPLATES,
                  held_out: Sequence[int] = HELD_OUT_TEMPLATES, combined: Sequence[int] = COMPOSITION_TEMPLATES
                  ) -> list[EvalConcept]:
    """What the demo measures per concept. Erased concepts: every training phrasing (exact), every held-out
    phrasing and one composition per combined template. Kept concepts (retention): the first training
    phrasing, the first held-out one when an erased concept shares their family (and so their phrasings),
    and the erased concepts' compositions they are the other half of (no extra images)."""
    overlap = set(train) & set(held_out)
    if overlap:
        raise ValueError(f"templates {sorted(overlap)} are both trained on and held out")
    pairs = {n: compositions(n, combined) for n in erased}
    result = [EvalConcept(n, phrasings(n, train), phrasings(n, held_out), list(range(seeds)), pairs[n])
              for n in erased]
    families = {CONCEPTS[e].family for e in erased}
    for n in kept:
        partnered = [(prompt, e) for e in erased for prompt, partner in pairs[e] if partner == n]
        shared = phrasings(n, held_out[:1]) if CONCEPTS[n].family in families else []
        result.append(EvalConcept(n, phrasings(n, train[:1]), shared, list(range(seeds)), partnered))
    return result


def demo_training(quick: bool, pooled_increment: bool = True) -> TrainConfig:
    """`DEMO_TRAINING`, with fewer reference images and iterations for `--quick`."""
    config = replace(DEMO_TRAINING, pooled_increment=pooled_increment)
    return replace(config, images_per_concept=4, max_iterations=QUICK_ITERATIONS) if quick else config


def train_demo_erasers(pipe: Any, out: Path, quick: bool, train: Sequence[int], progress: bool,
                       pooled_increment: bool = True) -> list[Eraser]:
    """The training part of the demo, in one place: each erased concept on its `train` phrasings.
    `pooled_increment=False`: `attn2` increments only, also on the SDXL world (to measure the pooled path)."""
    config = demo_training(quick, pooled_increment)
    concepts = [Concept(n, prompts=tuple(phrasings(n, train))) for n in ERASED]
    return train_erasers(pipe, concepts, mode="simultaneous", config=config, cache_dir=out / "reference",
                         progress=progress)


def run_demo(out: str | Path = "sepme-demo", quick: bool = False, seeds: int | None = None,
             progress: bool = True, threads: int | None = None, batch_size: int = BATCH_SIZE,
             train_templates: Sequence[int] = TRAIN_TEMPLATES, held_out_templates: Sequence[int] = HELD_OUT_TEMPLATES,
             composition_templates: Sequence[int] = COMPOSITION_TEMPLATES, model: str = "sd",
             pooled_increment: bool = True) -> dict[str, Any]:
    """Train, evaluate, and write `grid.png`, `results.md`, `results.json` and the erasers to `out`.

    `threads`: torch CPU threads (None: torch's default, one per core). `quick`: 4 seeds, one held-out
    phrasing and one composition template per concept, `QUICK_ITERATIONS` per eraser and `QUICK_STEPS` sampler
    steps (a smoke run). `model`: the demo world, "sd", "sdxl" or "flux" (the SDXL or FLUX architecture; same
    renderer, concepts and classifiers). `pooled_increment=False`: SDXL / FLUX erasers without their pooled
    increment (`attn2` / `context_embedder` only), to measure what the pooled path carries.
    """
    started = time.monotonic()
    out = Path(out)
    torch.manual_seed(0)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        pipe = attach(load_pipeline(model))
        pipe.set_progress_bar_config(disable=True)
        seeds = seeds or (4 if quick else 10)
        if quick:
            held_out_templates, composition_templates = held_out_templates[:1], composition_templates[:1]

        erasers = train_demo_erasers(pipe, out, quick, train_templates, progress, pooled_increment)
        trained_at = time.monotonic()
        for eraser in erasers:
            eraser.save(out / "erasers" / eraser_filename(eraser.name))
            pipe.load_sepme(eraser, erase=False)
        write_report(erasers, out / "erasers")

        concepts = demo_concepts(ERASED, KEPT, seeds, train_templates, held_out_templates, composition_templates)
        steps = QUICK_STEPS if quick else STEPS
        results = evaluate(pipe, concepts, demo_classifier(), all_subsets(ERASED), steps=steps,
                           guidance_scale=GUIDANCE, metric=image_metric(), progress=progress, keep_images=True,
                           batch_size=batch_size)
        images = results.pop("_images")
        columns = {"original": "original", **{f"{n} erased": n for n in ERASED}, "all erased": "+".join(ERASED),
                   f"{ERASED[0]} restored": "+".join(ERASED[1:])}
        rows = {c.prompts[0]: [images[key][c.name][0] for key in columns.values()] for c in concepts}
        grid = image_grid(rows, list(columns), out / "grid.png")
        results["timing_seconds"] = {"training": round(trained_at - started, 1),
                                     "evaluation": results["generation"]["seconds"],
                                     "total": round(time.monotonic() - started, 1)}
        results["settings"] = {"model": model, "pooled_increment": pooled_increment, "quick": quick, "seeds": seeds,
                               "steps": steps, "guidance_scale": GUIDANCE,
                               "batch_size": batch_size, "threads": torch.get_num_threads(),
                               "train_templates": list(train_templates),
                               "held_out_templates": list(held_out_templates),
                               "composition_templates": list(composition_templates),
                               "training": vars(demo_training(quick, pooled_increment))}
        json_path, md_path = write_results(results, out)
        print(markdown_table(results))
        print(f"\nerasers: {out / 'erasers'}   grid: {grid}   tables: {md_path}, {json_path}")
        timing, generation = results["timing_seconds"], results["generation"]
        print(f"time: training {timing['training']} s, evaluation {timing['evaluation']} s "
              f"({generation['images']} images, {generation['images_per_second']} images/s, "
              f"{torch.get_num_threads()} threads), total {timing['total']} s")
    finally:
        torch.set_num_threads(previous_threads)
    return results
