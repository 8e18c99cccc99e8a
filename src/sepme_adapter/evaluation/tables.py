"""The paper-style markdown tables (one builder for all of them) and the results files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table: the header, its separator and one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def accuracy_cells(accuracy: dict[str, float], concepts: Sequence[str], erased: Iterable[str] = ()) -> list[str]:
    """ACC per concept, erased concepts in bold."""
    erased = set(erased)
    return [f"**{accuracy[c]:.2f}**" if c in erased else f"{accuracy[c]:.2f}" for c in concepts]


def metric_name(results: dict[str, Any]) -> str:
    """The image metric's column label: "LPIPS" only when real LPIPS was measured."""
    return results.get("image_metric", {}).get("name", "distance")


def metric_note(results: dict[str, Any]) -> str:
    return f"{metric_name(results)}: {results.get('image_metric', {}).get('description', 'image distance')}"


def metric_header(concepts: Sequence[str], name: str = "distance") -> list[str]:
    return [f"{c} ACC" for c in concepts] + [f"{c} {name}" for c in concepts]


def _original_cells(results: dict[str, Any], concepts: Sequence[str]) -> list[str]:
    return accuracy_cells(results["original"]["accuracy"], concepts) + ["-" for _ in concepts]


def _subset_cells(entry: dict[str, Any], concepts: Sequence[str], erased: Iterable[str]) -> list[str]:
    return accuracy_cells(entry["accuracy"], concepts, erased) + [f"{entry['distance'][c]:.3f}" for c in concepts]


def _measure_table(results: dict[str, Any], measure: str, concepts: Sequence[str], title: str) -> list[str]:
    """One ACC table for one measure: rows per state, one column per concept that has it."""
    concepts = [c for c in concepts if c in results["original"].get(measure, {})]

    def cells(entry: dict[str, Any], erased: Iterable[str] = ()) -> list[str]:
        return accuracy_cells(entry[measure], concepts, erased)

    rows = [["(none: original)", *cells(results["original"])]]
    rows += [[", ".join(e["erased"]), *cells(e, e["erased"])] for e in results["subsets"]]
    return ["", title, "", *table(["erased", *concepts], rows)]


def _composition_table(results: dict[str, Any], concepts: Sequence[str]) -> list[str]:
    """Compositions: each concept's own half and the other half (its partners) of the same images."""
    concepts = [c for c in concepts if c in results["original"].get("composition_accuracy", {})]

    def cells(entry: dict[str, Any], erased: Iterable[str] = ()) -> list[str]:
        erased = set(erased)
        own = accuracy_cells(entry["composition_accuracy"], concepts, erased)
        return [cell for c, o in zip(concepts, own) for cell in (o, f"{entry['composition_partner_accuracy'][c]:.2f}")]

    header = [h for c in concepts for h in (c, f"{c}: other half")]
    rows = [["(none: original)", *cells(results["original"])]]
    rows += [[", ".join(e["erased"]), *cells(e, e["erased"])] for e in results["subsets"]]
    pairs = "; ".join(f"{c}: " + ", ".join(p for p, _ in results["prompts"][c]["compositions"])
                      for c in concepts if results.get("prompts"))
    return ["", "Compositions (prompts combining a concept with one of another family, held out from training): ACC "
            "of the concept itself and of the other half in the same images" + (f" ({pairs})" if pairs else "") + ":",
            "", *table(["erased", *header], rows)]


def _ratio(value: float | None, original: float | None) -> float | None:
    return None if value is None or not original else value / original


