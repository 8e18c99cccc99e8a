"""Opening a Stable Diffusion pipeline (a local folder or a Hub id) with the SepME methods attached."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .loader import attach

DTYPES = ("float32", "float16", "bfloat16")


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None) -> Any:
    """`StableDiffusionPipeline.from_pretrained` (a local folder or a Hub id) with the SepME methods attached.

    `dtype`: "float32", "float16" or "bfloat16" (default float32 on CPU, float16 on CUDA).
    """
    from diffusers import StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        pipe = StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
        )
    return attach(pipe.to(device))
