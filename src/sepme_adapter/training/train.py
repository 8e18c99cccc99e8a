"""`train_erasers`: G-CiRs (paper Alg. 1) and SepME weight decoupling (Alg. 2) from concepts to erasers.

The plan: encode every prompt once, compute each concept's basis `S_p` (Eq. 8: the null space of
the blank, known, protected and other concepts' embeddings, or the compact basis when the null space
has no room), group the increments that train together, run the loop on each group, and return
validated erasers with their statistics and their measured leakage certificate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..basis import BasisChoice, choose_basis, contrastive_basis, pooled_basis
from ..certificate import collateral_certificate, leakage_certificate
from ..eraser import Eraser
from ..errors import EmptyNullSpaceError, TrainingError
from ..mmdit import CONTEXT_LAYER, denoiser, is_transformer, pooled_layer_path, transformer_pooled_layer
from ..retain import RetainSet, anchor_prompt, first_row_after, fits, retain_prompts
from ..runtime import ErasureRuntime
from ..text import encode_prompts, encode_prompts_pooled, prompt_tokenizer, zeros_for_empty_prompt
from ..unet import layer_weight, modified_layers, pooled_layer
from .calibration import parameter_groups
from .checkpoints import checkpoint_path, load_checkpoint
from .concepts import Concept, check_concepts, derived_phrasings, prepare_concepts, template_stems
from .config import MODES, TrainConfig
from .containment import CollateralMeter, RetainEnergy
from .harness import base_model_metadata, frozen_model, text_length_metadata, training_runtime, zero_weights
from .loop import optimise
from .pooled import pooled_increment
from .reference import pipeline_resolution, reference_latents
from .track import ConceptTrack


@dataclass
class PromptTexts:
    """Text embeddings of every prompt involved, encoded once: `c_0`, each concept's prompts, known, protected."""

    blank: torch.Tensor
    concepts: dict[str, torch.Tensor]  # name -> (prompts, L, d)
    known: list[torch.Tensor]  # one (L, d) per known prompt
    protected: list[torch.Tensor]
    # SDXL: pooled embeddings of each concept's prompts (None for SD v1 / v2), and the unconditional branch's
    # embeddings the training objective's c_0 uses: zeros under force_zeros_for_empty_prompt, else the blank's
    pooled: dict[str, torch.Tensor] | None = None
    unconditional: torch.Tensor | None = None
    unconditional_pooled: torch.Tensor | None = None
    # SDXL: the pooled embeddings of the blank prompt and of every known and protected prompt (pooled bases)
    excluded_pooled: dict[str, torch.Tensor] | None = None
    # containment (`retain.py`): the retain prompts' embeddings, training part and held-out part
    retain: torch.Tensor | None = None
    held_out: torch.Tensor | None = None
    held_out_prompts: tuple[str, ...] = ()
    contexts: dict[str, torch.Tensor] | None = None  # name -> the name said in random contexts
    after_name: dict[str, list[torch.Tensor]] | None = None  # name -> each context's rows after the name
    # --objective anchor: name -> the anchors (each prompt with the name cut out) of its prompts and of its contexts
    anchors: dict[str, torch.Tensor] | None = None
    context_anchors: dict[str, torch.Tensor] | None = None

    def add_retain(self, pipe: Any, retain: RetainSet) -> None:
        """Encode the retain prompts (training and held-out parts)."""
        self.retain = encode_prompts(pipe, list(retain.train)) if retain.train else None
        self.held_out = encode_prompts(pipe, list(retain.held_out)) if retain.held_out else None
        self.held_out_prompts = tuple(retain.held_out)
        self.contexts = {name: encode_prompts(pipe, list(p)) for name, p in retain.contexts.items()}
        tokenizer = prompt_tokenizer(pipe)
        self.after_name = {}
        for name, prompts in retain.contexts.items():
            starts = [first_row_after(tokenizer, p, name) for p in prompts]
            self.after_name[name] = [rows[k:] for rows, k in zip(self.contexts[name], starts)
                                     if k is not None and k < rows.shape[0]]

    def add_anchors(self, pipe: Any, concepts: list[Concept], retain: RetainSet) -> None:
        """Encode the anchor of every concept prompt and every name-in-context prompt (`retain.anchor_prompt`)."""
        self.anchors = {c.name: encode_prompts(pipe, [anchor_prompt(p, c.name) for p in c.prompts]) for c in concepts}
        self.context_anchors = {name: encode_prompts(pipe, [anchor_prompt(p, name) for p in prompts])
                                for name, prompts in retain.contexts.items()}

    @classmethod
    def encode(cls, pipe: Any, concepts: list[Concept], known: list[Concept], protected: list[str]) -> PromptTexts:
        known_prompts = [p for k in known for p in k.prompts]
        texts, pooled = encode_prompts_pooled(
            pipe, ["", *(p for c in concepts for p in c.prompts), *known_prompts, *protected])
        by_concept, pooled_by_concept, start = {}, {}, 1
        for concept in concepts:
            by_concept[concept.name] = texts[start : start + len(concept.prompts)]
            if pooled is not None:
                pooled_by_concept[concept.name] = pooled[start : start + len(concept.prompts)]
            start += len(concept.prompts)
        end = start + len(known_prompts)
        blank, blank_pooled = texts[:1], None if pooled is None else pooled[:1]
        excluded_pooled = None if pooled is None else {
            "blank": pooled[:1], "known": pooled[start:end], "protected": pooled[end:]}
        if zeros_for_empty_prompt(pipe):  # SDXL's unconditional branch is zeros (the blank prompt stays excluded)
            unconditional = torch.zeros_like(blank)
            blank_pooled = None if blank_pooled is None else torch.zeros_like(blank_pooled)
        else:
            unconditional = blank
        return cls(blank, by_concept, list(texts[start:end]), list(texts[end:]),
                   None if pooled is None else pooled_by_concept, unconditional, blank_pooled, excluded_pooled)

    def pooled_basis(self, concept: Concept, others: list[Concept], width: int, rtol: float | None
                     ) -> torch.Tensor | None:
        """`S_pool` of the concept's pooled increment (`width` x m): the exact null space of the blank, other,
        known and protected prompts' pooled embeddings, zero on the layer's time-id columns; None when there
        are no pooled embeddings or the concept has nothing outside their span."""
        if self.pooled is None or self.excluded_pooled is None:
            return None
        rows = [self.excluded_pooled["blank"], *(self.pooled[c.name] for c in others),
                self.excluded_pooled["known"], self.excluded_pooled["protected"]]
        try:
            basis = pooled_basis(rows, width, rtol=rtol)
        except EmptyNullSpaceError:
            return None
        concept = self.pooled[concept.name].double()
        if float((concept @ basis[: concept.shape[-1]].double()).norm()) < 1e-6 * float(concept.norm()):
            return None  # the concept's pooled embeddings lie in the excluded ones' span
        return basis


