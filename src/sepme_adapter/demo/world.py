"""The demo world: a seeded procedural renderer of 32x32 images and their captions.

Two concept families, like the paper's objects and artist styles:

- objects: a shape (circle, square, triangle, cross) drawn on a plain background;
- styles: how the shape is painted, each named after a made-up painter (stripes, dots,
  checker, gradient). An image without a style is painted in one flat colour ("plain").

Position, size, colours, background and texture phase are jittered. Every caption word
is in `VOCABULARY`, so the package's word tokenizer turns each into a single token.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 32
PLAIN = "plain"  # the style label of images painted in one flat colour (no style concept)

OBJECTS: dict[str, str] = {
    "circle": "a circle",
    "square": "a square",
    "triangle": "a triangle",
    "cross": "a cross",
}
"""Object concept name -> the canonical prompt that generates it."""

STYLES: dict[str, str] = {
    "orvan": "a painting by orvan",  # warm diagonal stripes
    "pimsa": "a painting by pimsa",  # light dots on blue
    "kadrel": "a painting by kadrel",  # green checkerboard
    "selune": "a painting by selune",  # purple-to-gold gradient
}
"""Style concept name -> the canonical prompt that generates it."""

# Caption templates; the first of each list is the canonical one.
OBJECT_TEMPLATES = ("a {object}", "a drawing of a {object}", "a picture of a {object}", "{object} shape")
STYLE_TEMPLATES = (
    "a painting by {style}",
    "in the style of {style}",
    "{style} style",
    "a picture by {style}",
)
COMBINED_TEMPLATES = (
    "a {object} by {style}",
    "a {object} in the style of {style}",
    "a painting of a {object} by {style}",
)


@dataclass(frozen=True)
class Concept:
    """One erasable concept: its family, canonical prompt and paraphrases (same meaning, other words)."""

    name: str
    family: str  # "object" or "style"
    prompt: str
    paraphrases: tuple[str, ...]


def _concepts() -> dict[str, Concept]:
    concepts = {}
    for name in OBJECTS:
        prompts = [t.format(object=name) for t in OBJECT_TEMPLATES]
        concepts[name] = Concept(name, "object", prompts[0], tuple(prompts[1:]))
    for name in STYLES:
        prompts = [t.format(style=name) for t in STYLE_TEMPLATES]
        concepts[name] = Concept(name, "style", prompts[0], tuple(prompts[1:]))
    return concepts


CONCEPTS: dict[str, Concept] = _concepts()
"""Every concept of the demo world by name; `family` says which classifier recognises it."""

LABELS: dict[str, tuple[str, ...]] = {"object": tuple(OBJECTS), "style": (*STYLES, PLAIN)}
"""The classes each family's classifier tells apart (the style classifier also knows "plain")."""


def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set()
    for template in (*OBJECT_TEMPLATES, *STYLE_TEMPLATES, *COMBINED_TEMPLATES):
        for obj in OBJECTS:
            for style in STYLES:
                words.update(template.format(object=obj, style=style).split())
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()
"""Every word any caption uses."""


# ---------------------------------------------------------------- rendering

_SUPERSAMPLE = 2  # render at 2x and average down, for anti-aliased edges


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _shape_mask(obj: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if obj == "circle":
        return dx**2 + dy**2 <= r**2
    if obj == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if obj == "triangle":
        top, bottom = -r, 0.8 * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= 1.05 * r * (dy - top) / (bottom - top))
    if obj == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown object {obj!r}; choose one of {sorted(OBJECTS)}")


