"""Several methods' erasers (SepME, G-CiRs, the baselines) evaluated side by side in one run."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..eraser import Eraser
from ..files import resolve_eraser_files
from ..loader import SepMEWarning
from .protocol import TEMPLATES, Classify, EvalConcept, default_prompt, evaluate, scenario_subsets
from .tables import generalisation_summary


def load_methods(pipe: Any, methods: Sequence[tuple[str, str | Path]], allow_base_mismatch: bool
                 ) -> dict[str, dict[str, Eraser]]:
    """Load every method's erasers under adapter names `label:concept` (not erased); by label, then concept."""
    labels = [label for label, _ in methods]
    if len(set(labels)) != len(labels) or any(not label or ":" in label for label in labels):
        raise ValueError(f"method labels must be unique, non-empty and without ':', got {labels}")
    by_method: dict[str, dict[str, Eraser]] = {}
    for label, source in methods:
        erasers = {}
        for path in resolve_eraser_files(source):
            eraser = Eraser.load(path)
            pipe.load_sepme(eraser, adapter_name=f"{label}:{eraser.name}", erase=False,
                            allow_base_mismatch=allow_base_mismatch)
            erasers[eraser.name] = eraser
        by_method[label] = erasers
    return by_method


def method_concepts(by_method: dict[str, dict[str, Eraser]], concepts: Sequence[Any] | None, seeds: Sequence[int],
                    paraphrases: bool, default_prompts: Mapping[str, str] | None) -> list[EvalConcept]:
    """`EvalConcept`s as given, or built from names (prompts from the erasers, else `default_prompt`)."""
    if concepts is not None and not all(isinstance(c, str) for c in concepts):
        return list(concepts)
    prompts: dict[str, str] = {}
    for erasers in by_method.values():
        for eraser in erasers.values():
            for part in eraser.name.split("+"):  # a shared G-CiRs eraser is named "a+b"
                prompts.setdefault(part, eraser.prompt if part == eraser.name else default_prompt(part, default_prompts))
    names = list(prompts) if concepts is None else list(concepts)
    return [EvalConcept(name, [prompts.get(name, default_prompt(name, default_prompts))],
                        [t.format(name) for t in TEMPLATES[1:]] if paraphrases else [], list(seeds))
            for name in names]


def _method_summary(source: str | Path, erasers: dict[str, Eraser]) -> dict[str, Any]:
    return {
        "source": str(source),
        "erasers": {
            name: {"method": e.metadata.get("training", {}).get("method"), "separable": e.separable,
                   "dtheta_p": e.dtheta_p(), "seconds": e.metadata.get("stats", {}).get("seconds"),
                   "peak_memory_mb": e.metadata.get("stats", {}).get("peak_memory_mb")}
            for name, e in erasers.items()
        },
    }


def evaluate_methods(
    pipe: Any,
    methods: Sequence[tuple[str, str | Path]],
    classify: Classify,
    scenario: str = "single",
    concepts: Sequence[Any] | None = None,
    seeds: Sequence[int] = tuple(range(10)),
    paraphrases: bool = False,
    allow_base_mismatch: bool = False,
    keep_images: bool = False,
    default_prompts: Mapping[str, str] | None = None,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate several methods' erasers on the same model, prompts, seeds and metrics, in one run.

    Each `(label, source)` is one method: an eraser file or folder (e.g. the `--out` of `sepme erase
    --method esd`). Its erasers load under adapter names `label:concept`, each method's subsets of the
    `scenario` (`scenario_subsets`) are evaluated, and the original model is generated once.
    `concepts`: `EvalConcept`s, concept names (prompts from the erasers, else `default_prompts[name]`,
    else `a painting by NAME`), or None (every erased concept).
    Returns `evaluate`'s results plus `methods` (per method: its erasers' training method,
    seconds, peak memory, `||dtheta||_p`) and, per subset, `method`, `erased_concepts`, `train_seconds`
    and `peak_memory_mb`. Combinations of dense erasers carry no separation guarantee; the loader's
    warnings about it are silenced here (the table is the measurement).
    """
    by_method = load_methods(pipe, methods, allow_base_mismatch)
    concepts = method_concepts(by_method, concepts, seeds, paraphrases, default_prompts)
    subsets, owners = [], []
    for label, erasers in by_method.items():
        for subset in scenario_subsets(list(erasers), scenario):
            subsets.append([f"{label}:{name}" for name in subset])
            owners.append((label, subset))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SepMEWarning)
        results = evaluate(pipe, concepts, classify, subsets, keep_images=keep_images, **evaluate_kwargs)
    for entry, (label, subset) in zip(results["subsets"], owners):
        stats = [by_method[label][name].metadata.get("stats", {}) for name in subset]
        peaks = [s["peak_memory_mb"] for s in stats if s.get("peak_memory_mb") is not None]
        entry["method"] = label
        entry["erased_concepts"] = [part for name in subset for part in name.split("+")]
        entry["train_seconds"] = sum(float(s.get("seconds", 0.0)) for s in stats)
        entry["peak_memory_mb"] = max(peaks) if peaks else None
        entry["summary"] = generalisation_summary(results, entry)
    results["methods"] = {label: _method_summary(source, by_method[label]) for label, source in methods}
    return results
