"""The certificates every eraser carries: leakage (the prompts it must keep) and collateral (prompts nobody listed).

For an eraser with increment `dW_l = beta * w_l @ S_p^T` (Eq. 10) and its excluded prompts (blank,
known concepts' prompts, protected prompts; each an `L x d_in` embedding `c`), the certificate is

    max over layers l (to_k / to_v) and excluded prompts c of  ||c dW_l^T||_F / ||c W_l^T||_F,

the largest relative change of any `attn2` key or value those prompts see. With the exact null space
(Eq. 8) it is float round-off (~1e-7); with a compact basis it is the measured price of capacity.
An SDXL eraser's pooled increment counts too: `||p dW^T|| / ||p W^T||` on `add_embedding.linear_1`'s
pooled-text columns for each excluded prompt's pooled embedding `p`. FLUX / SD3 erasers: the layer is
`context_embedder` (the relative change of the context rows the joint blocks read) and the pooled layer
`time_text_embed.text_embedder.linear_1`.
"""

from __future__ import annotations

from typing import Any

import torch

from .eraser import Eraser
from .mmdit import POOLED_LAYERS, TEXT_LAYERS, denoiser
from .text import encode_prompts_pooled
from .unet import layer_weight


def relative_change(embeddings: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`||c dW^T||_F / ||c W^T||_F` for each prompt `c` of `embeddings` (`n x L x d`), in float64."""
    change = torch.linalg.matrix_norm(embeddings @ delta.T)
    return change / torch.linalg.matrix_norm(embeddings @ weight.T).clamp_min(1e-300)


@torch.no_grad()
def leakage_certificate(pipe: Any, eraser: Eraser, prompts: list[str] | None = None,
                        original_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Measure the certificate of `eraser` on `pipe`'s base weights (default prompts: `eraser.excluded_prompts`).

    `original_weights`: layer path -> the unfused weight, when the pipeline's weights are fused.
    Returns `{"max_leakage", "worst_prompt", "worst_layer", "prompts"}`.
    """
    prompts = eraser.excluded_prompts if prompts is None else list(prompts)
    texts, pooled = encode_prompts_pooled(pipe, prompts)
    texts = texts.double()
    worst, worst_prompt, worst_layer = 0.0, None, None
    for layer in sorted(eraser.weights):
        if not layer.endswith(TEXT_LAYERS) and layer not in POOLED_LAYERS:
            continue  # dense to_q / to_out increments do not read text
        weight = (original_weights or {}).get(layer)
        weight = (layer_weight(denoiser(pipe), layer) if weight is None else weight).detach().double().cpu()
        inputs = texts
        if layer in POOLED_LAYERS:  # one row per prompt: its pooled embedding, zeros on the time-id columns
            inputs = torch.zeros(len(prompts), 1, weight.shape[1], dtype=torch.float64)
            inputs[:, 0, : pooled.shape[-1]] = pooled.double()
        changes = relative_change(inputs, eraser.delta(layer).double(), weight)
        index = int(changes.argmax())
        if float(changes[index]) >= worst:
            worst, worst_prompt, worst_layer = float(changes[index]), prompts[index], layer
    return {"max_leakage": worst, "worst_prompt": worst_prompt, "worst_layer": worst_layer,
            "prompts": len(prompts)}


@torch.no_grad()
def collateral_certificate(pipe: Any, eraser: Eraser, prompts: list[str] | None = None,
                           original_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The collateral certificate: how far `eraser` moves prompts nobody listed. For each prompt (default: the
    held-out retain prompts stored in the eraser, `eraser.metadata["collateral"]["held_out"]`, never used in
    training) the largest relative `attn2` key / value change over layers, `max_l ||c dW_l^T|| / ||c W_l^T||`;
    returns their median and max, the worst prompt and the count. Unlike the leakage certificate (exact
    prompts, ~1e-7) this is a measured size, not a bound: it says how much of the increment unlisted prompts
    see."""
    if prompts is None:
        prompts = list((eraser.metadata.get("collateral") or {}).get("held_out") or [])
    if not prompts:
        return {"median": None, "max": None, "worst_prompt": None, "prompts": 0}
    texts = encode_prompts_pooled(pipe, prompts)[0].double()
    worst = torch.zeros(len(prompts), dtype=torch.float64)
    for layer in sorted(eraser.weights):
        if not layer.endswith(TEXT_LAYERS):
            continue
        weight = (original_weights or {}).get(layer)
        weight = (layer_weight(denoiser(pipe), layer) if weight is None else weight).detach().double().cpu()
        worst = torch.maximum(worst, relative_change(texts, eraser.delta(layer).double(), weight))
    index = int(worst.argmax())
    return {"median": float(worst.median()), "max": float(worst[index]), "worst_prompt": prompts[index],
            "prompts": len(prompts)}


def certify(pipe: Any, eraser: Eraser) -> Eraser:
    """Measure the certificate and store it in `eraser.metadata["certificate"]`; returns the eraser."""
    eraser.metadata["certificate"] = leakage_certificate(pipe, eraser)
    return eraser
