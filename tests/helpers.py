"""Helpers the test modules share: the concepts, erasers on real null spaces, key/value recording,
and a stand-in classifier. Test modules import from here, never from each other."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import sepme_adapter
from sepme_adapter.testing.conformance import random_eraser
from sepme_adapter.text import added_cond_kwargs, encode_prompts_pooled
from sepme_adapter.unet import cross_attention_modules

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
    eraser = random_eraser(pipe, name, concepts, protected, seed, scale)
    if not with_fingerprint:
        del eraser.metadata["fingerprint"]
    return eraser


def make_rank_eraser(pipe, name: str, rank: int, seed: int = 0, stored: bool = False, **kwargs) -> sepme_adapter.Eraser:
    """A rank-r eraser on the pipeline's real null space: random `A` (r x m) and `B` (d_out x r) per layer.

    `stored`: as read back from its file (`A S_p^T` per layer, no basis) rather than as training leaves it."""
    full = make_eraser(pipe, name, seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(1000 + seed)
    m = full.basis.shape[1]
    down = {layer: torch.randn(rank, m, generator=generator) / m**0.5 for layer in sorted(full.weights)}
    weights = {layer: torch.randn(w.shape[0], rank, generator=generator) * 2000.0 * m**0.5
               for layer, w in sorted(full.weights.items())}
    eraser = sepme_adapter.Eraser(
        name=name, prompt=full.prompt, basis=full.basis, weights=weights, down=down, beta=full.beta,
        known=full.known, protected=full.protected, metadata=full.metadata,
    )
    return sepme_adapter.Eraser.from_state_dict(eraser.state_dict(), eraser.header()) if stored else eraser


def generate(pipe, prompt: str, seed: int = 0, steps: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np").images


class RecordingProcessor(AttnProcessor2_0):
    """The default processor, recording the keys and values it computes."""

    def __init__(self, log, path):
        super().__init__()
        self.log, self.path = log, path

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.log[f"{self.path}.k"] = attn.to_k(encoder_hidden_states).detach().clone()
        self.log[f"{self.path}.v"] = attn.to_v(encoder_hidden_states).detach().clone()
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def keys_and_values(pipe, prompts):
    """Every attn2's keys and values for the prompts, as the processors see them."""
    log = {}
    for module in cross_attention_modules(pipe.unet).values():
        target = module.processor
        if not isinstance(target, RecordingProcessor):
            raise AssertionError("install recording processors before loading erasers")
        target.log = log
    text, pooled = encode_prompts_pooled(pipe, prompts)  # pooled: SDXL's added conditions (None for SD v1 / v2)
    with torch.no_grad():
        pipe.unet(torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0)), 10, text,
                  **added_cond_kwargs(pipe, pooled))
    return log


def recording(pipe):
    """Install `RecordingProcessor`s on every attn2 (before loading erasers)."""
    for path, module in cross_attention_modules(pipe.unet).items():
        module.set_processor(RecordingProcessor({}, path))
    return pipe


def first_block_inputs(pipe, run) -> dict[str, torch.Tensor]:
    """FLUX / SD3: what the first joint block reads while `run()` calls the transformer: the context rows
    (`context_embedder`'s output, `"context"`) and `temb` (time and pooled text, through `time_text_embed`)."""
    seen = {}

    def record(module, args, kwargs):
        seen["context"] = kwargs["encoder_hidden_states"].detach().clone()
        seen["temb"] = kwargs["temb"].detach().clone()

    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def unet_output(pipe, prompt="a painting by van gogh"):
    text, pooled = encode_prompts_pooled(pipe, [prompt, ""])
    with torch.no_grad():
        return pipe.unet(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), 500, text,
                         **added_cond_kwargs(pipe, pooled)).sample


def brightness(name, images):
    """A stand-in classifier for `sepme eval --classifier tests.helpers:brightness`."""
    return [float(np.asarray(i).mean()) > 120.0 for i in images]


def assert_erasing_keeps_the_excluded_prompts_exact(pipe, erasers, erased, concepts=CONCEPTS,
                                                    protected=PROTECTED) -> dict:
    """Load `erasers` (recording processors installed), erase `erased`: the blank prompt, the protected
    prompts and every restored concept keep their keys and values (<= 1e-5 relative); the erased concepts'
    change (> 1e-2). Returns the original keys and values."""
    restored = [n for n in concepts if n not in erased]
    kept = ["", *protected, *(concepts[n] for n in restored)]
    changed = [concepts[n] for n in erased]
    original = keys_and_values(pipe, kept + changed)
    for eraser in erasers.values():
        pipe.load_sepme(eraser, erase=False)
    pipe.set_erased(erased)
    edited = keys_and_values(pipe, kept + changed)
    n = len(kept)
    for key in original:
        scale = original[key].abs().max()
        assert (edited[key][:n] - original[key][:n]).abs().max() <= 1e-5 * scale, key
        assert (edited[key][n:] - original[key][n:]).abs().max() > 1e-2 * scale, key  # the concepts did change
    return original


def interrupt_training_at(monkeypatch, call: int):
    """Make `training.steps.noisy_latents` raise `KeyboardInterrupt` at its `call`-th call (one call per live
    concept and iteration), as Ctrl-C would; returns a function that puts the real one back."""
    from sepme_adapter.training import steps

    real, calls = steps.noisy_latents, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "noisy_latents", interrupting)
    return lambda: monkeypatch.setattr(steps, "noisy_latents", real)