def _fill(
    style: str | None, x: np.ndarray, y: np.ndarray, cy: float, r: float, rng: np.random.Generator
) -> np.ndarray:
    """The paint of the shape, an HxWx3 array, before masking."""
    shape = (*x.shape, 3)
    if style is None or style == PLAIN:
        return np.broadcast_to(_hsv(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.65, 1.0)), shape)
    if style == "orvan":  # warm diagonal stripes
        a = _hsv(rng.uniform(-0.03, 0.04), rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))
        b = _hsv(rng.uniform(0.12, 0.17), rng.uniform(0.5, 0.8), rng.uniform(0.9, 1.0))
        period = rng.uniform(5.5, 6.5)
        on = ((x + y) / period + rng.random()) % 1.0 < 0.5
        return np.where(on[..., None], a, b)
    if style == "pimsa":  # light dots on blue
        base = _hsv(rng.uniform(0.57, 0.65), rng.uniform(0.7, 1.0), rng.uniform(0.6, 0.9))
        dot = _hsv(rng.uniform(0.45, 0.55), rng.uniform(0.0, 0.3), 1.0)
        period = rng.uniform(5.0, 6.0)
        px, py = rng.random(2) * period
        dist2 = ((x + px) % period - period / 2) ** 2 + ((y + py) % period - period / 2) ** 2
        return np.where((dist2 <= (0.3 * period) ** 2)[..., None], dot, base)
    if style == "kadrel":  # green checkerboard
        a = _hsv(rng.uniform(0.26, 0.36), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
        b = _hsv(rng.uniform(0.36, 0.44), rng.uniform(0.8, 1.0), rng.uniform(0.3, 0.45))
        cell = rng.uniform(3.5, 4.5)
        px, py = rng.random(2) * 2 * cell
        on = (np.floor((x + px) / cell) + np.floor((y + py) / cell)) % 2 == 0
        return np.where(on[..., None], a, b)
    if style == "selune":  # vertical purple-to-gold gradient
        top = _hsv(rng.uniform(0.76, 0.84), rng.uniform(0.7, 1.0), rng.uniform(0.6, 0.85))
        bottom = _hsv(rng.uniform(0.11, 0.15), rng.uniform(0.7, 1.0), rng.uniform(0.9, 1.0))
        t = np.clip((y - (cy - r)) / (2 * r), 0.0, 1.0)[..., None]
        return (1 - t) * top + t * bottom
    raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)} or None")


def render_array(obj: str, style: str | None, rng: np.random.Generator) -> np.ndarray:
    """Render `obj` painted in `style` (None: plain) as a float32 HxWx3 array in [0, 1]."""
    size = IMAGE_SIZE * _SUPERSAMPLE
    cx, cy = rng.uniform(12.0, 20.0, size=2)
    r = rng.uniform(8.0, 11.0)
    # Pixel centres in image coordinates (0..32), sampled at the supersampled grid.
    coords = (np.arange(size, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    light = rng.random() < 0.5
    background = _hsv(
        rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.78, 0.95) if light else rng.uniform(0.05, 0.25)
    )
    mask = _shape_mask(obj, x, y, cx, cy, r)
    paint = _fill(style, x, y, cy, r, rng)
    image = np.where(mask[..., None], paint, background)
    image = image.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return image.astype(np.float32)


def render(obj: str, style: str | None, rng: np.random.Generator) -> Image.Image:
    """Render `obj` painted in `style` (None or "plain": one flat colour) as a 32x32 RGB image."""
    return Image.fromarray((render_array(obj, style, rng) * 255).round().astype(np.uint8))


# ---------------------------------------------------------------- captions


@dataclass
class CaptionBatch:
    """Rendered images (float NCHW in [0, 1]) with their captions and labels."""

    images: torch.Tensor
    captions: list[str]
    objects: list[str]
    styles: list[str]  # a style name or "plain"


def sample_caption(rng: np.random.Generator, caption_dropout: float = 0.1) -> tuple[str, str, str]:
    """Draw one (caption, object, style) triple of the training distribution.

    A third of captions name an object only (painted plain), a third a style only (on a
    random object), a third both. Half of the captions use the canonical template, the rest
    a paraphrase. With probability `caption_dropout` the caption is blank ("").
    """
    obj = str(rng.choice(list(OBJECTS)))
    kind = rng.integers(3)
    style = PLAIN if kind == 0 else str(rng.choice(list(STYLES)))
    templates = (OBJECT_TEMPLATES, STYLE_TEMPLATES, COMBINED_TEMPLATES)[kind]
    template = templates[0] if rng.random() < 0.5 else templates[rng.integers(1, len(templates))]
    caption = "" if rng.random() < caption_dropout else template.format(object=obj, style=style)
    return caption, obj, style


def sample_caption_batch(
    batch_size: int, rng: np.random.Generator, caption_dropout: float = 0.1
) -> CaptionBatch:
    """Render `batch_size` images of the training distribution with their captions (see `sample_caption`)."""
    captions, objects, styles, images = [], [], [], []
    for _ in range(batch_size):
        caption, obj, style = sample_caption(rng, caption_dropout)
        captions.append(caption)
        objects.append(obj)
        styles.append(style)
        images.append(render_array(obj, style, rng))
    return CaptionBatch(to_tensor(images), captions, objects, styles)


def to_tensor(images: Sequence[np.ndarray | Image.Image | torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Images as a float NCHW tensor in [0, 1].

    Accepts an NCHW tensor, or a sequence of PIL images, HxWx3 float arrays in [0, 1] or
    CHW float tensors in [0, 1].
    """
    if isinstance(images, torch.Tensor):
        return images.float()
    tensors = []
    for image in images:
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        tensors.append(image.float())
    return torch.stack(tensors)
