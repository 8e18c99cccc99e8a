"""Baselines in the same harness: ESD-x, Concept Ablation, Forget-Me-Not and UCE.

Each method produces one dense `Eraser` per concept (`basis=None`, `beta=1.0`, `weights` = the
full weight change of the `attn2` layers it edits), so the same loader toggles it with
`set_erased` and warns when it is combined with others (a dense increment has no separation
guarantee). Targets, in the paper's notation (SepME Sec. 2):

- ESD-x (Gandikota et al. 2023, Eq. 3 of SepME):
  `eps(theta', x_t, c_f) -> eps(theta, x_t, c_0) - eta * (eps(theta, x_t, c_f) - eps(theta, x_t, c_0))`.
- Concept Ablation, model-based (Kumari et al. 2023): `eps(theta', x_t, c_f) -> eps(theta, x_t, c*)`.
- Forget-Me-Not, attention re-steering (Zhang et al. 2023): minimise `||A[:, :, concept tokens]||_2`
  over every `attn2` attention map.
- UCE (Gandikota et al. 2024): a closed-form edit of `to_k` / `to_v` mapping the concept's token
  embeddings to the anchor's keys and values while preserving other prompts.

What differs from the original papers (said again in the report of each eraser's metadata):
- `x_t` comes from reference images of the original model (`training/reference.py`, as for SepME) noised at
  a random timestep (`training.harness.noisy_latents`), one sample per iteration. ESD samples `x_t` by
  partially denoising with the model being trained; AbConcept uses images of the anchor (we do
  too: ablation's reference images are generated from the anchor prompt); FMN uses concept images.
- Only weights (no biases) of `attn2` change: an `Eraser` stores weight increments only.
- FMN's preliminary textual-inversion step is not run (attention re-steering only) and
  AbConcept's optional prior-preservation loss on anchor images is not used.

| module | what it holds |
|---|---|
| `config` | `BaselineConfig`, the methods, their papers and layer sets |
| `objectives` | the ESD, ablation and FMN losses and UCE's closed form |
| `attention` | attention-map capture (FMN) |
| `train` | `train_baseline`: one dense eraser per concept |
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# Imported on first use, so `sepme erase --help` reads `BaselineConfig` without loading torch and diffusers.
_EXPORTS = {
    "capture_attention": ".attention",
    "ANCHOR_METHODS": ".config",
    "DEFAULT_ANCHORS": ".config",
    "LAYER_SETS": ".config",
    "METHOD_FIELDS": ".config",
    "METHODS": ".config",
    "PAPERS": ".config",
    "SHARED_FIELDS": ".config",
    "BaselineConfig": ".config",
    "field_choices": ".config",
    "ablation_loss": ".objectives",
    "concept_token_positions": ".objectives",
    "esd_loss": ".objectives",
    "fmn_loss": ".objectives",
    "uce_increments": ".objectives",
    "train_baseline": ".train",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .attention import capture_attention
    from .config import (
        ANCHOR_METHODS,
        DEFAULT_ANCHORS,
        LAYER_SETS,
        METHOD_FIELDS,
        METHODS,
        PAPERS,
        SHARED_FIELDS,
        BaselineConfig,
        field_choices,
    )
    from .objectives import ablation_loss, concept_token_positions, esd_loss, fmn_loss, uce_increments
    from .train import train_baseline

__all__ = [
    "ANCHOR_METHODS",
    "DEFAULT_ANCHORS",
    "LAYER_SETS",
    "METHODS",
    "METHOD_FIELDS",
    "PAPERS",
    "SHARED_FIELDS",
    "BaselineConfig",
    "ablation_loss",
    "capture_attention",
    "concept_token_positions",
    "esd_loss",
    "field_choices",
    "fmn_loss",
    "train_baseline",
    "uce_increments",
]
