"""One concept's training state: its increment, optimiser, random stream, stop rule and history."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..eraser import Eraser
from .concepts import Concept
from .config import TrainConfig
from .objective import MomentumStop


@dataclass
class ConceptTrack:
    """Everything that evolves while one increment trains (saved in checkpoints, so resumable)."""

    concept: Concept
    eraser: Eraser
    optimizer: torch.optim.Adam
    generator: torch.Generator
    stop: MomentumStop
    latents: torch.Tensor
    embedding: torch.Tensor
    history: list[float] = field(default_factory=list)
    regulariser: list[float] = field(default_factory=list)
    done: bool = False
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The `w`s (rank r: `B`s, then the `A`s), in the optimiser's order."""
        return [*self.eraser.weights.values(), *self.eraser.down.values()]

    @classmethod
    def start(cls, concept: Concept, eraser: Eraser, lr: float, index: int, config: TrainConfig,
              latents: torch.Tensor, embedding: torch.Tensor) -> ConceptTrack:
        """A fresh track: Adam on the eraser's `w`s, and the concept's own seeded random stream."""
        return cls(
            concept=concept, eraser=eraser, optimizer=torch.optim.Adam([*eraser.weights.values(), *eraser.down.values()], lr=lr),
            generator=torch.Generator().manual_seed(config.seed * 100_003 + index),
            stop=MomentumStop(config.alpha, config.tau, config.warmup), latents=latents, embedding=embedding,
        )

    def follower(self, concept: Concept, latents: torch.Tensor, embedding: torch.Tensor) -> ConceptTrack:
        """A track of another concept that shares this one's increment, optimiser, stream and stop (G-CiRs)."""
        return ConceptTrack(concept, self.eraser, self.optimizer, self.generator, self.stop, latents, embedding)
