"""Shared fixtures: tiny random-weight pipelines and erasers built on their real null spaces."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import pytest
import torch

import sepme_adapter
from sepme_adapter.base_model import encode_prompts, fingerprint
from sepme_adapter.basis import null_space_basis
from sepme_adapter.testing import tiny_pipeline

torch.set_num_threads(1)  # tiny models gain nothing from threads; avoids oversubscription

CONCEPTS = {
    "vangogh": "a painting by van gogh",
    "picasso": "a painting by picasso",
    "cezanne": "a painting by cezanne",
}
PROTECTED = ["watermark"]


def make_eraser(
    pipe,
    name: str,
    concepts: dict[str, str] = CONCEPTS,
    protected: list[str] = PROTECTED,
    seed: int = 0,
    scale: float = 2000.0,
    with_fingerprint: bool = True,
) -> sepme_adapter.Eraser:
    """A separable eraser with random `w` on the pipeline's real null space (as training would make)."""
    known = {n: p for n, p in concepts.items() if n != name}
    embeddings = encode_prompts(pipe, ["", *known.values(), *protected])
    basis = null_space_basis(list(embeddings))
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for path, module in sorted(sepme_adapter.base_model.cross_attention_modules(pipe.unet).items()):
        for proj in ("to_k", "to_v"):
            d_out = getattr(module, proj).weight.shape[0]
            weights[f"{path}.{proj}"] = torch.randn(d_out, basis.shape[1], generator=generator) * scale
    metadata = {"base_model": "tiny-random"}
    if with_fingerprint:
        metadata["fingerprint"] = fingerprint(pipe)
    return sepme_adapter.Eraser(
        name=name, prompt=concepts[name], basis=basis, weights=weights, beta=1e-4,
        known=known, protected=list(protected), metadata=metadata,
    )


@pytest.fixture
def pipe():
    return sepme_adapter.attach(tiny_pipeline())


@pytest.fixture
def erasers(pipe):
    return {name: make_eraser(pipe, name, seed=i) for i, name in enumerate(CONCEPTS)}


def generate(pipe, prompt: str, seed: int = 0, steps: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np").images
