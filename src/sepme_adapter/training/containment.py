"""Containment while training: the closed-form retain penalty, the collateral meter and the probe stop.

- `RetainEnergy`: the increment's energy on the retain prompts relative to their own keys / values,
  `mean_l ||C_r dW_l^T||_F^2 / ||C_r W_l^T||_F^2` with `dW_l = beta * w_l S_p^T` (Eq. 10), computed from
  `G = S_p^T C_r^T C_r S_p` alone: no UNet pass. `config.containment` weighs it in the objective.
- `CollateralMeter`: the relative key / value change `||c dW_l^T||_F / ||c W_l^T||_F` (max over layers) of
  each held-out retain prompt: prompts no part of training ever saw. Its median and max are the collateral
  certificate; the probe stop keeps the max under `config.max_collateral`.
- `Probes`: a fixed probe set drawn once per eraser from the seed (reference latents, timesteps, noise
  for the concept's prompts), evaluated every `probe_every` iterations without a graph: the relative
  correlation `rho` (Eq. 2 made scale-free) over all probes at once, so the stop never fires on one sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..basis import energy_gram, stack_embeddings
from ..eraser import Eraser
from ..mmdit import POOLED_LAYERS, TEXT_LAYERS
from ..unet import layer_weight
from .harness import compute_dtype, noisy_latents
from .objective import relative_correlation


def effective_w(eraser: Eraser, layer: str) -> torch.Tensor:
    """`w` in basis coordinates (`d_out x m`), with its graph: rank r gives `B @ A`."""
    w = eraser.weights[layer]
    return w @ eraser.down[layer] if layer in eraser.down else w


def text_layers(eraser: Eraser) -> list[str]:
    """The layers whose increment reads per-token text through the basis (`attn2.to_k` / `to_v`; FLUX / SD3:
    `context_embedder`; not the pooled layers)."""
    return [layer for layer in eraser.weights if layer not in POOLED_LAYERS and layer.endswith(TEXT_LAYERS)]


@dataclass
class RetainEnergy:
    """The closed-form containment term of one eraser (module docstring)."""

    gram: torch.Tensor  # G = mean_c (c S)^T (c S) / ||c||^2, m x m
    scales: dict[str, float]  # layer -> mean_c ||c W^T||^2 / ||c||^2

    @classmethod
    def build(cls, unet: Any, eraser: Eraser, retain: torch.Tensor) -> RetainEnergy:
        prompts = list(retain)
        rows = [stack_embeddings(p) for p in prompts]
        second = sum(r.T @ r / r.pow(2).sum() for r in rows) / len(rows)
        scales = {}
        for layer in text_layers(eraser):
            weight = layer_weight(unet, layer).detach().double().cpu()
            scales[layer] = float(torch.trace(weight @ second @ weight.T))
        return cls(energy_gram(prompts, eraser.basis), scales)

    def penalty(self, eraser: Eraser) -> torch.Tensor:
        """`mean_l beta^2 tr(w_l G w_l^T) / scale_l`: the retain prompts' mean squared relative K/V change."""
        total = 0.0
        for layer, scale in self.scales.items():
            w = effective_w(eraser, layer)
            gram = self.gram.to(device=w.device, dtype=w.dtype)
            total = total + eraser.beta**2 * ((w @ gram) * w).sum() / scale
        return total / max(len(self.scales), 1)


@dataclass
class CollateralMeter:
    """Relative K/V change of held-out retain prompts under an eraser's increment (module docstring)."""

    projected: torch.Tensor  # n x L x m: each prompt's rows in basis coordinates
    norms: dict[str, torch.Tensor]  # layer -> n: ||c W_l^T||_F

    @classmethod
    def build(cls, unet: Any, eraser: Eraser, prompts: torch.Tensor) -> CollateralMeter:
        texts = prompts.detach().double().cpu()
        norms = {layer: torch.linalg.matrix_norm(texts @ layer_weight(unet, layer).detach().double().cpu().T)
                 for layer in text_layers(eraser)}
        return cls(texts @ eraser.basis.detach().double().cpu(), norms)

    @torch.no_grad()
    def changes(self, eraser: Eraser) -> torch.Tensor:
        """Per held-out prompt: the largest relative K/V change over layers."""
        worst = torch.zeros(self.projected.shape[0], dtype=torch.float64)
        for layer, norms in self.norms.items():
            w = effective_w(eraser, layer).detach().double().cpu()
            change = eraser.beta * torch.linalg.matrix_norm(self.projected @ w.T) / norms.clamp_min(1e-300)
            worst = torch.maximum(worst, change)
        return worst

    def summary(self, eraser: Eraser) -> dict[str, float]:
        changes = self.changes(eraser)
        return {"median": float(changes.median()), "max": float(changes.max()), "prompts": int(len(changes))}