@dataclass(frozen=True)
class Planned:
    """One increment to train: dense (G-CiRs, no basis) or decoupled on a basis excluding `known`."""

    index: int
    concept: Concept
    dense: bool
    known: dict[str, list[str]]
    choice: BasisChoice | None
    pooled_basis: torch.Tensor | None = None  # SDXL: S_pool of the pooled increment

    @property
    def basis(self) -> torch.Tensor | None:
        return None if self.choice is None else self.choice.basis


def plan_bases(concepts: list[Concept], known: list[Concept], texts: PromptTexts, mode: str,
               config: TrainConfig, pooled_width: int | None = None) -> list[Planned]:
    """Each concept's basis `S_p` (Eq. 8, or compact); iterative mode's bases know only earlier concepts,
    its first is dense. `pooled_width`: SDXL's `add_embedding.linear_1` input width, for the pooled bases."""
    plan = []
    for i, concept in enumerate(concepts):
        if mode == "gcirs" or (mode == "iterative" and i == 0):
            plan.append(Planned(i, concept, True, {}, None))
            continue
        others = concepts[:i] if mode == "iterative" else [c for c in concepts if c != concept]
        rows = [texts.blank, *(texts.concepts[c.name] for c in others), *texts.known, *texts.protected]
        excluded = {c.name: list(c.prompts) for c in others} | {k.name: list(k.prompts) for k in known}
        choice = choose_basis(rows, max_leakage=config.max_leakage, rtol=config.rtol,
                              concept=texts.concepts[concept.name])
        if config.basis == "contrastive" and texts.retain is not None:
            basis, contrasts = contrastive_basis(choice.basis, list(texts.concepts[concept.name]),
                                                 list(texts.retain), config.basis_dimensions,
                                                 list((texts.contexts or {}).get(concept.name, [])),
                                                 (texts.after_name or {}).get(concept.name, []),
                                                 config.after_name_weight)
            choice = BasisChoice(basis, f"{choice.kind}+contrastive", choice.bound, tuple(contrasts))
        pooled = None if pooled_width is None or not config.pooled_increment else texts.pooled_basis(
            concept, others, pooled_width, config.rtol)
        plan.append(Planned(i, concept, False, excluded, choice, pooled))
    return plan