def _mean(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def generalisation_summary(results: dict[str, Any], entry: dict[str, Any]) -> dict[str, float | None]:
    """One subset's generalisation figures: erased concepts' ACC on exact prompts, held-out paraphrases and in
    compositions; the kept half of their compositions and every other concept, as fractions of the original."""
    original = results["original"]
    erased = [c for c in results["concepts"] if c in entry.get("erased_concepts", entry["erased"])]
    others = [c for c in results["concepts"] if c not in erased]

    def acc(e: dict[str, Any], measure: str, c: str) -> float | None:
        return e.get(measure, {}).get(c)

    def kept_half(c: str) -> float | None:  # partners of an erased concept that are themselves kept
        partners = {p for _, p in results.get("prompts", {}).get(c, {}).get("compositions", [])}
        if partners & set(erased):
            return None
        return _ratio(acc(entry, "composition_partner_accuracy", c), acc(original, "composition_partner_accuracy", c))

    others_all = [_ratio(acc(entry, m, c), acc(original, m, c)) for c in others
                  for m in ("accuracy", "paraphrase_accuracy", "composition_accuracy")]
    return {
        "erased_exact": _mean(acc(entry, "accuracy", c) for c in erased),
        "erased_held_out": _mean(acc(entry, "paraphrase_accuracy", c) for c in erased),
        "erased_in_compositions": _mean(acc(entry, "composition_accuracy", c) for c in erased),
        "kept_half_ratio": _mean(kept_half(c) for c in erased),
        "others_exact_ratio": _mean(_ratio(acc(entry, "accuracy", c), acc(original, "accuracy", c)) for c in others),
        "others_held_out_ratio": _mean(_ratio(acc(entry, "paraphrase_accuracy", c), acc(original, "paraphrase_accuracy", c))
                                       for c in others),
        "others_min_ratio": min((r for r in others_all if r is not None), default=None),
    }


SUMMARY_COLUMNS = {
    "erased_exact": "erased: exact prompts ACC",
    "erased_held_out": "erased: held-out ACC",
    "erased_in_compositions": "erased: in compositions ACC",
    "kept_half_ratio": "compositions' kept half (x original)",
    "others_exact_ratio": "other concepts: exact (x original)",
    "others_held_out_ratio": "other concepts: held-out (x original)",
    "others_min_ratio": "other concepts: worst (x original)",
}


def summary_table(results: dict[str, Any]) -> list[str]:
    """The generalisation summary, one row per subset: means over its erased / other concepts."""
    rows = []
    for entry in results["subsets"]:
        figures = generalisation_summary(results, entry)
        rows.append([", ".join(entry["erased"]), *("-" if figures[k] is None else f"{figures[k]:.2f}"
                                                   for k in SUMMARY_COLUMNS)])
    return ["", "Summary (means over the subset's erased concepts and over every other concept; 'worst': the "
            "lowest ratio of any other concept on any prompt set):", "",
            *table(["erased", *SUMMARY_COLUMNS.values()], rows)]


def markdown_table(results: dict[str, Any]) -> str:
    """The paper-style tables: exact prompts (ACC, image distance, restored drift), then held-out paraphrases,
    compositions (both halves) and the generalisation summary, each with one row per erased subset."""
    concepts = results["concepts"]
    rows = [["(none: original)", *_original_cells(results, concepts), "-"]]
    for entry in results["subsets"]:
        # restored: concepts with a loaded eraser that is switched off (their prompts should be exact)
        restored = [entry["max_pixel_change"][c] for c in concepts
                    if c not in entry["erased"] and c in results.get("erasers", concepts)]
        rows.append([", ".join(entry["erased"]), *_subset_cells(entry, concepts, entry["erased"]),
                     f"{max(restored):.1e}" if restored else "-"])
    lines = ["Exact prompts (the prompts the erasers were trained on):", "",
             *table(["erased", *metric_header(concepts, metric_name(results)), "restored max pixel change"], rows)]
    if results["original"].get("paraphrase_accuracy"):
        lines += _measure_table(results, "paraphrase_accuracy", concepts,
                                "Held-out paraphrases (phrasings never used in training):")
    if results["original"].get("composition_accuracy"):
        lines += _composition_table(results, concepts)
    if results["original"].get("paraphrase_accuracy") or results["original"].get("composition_accuracy"):
        lines += summary_table(results)
    lines += ["", f"{metric_note(results)}. Bold: erased concepts. Restored max pixel "
              f"change: largest change (0-1 scale) of any image of a concept whose eraser is loaded but off."]
    return "\n".join(lines)


def comparison_table(results: dict[str, Any]) -> str:
    """One markdown table for all methods: ACC and image distance per concept, the worst pixel change of the concepts
    left alone, `||dtheta||_p`, training seconds and peak memory (paper Tables 1-4 side by side)."""
    concepts = results["concepts"]
    rows = [["original", "-", *_original_cells(results, concepts), "-", "0", "-", "-"]]
    for entry in results["subsets"]:
        erased = set(entry.get("erased_concepts", entry["erased"]))
        others = [entry["max_pixel_change"][c] for c in concepts if c not in erased]
        peak = entry.get("peak_memory_mb")
        rows.append([entry.get("method", "-"), ", ".join(sorted(erased, key=concepts.index)),
                     *_subset_cells(entry, concepts, erased), f"{max(others):.1e}" if others else "-",
                     f"{entry['dtheta_p']:.4g}", f"{entry.get('train_seconds', 0.0):.1f}",
                     "-" if peak is None else f"{peak:.0f}"])
    lines = table(["method", "erased", *metric_header(concepts, metric_name(results)), "others max pixel change", "||dtheta||_p",
                   "train s", "peak MB"], rows)
    lines += ["", f"{metric_note(results)}. Bold: erased concepts. ||dtheta||_p = ||dtheta||_1 / M "
              "over the modified layers. Peak memory is measured on CUDA only ('-' on CPU). Dense erasers (G-CiRs, "
              "ESD, ablation, FMN, UCE) change other prompts too; only SepME's separable erasers keep their "
              "known prompts exact."]
    return "\n".join(lines)


def write_results(results: dict[str, Any], folder: str | Path, markdown: str | None = None) -> tuple[Path, Path]:
    """`results.json` and `results.md` (`markdown`, default `markdown_table(results)`), written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    paths = []
    text = markdown if markdown is not None else markdown_table(results)
    for name, content in (("results.json", json.dumps(clean, indent=2)), ("results.md", text)):
        temp = folder / f".{name}.tmp"
        temp.write_text(content + "\n")
        os.replace(temp, folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]
