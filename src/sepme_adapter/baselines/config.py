"""The baselines' settings: `BaselineConfig` (each method's published defaults), methods and layer sets."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import TrainingError
from ..training.config import TrainConfig, check_numbers

METHODS = ("esd", "ablation", "fmn", "uce")
ANCHOR_METHODS = ("ablation", "uce")
# Default anchors c*: AbConcept maps an artist's style to a generic painting; UCE's erase script maps
# a concept to the blank prompt. For objects, pass a generic anchor of the same kind ("a dog" -> "an animal").
DEFAULT_ANCHORS = {"ablation": "a painting", "uce": ""}
LAYER_SETS = {"attn2": ("to_q", "to_k", "to_v", "to_out.0"), "kv": ("to_k", "to_v")}
PAPERS = {
    "esd": "Gandikota et al. 2023, Erasing Concepts from Diffusion Models (ESD-x)",
    "ablation": "Kumari et al. 2023, Ablating Concepts in Text-to-Image Diffusion Models (model-based)",
    "fmn": "Zhang et al. 2023, Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models",
    "uce": "Gandikota et al. 2024, Unified Concept Editing in Diffusion Models",
}
UCE_TOKENS = ("tail", "all")
# settings of the reference images and timesteps, shared with TrainConfig (so both reuse the same images)
SHARED_FIELDS = ("seed", "images_per_concept", "reference_steps", "guidance_scale", "ddim_steps")


@dataclass
class BaselineConfig:
    """Hyperparameters of the baselines; defaults follow each method's paper or public release.

    Attributes:
        esd_lr, esd_iterations: Adam learning rate and steps of ESD-x (ESD paper: 1e-5, 1000).
        esd_eta: ESD's negative guidance eta (ESD-x: 1.0).
        esd_layers: `attn2` (to_q, to_k, to_v, to_out.0: ESD-x fine-tunes all cross-attention) or `kv`.
        ablation_lr, ablation_iterations: Concept Ablation's Adam settings (its cross-attention runs
            use a few hundred steps at about 2e-6 with batch 8; here batch 1).
        ablation_layers: `kv` (AbConcept's "cross-attn" parameter group: to_k, to_v) or `attn2`.
        fmn_lr, fmn_iterations: Forget-Me-Not's attention re-steering (its release: 35 steps).
        fmn_layers: `attn2` (every cross-attention weight, the closest to FMN's UNet fine-tuning that
            an eraser can store) or `kv`.
        uce_lambda: lambda of UCE's `lambda * ||W' - W||^2` (its erase script: 0.5).
        uce_erase_scale: weight of the erased concepts' terms (UCE: 1.0).
        uce_preserve_scale: lambda_p, weight of the preserved prompts' terms (UCE's edit_model: 0.1).
        uce_tokens: `tail` (UCE's release: the concept's last word token and everything after it,
            aligned with the anchor's) or `all` (every token position).
        probe_samples: fixed (x_t, t) samples on which the objective is measured before and after.
        seed, images_per_concept, reference_steps, guidance_scale, ddim_steps: reference images and
            timestep sampling, exactly as `TrainConfig` (the same cached images are reused).
    """

    esd_lr: float = 1e-5
    esd_iterations: int = 1000
    esd_eta: float = 1.0
    esd_layers: str = "attn2"
    ablation_lr: float = 2e-6
    ablation_iterations: int = 400
    ablation_layers: str = "kv"
    fmn_lr: float = 2e-6
    fmn_iterations: int = 35
    fmn_layers: str = "attn2"
    uce_lambda: float = 0.5
    uce_erase_scale: float = 1.0
    uce_preserve_scale: float = 0.1
    uce_tokens: str = "tail"
    probe_samples: int = 4
    # reference images and timesteps: TrainConfig's defaults, so SepME and the baselines share cached images
    seed: int = TrainConfig.seed
    images_per_concept: int = TrainConfig.images_per_concept
    reference_steps: int = TrainConfig.reference_steps
    guidance_scale: float = TrainConfig.guidance_scale
    ddim_steps: int = TrainConfig.ddim_steps

    @classmethod
    def from_train_config(cls, config: TrainConfig, **overrides: Any) -> BaselineConfig:
        """Reference-image settings from a `TrainConfig` (so SepME and baselines share images)."""
        return cls(**{name: getattr(config, name) for name in SHARED_FIELDS}, **overrides)

    def validate(self) -> None:
        """Refuse NaN, infinite, negative or unknown values before any work starts."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, str):
                allowed = field_choices(item.name)
                if value not in allowed:
                    raise TrainingError(f"BaselineConfig.{item.name} must be one of {allowed}, got {value!r}")
        check_numbers(self, positive=("esd_lr", "ablation_lr", "fmn_lr", "uce_lambda", "uce_erase_scale",
                                      "images_per_concept", "reference_steps", "ddim_steps"),
                      non_negative=("esd_iterations", "ablation_iterations", "fmn_iterations", "uce_preserve_scale",
                                    "probe_samples", "guidance_scale", "esd_eta"))


# BaselineConfig fields of the methods themselves (`--esd-lr` ...); the shared ones come from TrainConfig
METHOD_FIELDS = tuple(f.name for f in fields(BaselineConfig) if f.name not in SHARED_FIELDS)


def field_choices(name: str) -> tuple[str, ...]:
    """The allowed values of a text field of `BaselineConfig`."""
    return UCE_TOKENS if name == "uce_tokens" else tuple(LAYER_SETS)
