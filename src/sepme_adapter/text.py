"""Prompt embeddings `c` exactly as the pipeline computes them (the rows of Eq. 8's `A_i`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder outputs `c` (`n x L x d_in`, float32, CPU) exactly as the pipeline computes them."""
    prompts = list(prompts)
    if not prompts:
        return torch.empty(0)
    device = pipe.text_encoder.device
    embeddings = pipe.encode_prompt(prompts, device, 1, False)[0]
    return embeddings.detach().float().cpu()
