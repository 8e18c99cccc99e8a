"""The baselines' objectives, in the paper's notation (SepME Sec. 2): ESD-x, Concept Ablation, Forget-Me-Not
(attention re-steering) and UCE's closed-form edit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime import ErasureRuntime
from ..text import added_conditions, encode_prompts
from ..training.concepts import Concept
from ..unet import base_linear, cross_attention_modules
from .attention import capture_attention
from .config import LAYER_SETS, BaselineConfig


def _added(time_ids: torch.Tensor | None, like: torch.Tensor, *pooled: torch.Tensor | None) -> dict[str, Any]:
    """SDXL's `added_cond_kwargs` for rows with these pooled embeddings (concatenated, in order); `{}` for a UNet
    without added conditions (`time_ids` or a pooled embedding None): the call stays exactly as before."""
    if time_ids is None or any(p is None for p in pooled):
        return {}
    return added_conditions(torch.cat(pooled), time_ids, like.dtype, like.device)


def esd_loss(unet: Any, runtime: ErasureRuntime, name: str, x_t: torch.Tensor, t: torch.Tensor,
             concept: torch.Tensor, blank: torch.Tensor, eta: float, concept_pooled: torch.Tensor | None = None,
             blank_pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """ESD-x (Gandikota et al. 2023, Eq. 6 of ESD; SepME Sec. 2):
    `|| eps(theta', x_t, c_f) - [eps(theta, x_t, c_0) - eta (eps(theta, x_t, c_f) - eps(theta, x_t, c_0))] ||^2`.

    `concept_pooled`, `blank_pooled` (`1 x d_pool`) and `time_ids` (`1 x k`): SDXL's added conditions (None for
    SD v1 / v2), likewise for the other losses.
    """
    with torch.no_grad(), runtime.per_row([None, None]):  # the frozen model theta: no increment
        frozen = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([concept, blank]),
                      **_added(time_ids, x_t, concept_pooled, blank_pooled)).sample.float()
    eps_concept, eps_blank = frozen.chunk(2)
    target = eps_blank - eta * (eps_concept - eps_blank)
    with runtime.per_row([name]):
        edited = unet(x_t, t, concept, **_added(time_ids, x_t, concept_pooled)).sample.float()
    return F.mse_loss(edited, target)


def ablation_loss(unet: Any, runtime: ErasureRuntime, name: str, x_t: torch.Tensor, t: torch.Tensor,
                  concept: torch.Tensor, anchor: torch.Tensor, concept_pooled: torch.Tensor | None = None,
                  anchor_pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Concept Ablation, model-based (Kumari et al. 2023, Eq. 3; SepME Sec. 2):
    `|| eps(theta', x_t, c_f) - eps(theta, x_t, c*) ||^2`, `x_t` from images of the anchor `c*`.
    """
    with torch.no_grad(), runtime.per_row([None]):
        target = unet(x_t, t, anchor, **_added(time_ids, x_t, anchor_pooled)).sample.float()
    with runtime.per_row([name]):
        edited = unet(x_t, t, concept, **_added(time_ids, x_t, concept_pooled)).sample.float()
    return F.mse_loss(edited, target)


def fmn_loss(unet: Any, runtime: ErasureRuntime, name: str, x_t: torch.Tensor, t: torch.Tensor,
             concept: torch.Tensor, positions: Sequence[int], concept_pooled: torch.Tensor | None = None,
             time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Forget-Me-Not attention re-steering (Zhang et al. 2023, Sec. 3; SepME Sec. 2): the L2 norm of
    every `attn2` attention probability on the concept's token positions, `|| cat_l A_l[:, :, pos] ||_2`
    (as FMN's `AttnController.loss`), with the edited model `theta'`.
    """
    maps: list[torch.Tensor] = []
    with capture_attention(runtime, maps), runtime.per_row([name]):
        unet(x_t, t, concept, **_added(time_ids, x_t, concept_pooled))
    index = torch.as_tensor(list(positions), dtype=torch.long, device=x_t.device)
    return torch.cat([m.index_select(-1, index).float().flatten() for m in maps]).norm()


@torch.no_grad()
def uce_increments(pipe: Any, prompt: str, anchor: str, preserve: Sequence[str], config: BaselineConfig
                   ) -> dict[str, torch.Tensor]:
    """UCE (Gandikota et al. 2024, Eq. 7-8): for every `attn2` `to_k` / `to_v` weight `W`,
    `W' = (s_e sum_i W c*_i c_i^T + s_p sum_j W c_j c_j^T + lambda W)(s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T + lambda I)^-1`
    (`v*_i = W c*_i`: UCE's "replace" edit). Since every term is `W` times a `d_in x d_in` matrix, the
    increment is `W' - W = s_e W (C* - C)^T C (C^T C s_e + s_p P^T P + lambda I)^-1`, computed once as a
    `d_in x d_in` matrix `G` and applied to every layer: `dW = W G`.

    `c_i`: the concept's token embeddings (`uce_tokens`: `tail` = its last word token onwards, aligned
    position by position with the anchor's, as UCE's release; `all` = every position); `c*_i`: the
    anchor's; `c_j`: every token of each preserved prompt.
    """
    texts = encode_prompts(pipe, [prompt, anchor, *preserve]).double()
    concept_rows, anchor_rows = texts[0], texts[1]
    if config.uce_tokens == "tail":
        lengths = token_counts(pipe, [prompt, anchor])
        last = [max(n - 2, 0) for n in lengths]  # the last word token (BOS for a blank prompt)
        farthest, total = max(last), texts.shape[1]
        concept_rows = concept_rows[last[0] : total - (farthest - last[0])]
        anchor_rows = anchor_rows[last[1] : total - (farthest - last[1])]
    preserved = texts[2:].reshape(-1, texts.shape[-1])
    d_in = texts.shape[-1]
    gram = (config.uce_erase_scale * concept_rows.T @ concept_rows
            + config.uce_preserve_scale * preserved.T @ preserved
            + config.uce_lambda * torch.eye(d_in, dtype=torch.float64))
    # G = s_e (C* - C)^T C gram^-1; gram is symmetric positive definite (lambda > 0)
    change = config.uce_erase_scale * (anchor_rows - concept_rows).T @ concept_rows
    g = torch.linalg.solve(gram, change.T).T
    increments = {}
    for path, module in sorted(cross_attention_modules(pipe.unet).items()):
        for proj in LAYER_SETS["kv"]:
            weight = base_linear(getattr(module, proj)).weight.detach().to("cpu", torch.float64)
            increments[f"{path}.{proj}"] = (weight @ g).float()
    return increments


def concept_token_positions(pipe: Any, concept: Concept) -> list[int]:
    """Token positions FMN suppresses: the concept's name where it appears in its prompt (spaces, `-`
    and `_` all count as word breaks, so `van-gogh` finds "van gogh"); otherwise every word token of
    the prompt (everything between the start and end tokens)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(concept.prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    for phrase in dict.fromkeys([concept.name, concept.name.replace("-", " ").replace("_", " ")]):
        wanted = tokenizer(phrase, add_special_tokens=False).input_ids
        for start in range(1, len(ids) - len(wanted) + 1):
            if wanted and ids[start : start + len(wanted)] == wanted:
                return list(range(start, start + len(wanted)))
    return list(range(1, max(len(ids) - 1, 2)))


def token_counts(pipe: Any, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt including its start and end tokens (the attention mask's sum)."""
    tokenizer = pipe.tokenizer
    encoded = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True)
    return [int(sum(mask)) for mask in encoded.attention_mask]
