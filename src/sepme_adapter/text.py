"""Prompt embeddings `c` exactly as the pipeline computes them (the rows of Eq. 8's `A_i`).

Stable Diffusion v1 / v2 have one text encoder; SDXL has two, and its prompt embedding is both
encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide), plus a pooled embedding
(the second encoder's projected end-of-text token) that reaches the UNet through `add_embedding`
together with six "time ids" (original size, crop corner, target size). `encode_prompts` returns
the per-token embeddings every `attn2` reads; `encode_prompts_pooled` also the pooled ones, and
`added_cond_kwargs` builds what an SDXL UNet call needs besides them.

FLUX and SD3 (`text_sequence_length`): the per-token embedding ends with T5 rows, as many as the pipeline's
`max_sequence_length` (FLUX: T5 alone; SD3: CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5
along the sequence). T5 attends without a mask, so every row depends on that length: an eraser is exact for the
length its basis was made with (recorded as `metadata["text_length"]`, the number of rows), which is
`min(the pipeline's default max_sequence_length, the T5 tokenizer's model_max_length)`.

SDXL's unconditional branch: with `force_zeros_for_empty_prompt` (SDXL base's default) and no
negative prompt the pipeline feeds zeros, not the blank prompt's embedding (`unconditional_embeddings`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def _text_device(pipe: Any) -> torch.device:
    encoder = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
    return encoder.device


def prompt_tokenizer(pipe: Any) -> Any:
    """The pipeline's (first) tokenizer: what decides a prompt's tokens and its length limit."""
    return pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2


def uses_added_conditions(unet: Any) -> bool:
    """Whether the UNet takes pooled text embeddings and time ids (`addition_embed_type="text_time"`: SDXL)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _call_default(pipe: Any, name: str) -> Any:
    """The default of one `pipe.__call__` / `pipe.encode_prompt` argument (None where neither has it)."""
    for method in (pipe.__call__ if callable(pipe) else None, getattr(pipe, "encode_prompt", None)):
        if method is None:
            continue
        parameter = inspect.signature(method).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return None


def t5_tokenizer(pipe: Any) -> Any:
    """The T5 tokenizer of a FLUX (`tokenizer_2`) or SD3 (`tokenizer_3`) pipeline, or None."""
    if getattr(pipe, "tokenizer_3", None) is not None:
        return pipe.tokenizer_3
    if getattr(pipe, "transformer", None) is not None and getattr(pipe, "text_encoder_3", None) is None \
            and "do_classifier_free_guidance" not in inspect.signature(pipe.encode_prompt).parameters:
        return getattr(pipe, "tokenizer_2", None)  # FLUX: tokenizer_2 is T5's
    return None


def text_sequence_length(pipe: Any) -> int | None:
    """The `max_sequence_length` SepME encodes FLUX / SD3 prompts with (and the pipeline must be called with):
    the pipeline's default, capped by the T5 tokenizer's `model_max_length`. None for SD v1 / v2 / XL."""
    if getattr(pipe, "transformer", None) is None:
        return None
    default = _call_default(pipe, "max_sequence_length")
    if default is None:
        return None
    tokenizer = t5_tokenizer(pipe)
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return int(min(default, limit)) if limit and limit < 100_000 else int(default)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU in float32, or float64 for a float64 pipeline (checks where round-off would decide)."""
    return tensor.detach().to(device="cpu", dtype=torch.promote_types(tensor.dtype, torch.float32))


@torch.no_grad()
def encode_prompts_pooled(pipe: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token embeddings `c` (`n x L x d_in`) and the pooled embeddings (`n x d_pool`; None for SD v1 / v2),
    float32 (a float64 pipeline's: float64) on the CPU, exactly as the pipeline's `encode_prompt` computes them for conditional prompts
    (FLUX / SD3: at `text_sequence_length(pipe)` T5 tokens)."""
    prompts = list(prompts)
    if not prompts:
        return torch.empty(0), None
    parameters = inspect.signature(pipe.encode_prompt).parameters
    extra: dict[str, Any] = {}
    length = text_sequence_length(pipe)
    if length is not None:
        extra["max_sequence_length"] = length
    if "do_classifier_free_guidance" not in parameters:  # FLUX: (embeds, pooled, text ids)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=_text_device(pipe),
                                               num_images_per_prompt=1, **extra)
        return _wide(embeds), _wide(pooled)
    if "prompt_3" in parameters:  # SD3: prompt_2 / prompt_3 default to the prompt
        extra.update(prompt_2=None, prompt_3=None)
    encoded = pipe.encode_prompt(prompt=prompts, device=_text_device(pipe), num_images_per_prompt=1,
                                 do_classifier_free_guidance=False, **extra)
    pooled = encoded[2] if len(encoded) >= 4 and encoded[2] is not None else None
    return _wide(encoded[0]), None if pooled is None else _wide(pooled)


