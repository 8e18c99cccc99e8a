"""Fine-tuning and closed-form editing with the baselines: one dense eraser per concept."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..eraser import Eraser
from ..errors import TrainingError
from ..runtime import ErasureRuntime
from ..text import default_time_ids, encode_prompts_pooled, uses_added_conditions, zeros_for_empty_prompt
from ..training.concepts import Concept, prepare_concepts
from ..training.harness import (
    base_model_metadata,
    frozen_model,
    gradients_finite,
    noise_schedule,
    noisy_latents,
    training_runtime,
    zero_weights,
)
from ..training.reference import reference_latents
from ..unet import cross_attention_modules
from .config import ANCHOR_METHODS, DEFAULT_ANCHORS, LAYER_SETS, METHODS, PAPERS, BaselineConfig
from .objectives import ablation_loss, concept_token_positions, esd_loss, fmn_loss, uce_increments

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory since `peak_memory_start`; None on CPU (not measurable per method there)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None


def fine_tune(pipe: Any, eraser: Eraser, objective: Objective, latents: torch.Tensor, lr: float, iterations: int,
              config: BaselineConfig, index: int, progress: bool, description: str) -> dict[str, Any]:
    """Adam on the eraser's dense increments, read live by the processor (`runtime.add(trainable=True)`).

    `objective(x_t, t)` returns the method's loss with the increment active; `x_t` is a reference
    latent noised at a random timestep (`training.harness.noisy_latents`). Returns the loss history and
    the objective on fixed probe samples before and after.
    """
    device, dtype = pipe.unet.device, pipe.unet.dtype
    alphas_cumprod = noise_schedule(pipe)
    parameters = list(eraser.weights.values())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    stream = torch.Generator().manual_seed(config.seed * 100_003 + index)
    probe_stream = torch.Generator().manual_seed(config.seed * 100_003 + index + 50_000)

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x_t, t, _ = noisy_latents(latents, generator, alphas_cumprod, config.ddim_steps, device)
        return x_t.to(dtype), torch.tensor([t], device=device)

    probes = [draw(probe_stream) for _ in range(config.probe_samples)]

    def probe_loss() -> float | None:
        if not probes:
            return None
        with torch.no_grad():
            return sum(float(objective(x, t)) for x, t in probes) / len(probes)

    before = probe_loss()
    history: list[float] = []
    for step in tqdm(range(iterations), desc=description, disable=not progress, leave=False):
        loss = objective(*draw(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(float(loss.detach())) or not gradients_finite(parameters):
            raise TrainingError(f"{description}: the loss became non-finite at iteration {step + 1}; lower the "
                                f"learning rate (lr={lr})")
        optimizer.step()
        history.append(float(loss.detach()))
    return {"history": history, "probe_loss_before": before, "probe_loss_after": probe_loss()}


def method_objective(pipe: Any, runtime: ErasureRuntime, method: str, name: str, concept: Concept,
                     anchor: str | None, config: BaselineConfig, extra: dict[str, Any]) -> Objective:
    """`objective(x_t, t)` of ESD, ablation or FMN for one concept (FMN records its token positions in `extra`)."""
    unet = pipe.unet
    prompts = [concept.prompt, "" if method == "esd" else (anchor or "")]
    texts, pooled = encode_prompts_pooled(pipe, prompts)
    texts = texts.to(device=unet.device, dtype=unet.dtype)
    concept_text, other_text = texts[:1], texts[1:]
    # SDXL: pooled embeddings and the default size's time ids in every UNet call (None for SD v1 / v2)
    time_ids = default_time_ids(pipe) if pooled is not None and uses_added_conditions(unet) else None
    concept_pooled = other_pooled = None
    if time_ids is not None:
        pooled = pooled.to(device=unet.device, dtype=unet.dtype)
        concept_pooled, other_pooled = pooled[:1], pooled[1:]
    if method == "esd" and zeros_for_empty_prompt(pipe):  # SDXL's unconditional branch c_0 is zeros
        other_text = torch.zeros_like(other_text)
        other_pooled = None if other_pooled is None else torch.zeros_like(other_pooled)
    if method == "esd":
        return lambda x_t, t: esd_loss(unet, runtime, name, x_t, t, concept_text, other_text, config.esd_eta,
                                       concept_pooled, other_pooled, time_ids)
    if method == "ablation":
        return lambda x_t, t: ablation_loss(unet, runtime, name, x_t, t, concept_text, other_text, concept_pooled,
                                            other_pooled, time_ids)
    positions = concept_token_positions(pipe, concept)
    ids = pipe.tokenizer(concept.prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    extra["token_positions"] = positions
    extra["tokens"] = pipe.tokenizer.convert_ids_to_tokens([ids[p] for p in positions])
    return lambda x_t, t: fmn_loss(unet, runtime, name, x_t, t, concept_text, positions, concept_pooled, time_ids)


def train_one(pipe: Any, runtime: ErasureRuntime, method: str, concept: Concept, anchor: str | None,
              latents: torch.Tensor | None, config: BaselineConfig, index: int, progress: bool
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], int]:
    """One concept's ESD / ablation / FMN fine-tuning through a temporary trainable eraser."""
    layers_key = getattr(config, f"{method}_layers")
    layers = [f"{path}.{proj}" for path in sorted(cross_attention_modules(pipe.unet))
              for proj in LAYER_SETS[layers_key]]
    # validated again by the caller once trained
    eraser = Eraser(name=concept.name, prompt=concept.prompt, basis=None, weights=zero_weights(pipe, layers, None),
                    beta=1.0)
    name = f"__{method}__{concept.name}"  # never clashes with a loaded eraser
    extra: dict[str, Any] = {"layers": layers_key}
    objective = method_objective(pipe, runtime, method, name, concept, anchor, config, extra)
    lr, iterations = getattr(config, f"{method}_lr"), getattr(config, f"{method}_iterations")
    runtime.add(name, eraser, trainable=True)
    try:
        result = fine_tune(pipe, eraser, objective, latents, lr, iterations, config, index, progress,
                           f"{method} {concept.name}")
    finally:
        runtime.discard(name)
    return eraser.weights, result, extra, iterations


