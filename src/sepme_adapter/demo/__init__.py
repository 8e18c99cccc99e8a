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
classifiers; `model="flux"` the FLUX-architecture one (`FluxPipeline`: CLIP's pooled embedding and T5's rows
into a `FluxTransformer2DModel` trained with flow matching; sample it with `true_cfg_scale` and a blank
`negative_prompt`, or through `generation.generate_batched`, which passes them), built by
`python -m sepme_adapter.demo.build --model flux`.
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
    "world_sized",
]


def _require(path: Path, model: str = "sd") -> Path:
    if not path.exists():
        command = "python -m sepme_adapter.demo.build" + ("" if model == "sd" else f" --model {model}")
        raise FileNotFoundError(
            f"demo asset {path} is missing: the demo worlds ship with the source repository, not the wheel "
            f"(clone it and run `make demo`), or build it with `{command}`"
        )
    return path


MODELS = ("sd", "sdxl", "flux")
"""The demo worlds: SD v1 architecture (`StableDiffusionPipeline`), SDXL's (`StableDiffusionXLPipeline`) and
FLUX's (`FluxPipeline`)."""
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}


def pipeline_path(model: str = "sd") -> str:
    """The folder of the demo's pipeline (a `save_pretrained` layout) for `model` ("sd", "sdxl" or "flux")."""
    if model not in MODELS:
        raise ValueError(f"the demo worlds are {MODELS}, got {model!r}")
    return str(_require(ASSETS / "pipeline" if model == "sd" else ASSETS / model / "pipeline", model))


def world_sized(pipe: Any) -> Any:
    """`pipe`, drawing the demo world's 32x32 images by default: a FLUX pipeline's default size is not in its
    folder (`FluxPipeline` sets `default_sample_size` 128, 1024 pixels), so it is set here; others unchanged."""
    if getattr(pipe, "transformer", None) is not None and hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor
    return pipe


def load_pipeline(model: str = "sd", **kwargs: Any):
    """The demo's `StableDiffusionPipeline` ("sd"), `StableDiffusionXLPipeline` ("sdxl") or `FluxPipeline`
    ("flux"), `from_pretrained(pipeline_path(model), **kwargs)`: 32x32 images, CPU-friendly."""
    import diffusers

    path = pipeline_path(model)
    return world_sized(getattr(diffusers, PIPELINE_CLASSES[model]).from_pretrained(path, **kwargs))


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
