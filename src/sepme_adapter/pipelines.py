"""Opening a Stable Diffusion (v1, v2 or XL) pipeline (a local folder or a Hub id) with the SepME methods attached."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .loader import attach

DTYPES = ("float32", "float16", "bfloat16")


def pipeline_class_name(model: str) -> str | None:
    """The pipeline class a model folder or Hub repo declares (`model_index.json`'s `_class_name`), or None."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model).get("_class_name")
    except (OSError, ValueError):
        return None


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None) -> Any:
    """Open a Stable Diffusion model (a local folder or a Hub id) with the SepME methods attached.

    SD v1 / v2 models open as `StableDiffusionPipeline` (no safety checker); a model whose `model_index.json`
    names an SDXL pipeline (`StableDiffusionXL*`) opens as that class (`DiffusionPipeline.from_pretrained`).
    `dtype`: "float32", "float16" or "bfloat16" (default float32 on CPU, float16 on CUDA).
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        if (pipeline_class_name(model) or "").startswith("StableDiffusionXL"):
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, torch_dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
            )
    return attach(pipe.to(device))
