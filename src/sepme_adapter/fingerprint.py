"""The base-model fingerprint an eraser carries, so a file for another model is refused at load time.

It is derived from the weights erasers modify (`to_k` / `to_v` of every `attn2`; FLUX / SD3: `context_embedder`)
and from the
blank prompt's embedding `c_0`, so a file trained on another base model, or on the same UNet with
another text encoder, is caught. It compares sums with a relative tolerance, so the same model in
fp16 / bf16 still matches.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from .mmdit import denoiser, text_layer_paths
from .text import encode_prompts
from .unet import layer_weight

FINGERPRINT_RTOL = 1e-4


def fingerprint(pipe: Any, original_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Sums of the modified weights and of `c_0`, plus a short digest for display.

    `original_weights`: layer path -> weight to use instead of the live one (the weights before fusing).
    """
    original_weights = original_weights or {}
    layers = []
    model = denoiser(pipe)
    for key in text_layer_paths(model):
        weight = original_weights.get(key, layer_weight(model, key)).detach().double()
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
