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


def metric_header(concepts: Sequence[str]) -> list[str]:
    return [f"{c} ACC" for c in concepts] + [f"{c} LPIPS" for c in concepts]


def _original_cells(results: dict[str, Any], concepts: Sequence[str]) -> list[str]:
    return accuracy_cells(results["original"]["accuracy"], concepts) + ["-" for _ in concepts]


def _subset_cells(entry: dict[str, Any], concepts: Sequence[str], erased: Iterable[str]) -> list[str]:
    return accuracy_cells(entry["accuracy"], concepts, erased) + [f"{entry['lpips'][c]:.3f}" for c in concepts]


def _paraphrase_table(results: dict[str, Any], concepts: Sequence[str]) -> list[str]:
    def cells(entry: dict[str, Any]) -> list[str]:
        return [f"{entry['paraphrase_accuracy'].get(c, float('nan')):.2f}" for c in concepts]

    rows = [["(none: original)", *cells(results["original"])]]
    rows += [[", ".join(entry["erased"]), *cells(entry)] for entry in results["subsets"]]
    return ["", "Paraphrase prompts (not in any eraser's known set: the harder case):", "",
            *table(["erased", *concepts], rows)]


def markdown_table(results: dict[str, Any]) -> str:
    """The paper-style table: accuracy (and LPIPS) of every concept for the original and each subset."""
    concepts = results["concepts"]
    rows = [["(none: original)", *_original_cells(results, concepts), "-"]]
    for entry in results["subsets"]:
        # restored: concepts with a loaded eraser that is switched off (their prompts should be exact)
        restored = [entry["max_pixel_change"][c] for c in concepts
                    if c not in entry["erased"] and c in results.get("erasers", concepts)]
        rows.append([", ".join(entry["erased"]), *_subset_cells(entry, concepts, entry["erased"]),
                     f"{max(restored):.1e}" if restored else "-"])
    lines = table(["erased", *metric_header(concepts), "restored max pixel change"], rows)
    if any(e.get("paraphrase_accuracy") for e in results["subsets"]):
        lines += _paraphrase_table(results, concepts)
    lines += ["", f"LPIPS backbone: {results['lpips_backbone']}. Bold: erased concepts. Restored max pixel "
              f"change: largest change (0-1 scale) of any image of a concept whose eraser is loaded but off."]
    return "\n".join(lines)


def comparison_table(results: dict[str, Any]) -> str:
    """One markdown table for all methods: ACC and LPIPS per concept, the worst pixel change of the concepts
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
    lines = table(["method", "erased", *metric_header(concepts), "others max pixel change", "||dtheta||_p",
                   "train s", "peak MB"], rows)
    lines += ["", f"LPIPS backbone: {results['lpips_backbone']}. Bold: erased concepts. ||dtheta||_p = ||dtheta||_1 / M "
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
