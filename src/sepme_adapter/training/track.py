"""One concept's training state: its increment, optimiser, random stream, stop rule and history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..eraser import Eraser
from ..mmdit import POOLED_LAYERS
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
    history: list[float] = field(default_factory=list)  # L_cor (Eq. 2) per iteration
    relative: list[float] = field(default_factory=list)  # rho = L_cor / mean(D_o^2) per iteration
    regulariser: list[float] = field(default_factory=list)
    done: bool = False
    stopped_early: bool = False
    seconds: float = 0.0
    pooled: torch.Tensor | None = None  # SDXL: the pooled embedding paired with each reference latent
    pooled_solution: torch.Tensor | None = None  # SDXL: the pooled increment's solved `w`, set when training ends
    # containment (training/containment.py): the retain penalty, the collateral meter, the probe stop
    contexts: torch.Tensor | None = None  # the name said in random contexts (n x L x d), trained on beside `embedding`
    # --objective anchor: each `embedding` / `contexts` row's anchor (the same prompt with the name cut out)
    anchors: torch.Tensor | None = None
    context_anchors: torch.Tensor | None = None
    retain_energy: Any = None
    collateral: Any = None
    probes: Any = None
    probe_seed: int = 0
    probe_history: list[dict] = field(default_factory=list)  # per probe check: step, rho, collateral
    stop_reason: str = ""
    snapshot: dict | None = None  # the increments at the last probe check within the collateral bound

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The trained `w`s (rank r: `B`s, then the `A`s), in the optimiser's order; SDXL's pooled increment is
        solved, not trained (`training/pooled.py`; FLUX / SD3's too)."""
        trained = [w for layer, w in self.eraser.weights.items() if layer not in POOLED_LAYERS]
        return [*trained, *(a for layer, a in self.eraser.down.items() if layer not in POOLED_LAYERS)]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The trained tensors by a stable name (`w:<layer>`, `down:<layer>`), for snapshots."""
        named = [(f"w:{layer}", w) for layer, w in self.eraser.weights.items() if layer not in POOLED_LAYERS]
        return named + [(f"down:{layer}", a) for layer, a in self.eraser.down.items() if layer not in POOLED_LAYERS]

    def take_snapshot(self) -> None:
        """Remember the trained tensors as they are now (the probe stop returns here past its collateral bound)."""
        self.snapshot = {name: p.detach().clone() for name, p in self.named_parameters()}

    def parameter(self, name: str) -> torch.Tensor:
        kind, _, layer = name.partition(":")
        return (self.eraser.weights if kind == "w" else self.eraser.down)[layer]

    @classmethod
    def start(cls, concept: Concept, eraser: Eraser, groups: list[dict], index: int, config: TrainConfig,
              latents: torch.Tensor, embedding: torch.Tensor, pooled: torch.Tensor | None = None) -> ConceptTrack:
        """A fresh track: Adam on the eraser's parameter groups (`calibration.parameter_groups`: one learning
        rate per layer), the concept's own seeded random stream, and its early stop."""
        stop = MomentumStop(config.alpha, config.tau, config.warmup, value=1.0 if config.stop_on == "rho" else 0.0,
                            patience=config.patience)
        return cls(
            concept=concept, eraser=eraser, optimizer=torch.optim.Adam(groups),
            generator=torch.Generator().manual_seed(config.seed * 100_003 + index),
            stop=stop, latents=latents, embedding=embedding, pooled=pooled,
            probe_seed=config.seed * 1_000_003 + 104_729 * (index + 1),
        )

    def follower(self, concept: Concept, latents: torch.Tensor, embedding: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> ConceptTrack:
        """A track of another concept that shares this one's increment, optimiser, stream and stop (G-CiRs)."""
        return ConceptTrack(concept, self.eraser, self.optimizer, self.generator, self.stop, latents, embedding,
                            pooled=pooled)
