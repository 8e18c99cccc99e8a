"""Walking a UNet: its cross-attention (`attn2`) modules and the layers an increment may change.

Every `attn2` reads the same text embeddings `c`, so one basis `S_p` serves all of them (Eq. 9).
Separable increments change `to_k` / `to_v` only (the weights that see text alone); dense ones
(G-CiRs, the baselines) may also change `to_q` / `to_out.0`.
"""

from __future__ import annotations

from torch import nn

SEPARABLE_PROJECTIONS = ("to_k", "to_v")
DENSE_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# layer-path endings an increment may touch (checked when an eraser is built or loaded)
SEPARABLE_LAYERS = tuple(f"attn2.{p}" for p in SEPARABLE_PROJECTIONS)
DENSE_LAYERS = (*SEPARABLE_LAYERS, "attn2.to_q", "attn2.to_out.0")
# SDXL: the pooled text embedding reaches the UNet through this layer (its input is `[pooled, time ids
# embedded]`), not through `attn2`; the pooled increment changes its pooled-text columns only
POOLED_LAYER = "add_embedding.linear_1"


def pooled_layer(unet: nn.Module) -> nn.Linear | None:
    """The `nn.Linear` the pooled text embedding enters (`add_embedding.linear_1` of an
    `addition_embed_type="text_time"` UNet: SDXL), or None."""
    if getattr(getattr(unet, "config", None), "addition_embed_type", None) != "text_time":
        return None
    return base_linear(unet.get_submodule(POOLED_LAYER))


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


def modified_layers(unet: nn.Module, dense: bool = False) -> list[str]:
    """The layer paths an increment changes: `<attn2>.to_k` / `.to_v` (dense: also `.to_q` / `.to_out.0`)."""
    projections = DENSE_PROJECTIONS if dense else SEPARABLE_PROJECTIONS
    return [f"{path}.{proj}" for path in sorted(cross_attention_modules(unet)) for proj in projections]


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain `nn.Linear` under PEFT / LoRA wrappers (they keep it as `base_layer`)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def layer_weight(unet: nn.Module, layer_path: str) -> nn.Parameter:
    """The base weight (`d_out x d_in`) of one modified layer, under any LoRA wrapper."""
    return base_linear(unet.get_submodule(layer_path)).weight
