"""The paper's training objective, one function per formula.

For concept i the correlation loss (Eq. 2)
    L_cor(c_i, dW) = mean( D(c_i, theta) * D(c_i, theta + dW) ),   D(c, .) = eps(., x_t, c) - eps(., x_t, c_0)
is balanced across concepts by eta_i (Eq. 3), regularised by `lambda * ||w||_1 / M` (Eq. 11), and
training stops on a momentum statistic (Eq. 4). The paper's statistic is `L_cor` itself; the default
is its scale-free form, the relative correlation `rho = sum(D_o * D_n) / sum(D_o^2)` (1 before
training, 0 when uncorrelated), which does not swing with the timestep or the model's noise scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def correlation_loss(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Eq. 2: `L_cor = mean(D(c, theta) * D(c, theta + dW))`, one value per batch row."""
    return (original * edited).flatten(1).mean(dim=1)


def relative_correlation(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """`rho = sum(D(c, theta) * D(c, theta + dW)) / sum(D(c, theta)^2)` per batch row: Eq. 2 made scale-free."""
    original, edited = original.flatten(1).detach(), edited.flatten(1).detach()
    return (original * edited).sum(1) / original.pow(2).sum(1).clamp_min(1e-30)


def target_loss(original: torch.Tensor, edited: torch.Tensor, guidance: float) -> torch.Tensor:
    """A bounded alternative to Eq. 2 (ESD's negative guidance): `||D(c, theta + dW) + g D(c, theta)||^2 /
    ||D(c, theta)||^2` per batch row, smallest when the concept's guidance direction is reversed with strength `g`
    (0: the concept prompt acts like the blank one). Unlike the correlation it cannot be pushed without bound."""
    original = original.flatten(1).detach()
    return (edited.flatten(1) + guidance * original).pow(2).sum(1) / original.pow(2).sum(1).clamp_min(1e-30)


def balance_weights(losses: Sequence[float]) -> list[float]:
    """Eq. 3: `eta_i = |L_cor(c_1)| / |L_cor(c_i)|` (detached), balancing concepts."""
    first = abs(float(losses[0]))
    return [first / max(abs(float(x)), 1e-30) for x in losses]


def l1_norm_per_layer(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """`||W||_p = ||W||_1 / M`, M = number of modified layers (Eq. 3 and 11)."""
    return sum(w.abs().sum() for w in weights) / max(len(weights), 1)


@dataclass
class MomentumStop:
    """Eq. 4: `L_mom_n = alpha * L_mom_{n-1} + (1 - alpha) * L_n`; stop once `L_mom_n <= tau` after warm-up,
    for `patience` consecutive iterations (the paper: 1; one noisy sample then cannot end training)."""

    alpha: float
    tau: float
    warmup: int
    value: float = 0.0
    steps: int = 0
    patience: int = 1
    below: int = 0  # consecutive iterations at or below tau

    def update(self, loss: float) -> bool:
        """Add one iteration's statistic; return True when training should stop."""
        self.value = self.alpha * self.value + (1 - self.alpha) * loss
        self.steps += 1
        self.below = self.below + 1 if self.steps > self.warmup and self.value <= self.tau else 0
        return self.below >= self.patience
