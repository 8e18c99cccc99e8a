"""The denoiser call: the one place training knows how a model family is noised and called.

The objective (Eq. 2-4) needs, for a reference latent `x_0`, a noisy `x_t` and the model's prediction at `x_t`
for a text: `D(c, .) = pred(., x_t, c) - pred(., x_t, c_0)`. Everything else in the loop (`steps.py`, `loop.py`,
`containment.Probes`) is family-agnostic and goes through the two objects here:

- a noise schedule, drawn from by `harness.noisy_latents`: DDPM's `alphas_cumprod` for a UNet
  (`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, `t` an integer timestep), or a `FlowSchedule` for FLUX / SD3
  (flow matching: `x_t = (1 - sigma) x_0 + sigma eps`, `sigma` in (0, 1] shifted as the pipeline's
  `FlowMatchEulerDiscreteScheduler` shifts its sigmas);
- a call, `call(x_t, t, text, pooled)` -> the prediction in the compute dtype: the UNet's noise prediction
  (`UNetCall`: SDXL's added conditions built from `pooled` and the default time ids), or the transformer's velocity
  (`FlowCall`: FLUX with packed latents, `img_ids` / `txt_ids` and, for guidance-distilled models, the guidance
  embedding; SD3 with `hidden_states`, `encoder_hidden_states`, `pooled_projections` and `timestep`).

On FLUX / SD3 the velocity difference plays the role of `D`: `v(x_t, c) - v(x_t, c_0)` is the direction the text
adds to the flow, exactly as the noise-prediction difference is for a UNet (the velocity is `eps - x_0`, an affine
function of the noise prediction at a fixed `x_t`, so the guidance direction is the same up to a per-timestep
scale, which the relative correlation `rho` and the bounded target divide out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..mmdit import denoiser, is_flux, is_transformer
from ..text import added_conditions, default_time_ids, uses_added_conditions
from .harness import compute_dtype, noise_schedule


@dataclass(frozen=True)
class FlowSchedule:
    """Flow-matching noise levels: one of `steps` equal strata of (0, 1], a uniform sigma inside it, then the
    scheduler's shift (static `shift`, or FLUX's resolution-dependent `mu`)."""

    shift: float = 1.0
    mu: float | None = None  # dynamic shifting: sigma -> exp(mu) / (exp(mu) + 1 / sigma - 1)
    linear: bool = False  # time_shift_type "linear": sigma -> mu / (mu + 1 / sigma - 1)
    train_timesteps: int = 1000

    @classmethod
    def of(cls, scheduler_config: Any, image_tokens: int) -> FlowSchedule:
        """The schedule of a `FlowMatchEulerDiscreteScheduler` config for latents of `image_tokens` tokens."""
        config = dict(scheduler_config)
        mu = None
        if config.get("use_dynamic_shifting"):  # FLUX's calculate_shift
            base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            slope = (high - low) / (top - base)
            mu = image_tokens * slope + (low - slope * base)
        return cls(float(config.get("shift", 1.0)), mu, config.get("time_shift_type", "exponential") == "linear",
                   int(config.get("num_train_timesteps", 1000)))

    def shifted(self, sigma: float) -> float:
        if self.mu is not None:
            scale = self.mu if self.linear else math.exp(self.mu)
            return scale / (scale + (1 / sigma - 1))
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def noisy(self, latents: torch.Tensor, generator: torch.Generator, steps: int,
              device: torch.device) -> tuple[torch.Tensor, float, int]:
        """`x_t = (1 - sigma) x_0 + sigma eps` for one random reference latent; returns `x_t`, sigma and the
        latent's index (the same random draws, in the same order, as the DDPM path)."""
        index = int(torch.randint(len(latents), (1,), generator=generator))
        step = int(torch.randint(steps, (1,), generator=generator))
        inside = float(torch.rand((), generator=generator))
        sigma = self.shifted(min(max((step + inside) / steps, 1e-3), 1.0))
        x0 = latents[index : index + 1]
        noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        return (1 - sigma) * x0 + sigma * noise, sigma, index


@dataclass
class UNetCall:
    """`eps(x_t, t, c)` of a Stable Diffusion UNet (`time_ids`: SDXL's, used with pooled rows)."""

    model: nn.Module
    schedule: torch.Tensor  # alphas_cumprod
    time_ids: torch.Tensor | None = None

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        added = added_conditions(pooled, self.time_ids, x_t.dtype, x_t.device)
        return self.model(x_t, timesteps, text, **added).sample.to(compute_dtype(self.model.dtype))


@dataclass
class FlowCall:
    """`v(x_t, sigma, c)` of a FLUX or SD3 transformer, called as the pipeline calls it."""

    model: nn.Module
    schedule: FlowSchedule
    img_ids: torch.Tensor | None = None  # FLUX: the packed latents' positions (tokens x 3); None: SD3
    guidance: float | None = None  # FLUX.1-dev style guidance embedding (None: not guidance-distilled)

    def __call__(self, x_t: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        dtype, n = x_t.dtype, len(x_t)
        if pooled is None:
            raise ValueError("FLUX / SD3 transformers need the pooled text embedding of every row")
        pooled = pooled.to(device=x_t.device, dtype=dtype)
        if self.img_ids is None:  # SD3: timestep in the scheduler's units
            out = self.model(hidden_states=x_t, timestep=(sigmas * self.schedule.train_timesteps).to(dtype),
                             encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
        else:  # FLUX: the pipeline passes timestep / 1000 = sigma
            guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=x_t.device,
                                                                     dtype=dtype)
            txt_ids = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype)
            out = self.model(hidden_states=x_t, timestep=sigmas.to(dtype), guidance=guidance,
                             pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids,
                             img_ids=self.img_ids.to(device=x_t.device, dtype=dtype), return_dict=False)[0]
        return out.to(compute_dtype(self.model.dtype))


def flux_image_ids(pipe: Any, resolution: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The positions of FLUX's packed latent tokens for `resolution` x `resolution` images (as the pipeline's)."""
    side = 2 * (int(resolution) // (pipe.vae_scale_factor * 2))
    return type(pipe)._prepare_latent_image_ids(1, side // 2, side // 2, device, dtype)


def denoiser_call(pipe: Any, resolution: int | None, guidance_scale: float, pooled: bool) -> UNetCall | FlowCall:
    """The call and schedule for `pipe`'s denoiser: a `UNetCall` (time ids when `pooled` and the UNet takes
    added conditions) or, for FLUX / SD3, a `FlowCall` at `resolution` (FLUX's guidance embedding gets
    `guidance_scale`)."""
    model = denoiser(pipe)
    if not is_transformer(model):
        time_ids = default_time_ids(pipe) if pooled and uses_added_conditions(model) else None
        return UNetCall(model, noise_schedule(pipe), time_ids)
    if resolution is None:
        raise ValueError("a FLUX / SD3 denoiser call needs the training resolution")
    latent_side = int(resolution) // pipe.vae_scale_factor
    if is_flux(pipe):
        ids = flux_image_ids(pipe, resolution, model.device, model.dtype)
        guidance = guidance_scale if getattr(model.config, "guidance_embeds", False) else None
        return FlowCall(model, FlowSchedule.of(pipe.scheduler.config, len(ids)), ids, guidance)
    patch = int(getattr(model.config, "patch_size", 1) or 1)
    return FlowCall(model, FlowSchedule.of(pipe.scheduler.config, (latent_side // patch) ** 2))