def group_plan(plan: list[Planned], selected: list[int], mode: str) -> list[list[Planned]]:
    """Increments that train together: G-CiRs on several concepts is one shared increment; simultaneous and
    iterative train every decoupled increment in one group; separate trains them one by one."""
    if mode == "gcirs" and len(plan) > 1:
        # Alg. 1 on several concepts: one dense increment shared by all, losses balanced by eta (Eq. 3).
        shared = Concept("+".join(p.concept.name for p in plan), prompts=plan[0].concept.prompts)
        return [[Planned(0, shared, True, {}, None)]]
    entries = [p for p in plan if p.index in selected]
    decoupled = [p for p in entries if not p.dense]
    groups = [[p] for p in entries if p.dense]
    if mode in ("simultaneous", "iterative") and decoupled:
        groups.append(decoupled)  # iterative: bases differ, but the increments still train together
    else:
        groups.extend([p] for p in decoupled)
    return groups


@dataclass
class TrainingRun:
    """The state shared by every group of one `train_erasers` call."""

    pipe: Any
    runtime: ErasureRuntime
    concepts: list[Concept]
    protected: list[str]
    mode: str
    config: TrainConfig
    texts: PromptTexts
    latents: dict[str, torch.Tensor]
    pairing: dict[str, torch.Tensor]  # name -> for each reference latent, the index of its prompt

    @property
    def shared_dense(self) -> bool:
        return self.mode == "gcirs" and len(self.concepts) > 1

    def track(self, planned: Planned) -> ConceptTrack:
        """A zero increment registered as a trainable eraser, and its track."""
        dense, config, model = planned.dense, self.config, denoiser(self.pipe)
        columns = None if dense else planned.basis.shape[1]
        layers = [CONTEXT_LAYER] if is_transformer(model) else modified_layers(model, dense=dense)
        rank = None if dense or config.rank is None or config.rank >= columns else config.rank
        weights = zero_weights(self.pipe, layers, columns if rank is None else rank)
        down = {} if rank is None else random_down(weights, rank, columns, config.seed, planned.index)
        solved = None
        if planned.pooled_basis is not None:  # SDXL, FLUX, SD3: solved in closed form, set once the text increments
            like, path = next(iter(weights.values())), pooled_layer_path(model)  # are trained
            w, a = pooled_increment(layer_weight(model, path), planned.pooled_basis,
                                    self.texts.pooled[planned.concept.name], self.texts.unconditional_pooled,
                                    config.beta, rank)
            solved = w.to(device=like.device, dtype=like.dtype)
            weights[path] = torch.zeros_like(solved)
            if a is not None:
                down[path] = a.to(device=like.device, dtype=like.dtype)
        eraser = Eraser(
            name=planned.concept.name, prompt=planned.concept.prompt, prompts=list(planned.concept.prompts),
            basis=planned.basis, weights=weights,
            beta=1.0 if dense else config.beta,  # dense increments are the weights' change itself
            known=planned.known, protected=[] if dense else list(self.protected),
            down=down, pooled_basis=planned.pooled_basis,
        )
        self.runtime.add(planned.concept.name, eraser, trainable=True)
        source = planned.concept if planned.concept.name in self.latents else self.concepts[0]
        groups = parameter_groups(model, eraser, self.texts.concepts[source.name], config)
        track = ConceptTrack.start(planned.concept, eraser, groups, planned.index, config, *self.images(source))
        track.pooled_solution = solved
        if not dense and self.texts.retain is not None and config.containment > 0:
            track.retain_energy = RetainEnergy.build(model, eraser, self.texts.retain)
        contexts = (self.texts.contexts or {}).get(planned.concept.name)
        if not dense and contexts is not None and self.texts.pooled is None:
            track.contexts = contexts
        if not dense and self.texts.anchors is not None and self.texts.pooled is None:
            track.anchors = self.texts.anchors[source.name][self.pairing[source.name]]  # one per reference latent
            track.context_anchors = (self.texts.context_anchors or {}).get(planned.concept.name)
        if not dense and self.texts.held_out is not None:
            track.collateral = CollateralMeter.build(model, eraser, self.texts.held_out)
        return track

    def images(self, concept: Concept) -> tuple[torch.Tensor, ...]:
        """The concept's reference latents and, for each, the embedding of the prompt it pairs with (SDXL: and
        its pooled embedding)."""
        latents, texts = self.latents[concept.name], self.texts.concepts[concept.name]
        if self.texts.pooled is None:
            return latents, texts[self.pairing[concept.name]]
        return latents, texts[self.pairing[concept.name]], self.texts.pooled[concept.name][self.pairing[concept.name]]

    def tracks(self, group: list[Planned]) -> list[ConceptTrack]:
        tracks = [self.track(planned) for planned in group]
        if self.shared_dense:  # one track per concept, all sharing the increment, optimiser and stop
            tracks += [tracks[0].follower(c, *self.images(c)) for c in self.concepts[1:]]
        return tracks

    def release(self) -> None:
        """Unregister the trainable erasers; unload SepME when nothing else is loaded."""
        names = [c.name for c in self.concepts] + (["+".join(c.name for c in self.concepts)] if self.shared_dense
                                                   else [])
        for name in names:
            self.runtime.discard(name)
        if not self.runtime.erasers:
            self.pipe.unload_sepme()


