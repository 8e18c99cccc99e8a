"""Training settings: `TrainConfig` (the paper's defaults) and the number checks every config shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import TrainingError

MODES = ("simultaneous", "separate", "iterative", "gcirs")
STOP_STATISTICS = ("rho", "l_cor")


@dataclass
class TrainConfig:
    """Hyperparameters. The defaults need no tuning per model (`calibration.py`); `TrainConfig.paper()` gives
    the paper's SD v1.4 values (Sec. 4.2 Implementation Details), which learn nothing on other models.

    Attributes:
        lr: Adam learning rate for the weight-decoupled `w`s (SepME); None = scale-free per layer from `eta`.
        eta: the scale-free step: the relative change of the concept's keys / values one Adam step may make
            (`calibration.layer_learning_rates`), used when `lr` (or `gcirs_lr`) is None.
        gcirs_lr: Adam learning rate for dense G-CiRs increments; None = `eta * rms(W_l)` per layer.
        beta: the fixed scale of Eq. 10 (with the scale-free `lr` only a storage scale: 1 keeps `w` fp16-safe).
        lam: lambda, weight of `||w||_1 / M` (Eq. 11).
        tau: early-stop threshold on the momentum statistic (Eq. 4).
        alpha: momentum of Eq. 4.
        patience: stop once the statistic stays at or below `tau` for this many consecutive iterations.
        stop_on: the statistic: `rho` (relative correlation, 1 before training; default, tau -0.25) or
            `l_cor` (the paper's `sum_i eta_i L_cor_i`, tau 0).
        max_iterations: at most this many optimisation steps per concept.
        warmup: iterations before the early-stop check starts (authors' code: 10).
        seed: seeds reference images, timesteps and noise.
        images_per_concept: reference images `x_0` generated per concept prompt.
        reference_steps: sampler steps used to generate reference images.
        guidance_scale: classifier-free guidance for the reference images.
        ddim_steps: timesteps are drawn as one of these DDIM steps, then a DDPM t inside it.
        rtol: rank tolerance of the null-space basis (None: float32 round-off).
        max_leakage: the basis (`basis.choose_basis`): None = the exact null space while it keeps >= 1/8 of
            the text width, else the compact basis at the tightest of 1e-3 / 3e-3 / 1e-2 that leaves the
            concept at least half its reach at 1e-2; 0 = exact only; > 0 = compact with this bound on
            each excluded prompt's share of energy in `S_p`. The measured leakage certificate is stored.
        checkpoint_every: iterations between resumable checkpoints (when a folder is given).
        concepts_per_pass: concepts per UNet pass with a graph (0: all at once, fastest; 1: lowest
            peak memory). The frozen passes stay batched; the increments are identical either way.
        rank: None = full-rank `w` per layer; r = a rank-r eraser, `w = B @ A` per layer (`A` r x m in basis
            coordinates, seeded random with orthonormal rows; `B` d_out x r, zero), a small standard LoRA
            that keeps the exactness of the basis (a rank >= m trains full rank).
        protect_templates: every basis also excludes the phrasings around the names
            (`concepts.template_stems`: each concept's prompts with its name removed, and the standard style
            templates' stems such as "in the style of"), so an eraser acts through the name, not through the
            phrasing every other concept shares. Demo world, 3 training seeds: other concepts' held-out
            phrasings 0.83-0.86x -> 1.00x under pimsa's eraser, but the erased concepts' own held-out / composition
            ACC rises (0.28-0.31 -> 0.39-0.50 / 0.42-0.44 -> 0.50-0.64: part of their erasure came from damaging
            the shared phrasing), and the stems take basis room (demo 53 -> 20 dims; the tiny test pipeline goes
            compact, certificate 5e-3). Off by default: the bases exclude only the blank, known, protected and
            other concepts' prompts.
        pooled_increment: SDXL (a UNet with `add_embedding`): each eraser also gets the pooled increment,
            `dW = beta * w S_pool^T` on the pooled-text columns of `add_embedding.linear_1`, with `S_pool` the
            exact null space of the excluded prompts' pooled embeddings (one row per prompt), `w` solved so the
            concept's prompts give the unconditional branch's pooled-path output (`training/pooled.py`) and
            fixed while the `attn2` increments train; known, protected and blank prompts stay exact there too.
            Ignored on SD v1 / v2.
    """

    lr: float | None = None
    eta: float = 1e-2
    gcirs_lr: float | None = None
    beta: float = 1.0
    lam: float = 0.0
    tau: float = -0.25
    alpha: float = 0.9
    patience: int = 10
    stop_on: str = "rho"
    max_iterations: int = 400
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
    protect_templates: bool = False
    pooled_increment: bool = True

    @classmethod
    def paper(cls, **overrides: Any) -> TrainConfig:
        """The paper's SD v1.4 settings: Adam lr 1e-2 (G-CiRs 1e-6), beta 1e-4, lambda 3e-5, stop when the
        momentum of `L_cor` reaches 0, at most 1000 iterations (`sepme erase --preset paper`)."""
        settings = dict(lr=1e-2, gcirs_lr=1e-6, beta=1e-4, lam=3e-5, tau=0.0, patience=1, stop_on="l_cor",
                        max_iterations=1000)
        return cls(**{**settings, **overrides})

    def validate(self) -> None:
        """Refuse NaN, infinite or out-of-range values before any work starts."""
        if self.stop_on not in STOP_STATISTICS:
            raise TrainingError(f"TrainConfig.stop_on must be one of {STOP_STATISTICS}, got {self.stop_on!r}")
        check_numbers(self, positive=("lr", "eta", "gcirs_lr", "beta", "max_iterations", "images_per_concept",
                                      "reference_steps", "ddim_steps", "checkpoint_every", "patience"),
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
        if value is None or isinstance(value, str) or (isinstance(value, bool) and item.type in ("bool", bool)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrainingError(f"{name}.{item.name} must be a finite number, got {value!r}")
    for field_name in positive:
        if getattr(config, field_name) is not None and getattr(config, field_name) <= 0:
            raise TrainingError(f"{name}.{field_name} must be > 0, got {getattr(config, field_name)!r}")
    for field_name in non_negative:
        if getattr(config, field_name) is not None and getattr(config, field_name) < 0:
            raise TrainingError(f"{name}.{field_name} must be >= 0, got {getattr(config, field_name)!r}")
