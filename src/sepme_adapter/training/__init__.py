"""Training erasers: G-CiRs (paper Eq. 2-4, Alg. 1) and SepME weight decoupling (Eq. 5-11, Alg. 2).

| module | what it holds |
|---|---|
| `concepts` | `Concept` (name and prompt) and the checks on the concepts to erase and keep |
| `config` | `TrainConfig` (the paper's defaults) and `check_numbers` |
| `objective` | Eq. 2 `correlation_loss`, Eq. 3 `balance_weights`, Eq. 3/11 `l1_norm_per_layer`, Eq. 4 `MomentumStop` |
| `reference` | reference images `x_0` (generated and cached, or the user's) |
| `harness` | what the baselines share: frozen model, zero increments, noisy latents `x_t`, base-model metadata |
| `track`, `checkpoints` | one concept's training state; resumable checkpoints |
| `steps`, `loop` | the dense (Alg. 1) and decoupled (Alg. 2) step; the loop around them |
| `train` | `train_erasers`: bases (Eq. 8), groups, erasers |
| `report` | `write_report`: JSON and loss curves |
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Imported on first use, so `sepme erase --help` reads `TrainConfig` without loading torch and diffusers.
_EXPORTS = {
    "eraser_filename": "..files",
    "load_checkpoint": ".checkpoints",
    "save_checkpoint": ".checkpoints",
    "Concept": ".concepts",
    "check_concepts": ".concepts",
    "prepare_concepts": ".concepts",
    "MODES": ".config",
    "TrainConfig": ".config",
    "check_numbers": ".config",
    "frozen_model": ".harness",
    "noisy_latents": ".harness",
    "zero_weights": ".harness",
    "MomentumStop": ".objective",
    "balance_weights": ".objective",
    "correlation_loss": ".objective",
    "l1_norm_per_layer": ".objective",
    "reference_latents": ".reference",
    "write_report": ".report",
    "ConceptTrack": ".track",
    "train_erasers": ".train",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from ..files import eraser_filename
    from .checkpoints import load_checkpoint, save_checkpoint
    from .concepts import Concept, check_concepts, prepare_concepts
    from .config import MODES, TrainConfig, check_numbers
    from .harness import frozen_model, noisy_latents, zero_weights
    from .objective import MomentumStop, balance_weights, correlation_loss, l1_norm_per_layer
    from .reference import reference_latents
    from .report import write_report
    from .track import ConceptTrack
    from .train import train_erasers

__all__ = [
    "MODES",
    "Concept",
    "ConceptTrack",
    "MomentumStop",
    "TrainConfig",
    "balance_weights",
    "check_concepts",
    "check_numbers",
    "correlation_loss",
    "eraser_filename",
    "frozen_model",
    "l1_norm_per_layer",
    "load_checkpoint",
    "noisy_latents",
    "prepare_concepts",
    "reference_latents",
    "save_checkpoint",
    "train_erasers",
    "write_report",
    "zero_weights",
]