def random_down(weights: dict[str, torch.Tensor], rank: int, columns: int, seed: int,
                index: int) -> dict[str, torch.Tensor]:
    """Rank-r erasers: a trainable `A` (r x m) per layer with random orthonormal rows, seeded by the concept's
    index only (so separate and simultaneous modes start alike). With `B = 0` the increment starts at zero, and
    `A S_p^T` has orthonormal rows: `B` learns like a full-rank `w` restricted to r directions of the basis."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (index + 1))
    down = {}
    for layer, w in weights.items():
        q, _ = torch.linalg.qr(torch.randn(columns, rank, generator=generator, dtype=torch.float64))
        down[layer] = torch.nn.Parameter(q.T.to(device=w.device, dtype=w.dtype).contiguous())
    return down


def checkpoint_folder(root: Path | None, index: int, tracks: list[ConceptTrack], dense: bool, config: TrainConfig,
                      resume: bool) -> Path | None:
    """`root/group-<index>`, restored from when resuming, else cleared of an old checkpoint."""
    if root is None:
        return None
    folder = root / f"group-{index}"
    folder.mkdir(parents=True, exist_ok=True)
    if resume:
        load_checkpoint(folder, tracks, "dense" if dense else "wd", config)
    elif checkpoint_path(folder).exists():
        checkpoint_path(folder).unlink()
    return folder


def run_groups(run: TrainingRun, groups: list[list[Planned]], checkpoint_root: Path | None, resume: bool,
               progress: bool) -> dict[str, ConceptTrack]:
    """Train each group in turn, with the model frozen; the trained track of each eraser by name."""
    trained: dict[str, ConceptTrack] = {}
    try:
        with frozen_model(run.pipe):
            for g, group in enumerate(groups):
                dense = group[0].dense
                tracks = run.tracks(group)
                folder = checkpoint_folder(checkpoint_root, g, tracks, dense, run.config, resume)
                optimise(run.pipe, tracks, dense, run.config, run.texts.unconditional, folder, progress,
                         f"{'G-CiRs' if dense else 'SepME'} {'+'.join(t.concept.name for t in tracks)}",
                         run.texts.unconditional_pooled, pipeline_resolution(run.pipe, run.config))
                for track in tracks[:1] if run.shared_dense else tracks:
                    trained[track.concept.name] = track
    finally:
        run.release()
    return trained


def finished_eraser(track: ConceptTrack, run: TrainingRun, base: dict[str, Any], started: float,
                    choice: BasisChoice | None) -> Eraser:
    """The trained eraser, detached from its optimiser, with training settings, statistics, its basis and its
    measured leakage certificate in its metadata."""
    eraser = track.eraser
    eraser.weights = {k: v.detach().clone().requires_grad_(False) for k, v in eraser.weights.items()}
    eraser.down = {k: v.detach().clone().requires_grad_(False) for k, v in eraser.down.items()}
    if track.pooled_solution is not None:  # the pooled increment, solved (training/pooled.py)
        eraser.weights[pooled_layer_path(denoiser(run.pipe))] = track.pooled_solution.detach().clone()
    concepts = [p for c in run.concepts for p in c.prompts] if run.shared_dense else list(track.concept.prompts)
    eraser.metadata = {
        **base,
        "training": {"method": "gcirs" if eraser.basis is None else "sepme", "mode": run.mode,
                     "config": asdict(run.config), "concepts": concepts},
        "stats": {
            "iterations": track.stop.steps,
            "stopped_early": track.stopped_early,
            "final_l_cor": track.history[-1] if track.history else None,
            "final_rho": track.relative[-1] if track.relative else None,
            "final_l_mom": track.stop.value,
            "learning_rate_range": [min(g["lr"] for g in track.optimizer.param_groups),
                                    max(g["lr"] for g in track.optimizer.param_groups)],
            "seconds": round(track.seconds, 3),
            "total_seconds": round(time.monotonic() - started, 3),
        },
        "history": {"l_cor": track.history, "rho": track.relative, "regulariser": track.regulariser,
                    "probes": track.probe_history},
    }
    eraser.metadata["stats"]["stop_reason"] = track.stop_reason or (
        "stop statistic" if track.stopped_early else "max_iterations")
    if track.probe_history:
        eraser.metadata["stats"]["probe_rho"] = track.probe_history[-1]["rho"]
    eraser.validate(f"trained eraser {track.concept.name!r}")
    eraser.metadata["stats"]["dtheta_p"] = eraser.dtheta_p()
    if choice is not None:
        eraser.metadata["basis"] = choice.describe()
        if eraser.pooled_basis is not None:
            eraser.metadata["basis"]["pooled_dimensions"] = int(eraser.pooled_basis.shape[1])
        eraser.metadata["certificate"] = leakage_certificate(run.pipe, eraser)
        if run.texts.held_out_prompts:
            eraser.metadata["collateral"] = {"held_out": list(run.texts.held_out_prompts)}
            eraser.metadata["collateral"] |= collateral_certificate(run.pipe, eraser)
    return eraser


def reference_pairs(pipe: Any, concepts: list[Concept], config: TrainConfig, user_folder: Any, cache_dir: Any,
                    progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reference latents per concept and, per latent, the index of the concept prompt it pairs with.

    Generated images are a fair share of `images_per_concept` per prompt, each paired with its own prompt;
    a user's images (one folder per concept) are paired with the concept's prompts in turn.
    """
    if user_folder is not None:
        latents = reference_latents(pipe, concepts, config, user_folder, progress=progress)
        return latents, {c.name: torch.arange(len(latents[c.name])) % len(c.prompts) for c in concepts}
    latents, pairing = {}, {}
    shares: dict[int, list[Concept]] = {}  # concepts with the same images per prompt generate in one batch
    for concept in concepts:
        shares.setdefault(math.ceil(config.images_per_concept / len(concept.prompts)), []).append(concept)
    for share, group in shares.items():
        parts = reference_latents(pipe, [Concept(f"{c.name}#{i}", p) for c in group for i, p in enumerate(c.prompts)],
                                  replace(config, images_per_concept=share), None, cache_dir, progress=progress)
        for concept in group:
            mine = [parts[f"{concept.name}#{i}"] for i in range(len(concept.prompts))]
            latents[concept.name] = torch.cat(mine)
            pairing[concept.name] = torch.cat([torch.full((len(v),), i) for i, v in enumerate(mine)])
    return latents, pairing


