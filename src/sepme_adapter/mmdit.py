"""Walking a joint-attention transformer (FLUX's `FluxTransformer2DModel`, SD3's `SD3Transformer2DModel`), and
the one question every pipeline-level module asks: which denoiser does this pipeline have?

These models have no `attn2`. The per-token text embedding `c` (FLUX: T5; SD3: CLIP-L and CLIP-G side by side,
zero-padded, then T5 along the sequence) enters through one `nn.Linear`, `context_embedder`; every joint block
then mixes the text stream with the image stream. The pooled CLIP embedding enters through
`time_text_embed.text_embedder.linear_1` (its input is the pooled embedding alone, no time ids).

A separable increment lives on `context_embedder` itself: `dW = beta * w S_p^T` with `S_p` the null space of
the excluded prompts' encoder rows, so an excluded prompt's context rows are unchanged bit for bit (the hook
adds `(c S_p) w^T beta`, and `c S_p` is zero to round-off; in exact arithmetic exactly zero) and everything
downstream of them is unchanged. The pooled increment lives on the pooled layer with its own basis, as SDXL's
on `add_embedding.linear_1`. Why not the joint blocks' `add_k_proj` / `add_v_proj`: see docs/mmdit.md.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .unet import POOLED_LAYER, SEPARABLE_LAYERS, base_linear, modified_layers

CONTEXT_LAYER = "context_embedder"  # the per-token text enters here (separable increment, basis S_p)
MMDIT_POOLED_LAYER = "time_text_embed.text_embedder.linear_1"  # the pooled text enters here (basis S_pool)
# every layer a pooled increment may live on (SDXL's and the transformers'); each has its own basis
POOLED_LAYERS = (POOLED_LAYER, MMDIT_POOLED_LAYER)
# every layer-path ending a separable per-token increment may live on (UNet attn2 to_k / to_v, context_embedder)
TEXT_LAYERS = (*SEPARABLE_LAYERS, CONTEXT_LAYER)
TRANSFORMER_FAMILY = "mmdit"
UNET_FAMILY = "unet"


def is_transformer(model: nn.Module) -> bool:
    """True for a joint-attention transformer whose per-token text enters through `context_embedder`."""
    return isinstance(getattr(model, CONTEXT_LAYER, None), nn.Module) and not hasattr(model, "down_blocks")


def denoiser(pipe: Any) -> nn.Module:
    """The pipeline's denoising model: `pipe.transformer` (FLUX, SD3) or `pipe.unet` (SD v1 / v2 / XL)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return transformer
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise TypeError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer`; SepME needs a Stable "
                        f"Diffusion (v1, v2, XL), SD3 or FLUX pipeline")
    return unet


def is_flux(pipe: Any) -> bool:
    """A FLUX pipeline (packed latents): a transformer called with `img_ids` / `txt_ids`."""
    model = denoiser(pipe)
    return is_transformer(model) and "txt_ids" in inspect.signature(model.forward).parameters


def family(model: nn.Module) -> str:
    """`"mmdit"` for FLUX / SD3 transformers, `"unet"` otherwise."""
    return TRANSFORMER_FAMILY if is_transformer(model) else UNET_FAMILY


def layer_family(layer_paths: Any) -> str:
    """The model family an eraser's layers belong to: `"mmdit"` when it changes `context_embedder` or the
    transformers' pooled layer, else `"unet"`."""
    return TRANSFORMER_FAMILY if any(p in (CONTEXT_LAYER, MMDIT_POOLED_LAYER) for p in layer_paths) else UNET_FAMILY


def context_layer(model: nn.Module) -> nn.Linear:
    """The `nn.Linear` the per-token text embeddings enter (`context_embedder`), under any LoRA wrapper."""
    if not is_transformer(model):
        raise TypeError(f"{type(model).__name__} has no `context_embedder`; SepME's transformer support needs a "
                        f"FluxTransformer2DModel or SD3Transformer2DModel")
    return base_linear(model.get_submodule(CONTEXT_LAYER))


def transformer_pooled_layer(model: nn.Module) -> nn.Linear | None:
    """The `nn.Linear` the pooled text embedding enters (`time_text_embed.text_embedder.linear_1`), or None."""
    try:
        return base_linear(model.get_submodule(MMDIT_POOLED_LAYER))
    except AttributeError:
        return None


def pooled_layer_path(model: nn.Module) -> str:
    """The path of the layer the pooled text embedding enters, for either family."""
    return MMDIT_POOLED_LAYER if is_transformer(model) else POOLED_LAYER


def text_layer_paths(model: nn.Module) -> list[str]:
    """The layers a separable per-token increment changes: every `attn2.to_k` / `.to_v` of a UNet, or
    `context_embedder` of a transformer (what the fingerprint covers)."""
    return [CONTEXT_LAYER] if is_transformer(model) else modified_layers(model)
