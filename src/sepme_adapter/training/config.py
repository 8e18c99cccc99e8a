"""Training settings: `TrainConfig` (the paper's defaults) and the number checks every config shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import TrainingError

MODES = ("simultaneous", "separate", "iterative", "gcirs")
STOP_STATISTICS = ("rho", "l_cor")
BASES = ("exact", "contrastive")  # the paper's null space (Eq. 8), or its most concept-specific directions
# Eq. 2; a bounded target D(c, theta + dW) = -g D(c, theta); or the same target measured from the prompt without the
# name (its anchor) instead of the blank prompt, so the rest of the prompt is kept
OBJECTIVES = ("correlation", "target", "anchor")
STOPS = ("probe", "momentum")  # fixed probes every k iterations, or the momentum statistic (Eq. 4)


def setting(default: Any, flag: str | None = None, help: str = "", group: str = "advanced",
            choices: Sequence[str] | None = None) -> Any:
    """A config field that declares its command-line flag in `dataclasses.field(metadata=...)`:

    - `flag`: the descriptive name (`--step-size`); the field name (`--eta`) stays a hidden alias.
    - `help`: what it does in the user's words, with the paper's symbol in parentheses.
    - `group`: "common" (shown first) or "advanced".
    - `choices`: the allowed values of a text field.
    The flag's type comes from the annotation (`int | None` -> int, `bool` -> --name / --no-name).
    """
    metadata = {"flag": flag, "help": help, "group": group}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Hyperparameters. The defaults need no tuning per model (`calibration.py`); `TrainConfig.paper()` gives
    the paper's SD v1.4 values (Sec. 4.2 Implementation Details), which learn nothing on other models.

    Every field is a `sepme erase` flag. Declare a new one with its flag, help and group, e.g.
    `eta: float = setting(1e-2, "--step-size", "how much one step may change ... (eta)", "common")`
    (`setting` above; text fields add `choices=(...)`). A field without them still gets a flag
    (`--field-name`), but `tests/test_cli_flags.py` fails until it has its help.

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
        ddim_steps: timesteps are drawn as one of these DDIM steps, then a DDPM t inside it (FLUX / SD3: one of
            this many equal strata of the flow-matching noise level sigma, then a sigma inside it, shifted as the
            pipeline's scheduler shifts its sigmas).
        resolution: FLUX / SD3: the image size of the reference images and training latents (None: the
            pipeline's default, FLUX.1's 1024); refused on SD, whose size is the UNet's.
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

    lr: float | None = setting(None, "--learning-rate", "Adam learning rate of the eraser weights w (paper: "
                               "lr 1e-2); default: none, a scale-free rate per layer from --step-size")
    eta: float = setting(1e-2, "--step-size", "how much one training step may change the concept's keys and "
                         "values, relative to each layer's weights (eta); used unless --learning-rate is "
                         "given", "common")
    gcirs_lr: float | None = setting(None, "--gcirs-learning-rate", "Adam learning rate of the dense G-CiRs "
                                     "increments (paper: 1e-6); default: none, --step-size times each "
                                     "layer's RMS weight")
    beta: float = setting(1.0, "--increment-scale", "fixed scale of each increment, dW = beta * w S_p^T "
                          "(beta, Eq. 10); with the scale-free step only a storage scale: 1 keeps w safe in "
                          "float16 (paper: 1e-4)")
    lam: float = setting(0.0, "--l1-weight", "weight of the L1 penalty on the eraser weights, ||w||_1 / M "
                         "(lambda, Eq. 11); larger gives sparser, smaller increments (paper: 3e-5)", "common")
    tau: float = setting(-0.25, "--stop-below", "stop once the smoothed stop statistic is at or below this "
                         "(tau, Eq. 4); rho starts at 1 and erasing drives it negative (paper, with l_cor: "
                         "0)", "common")
    alpha: float = setting(0.9, "--momentum", "smoothing of the stop statistic, in [0, 1): higher reacts "
                           "more slowly (alpha, Eq. 4)")
    patience: int = setting(10, "--patience", "iterations the smoothed statistic must stay at or below "
                            "--stop-below before training stops")
    stop_on: str = setting("rho", "--stop-statistic", "what the momentum stop watches: rho (relative "
                           "correlation, 1 before training) or l_cor (the paper's weighted correlation loss, "
                           "with --stop-below 0)", choices=STOP_STATISTICS)
    max_iterations: int = setting(400, "--max-iterations", "at most this many training steps per concept; an "
                                  "eraser that reaches it without meeting its stop is reported with a "
                                  "warning", "common")
    warmup: int = setting(10, "--warmup", "iterations before the stop check starts")
    seed: int = setting(0, "--seed", "seed of the reference images, timesteps and noise", "common")
    images_per_concept: int = setting(8, "--images-per-concept", "reference images x_0 generated per concept "
                                      "prompt (more: slower, steadier training)", "common")
    reference_steps: int = setting(50, "--reference-steps", "sampler steps used to generate each reference "
                                   "image")
    guidance_scale: float = setting(7.5, "--guidance-scale", "classifier-free guidance of the reference "
                                    "images")
    ddim_steps: int = setting(50, "--ddim-steps", "training timesteps are drawn from this many DDIM steps (FLUX / "
                              "SD3: flow-matching noise levels from this many equal strata)")
    resolution: int | None = setting(None, "--resolution", "FLUX / SD3: the size in pixels of the reference images "
                                     "and training latents; default: the pipeline's default size (SD: always the "
                                     "UNet's)")
    rtol: float | None = setting(None, "--basis-tolerance", "relative singular-value cut-off of the "
                                 "null-space basis; default: float32 round-off")
    max_leakage: float | None = setting(None, "--max-leakage", "largest share of each excluded prompt's "
                                        "energy the basis may touch (0: exact null space only; default: "
                                        "chosen per concept, the bound is measured and stored as the "
                                        "certificate)")
    checkpoint_every: int = setting(50, "--checkpoint-every", "iterations between resumable checkpoints in "
                                    "OUT/checkpoints (see --resume)")
    concepts_per_pass: int = setting(0, "--concepts-per-pass", "concepts trained per UNet pass: 0 all at "
                                     "once (fastest), 1 lowest peak memory; results are identical")
    rank: int | None = setting(None, "--rank", "LoRA rank r of each eraser (w = B A, small files); default: "
                               "full rank", "common")
    protect_templates: bool = setting(False, "--protect-templates", "also keep the shared phrasings ('in the "
                                      "style of' ...) exact, so an eraser acts through the name only")
    pooled_increment: bool = setting(True, "--pooled-increment", "SDXL: also give each eraser its increment "
                                     "on the pooled text embedding (add_embedding); ignored on SD v1 / v2")
    # containment: erase the concept, leave every prompt nobody listed alone (`retain.py`, `training/containment.py`)
    basis: str = setting("contrastive", "--basis", "where the increment may act: exact (the paper's null space of "
                         "the listed prompts, Eq. 8) or contrastive (its few directions the concept uses most "
                         "relative to prompts drawn from the model's own vocabulary; listed prompts stay exact "
                         "either way)", "common", choices=BASES)
    basis_dimensions: int = setting(2, "--basis-dimensions", "directions of the contrastive basis: more erases "
                                    "more phrasings of the concept and touches more unlisted prompts")
    containment: float = setting(1.0, "--containment", "weight of the penalty on the increment's energy over the "
                                 "retain prompts (their mean squared relative key / value change, closed form); 0 "
                                 "turns it off")
    objective: str = setting("target", "--objective", "what training minimises: target (the concept's guidance "
                             "direction reversed, bounded like ESD's negative guidance), anchor (the same, measured "
                             "from the prompt with the name cut out instead of the blank prompt: only what the name "
                             "adds is reversed) or correlation (the paper's L_cor, Eq. 2, which has no minimum)",
                             choices=OBJECTIVES)
    negative_guidance: float = setting(1.0, "--negative-guidance", "with --objective target: how strongly the "
                                       "concept's direction is reversed (0: the concept prompt acts like the blank "
                                       "prompt)")
    stop: str = setting("probe", "--stop", "when training ends: probe (a fixed probe set, checked every "
                        "--probe-every iterations, reaches --erase-to) or momentum (the paper's smoothed per-sample "
                        "statistic, Eq. 4, with --stop-below)", choices=STOPS)
    probe_every: int = setting(10, "--probe-every", "iterations between probe checks")
    probe_size: int = setting(16, "--probe-size", "probes (reference latent, timestep, noise) drawn once per eraser")
    erase_to: float = setting(-0.5, "--erase-to", "the probe stop's target: stop once the concept's guidance "
                              "direction correlates with the original at most this much (rho; 1 before training, "
                              "0 uncorrelated, negative reversed)", "common")
    max_collateral: float | None = setting(None, "--max-collateral", "the probe stop returns to the last check "
                                           "within this bound and stops when held-out unlisted prompts' largest "
                                           "relative key / value change passes it (default: no bound)", "common")
    retain_vocabulary: int = setting(400, "--retain-vocabulary", "random 1-5-word prompts from the tokenizer's "
                                     "vocabulary in the retain distribution")
    retain_stems: int = setting(60, "--retain-stems", "other words put in each concept prompt's place of the name "
                                "(\"a painting by X\") in the retain distribution")
    derive_phrasings: bool = setting(False, "--derive-phrasings", "a one-prompt concept that spells its name also "
                                     "trains on the name in the standard templates of its kind")
    name_contexts: int = setting(60, "--name-contexts", "random vocabulary prompts that say the concept's name "
                                 "(and as many with another word instead), so the contrastive basis follows the "
                                 "name wherever it is said")
    after_name_weight: float = setting(0.0, "--after-name-weight", "how strongly the contrastive basis avoids the "
                                       "rows after the name (the words said after it, which a causal text encoder "
                                       "mixes with the name): 0 ignores them")
    context_share: float = setting(0.0, "--context-share", "share of training samples paired with the name said "
                                   "in a random context instead of the concept's prompt")

    @classmethod
    def paper(cls, **overrides: Any) -> TrainConfig:
        """The paper's SD v1.4 settings: Adam lr 1e-2 (G-CiRs 1e-6), beta 1e-4, lambda 3e-5, stop when the
        momentum of `L_cor` reaches 0, at most 1000 iterations (`sepme erase --preset paper`)."""
        settings = dict(lr=1e-2, gcirs_lr=1e-6, beta=1e-4, lam=3e-5, tau=0.0, patience=1, stop_on="l_cor",
                        max_iterations=1000, basis="exact", containment=0.0, objective="correlation",
                        stop="momentum", derive_phrasings=False)
        return cls(**{**settings, **overrides})

    def validate(self) -> None:
        """Refuse NaN, infinite or out-of-range values before any work starts."""
        for name, allowed in (("basis", BASES), ("objective", OBJECTIVES), ("stop", STOPS)):
            if getattr(self, name) not in allowed:
                raise TrainingError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.stop_on not in STOP_STATISTICS:
            raise TrainingError(f"TrainConfig.stop_on must be one of {STOP_STATISTICS}, got {self.stop_on!r}")
        check_numbers(self, positive=("lr", "eta", "gcirs_lr", "beta", "max_iterations", "images_per_concept",
                                      "reference_steps", "ddim_steps", "checkpoint_every", "patience", "resolution",
                                      "basis_dimensions", "probe_every", "probe_size", "max_collateral"),
                      non_negative=("lam", "warmup", "guidance_scale", "concepts_per_pass", "containment",
                                    "negative_guidance", "retain_vocabulary", "retain_stems", "name_contexts", "context_share",
                                    "after_name_weight"))
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
