"""A world's specification from its seed: concept names, caption templates, text encoder shape, and the
procedural renderer of its glyphs (objects) and textures (styles).

Everything here is a pure function of the seed (numpy's `default_rng`), so a world is reproducible from it.
Images are 32x32 RGB in [0, 1] like the demo world's, so the demo world's autoencoder serves every world.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from sepme_adapter.demo.world import CaptionBatch, to_tensor

IMAGE_SIZE = 32
SUPERSAMPLE = 2
PLAIN = "plain"

# ---------------------------------------------------------------- caption template pools

OBJECT_POOL = (
    "a {o}", "an image of a {o}", "a {o} icon", "a sketch of a {o}", "{o} symbol", "a drawing of a {o}",
    "a picture of a {o}", "a {o} shape", "the {o} sign", "a small {o}", "a photo of a {o}", "one {o}",
)
STYLE_POOL = (
    "a painting by {s}", "art by {s}", "{s} style", "in the manner of {s}", "a work by {s}",
    "in the style of {s}", "a picture by {s}", "made by {s}", "a print by {s}", "{s} artwork",
)
COMPOSITION_POOL = (
    "a {o} by {s}", "a {o} in {s} style", "a painting of a {o} by {s}", "a {o} in the manner of {s}",
    "{s} art of a {o}", "a {o} drawn by {s}", "a {o} in the style of {s}", "a {o} made by {s}",
)

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
          "sh", "th", "pl", "st", "ch", "j", "w")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea", "y")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "x", "k")

# Format 8 dropped the "polygon", "halfdisk" and "dots" glyphs: every object below the gate in a format 6 world
# was one of them (half disks 0.65-0.75 in worlds 14 / 19 / 20, pentagons 0.70-0.75 in 18 / 19, dots 0.45 in 11).
# Format 10 dropped "arrow" (0.80 / 0.825 in format 9 worlds 14 / 16), 4-point stars (0.725 in 11) and crosses
# with arms under 0.31 (0.80 in 13, 0.85 in 12; arms of 0.31-0.35 gave 0.95-0.975).
GLYPH_KINDS = ("star", "ring", "crescent", "cross", "letter", "bars")
# Format 4 dropped "grid" (thin lines) and "sectors" from the textures: no 900-step denoiser drew them to the
# quality gate (0.56-0.75). Format 5 dropped "gradient", "waves" and "dots", the styles below the gate in every
# format 4 world that drew them (0.50-0.75); see benchmarks/README.md. Format 10 dropped "rings", the weakest
# style (or tied) in 5 of the 6 format 9 worlds (0.825-0.90, misread as plain), so each world paints its styles
# in the same three kinds with their own hues, periods and angles.
TEXTURE_KINDS = ("stripes", "checks", "noise")

# Letters as strokes (segments in a [-1, 1] box, y down).
LETTERS = {
    "L": [(-0.6, -0.9, -0.6, 0.9), (-0.6, 0.9, 0.6, 0.9)],
    "T": [(-0.8, -0.9, 0.8, -0.9), (0.0, -0.9, 0.0, 0.9)],
    "H": [(-0.7, -0.9, -0.7, 0.9), (0.7, -0.9, 0.7, 0.9), (-0.7, 0.0, 0.7, 0.0)],
    "E": [(-0.6, -0.9, -0.6, 0.9), (-0.6, -0.9, 0.7, -0.9), (-0.6, 0.0, 0.5, 0.0), (-0.6, 0.9, 0.7, 0.9)],
    "Z": [(-0.7, -0.9, 0.7, -0.9), (0.7, -0.9, -0.7, 0.9), (-0.7, 0.9, 0.7, 0.9)],
    "N": [(-0.7, 0.9, -0.7, -0.9), (-0.7, -0.9, 0.7, 0.9), (0.7, 0.9, 0.7, -0.9)],
    "U": [(-0.7, -0.9, -0.7, 0.9), (-0.7, 0.9, 0.7, 0.9), (0.7, 0.9, 0.7, -0.9)],
    "V": [(-0.8, -0.9, 0.0, 0.9), (0.0, 0.9, 0.8, -0.9)],
    "A": [(-0.8, 0.9, 0.0, -0.9), (0.0, -0.9, 0.8, 0.9), (-0.4, 0.2, 0.4, 0.2)],
    "K": [(-0.6, -0.9, -0.6, 0.9), (-0.6, 0.1, 0.7, -0.9), (-0.3, -0.1, 0.7, 0.9)],
    "F": [(-0.6, -0.9, -0.6, 0.9), (-0.6, -0.9, 0.7, -0.9), (-0.6, 0.0, 0.5, 0.0)],
    "Y": [(-0.8, -0.9, 0.0, 0.0), (0.8, -0.9, 0.0, 0.0), (0.0, 0.0, 0.0, 0.9)],
}


def _words(template: str) -> int:
    return len(template.split())


@dataclass(frozen=True)
class WorldSpec:
    """Everything about a world that its seed decides (JSON-serialisable through `to_json`)."""

    seed: int
    objects: dict[str, dict]  # name -> glyph parameters
    styles: dict[str, dict]  # name -> texture parameters
    object_templates: tuple[str, ...]  # first: canonical
    style_templates: tuple[str, ...]
    composition_templates: tuple[str, ...]
    text_width: int
    text_layers: int
    text_heads: int
    max_tokens: int
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------ concepts and captions

    def prompts(self, name: str) -> list[str]:
        """Every phrasing of concept `name` the world is trained on; the first is the canonical prompt."""
        if name in self.objects:
            return [t.format(o=name) for t in self.object_templates]
        if name in self.styles:
            return [t.format(s=name) for t in self.style_templates]
        raise KeyError(f"{name!r} is not a concept of world {self.seed}")

    def family(self, name: str) -> str:
        return "object" if name in self.objects else "style"

    def compositions(self, obj: str, style: str) -> list[str]:
        return [t.format(o=obj, s=style) for t in self.composition_templates]

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        return {"object": tuple(self.objects), "style": (*self.styles, PLAIN)}

    @property
    def vocabulary(self) -> tuple[str, ...]:
        words: set[str] = set()
        for o in self.objects:
            for s in self.styles:
                for text in (*self.prompts(o), *self.prompts(s), *self.compositions(o, s)):
                    words.update(text.split())
        return tuple(sorted(words))

    def sample_caption(self, rng: np.random.Generator, caption_dropout: float) -> tuple[str, str, str]:
        """(caption, object, style) as the demo's: thirds object-only (plain), style-only, both; half canonical."""
        obj = str(rng.choice(list(self.objects)))
        kind = int(rng.integers(3))
        style = PLAIN if kind == 0 else str(rng.choice(list(self.styles)))
        templates = (self.object_templates, self.style_templates, self.composition_templates)[kind]
        template = templates[0] if rng.random() < 0.5 else templates[int(rng.integers(1, len(templates)))]
        caption = "" if rng.random() < caption_dropout else template.format(o=obj, s=style)
        return caption, obj, style

    def sample_batch(self, batch_size: int, rng: np.random.Generator, caption_dropout: float = 0.1) -> CaptionBatch:
        """Training images and captions (the `sample_batch` callback of the demo build's `train_unet`)."""
        captions, objects, styles, images = [], [], [], []
        for _ in range(batch_size):
            caption, obj, style = self.sample_caption(rng, caption_dropout)
            captions.append(caption)
            objects.append(obj)
            styles.append(style)
            images.append(render_array(self, obj, style, rng))
        return CaptionBatch(to_tensor(images), captions, objects, styles)

    def judge_sampler(self):
        """Renders of random objects in random styles (or plain), labelled {"object": ..., "style": ...}."""

        def sample(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, list[str]]]:
            objects = [str(o) for o in rng.choice(list(self.objects), size=n)]
            styles = [str(s) for s in rng.choice([*self.styles, PLAIN], size=n)]
            images = to_tensor([render_array(self, o, s, rng) for o, s in zip(objects, styles)])
            return images, {"object": objects, "style": styles}

        return sample

    def classifier_sampler(self, family: str):
        """`judge_sampler`'s renders labelled by `family` only."""
        both = self.judge_sampler()

        def sample(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
            images, labels = both(n, rng)
            return images, labels[family]

        return sample

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> WorldSpec:
        data = dict(data)
        for key in ("object_templates", "style_templates", "composition_templates"):
            data[key] = tuple(data[key])
        return cls(**data)


# ---------------------------------------------------------------- generation from the seed


def _name(rng: np.random.Generator) -> str:
    syllables = int(rng.integers(2, 4))
    word = "".join(str(rng.choice(ONSETS)) + str(rng.choice(VOWELS)) for _ in range(syllables))
    return word + str(rng.choice(CODAS))


def _draw_templates(rng: np.random.Generator, pool: tuple[str, ...], count: int, max_words: int) -> tuple[str, ...]:
    fitting = [t for t in pool if _words(t) <= max_words]
    picks = rng.choice(len(fitting), size=min(count, len(fitting)), replace=False)
    return tuple(fitting[int(i)] for i in picks)


def _hues(rng: np.random.Generator, count: int) -> list[float]:
    """`count` hues evenly round the wheel (random offset, slight jitter): every style has its own colour."""
    offset = rng.random()
    order = rng.permutation(count)
    return [float((offset + (int(k) + rng.uniform(-0.12, 0.12)) / count) % 1.0) for k in order]


def glyph_params(kind: str, rng: np.random.Generator) -> dict:
    p: dict = {"kind": kind, "angle": float(rng.uniform(0, 2 * math.pi))}
    if kind == "polygon":
        p["sides"] = int(rng.integers(3, 7))
    elif kind == "star":
        p["points"] = int(rng.integers(5, 8))  # format 10: no 4-point stars
        p["inner"] = float(rng.uniform(0.35, 0.55))
    elif kind == "ring":
        p["inner"] = float(rng.uniform(0.45, 0.62))
    elif kind == "crescent":
        p["offset"] = float(rng.uniform(0.4, 0.6))
    elif kind == "cross":
        p["arm"] = float(rng.uniform(0.31, 0.38))  # format 10: was 0.25-0.38
    elif kind == "letter":
        p["letter"] = str(rng.choice(sorted(LETTERS)))
        p["angle"] = float(rng.uniform(-0.3, 0.3))
        p["stroke"] = float(rng.uniform(0.2, 0.28))
    elif kind == "arrow":
        p["stroke"] = float(rng.uniform(0.2, 0.28))
    elif kind == "bars":
        p["count"] = int(rng.integers(2, 4))
        p["width"] = float(rng.uniform(0.22, 0.3))
    elif kind == "dots":
        p["count"] = int(rng.integers(3, 5))
        p["radius"] = float(rng.uniform(0.32, 0.42))
    return p


def texture_params(kind: str, hue: float, rng: np.random.Generator) -> dict:
    """A texture in two colours of the style's own hue: a saturated light one and a dark shade of a nearby hue
    (so no two styles of a world share a colour). Format 4 dropped the pale-tint option: the two worst styles of
    format 3 (0.47, 0.56) were pale tints, low contrast at the autoencoder's blur."""
    p: dict = {
        "kind": kind,
        "hue_a": hue,
        "hue_b": float((hue + rng.uniform(0.04, 0.1) * rng.choice([-1, 1])) % 1.0),
        "value_a": float(rng.uniform(0.8, 1.0)),
        "value_b": float(rng.uniform(0.25, 0.45)),
        "sat_b": float(rng.uniform(0.7, 1.0)),
        "angle": float(rng.uniform(0, math.pi)),
        "period": float(rng.uniform(5.5, 8.0)),
    }
    if kind == "noise":
        p["cells"] = int(rng.integers(2, 4))
    if kind == "sectors":
        p["count"] = int(rng.integers(3, 6))
    if kind == "waves":
        p["amplitude"] = float(rng.uniform(1.0, 2.0))
    return p


def make_spec(seed: int) -> WorldSpec:
    """The world of `seed`."""
    rng = np.random.default_rng([int(seed), 21])
    max_tokens = int(rng.integers(8, 25))
    width = int(rng.choice([64, 96, 128, 160, 192, 224, 256]))
    layers = int(rng.integers(1, 4))
    heads = width // 32
    max_words = max_tokens - 2
    object_templates = _draw_templates(rng, OBJECT_POOL, int(rng.integers(2, 5)), max_words)
    style_templates = _draw_templates(rng, STYLE_POOL, int(rng.integers(2, 5)), max_words)
    composition_templates = _draw_templates(rng, COMPOSITION_POOL, int(rng.integers(2, 4)), max_words)
    n_objects, n_styles = 3, 3  # format 4: six concepts (3-4 of each in format 3 failed the gate more often)
    reserved = {w for t in (*OBJECT_POOL, *STYLE_POOL, *COMPOSITION_POOL) for w in t.split()}
    names: list[str] = []
    while len(names) < n_objects + n_styles:
        name = _name(rng)
        if name not in reserved and name not in names and len(name) <= 10 and name != PLAIN:
            names.append(name)
    glyph_kinds = [str(k) for k in rng.choice(GLYPH_KINDS, size=n_objects, replace=False)]
    texture_kinds = [str(k) for k in rng.choice(TEXTURE_KINDS, size=n_styles, replace=False)]
    hues = _hues(rng, n_styles)
    objects = {n: glyph_params(k, rng) for n, k in zip(names[:n_objects], glyph_kinds)}
    styles = {n: texture_params(k, h, rng) for n, k, h in zip(names[n_objects:], texture_kinds, hues)}
    return WorldSpec(
        seed=int(seed), objects=objects, styles=styles, object_templates=object_templates,
        style_templates=style_templates, composition_templates=composition_templates, text_width=width,
        text_layers=layers, text_heads=heads, max_tokens=max_tokens,
    )


# ---------------------------------------------------------------- rendering


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), dtype=np.float32)