def check_family(pipe: Any, mode: str, config: TrainConfig) -> None:
    """Refuse, naming them, the options that do not carry over to the pipeline's model family: on FLUX / SD3 the
    dense increments (`gcirs`, `iterative`'s first step), rank-r training and the after-name rows (found with the
    CLIP tokenizer; T5's rows do not line up with them); `resolution` on a UNet (its size is the UNet's)."""
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise TrainingError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer`: train_erasers needs a "
                            f"Stable Diffusion (v1, v2, XL), SD3 or FLUX pipeline")
    if not is_transformer(denoiser(pipe)):
        if config.resolution is not None:
            raise TrainingError(f"TrainConfig.resolution (--resolution) is for FLUX / SD3 pipelines; "
                                f"{type(pipe).__name__} trains at its UNet's sample size: leave it unset")
        return
    refused = []
    if mode in ("gcirs", "iterative"):
        refused.append(f"mode={mode!r} (dense G-CiRs increments)")
    if config.rank is not None:
        refused.append(f"rank={config.rank} (rank-r training)")
    if config.after_name_weight:
        refused.append(f"after_name_weight={config.after_name_weight} (--after-name-weight)")
    if refused:
        raise TrainingError(
            f"{type(pipe).__name__}: training FLUX / SD3 erasers supports the separable full-rank increment on "
            f"context_embedder (modes simultaneous / separate) only; not supported: {', '.join(refused)}. "
            f"See docs/mmdit.md")


def _check_run(mode: str, shard: tuple[int, int] | None, resume: bool, checkpoint_dir: Any) -> None:
    if mode not in MODES:
        raise TrainingError(f"mode must be one of {MODES}, got {mode!r}")
    if shard is not None and (mode not in ("simultaneous", "separate") or not 0 <= shard[0] < shard[1]):
        raise TrainingError(f"shard={shard} needs mode simultaneous or separate and 0 <= rank < world_size; "
                            f"iterative and gcirs increments depend on each other")
    if resume and checkpoint_dir is None:
        raise TrainingError("resume=True needs the checkpoint_dir of the interrupted run")


def train_erasers(
    pipe: Any,
    concepts: Sequence[str | Concept | tuple[str, str]],
    known: Sequence[str | Concept | tuple[str, str]] | None = None,
    protected: Sequence[str] = (),
    mode: str = "simultaneous",
    config: TrainConfig | None = None,
    reference_images: str | Path | None = None,
    cache_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    retain: Sequence[str] = (),
) -> list[Eraser]:
    """Train one eraser per concept (Alg. 1-2) and return them (not loaded onto the pipeline).

    Args:
        pipe: a Stable Diffusion (v1, v2, XL), SD3 or FLUX pipeline (the base model; left unchanged). FLUX / SD3
            train on the flow-matching velocity (`denoise.py`), modes simultaneous / separate, full rank.
        concepts: what to erase: `"name"`, `"name=prompt"`, `Concept` (several prompts: `Concept(name,
            prompts=[...])`) or `(name, prompt)`; entries with the same name are one concept with all their prompts.
        known: concepts not erased now whose prompts every basis excludes (exact restoration).
        protected: extra prompts kept exact (e.g. watermark triggers).
        mode: `simultaneous` (SepME1), `separate` (same bases, one concept at a time), `iterative`
            (SepME2: step t knows concepts before it; step 1 is G-CiRs) or `gcirs` (Alg. 1 only:
            one dense increment on all attn2 weights for all concepts, not separable).
        config: hyperparameters (`TrainConfig()`: the paper's defaults).
        reference_images: a folder with one sub-folder of images per concept name (default: generate
            `images_per_concept` images with the original model, cached in `cache_dir`).
        cache_dir: where generated reference images are cached (PNG + manifest).
        checkpoint_dir: resumable checkpoints go here (and on Ctrl-C or a crash).
        resume: continue from the checkpoint in `checkpoint_dir`.
        shard: `(rank, world_size)`: train only concepts `i` with `i % world_size == rank` (bases still
            exclude all of them), for splitting independent erasers across processes or machines.
        retain: prompts to leave alone besides the retain distribution drawn from the model (`retain.py`):
            they shape the contrastive basis and the containment term (not kept exact; use `protected` for that).

    Example:
        >>> erasers = train_erasers(pipe, ["vangogh=a painting by van gogh", "picasso=a painting by picasso"])
        >>> for e in erasers: e.save(f"{e.name}.safetensors")
    """
    config = config or TrainConfig()
    config.validate()
    check_family(pipe, mode, config)
    concepts, known, protected = prepare_concepts(concepts, known, protected)
    if config.derive_phrasings:
        tokenizer = prompt_tokenizer(pipe)
        concepts = [derived_phrasings(c, keep=lambda prompt: fits(tokenizer, prompt)) for c in concepts]
        check_concepts(concepts, known, protected)
    if config.protect_templates:
        protected = protected + [s for s in template_stems([*concepts, *known]) if s not in protected]
    _check_run(mode, shard, resume, checkpoint_dir)
    selected = [i for i in range(len(concepts)) if shard is None or i % shard[1] == shard[0]]
    pipe, runtime = training_runtime(pipe, [c.name for c in concepts])
    # Everything that can fail on bad input happens before any image is generated.
    texts = PromptTexts.encode(pipe, concepts, known, protected)
    # the retain distribution (basis, containment term) and its held-out part (the collateral certificate)
    retain_set = retain_prompts(
        prompt_tokenizer(pipe), [(c.name, c.prompts) for c in concepts], user=list(retain),
        vocabulary=config.retain_vocabulary, stems_per_prompt=config.retain_stems, seed=config.seed,
        contexts=config.name_contexts)
    texts.add_retain(pipe, retain_set)
    if config.objective == "anchor":
        texts.add_anchors(pipe, concepts, retain_set)
    model = denoiser(pipe)
    pooled = transformer_pooled_layer(model) if is_transformer(model) else pooled_layer(model)
    plan = plan_bases(concepts, known, texts, mode, config, None if pooled is None else pooled.in_features)
    base = base_model_metadata(pipe, runtime) | text_length_metadata(pipe, texts.blank.shape[1])
    latents, pairing = reference_pairs(pipe, [concepts[i] for i in selected], config, reference_images, cache_dir,
                                       progress)
    run = TrainingRun(pipe, runtime, concepts, protected, mode, config, texts, latents, pairing)
    started = time.monotonic()
    trained = run_groups(run, group_plan(plan, selected, mode), Path(checkpoint_dir) if checkpoint_dir is not None else None,
                         resume, progress)
    choices = {p.concept.name: p.choice for p in plan}
    return [finished_eraser(track, run, base, started, choices.get(name)) for name, track in trained.items()]
