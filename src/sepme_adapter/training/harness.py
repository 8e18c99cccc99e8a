"""What every trainer of increments shares (SepME, G-CiRs and the baselines in `baselines/`).

One denoiser (a UNet, or a FLUX / SD3 transformer) serves as the frozen model (no eraser active) and the
edited model (trainable erasers read live by the hooks), so training needs: the model's weights frozen,
zero-initialised increments, noisy reference latents `x_t` (DDPM's, or flow matching's through a
`denoise.FlowSchedule`), and the base model recorded in each eraser.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DDPMScheduler

from ..errors import TrainingError
from ..fingerprint import fingerprint
from ..loader import attach, erasure_runtime
from ..mmdit import denoiser, is_transformer
from ..runtime import ErasureRuntime
from ..text import text_sequence_length
from ..unet import layer_weight


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses and increments use: the model's, but at least float32 (fp16 models train in fp32)."""
    return torch.promote_types(dtype, torch.float32)


def training_runtime(pipe: Any, names: Sequence[str] = ()) -> tuple[Any, ErasureRuntime]:
    """Attach SepME to `pipe` and return it with its runtime; refuse loaded erasers named `names` and fused ones."""
    pipe = attach(pipe)
    runtime = erasure_runtime(pipe, create=True)
    clashes = [name for name in names if name in runtime.erasers]
    if clashes:
        raise TrainingError(f"erasers named {clashes} are loaded on this pipeline; unload them before training")
    if runtime.fused:
        raise TrainingError("erasers are fused into the weights; call pipe.unfuse_sepme() before training")
    return pipe, runtime


def base_model_metadata(pipe: Any, runtime: ErasureRuntime) -> dict[str, Any]:
    """The base model's name and fingerprint, recorded in every trained eraser (checked when loading)."""
    name = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
    return {"base_model": name, "pipeline": type(pipe).__name__, "fingerprint": fingerprint(pipe, runtime.fused_originals)}


def text_length_metadata(pipe: Any, rows: int) -> dict[str, Any]:
    """FLUX / SD3: the text rows per prompt the bases were made with and the `max_sequence_length` that gives
    them (the runtime refuses other lengths, `runtime.check_text_length`); `{}` for a UNet."""
    if not is_transformer(denoiser(pipe)):
        return {}
    return {"text_length": int(rows), "max_sequence_length": text_sequence_length(pipe)}


@contextmanager
def frozen_model(pipe: Any) -> Iterator[None]:
    """Freeze every model weight (only the increments learn); restore the flags afterwards."""
    modules = [m for m in (denoiser(pipe), pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                           getattr(pipe, "text_encoder_3", None), pipe.vae) if m is not None]
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module, module_flags in zip(modules, flags):
            for p, flag in zip(module.parameters(), module_flags):
                p.requires_grad_(flag)


def zero_weights(pipe: Any, layers: Sequence[str], columns: int | None) -> dict[str, torch.Tensor]:
    """Trainable `w`s initialised to zero (Eq. 10): `d_out x m`, or `d_out x d_in` for dense increments."""
    weights = {}
    for layer in layers:
        weight = layer_weight(denoiser(pipe), layer)
        shape = (weight.shape[0], columns if columns is not None else weight.shape[1])
        dtype = compute_dtype(weight.dtype)
        weights[layer] = torch.nn.Parameter(torch.zeros(shape, device=weight.device, dtype=dtype))
    return weights


def noise_schedule(pipe: Any) -> torch.Tensor:
    """`abar_t` (DDPM's `alphas_cumprod`) of the pipeline's scheduler."""
    return DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod


def noisy_latents(latents: torch.Tensor, generator: torch.Generator, alphas_cumprod: Any,
                  ddim_steps: int, device: torch.device) -> tuple[torch.Tensor, Any, int]:
    """`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` for one random reference image and timestep.

    Returns `x_t`, `t` and the index of the reference image used. A flow-matching schedule
    (`denoise.FlowSchedule`, FLUX / SD3) in place of `alphas_cumprod` draws `x_t = (1 - sigma) x_0 + sigma eps`
    and returns sigma as `t`."""
    if hasattr(alphas_cumprod, "noisy"):
        return alphas_cumprod.noisy(latents, generator, ddim_steps, device)
    index = int(torch.randint(len(latents), (1,), generator=generator))
    total = len(alphas_cumprod)
    step = int(torch.randint(ddim_steps, (1,), generator=generator))  # one of the DDIM steps ...
    low, high = step * total // ddim_steps, (step + 1) * total // ddim_steps
    t = int(torch.randint(low, max(high, low + 1), (1,), generator=generator))  # ... then a DDPM t inside it
    x0 = latents[index : index + 1]
    noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
    abar = alphas_cumprod[t].to(device=device, dtype=x0.dtype)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, index


def gradients_finite(parameters: Iterable[torch.Tensor]) -> bool:
    """True when no parameter has a NaN or infinite gradient."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)
