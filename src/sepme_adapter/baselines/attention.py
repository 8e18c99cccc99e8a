"""Attention capture for Forget-Me-Not: every `attn2` computes its attention maps explicitly and records them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor

from ..runtime import ErasureRuntime


class _ScoreRecorder:
    """A view of an attention module whose `get_attention_scores` also records the probabilities."""

    def __init__(self, attn: Any, store: list[torch.Tensor]) -> None:
        self.__dict__.update(_attn=attn, _store=store)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def get_attention_scores(self, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        probabilities = self._attn.get_attention_scores(query, key, attention_mask)
        self._store.append(probabilities)  # (batch * heads, image tokens, text tokens)
        return probabilities


class _CapturingProcessor:
    """diffusers' `AttnProcessor` (explicit softmax, so the maps exist) recording each attention map.

    `attn.to_q` / `attn.to_k` carry the erasers' hooks, so they already add the increments.
    """

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store
        self.math = AttnProcessor()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_: Any
                 ) -> torch.Tensor:
        return self.math(_ScoreRecorder(attn, self.store), hidden_states, encoder_hidden_states, attention_mask,
                         temb)


@contextlib.contextmanager
def capture_attention(runtime: ErasureRuntime, store: list[torch.Tensor]) -> Iterator[None]:
    """Within the block every `attn2` computes attention explicitly and appends its probabilities to `store`.

    The installed processors are put back afterwards (IP-Adapter or other custom processors are
    bypassed inside the block: FMN needs the plain text cross-attention maps).
    """
    saved = {path: module.processor for path, module in runtime.attention.items()}
    for module in runtime.attention.values():
        module.set_processor(_CapturingProcessor(store))
    try:
        yield
    finally:
        for path, processor in saved.items():
            runtime.attention[path].set_processor(processor)