@dataclass
class Probes:
    """A fixed probe set for one concept: `x_t`, `t`, text rows and the frozen model's `D(c, theta)` and
    `eps(theta, x_t, c_0)`, drawn once from the seed (module docstring). `call`: the denoiser call
    (`denoise.py`; its `schedule` noises the latents)."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    eps_blank: torch.Tensor
    original: torch.Tensor
    pooled: torch.Tensor | None  # the pooled text of the concept rows (None for SD v1 / v2)

    @classmethod
    @torch.no_grad()
    def draw(cls, call: Any, runtime: Any, latents: torch.Tensor, embedding: torch.Tensor, blank: torch.Tensor,
             ddim_steps: int, size: int, seed: int, pooled: torch.Tensor | None = None,
             blank_pooled: torch.Tensor | None = None, contexts: torch.Tensor | None = None,
             anchors: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Probes:
        """`size` probes of the concept's reference latents (each paired with its prompt's `embedding` row and,
        on SDXL / FLUX / SD3, its `pooled` row), from a generator seeded with `seed` alone; with `contexts`, every
        other probe pairs its latent with the name said in a random context instead. `anchors` (`--objective
        anchor`): the anchor of each `embedding` row and of each context, measured from instead of `blank`."""
        generator = torch.Generator().manual_seed(seed)
        device, dtype = call.model.device, call.model.dtype
        samples = [noisy_latents(latents, generator, call.schedule, ddim_steps, device) for _ in range(size)]
        x_t = torch.cat([s[0] for s in samples]).to(dtype)
        timesteps = torch.tensor([s[1] for s in samples], device=device)
        rows = [embedding[s[2]] for s in samples]
        bases = None if anchors is None else [anchors[0][s[2]] for s in samples]
        if contexts is not None and len(contexts):
            picks = torch.randint(len(contexts), (size,), generator=generator)
            rows = [contexts[int(picks[i])] if i % 2 else row for i, row in enumerate(rows)]
            if bases is not None:
                bases = [anchors[1][int(picks[i])] if i % 2 else row for i, row in enumerate(bases)]
        text = torch.stack(rows).to(device=device, dtype=dtype)
        blank = blank.to(device=device, dtype=dtype).expand(size, -1, -1) if bases is None else \
            torch.stack(bases).to(device=device, dtype=dtype)
        rows = both = None
        if pooled is not None and blank_pooled is not None:
            rows = torch.stack([pooled[s[2]] for s in samples]).to(device=device, dtype=dtype)
            both = torch.cat([rows, blank_pooled.to(device=device, dtype=dtype).expand(size, -1)])
        with runtime.per_row([None] * (2 * size)):
            eps = call(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), torch.cat([text, blank]), both)
        eps_concept, eps_blank = eps.to(compute_dtype(dtype)).chunk(2)
        return cls(x_t, timesteps, text, eps_blank, eps_concept - eps_blank, rows)

    @torch.no_grad()
    def rho(self, call: Any, runtime: Any, name: str) -> float:
        """The relative correlation of `D(c, theta + dW)` with `D(c, theta)` over all probes together."""
        with runtime.per_row([name] * len(self.x_t)):
            edited = call(self.x_t, self.timesteps, self.text, self.pooled).to(self.original.dtype)
        direction = (edited - self.eps_blank).flatten().unsqueeze(0)
        return float(relative_correlation(self.original.flatten().unsqueeze(0), direction)[0])