def _segments_distance(u: np.ndarray, v: np.ndarray, segments: list[tuple[float, float, float, float]]) -> np.ndarray:
    best = np.full(u.shape, np.inf, dtype=np.float32)
    for x0, y0, x1, y1 in segments:
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        best = np.minimum(best, np.hypot(u - x0 - t * dx, v - y0 - t * dy))
    return best


def glyph_mask(p: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The glyph in local coordinates (unit radius, rotated)."""
    kind = p["kind"]
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    if kind == "polygon":
        n = p["sides"]
        sector = np.mod(theta, 2 * np.pi / n) - np.pi / n
        return rho * np.cos(sector) <= math.cos(math.pi / n) * 1.0
    if kind == "star":
        n, inner = p["points"], p["inner"]
        phase = np.abs(np.mod(theta, 2 * np.pi / n) - np.pi / n) / (np.pi / n)  # 0 at a point, 1 between
        return rho <= 1.0 - (1.0 - inner) * phase
    if kind == "ring":
        return (rho <= 1.0) & (rho >= p["inner"])
    if kind == "crescent":
        return (rho <= 1.0) & (np.hypot(u - p["offset"], v) > 0.85)
    if kind == "cross":
        arm = p["arm"]
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if kind == "letter":
        return _segments_distance(u, v, LETTERS[p["letter"]]) <= p["stroke"]
    if kind == "arrow":
        segments = [(-0.9, 0.0, 0.9, 0.0), (0.9, 0.0, 0.3, -0.6), (0.9, 0.0, 0.3, 0.6)]
        return _segments_distance(u, v, segments) <= p["stroke"]
    if kind == "bars":
        count, width = p["count"], p["width"]
        centres = np.linspace(-0.75, 0.75, count)
        near = np.min(np.abs(u[..., None] - centres), axis=-1)
        return (near <= width * (0.8 if count == 3 else 1.0)) & (np.abs(v) <= 0.95)
    if kind == "halfdisk":
        return (rho <= 1.0) & (v >= -0.1)
    if kind == "dots":
        count, radius = p["count"], p["radius"]
        angles = np.arange(count) * 2 * np.pi / count
        mask = np.zeros(u.shape, dtype=bool)
        for a in angles:
            mask |= np.hypot(u - 0.62 * math.cos(a), v - 0.62 * math.sin(a)) <= radius
        return mask
    raise ValueError(f"unknown glyph kind {kind!r}")


def _value_noise(cells: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    grid = rng.random((cells + 2, cells + 2)).astype(np.float32)
    gx, gy = x / IMAGE_SIZE * cells + rng.random(), y / IMAGE_SIZE * cells + rng.random()
    i, j = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - i, gy - j
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    top = grid[j, i] * (1 - fx) + grid[j, i + 1] * fx
    bottom = grid[j + 1, i] * (1 - fx) + grid[j + 1, i + 1] * fx
    return top * (1 - fy) + bottom * fy


def texture(p: dict, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float,
            rng: np.random.Generator) -> np.ndarray:
    """The style's paint (HxWx3) in image coordinates, with per-image jitter of colour and phase."""
    a = _hsv(p["hue_a"] + rng.uniform(-0.03, 0.03), rng.uniform(0.7, 1.0), p["value_a"] * rng.uniform(0.9, 1.0))
    b = _hsv(p["hue_b"] + rng.uniform(-0.03, 0.03), p["sat_b"] * rng.uniform(0.8, 1.0),
             p["value_b"] * rng.uniform(0.9, 1.05))
    kind, period = p["kind"], p["period"] * rng.uniform(0.92, 1.08)
    angle = p["angle"] + rng.uniform(-0.15, 0.15)
    along = x * math.cos(angle) + y * math.sin(angle)
    across = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "stripes":
        t = (along / period + rng.random()) % 1.0 < 0.5
    elif kind == "dots":
        pu, pv = rng.random(2) * period
        d2 = ((along + pu) % period - period / 2) ** 2 + ((across + pv) % period - period / 2) ** 2
        t = d2 <= (0.3 * period) ** 2
    elif kind == "checks":
        cell = period * 0.7
        pu, pv = rng.random(2) * 2 * cell
        t = (np.floor((along + pu) / cell) + np.floor((across + pv) / cell)) % 2 == 0
    elif kind == "gradient":
        lo, hi = (cx * math.cos(angle) + cy * math.sin(angle)) - r, (cx * math.cos(angle) + cy * math.sin(angle)) + r
        w = np.clip((along - lo) / (hi - lo), 0.0, 1.0)[..., None]
        return (1 - w) * a + w * b
    elif kind == "noise":
        w = _value_noise(p["cells"] + 3, x, y, rng)
        t = w > np.median(w[np.hypot(x - cx, y - cy) <= r])  # format 10: both colours fill half the glyph's disc
    elif kind == "rings":
        t = (np.hypot(x - cx, y - cy) / period + rng.random()) % 1.0 < 0.5
    elif kind == "waves":
        t = ((along + p["amplitude"] * np.sin(across / period * 2 * np.pi)) / period + rng.random()) % 1.0 < 0.5
    elif kind == "grid":
        pu, pv = rng.random(2) * period
        t = (((along + pu) % period) < 2.0) | (((across + pv) % period) < 2.0)
    elif kind == "sectors":
        n = p["count"]
        t = np.floor((np.arctan2(y - cy, x - cx) + np.pi + rng.random()) / (2 * np.pi) * 2 * n) % 2 == 0
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    return np.where(t[..., None], a, b)


_COORDS = (np.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
_X, _Y = np.meshgrid(_COORDS, _COORDS)


def render_array(spec: WorldSpec, obj: str, style: str | None, rng: np.random.Generator) -> np.ndarray:
    """`obj`'s glyph painted in `style`'s texture (None / "plain": one flat colour), HxWx3 float32 in [0, 1]."""
    glyph = spec.objects[obj]
    cx, cy = rng.uniform(12.0, 20.0, size=2)
    r = rng.uniform(8.5, 11.0)
    angle = glyph["angle"] + rng.uniform(-0.15, 0.15)
    dx, dy = (_X - cx) / r, (_Y - cy) / r
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    light = rng.random() < 0.5
    background = _hsv(rng.random(), rng.uniform(0.0, 0.3),
                      rng.uniform(0.78, 0.95) if light else rng.uniform(0.05, 0.25))
    mask = glyph_mask(glyph, u, v)
    if style is None or style == PLAIN:
        paint = np.broadcast_to(_hsv(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.65, 1.0)), (*_X.shape, 3))
    else:
        paint = texture(spec.styles[style], _X, _Y, cx, cy, r, rng)
    image = np.where(mask[..., None], paint, background)
    image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return image.astype(np.float32)
