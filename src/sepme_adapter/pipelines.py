"""Opening a Stable Diffusion (v1, v2, XL), SD3 or FLUX pipeline (a local folder or a Hub id) with the SepME
methods attached."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from .loader import attach

DTYPES = ("float32", "float16", "bfloat16")
# `model_index.json` class names opened with `DiffusionPipeline.from_pretrained` (their own class), not as SD v1 / v2
OWN_CLASS_PREFIXES = ("StableDiffusionXL", "StableDiffusion3", "Flux")


def pipeline_class_name(model: str) -> str | None:
    """The pipeline class a model folder or Hub repo declares (`model_index.json`'s `_class_name`), or None."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model).get("_class_name")
    except (OSError, ValueError):
        return None


def check_model_location(model: str) -> None:
    """A `model` that looks like a path (absolute, `./`, `~`, or more than one `/`) must be an existing folder;
    otherwise diffusers would report a Hub repo-id format error for a simple typo in a folder name."""
    if os.path.isdir(model):
        return
    if os.path.isfile(model):
        raise FileNotFoundError(f"model {model!r} is a file; pass a diffusers folder (with model_index.json) or a "
                                f"Hub id such as org/name")
    looks_like_path = (os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model
                       or model.strip("/").count("/") > 1 or model.endswith("/"))
    if looks_like_path:
        raise FileNotFoundError(f"model folder not found: {os.path.expanduser(model)} (pass an existing diffusers "
                                f"folder, or a Hub id such as org/name)")


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None) -> Any:
    """Open a Stable Diffusion, SD3 or FLUX model (a local folder or a Hub id) with the SepME methods attached.

    SD v1 / v2 models open as `StableDiffusionPipeline` (no safety checker); a model whose `model_index.json`
    names an SDXL, SD3 or FLUX pipeline (`StableDiffusionXL*`, `StableDiffusion3*`, `Flux*`) opens as that class
    (`DiffusionPipeline.from_pretrained`).
    `dtype`: "float32", "float16" or "bfloat16" (default float32 on CPU, float16 on CUDA).
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    check_model_location(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        if (pipeline_class_name(model) or "").startswith(OWN_CLASS_PREFIXES):
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, torch_dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
            )
    return attach(pipe.to(device))
