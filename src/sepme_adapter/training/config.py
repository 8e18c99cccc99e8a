"""Training settings: `TrainConfig` (the paper's defaults) and the number checks every config shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import TrainingError

MODES = ("simultaneous", "separate", "iterative", "gcirs")


@dataclass
class TrainConfig:
    """Hyperparameters; defaults are the paper's (Sec. 4.2 Implementation Details).

    Attributes:
        lr: Adam learning rate for the weight-decoupled `w`s (SepME).
        gcirs_lr: Adam learning rate for dense G-CiRs increments on all attn2 weights.
        beta: the fixed scale of Eq. 10.
        lam: lambda, weight of `||w||_1 / M` (Eq. 11).
        tau: early-stop threshold on the momentum statistic (Eq. 4).
        alpha: momentum of Eq. 4.
        max_iterations: at most this many optimisation steps per concept.
        warmup: iterations before the early-stop check starts (authors' code: 10).
        seed: seeds reference images, timesteps and noise.
        images_per_concept: reference images `x_0` generated per concept prompt.
        reference_steps: sampler steps used to generate reference images.
        guidance_scale: classifier-free guidance for the reference images.
        ddim_steps: timesteps are drawn as one of these DDIM steps, then a DDPM t inside it.
        rtol: rank tolerance of the null-space basis (None: float32 round-off).
        max_leakage: the basis (`basis.choose_basis`): None = the exact null space while it keeps >= 1/8 of
            the text width, else the compact basis at 1e-3; 0 = exact only; > 0 = compact with this bound on
            each excluded prompt's share of energy in `S_p`. The measured leakage certificate is stored.
        checkpoint_every: iterations between resumable checkpoints (when a folder is given).
        concepts_per_pass: concepts per UNet pass with a graph (0: all at once, fastest; 1: lowest
            peak memory). The frozen passes stay batched; the increments are identical either way.
        rank: None = full-rank `w` per layer; r = a rank-r eraser, `w = B @ A` per layer (`A` r x m in basis
            coordinates, seeded random with orthonormal rows; `B` d_out x r, zero), a small standard LoRA
            that keeps the exactness of the basis (a rank >= m trains full rank).
    """

    lr: float = 1e-2
    gcirs_lr: float = 1e-6
    beta: float = 1e-4
    lam: float = 3e-5
    tau: float = 0.0
    alpha: float = 0.9
    max_iterations: int = 1000
    warmup: int = 10
    seed: int = 0
    images_per_concept: int = 8
    reference_steps: int = 50
    guidance_scale: float = 7.5
    ddim_steps: int = 50
    rtol: float | None = None
    max_leakage: float | None = None
    checkpoint_every: int = 50
    concepts_per_pass: int = 0
    rank: int | None = None

    def validate(self) -> None:
        """Refuse NaN, infinite or out-of-range values before any work starts."""
        check_numbers(self, positive=("lr", "gcirs_lr", "beta", "max_iterations", "images_per_concept",
                                      "reference_steps", "ddim_steps", "checkpoint_every"),
                      non_negative=("lam", "warmup", "guidance_scale", "concepts_per_pass"))
        if not 0 <= self.alpha < 1:
            raise TrainingError(f"TrainConfig.alpha must be in [0, 1), got {self.alpha!r}")
        if self.max_leakage is not None and not 0 <= self.max_leakage < 1:
            raise TrainingError(f"TrainConfig.max_leakage must be in [0, 1) or None, got {self.max_leakage!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise TrainingError(f"TrainConfig.rank must be a positive integer or None (full rank), got {self.rank!r}")
        if self.rtol is not None and self.rtol <= 0:
            raise TrainingError(f"TrainConfig.rtol must be > 0, got {self.rtol!r}")


def check_numbers(config: Any, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Every numeric field of a config dataclass is finite; the named ones are > 0 or >= 0."""
    name = type(config).__name__
    for item in fields(config):
        value = getattr(config, item.name)
        if value is None or isinstance(value, str):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrainingError(f"{name}.{item.name} must be a finite number, got {value!r}")
    for field_name in positive:
        if getattr(config, field_name) <= 0:
            raise TrainingError(f"{name}.{field_name} must be > 0, got {getattr(config, field_name)!r}")
    for field_name in non_negative:
        if getattr(config, field_name) < 0:
            raise TrainingError(f"{name}.{field_name} must be >= 0, got {getattr(config, field_name)!r}")
