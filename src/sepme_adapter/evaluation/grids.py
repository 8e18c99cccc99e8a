"""Image grids: one row per prompt, one column per model state or method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def image_grid(rows: dict[str, list[Image.Image]], columns: Sequence[str], path: str | Path,
               zoom: int = 3) -> Path:
    """A labelled grid: one row per prompt, one column per model state (each cell one image)."""
    cells = [[img.resize((img.width * zoom, img.height * zoom), Image.NEAREST) for img in row]
             for row in rows.values()]
    size = cells[0][0].width
    label_width, header = 170, 34
    grid = Image.new("RGB", (label_width + size * len(columns), header + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((label_width + j * size + 3, 3), "\n".join(name.split(" ", 1)), fill="black")
    for i, (label, row) in enumerate(zip(rows, cells)):
        draw.text((3, header + i * size + size // 2 - 6), label[:28], fill="black")
        for j, img in enumerate(row):
            grid.paste(img, (label_width + j * size, header + i * size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def comparison_grid(results: dict[str, Any], path: str | Path) -> Path:
    """Image grid: one row per concept (its exact prompt, first seed), one column for the original model and
    one per method (the smallest evaluated subset of that method erasing the concept). Needs `keep_images`."""
    images = results["_images"]
    methods = list(results["methods"])
    rows = {}
    for concept in results["concepts"]:
        row = [images["original"][concept][0]]
        for label in methods:
            erasing = [e for e in results["subsets"] if e.get("method") == label and concept in e["erased_concepts"]]
            entry = min(erasing, key=lambda e: len(e["erased"])) if erasing else None
            row.append(images["+".join(entry["erased"]) if entry else "original"][concept][0])
        rows[concept] = row
    return image_grid(rows, ["original", *methods], path)