def _check_anchor(method: str, anchor: str | None, concepts: list[Concept]) -> str | None:
    """The anchor `c*` of ablation / UCE (default per method); refused for the methods without one."""
    if anchor is not None and method not in ANCHOR_METHODS:
        raise TrainingError(f"an anchor applies to {' and '.join(ANCHOR_METHODS)}; {method} has no anchor "
                            f"({'it steers towards the blank prompt' if method == 'esd' else 'it is untargeted'})")
    if method in ANCHOR_METHODS:
        anchor = DEFAULT_ANCHORS[method] if anchor is None else anchor
        same = [c.name for c in concepts if c.prompt == anchor]
        if same:
            raise TrainingError(f"concepts {same} have the anchor {anchor!r} as their prompt; choose another --anchor")
    return anchor


def _baseline_latents(pipe: Any, method: str, selected: list[Concept], anchor: str | None, config: BaselineConfig,
                      reference_images: str | Path | None, cache_dir: str | Path | None, progress: bool
                      ) -> dict[str, torch.Tensor]:
    """Reference latents: images of the concept (ESD, FMN), of the anchor (ablation), none (UCE)."""
    if method in ("esd", "fmn"):
        return reference_latents(pipe, selected, config, reference_images, cache_dir, progress=progress)
    if method == "ablation":  # AbConcept trains on images of the anchor, paired with the concept prompt
        return reference_latents(pipe, [Concept(c.name, anchor) for c in selected], config, reference_images,
                                 cache_dir, progress=progress)
    return {}


def _uce(pipe: Any, concept: Concept, anchor: str, preserve: list[str], config: BaselineConfig
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], int]:
    weights = uce_increments(pipe, concept.prompt, anchor, preserve, config)
    result = {"history": [], "probe_loss_before": None, "probe_loss_after": None}
    return weights, result, {"preserve": preserve, "tokens": config.uce_tokens, "layers": "kv"}, 0


