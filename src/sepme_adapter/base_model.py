"""What an eraser needs to know about its base model: prompt embeddings and a fingerprint.

The fingerprint is derived from the weights erasers modify (`to_k` / `to_v` of every
`attn2`) and from the blank prompt's embedding `c_0`, so a file trained on another base
model, or on the same UNet with another text encoder, is caught at load time. It compares
sums with a relative tolerance, so the same model in fp16 / bf16 still matches.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

FINGERPRINT_RTOL = 1e-4


def cross_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Every cross-attention (`attn2`) module of a UNet, keyed by its `named_modules()` path."""
    found = {
        name: module
        for name, module in unet.named_modules()
        if name.endswith("attn2") and hasattr(module, "to_k") and hasattr(module, "processor")
    }
    if not found:
        raise TypeError(f"{type(unet).__name__} has no cross-attention ('attn2') layers; SepME needs a "
                        f"text-conditioned UNet2DConditionModel")
    return found


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain `nn.Linear` under PEFT / LoRA wrappers (they keep it as `base_layer`)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None) -> Any:
    """`StableDiffusionPipeline.from_pretrained` (a local folder or a Hub id) with the SepME methods attached.

    `dtype`: "float32", "float16" or "bfloat16" (default float32 on CPU, float16 on CUDA).
    """
    from diffusers import StableDiffusionPipeline

    from .loader import attach

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    pipe = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
    )
    return attach(pipe.to(device))


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder outputs `c` (`n x L x d_in`, float32, CPU) exactly as the pipeline computes them."""
    prompts = list(prompts)
    if not prompts:
        return torch.empty(0)
    device = pipe.text_encoder.device
    embeddings = pipe.encode_prompt(prompts, device, 1, False)[0]
    return embeddings.detach().float().cpu()


def fingerprint(pipe: Any, original_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Sums of the modified weights and of `c_0`, plus a short digest for display."""
    original_weights = original_weights or {}
    layers = []
    for path, module in sorted(cross_attention_modules(pipe.unet).items()):
        for proj in ("to_k", "to_v"):
            key = f"{path}.{proj}"
            weight = original_weights.get(key, base_linear(getattr(module, proj)).weight).detach().double()
            layers.append([key, list(weight.shape), float(weight.sum()), float(weight.abs().sum())])
    blank = encode_prompts(pipe, [""]).double()
    record = {"layers": layers, "blank": [float(blank.sum()), float(blank.abs().sum())]}
    shapes = json.dumps([[k, s] for k, s, _, _ in layers]) + f"{blank.abs().sum():.3e}"
    record["digest"] = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    return record


def fingerprint_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Describe how two fingerprints differ, or return None when they match within tolerance."""
    try:
        stored_layers = {k: (tuple(s), a, b) for k, s, a, b in stored["layers"]}
        current_layers = {k: (tuple(s), a, b) for k, s, a, b in current["layers"]}
        blank_stored, blank_current = stored["blank"], current["blank"]
    except (KeyError, TypeError, ValueError):
        return "the stored fingerprint is malformed"
    if set(stored_layers) != set(current_layers):
        return "the cross-attention layers differ (another UNet architecture)"
    for key, (shape, total, magnitude) in stored_layers.items():
        shape_now, total_now, magnitude_now = current_layers[key]
        if shape != shape_now:
            return f"{key} has shape {list(shape_now)}, the eraser's base had {list(shape)}"
        # bf16 rounds each weight by up to 2^-8 relative; the sum's error grows as sqrt(count)
        tolerance = (FINGERPRINT_RTOL + 4 * 2.0**-8 / math.sqrt(math.prod(shape))) * magnitude
        if abs(total - total_now) > tolerance or abs(magnitude - magnitude_now) > tolerance:
            return f"the weights of {key} differ from the eraser's base model"
    if abs(blank_stored[0] - blank_current[0]) > FINGERPRINT_RTOL * blank_stored[1] + 1e-6:
        return "the blank prompt's text embedding differs (another text encoder, or a LoRA loaded into it)"
    return None