def encode_prompts(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder outputs `c` (`n x L x d_in`, float32, CPU) exactly as the pipeline computes them."""
    return encode_prompts_pooled(pipe, prompts)[0]


def zeros_for_empty_prompt(pipe: Any) -> bool:
    """Whether the pipeline's unconditional branch uses zero embeddings (SDXL's `force_zeros_for_empty_prompt`)."""
    config = getattr(pipe, "config", None) or {}
    return bool(config.get("force_zeros_for_empty_prompt", False)) and hasattr(pipe, "text_encoder_2")


def unconditional_embeddings(pipe: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The embeddings of classifier-free guidance's unconditional branch without a negative prompt
    (`1 x L x d_in`, and pooled `1 x d_pool` or None): the blank prompt's, or zeros where the pipeline
    forces zeros for an empty negative prompt (SDXL). Any linear increment maps zeros to zeros, so
    that branch is untouched by every eraser without being excluded."""
    blank, pooled = encode_prompts_pooled(pipe, [""])
    if zeros_for_empty_prompt(pipe):
        return torch.zeros_like(blank), None if pooled is None else torch.zeros_like(pooled)
    return blank, pooled


def default_time_ids(pipe: Any) -> torch.Tensor:
    """SDXL's `add_time_ids` for the pipeline's default image size, as its `__call__` builds them by default:
    `(height, width, 0, 0, height, width)`, or `(height, width, 0, 0, 6.0)` for pipelines that condition on an
    aesthetic score (the refiner's `requires_aesthetics_score`). Shape `1 x k`, float32."""
    size = int(pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8))
    config = getattr(pipe, "config", None) or {}
    if config.get("requires_aesthetics_score", False):
        return torch.tensor([[size, size, 0, 0, 6.0]], dtype=torch.float32)
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)


def added_cond_kwargs(pipe: Any, pooled: torch.Tensor | None, like: torch.Tensor | None = None) -> dict[str, Any]:
    """The keyword arguments an SDXL UNet call needs besides the per-token embeddings, for a batch whose rows
    have these pooled embeddings: `{"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}` (the default
    size's time ids on every row); `{}` for a UNet without added conditions or when `pooled` is None.
    `like`: a tensor whose device and dtype they take (default: the UNet's)."""
    if pooled is None or getattr(pipe, "unet", None) is None or not uses_added_conditions(pipe.unet):
        return {}
    return added_conditions(pooled, default_time_ids(pipe), pipe.unet.dtype if like is None else like.dtype,
                            pipe.unet.device if like is None else like.device)


def added_conditions(pooled: torch.Tensor | None, time_ids: torch.Tensor | None, dtype: torch.dtype,
                     device: torch.device | str) -> dict[str, Any]:
    """`{"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids on every row}}`, or `{}` when either is
    None (a UNet without added conditions: the call stays exactly as before)."""
    if pooled is None or time_ids is None:
        return {}
    time_ids = time_ids.to(device=device, dtype=dtype).expand(len(pooled), -1)
    return {"added_cond_kwargs": {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids}}


def overlong_prompts(pipe: Any, prompts: Sequence[str]) -> list[tuple[str, int, int]]:
    """`(prompt, tokens, limit)` for every prompt longer than a tokenizer of the pipeline accepts (counting the
    start and end tokens): the text encoder would see only its truncation."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
                  if t is not None and t is not t5_tokenizer(pipe)]  # T5 (FLUX, SD3): its own length, see above
    found = []
    for prompt in dict.fromkeys(prompts):
        for tokenizer in tokenizers:
            limit = getattr(tokenizer, "model_max_length", None)
            if not limit or limit > 100_000:  # "no limit" is a huge number in transformers
                continue
            count = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
            if count > limit:
                found.append((prompt, count, limit))
                break
    return found