def _baseline_eraser(concept: Concept, method: str, anchor: str | None, known: list[Concept], protected: list[str],
                     config: BaselineConfig, trained: tuple, base: dict[str, Any], timing: dict[str, Any]) -> Eraser:
    """The trained increments as a dense eraser, with the method, its settings and statistics in the metadata."""
    weights, result, extra, iterations = trained
    weights = {k: v.detach().float().cpu().clone() for k, v in weights.items() if bool(v.abs().max() > 0)}
    if not weights:
        raise TrainingError(f"{method} left every layer unchanged for concept {concept.name!r} "
                            f"(0 iterations or a zero learning rate?)")
    history = result["history"]
    metadata = {
        **base,
        "training": {
            "method": method, "paper": PAPERS[method], "anchor": anchor, "concepts": [concept.prompt],
            "known": {k.name: k.prompt for k in known}, "protected": protected,
            "x_t": None if method == "uce" else "reference images noised at a random timestep",
            "config": asdict(config), **extra,
        },
        "stats": {
            "iterations": iterations, **timing, "final_loss": history[-1] if history else None,
            "probe_loss_before": result["probe_loss_before"], "probe_loss_after": result["probe_loss_after"],
        },
        "history": {"loss": history},
    }
    eraser = Eraser(name=concept.name, prompt=concept.prompt, basis=None, weights=weights, beta=1.0,
                    metadata=metadata)
    eraser.metadata["stats"]["dtheta_p"] = eraser.dtheta_p()
    eraser.validate(f"{method} eraser {concept.name!r}")
    return eraser


def train_baseline(
    pipe: Any,
    concepts: Sequence[str | Concept | tuple[str, str]],
    method: str,
    anchor: str | None = None,
    config: BaselineConfig | None = None,
    known: Sequence[str | Concept | tuple[str, str]] | None = None,
    protected: Sequence[str] = (),
    reference_images: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> list[Eraser]:
    """Erase each concept with a baseline method; one dense eraser per concept (not loaded on the pipeline).

    Args:
        pipe: a Stable Diffusion pipeline (the base model; left unchanged).
        concepts: what to erase: `"name"`, `"name=prompt"`, `Concept` or `(name, prompt)`. FMN suppresses
            the tokens of the name where it appears in the prompt (`"van gogh=a painting by van gogh"`).
        method: `esd` (ESD-x), `ablation` (Concept Ablation), `fmn` (Forget-Me-Not) or `uce`.
        anchor: the anchor prompt `c*` of `ablation` and `uce` (default `"a painting"` / `""`).
        config: hyperparameters (`BaselineConfig()`: each paper's defaults).
        known, protected: prompts UCE preserves (with the blank prompt and the other concepts); the
            training-based methods have no preservation term and only record them.
        reference_images: a folder with one sub-folder of images per concept name (for `ablation`:
            images of the anchor); default: generated by the original model, cached in `cache_dir`.
        shard: `(rank, world_size)`: only concepts `i` with `i % world_size == rank`.

    Example:
        >>> erasers = train_baseline(pipe, ["vangogh=a painting by van gogh"], "esd")
        >>> pipe.load_sepme(erasers[0])
    """
    if method not in METHODS:
        raise TrainingError(f"method must be one of {METHODS}, got {method!r}")
    config = config or BaselineConfig()
    config.validate()
    if getattr(pipe, "unet", None) is None:
        raise TrainingError(f"the baselines ({', '.join(METHODS)}) train dense UNet increments; "
                            f"{type(pipe).__name__} has no UNet. FLUX / SD3 train SepME erasers only "
                            f"(train_erasers, sepme erase --method sepme)")
    concepts, known, protected = prepare_concepts(concepts, known, protected)
    anchor = _check_anchor(method, anchor, concepts)
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise TrainingError(f"shard={shard} needs 0 <= rank < world_size")
    selected = [c for i, c in enumerate(concepts) if shard is None or i % shard[1] == shard[0]]
    pipe, runtime = training_runtime(pipe)
    base = base_model_metadata(pipe, runtime)
    latents = _baseline_latents(pipe, method, selected, anchor, config, reference_images, cache_dir, progress)
    erasers, started_all, device = [], time.monotonic(), pipe.unet.device
    try:
        for index, concept in enumerate(selected):
            started = time.monotonic()
            peak_memory_start(device)
            if method == "uce":
                preserve = ["", *(c.prompt for c in concepts if c != concept), *(k.prompt for k in known), *protected]
                trained = _uce(pipe, concept, anchor, preserve, config)
            else:
                with frozen_model(pipe):
                    trained = train_one(pipe, runtime, method, concept, anchor, latents.get(concept.name), config,
                                        index, progress)
            timing = {"seconds": round(time.monotonic() - started, 3),
                      "total_seconds": round(time.monotonic() - started_all, 3), "peak_memory_mb": peak_memory_mb(device)}
            erasers.append(_baseline_eraser(concept, method, anchor, known, protected, config, trained, base, timing))
    finally:
        if not runtime.erasers:
            pipe.unload_sepme()
    return erasers
