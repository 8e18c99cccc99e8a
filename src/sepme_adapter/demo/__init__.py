"""The built-in demo world: a procedural renderer, a tiny trained Stable Diffusion pipeline
and the classifiers that tell which concept a generated image shows.

>>> from sepme_adapter import demo
>>> pipe = demo.load_pipeline()
>>> image = pipe(demo.CONCEPTS["circle"].prompt, num_inference_steps=25).images[0]
>>> demo.load_classifiers()["object"].predict([image])
['circle']

The assets are built by `python -m sepme_adapter.demo.build` (see `build.py`). `model="sdxl"` gives the
SDXL-architecture world (`StableDiffusionXLPipeline`: two text encoders, pooled embeddings and time ids
through `add_embedding`), built by `python -m sepme_adapter.demo.build --model sdxl`, judged by the same
classifiers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .classifier import ConceptClassifier
from .world import (
    CONCEPTS,
    IMAGE_SIZE,
    LABELS,
    OBJECTS,
    PLAIN,
    STYLES,
    VOCABULARY,
    CaptionBatch,
    Concept,
    render,
    render_array,
    sample_caption,
    sample_caption_batch,
)

ASSETS = Path(__file__).parent / "assets"

__all__ = [
    "ASSETS",
    "CONCEPTS",
    "IMAGE_SIZE",
    "LABELS",
    "MODELS",
    "OBJECTS",
    "PLAIN",
    "STYLES",
    "VOCABULARY",
    "CaptionBatch",
    "Concept",
    "ConceptClassifier",
    "demo_classifier",
    "load_classifiers",
    "load_pipeline",
    "pipeline_path",
    "render",
    "render_array",
    "sample_caption",
    "sample_caption_batch",
]


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"demo asset {path} is missing: the demo worlds ship with the source repository, not the wheel "
            f"(clone it and run `make demo`), or build them with `python -m sepme_adapter.demo.build`"
        )
    return path


MODELS = ("sd", "sdxl")
"""The demo worlds: SD v1 architecture (`StableDiffusionPipeline`) and SDXL's (`StableDiffusionXLPipeline`)."""


def pipeline_path(model: str = "sd") -> str:
    """The folder of the demo's pipeline (a `save_pretrained` layout) for `model` ("sd" or "sdxl")."""
    if model not in MODELS:
        raise ValueError(f"the demo worlds are {MODELS}, got {model!r}")
    return str(_require(ASSETS / "pipeline" if model == "sd" else ASSETS / "sdxl" / "pipeline"))


def load_pipeline(model: str = "sd", **kwargs: Any):
    """The demo's `StableDiffusionPipeline` ("sd") or `StableDiffusionXLPipeline` ("sdxl"), `from_pretrained(
    pipeline_path(model), **kwargs)`: 32x32 images, CPU-friendly."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if model == "sd" else StableDiffusionXLPipeline
    return cls.from_pretrained(pipeline_path(model), **kwargs)


def load_classifiers() -> dict[str, ConceptClassifier]:
    """The demo's classifiers by concept family ("object", "style"); use `CONCEPTS[name].family` to pick one."""
    folder = _require(ASSETS / "classifiers")
    return {family: ConceptClassifier.load(folder, family) for family in LABELS}


def demo_classifier() -> Callable[[str, Sequence[Image.Image]], list[bool]]:
    """`classify(name, images)` for evaluation: concept `name` is recognised when its family's classifier says `name`."""
    classifiers = load_classifiers()

    def classify(name: str, images: Sequence[Image.Image]) -> list[bool]:
        if name not in CONCEPTS:
            raise KeyError(f"{name!r} is not a demo concept; demo concepts: {sorted(CONCEPTS)}")
        return [p == name for p in classifiers[CONCEPTS[name].family].predict(list(images))]

    return classify
