"""Training erasers: G-CiRs (paper Eq. 2-4, Alg. 1) and SepME weight decoupling (Eq. 5-11, Alg. 2).

The objective for concept i is the correlation loss (Eq. 2)
    L_cor(c_i, dW) = mean( D(c_i, theta) * D(c_i, theta + dW) ),   D(c, .) = eps(., x_t, c) - eps(., x_t, c_0)
plus `lambda * ||w||_1 / M` (Eq. 11), with a momentum early stop (Eq. 4).

The step is far cheaper than the paper's (two model copies, 2 frozen + 2 trainable passes per
concept): one UNet serves as frozen model (erasers inactive) and edited model (erasers active);
with weight decoupling `eps(theta + dW_i, x_t, c_0) == eps(theta, x_t, c_0)` exactly, so that pass
is dropped; text embeddings are computed once; frozen passes run without a graph; and all
concepts share one batched UNet call, the processor applying a different increment per row.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .base_model import cross_attention_modules, encode_prompts, fingerprint
from .basis import null_space_basis
from .eraser import Eraser, atomic_save_safetensors
from .errors import TrainingError
from .loader import attach
from .reference import reference_latents

MODES = ("simultaneous", "separate", "iterative", "gcirs")


@dataclass(frozen=True)
class Concept:
    """A concept to erase or to keep: a name (the adapter name) and its prompt (default: the name)."""

    name: str
    prompt: str

    @classmethod
    def parse(cls, text: str | Concept | tuple[str, str]) -> Concept:
        """`"vangogh=a painting by van gogh"`, `"Van Gogh"` (prompt = name) or `(name, prompt)`."""
        if isinstance(text, Concept):
            return text
        if isinstance(text, tuple):
            return cls(*text)
        name, _, prompt = text.partition("=")
        name, prompt = name.strip(), prompt.strip()
        if not name:
            raise TrainingError(f"concept {text!r} has an empty name; write NAME or NAME=PROMPT")
        return cls(name, prompt or name)


@dataclass
class TrainConfig:
    """Hyperparameters; defaults are the paper's (Sec. 4.2 Implementation Details).

    Attributes:
        lr: Adam learning rate for the weight-decoupled `w`s (SepME).
        gcirs_lr: Adam learning rate for dense G-CiRs increments on all attn2 weights.
        beta: the fixed scale of Eq. 10.
        lam: lambda, weight of `||w||_1 / M` (Eq. 11).
        tau: early-stop threshold on the momentum statistic (Eq. 4).
        alpha: momentum of Eq. 4.
        max_iterations: at most this many optimisation steps per concept.
        warmup: iterations before the early-stop check starts (authors' code: 10).
        seed: seeds reference images, timesteps and noise.
        images_per_concept: reference images `x_0` generated per concept prompt.
        reference_steps: sampler steps used to generate reference images.
        guidance_scale: classifier-free guidance for the reference images.
        ddim_steps: timesteps are drawn as one of these DDIM steps, then a DDPM t inside it.
        rtol: rank tolerance of the null-space basis (None: float32 round-off).
        checkpoint_every: iterations between resumable checkpoints (when a folder is given).
        concepts_per_pass: concepts per UNet pass with a graph (0: all at once, fastest; 1: lowest
            peak memory). The frozen passes stay batched; the increments are identical either way.
    """

    lr: float = 1e-2
    gcirs_lr: float = 1e-6
    beta: float = 1e-4
    lam: float = 3e-5
    tau: float = 0.0
    alpha: float = 0.9
    max_iterations: int = 1000
    warmup: int = 10
    seed: int = 0
    images_per_concept: int = 8
    reference_steps: int = 50
    guidance_scale: float = 7.5
    ddim_steps: int = 50
    rtol: float | None = None
    checkpoint_every: int = 50
    concepts_per_pass: int = 0

    def validate(self) -> None:
        """Refuse NaN, infinite or out-of-range values before any work starts."""
        check_numbers(self, positive=("lr", "gcirs_lr", "beta", "max_iterations", "images_per_concept",
                                      "reference_steps", "ddim_steps", "checkpoint_every"),
                      non_negative=("lam", "warmup", "guidance_scale", "concepts_per_pass"))
        if not 0 <= self.alpha < 1:
            raise TrainingError(f"TrainConfig.alpha must be in [0, 1), got {self.alpha!r}")
        if self.rtol is not None and self.rtol <= 0:
            raise TrainingError(f"TrainConfig.rtol must be > 0, got {self.rtol!r}")


def check_numbers(config: Any, positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Every numeric field of a config dataclass is finite; the named ones are > 0 or >= 0."""
    name = type(config).__name__
    for item in fields(config):
        value = getattr(config, item.name)
        if value is None or isinstance(value, str):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrainingError(f"{name}.{item.name} must be a finite number, got {value!r}")
    for field_name in positive:
        if getattr(config, field_name) <= 0:
            raise TrainingError(f"{name}.{field_name} must be > 0, got {getattr(config, field_name)!r}")
    for field_name in non_negative:
        if getattr(config, field_name) < 0:
            raise TrainingError(f"{name}.{field_name} must be >= 0, got {getattr(config, field_name)!r}")


# --------------------------------------------------------------------------- the paper's formulas
def correlation_loss(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Eq. 2: `L_cor = mean(D(c, theta) * D(c, theta + dW))`, one value per batch row."""
    return (original * edited).flatten(1).mean(dim=1)


def balance_weights(losses: Sequence[float]) -> list[float]:
    """Eq. 3: `eta_i = |L_cor(c_1)| / |L_cor(c_i)|` (detached), balancing concepts."""
    first = abs(float(losses[0]))
    return [first / max(abs(float(x)), 1e-30) for x in losses]


def l1_norm_per_layer(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """`||W||_p = ||W||_1 / M`, M = number of modified layers (Eq. 3 and 11)."""
    return sum(w.abs().sum() for w in weights) / max(len(weights), 1)


@dataclass
class MomentumStop:
    """Eq. 4: `L_mom_n = alpha * L_mom_{n-1} + (1 - alpha) * L_n`; stop once `L_mom_n <= tau` after warm-up."""

    alpha: float
    tau: float
    warmup: int
    value: float = 0.0
    steps: int = 0

    def update(self, loss: float) -> bool:
        """Add one iteration's loss; return True when training should stop."""
        self.value = self.alpha * self.value + (1 - self.alpha) * loss
        self.steps += 1
        return self.steps > self.warmup and self.value <= self.tau


# --------------------------------------------------------------------------- one concept's state
@dataclass
class _Track:
    """Everything that evolves while one increment trains (resumable)."""

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
        return list(self.eraser.weights.values())


def _noisy_latents(track: _Track, alphas_cumprod: torch.Tensor, config: TrainConfig, device: torch.device):
    """`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps` for one random reference image and timestep."""
    g = track.generator
    index = int(torch.randint(len(track.latents), (1,), generator=g))
    total = len(alphas_cumprod)
    step = int(torch.randint(config.ddim_steps, (1,), generator=g))  # one of the DDIM steps ...
    low, high = step * total // config.ddim_steps, (step + 1) * total // config.ddim_steps
    t = int(torch.randint(low, max(high, low + 1), (1,), generator=g))  # ... then a DDPM t inside it
    x0 = track.latents[index : index + 1]
    noise = torch.randn(x0.shape, generator=g).to(device=device, dtype=x0.dtype)
    abar = alphas_cumprod[t].to(device=device, dtype=x0.dtype)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t


# --------------------------------------------------------------------------- checkpoints
def _checkpoint_path(folder: Path) -> Path:
    return folder / "checkpoint.safetensors"


def save_checkpoint(folder: Path, tracks: Sequence[_Track], mode: str, config: TrainConfig) -> Path:
    """Increments, Adam moments, RNG states and loss history of every concept, written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mode": mode, "config": asdict(config), "tracks": []}
    seen: set[int] = set()
    for i, track in enumerate(tracks):
        if id(track.eraser) in seen:  # G-CiRs on several concepts: one increment shared by all tracks
            state["tracks"].append({"name": track.concept.name, "prompt": track.concept.prompt, "shared": True})
            continue
        seen.add(id(track.eraser))
        for layer, w in track.eraser.weights.items():
            tensors[f"{i}/w/{layer}"] = w.detach().cpu().contiguous()
        adam = track.optimizer.state_dict()
        for j, slot in adam["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{i}/adam/{j}/{key}"] = slot[key].detach().cpu().contiguous()
            tensors[f"{i}/adam/{j}/step"] = torch.as_tensor(slot["step"], dtype=torch.float64).reshape(1)
        tensors[f"{i}/rng"] = track.generator.get_state()
        state["tracks"].append({
            "name": track.concept.name, "prompt": track.concept.prompt, "history": track.history,
            "regulariser": track.regulariser, "momentum": track.stop.value, "steps": track.stop.steps,
            "done": track.done, "stopped_early": track.stopped_early, "seconds": track.seconds,
        })
    path = _checkpoint_path(folder)
    atomic_save_safetensors(tensors, path, {"sepme_checkpoint": json.dumps(state)})
    return path


def load_checkpoint(folder: Path, tracks: Sequence[_Track], mode: str, config: TrainConfig) -> bool:
    """Restore `tracks` from the folder's checkpoint; False when there is none."""
    path = _checkpoint_path(folder)
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as reader:
        state = json.loads((reader.metadata() or {})["sepme_checkpoint"])
    tensors = load_file(str(path))
    names = [(t["name"], t["prompt"]) for t in state["tracks"]]
    if state["mode"] != mode or names != [(t.concept.name, t.concept.prompt) for t in tracks]:
        raise TrainingError(f"the checkpoint in {folder} is for mode {state['mode']!r} and concepts {names}; "
                            f"use another --out folder or delete {path.name} to start over")
    if state["config"] != asdict(config):
        raise TrainingError(f"the checkpoint in {folder} was made with other settings ({state['config']}); "
                            f"resume with the same settings or delete {path.name}")
    for i, (track, saved) in enumerate(zip(tracks, state["tracks"])):
        if saved.get("shared"):
            continue
        with torch.no_grad():
            for layer, w in track.eraser.weights.items():
                w.copy_(tensors[f"{i}/w/{layer}"])
        adam = track.optimizer.state_dict()
        for j in range(len(track.parameters)):
            if f"{i}/adam/{j}/step" in tensors:
                adam["state"][j] = {
                    "step": tensors[f"{i}/adam/{j}/step"].reshape(()).to(torch.float32),
                    "exp_avg": tensors[f"{i}/adam/{j}/exp_avg"],
                    "exp_avg_sq": tensors[f"{i}/adam/{j}/exp_avg_sq"],
                }
        track.optimizer.load_state_dict(adam)
        track.generator.set_state(tensors[f"{i}/rng"])
        track.history, track.regulariser = list(saved["history"]), list(saved["regulariser"])
        track.stop.value, track.stop.steps = saved["momentum"], saved["steps"]
        track.done, track.stopped_early, track.seconds = saved["done"], saved["stopped_early"], saved["seconds"]
    return True


# --------------------------------------------------------------------------- the training loop
@contextmanager
def _frozen_model(pipe) -> Iterator[None]:
    """Freeze every model weight (only the increments learn); restore the flags afterwards."""
    modules = [m for m in (pipe.unet, pipe.text_encoder, pipe.vae) if m is not None]
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module, module_flags in zip(modules, flags):
            for p, flag in zip(module.parameters(), module_flags):
                p.requires_grad_(flag)


def _optimise(pipe, tracks: list[_Track], dense: bool, config: TrainConfig, blank: torch.Tensor,
              checkpoint_dir: Path | None, progress: bool, description: str) -> None:
    """Run Alg. 1 (dense, `dense=True`) or Alg. 2 (weight-decoupled) on the given concepts together.

    Weight-decoupled: each concept keeps its own objective `L_cor_i + lambda ||w_i||_1 / M` and its own
    momentum stop, so optimising concepts together or one by one gives the same increments (their
    parameters are disjoint; with Adam, eta_i would only rescale concept i's gradient). Dense G-CiRs
    shares one increment: `sum_i eta_i L_cor_i + lambda ||dW||_1 / M` and one momentum stop.
    """
    unet = pipe.unet
    runtime = pipe._sepme(create=True)
    device, dtype = unet.device, unet.dtype
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    blank = blank.to(device=device, dtype=dtype)
    shared = tracks[0] if dense else None
    bar = tqdm(total=config.max_iterations, desc=description, disable=not progress, leave=False,
               initial=max(t.stop.steps for t in tracks))
    last_checkpoint = time.monotonic()
    try:
        while True:
            live = [t for t in tracks if not t.done and t.stop.steps < config.max_iterations]
            if dense and shared.done:
                live = []
            if not live:
                break
            started = time.monotonic()
            samples = [_noisy_latents(t, alphas_cumprod, config, device) for t in live]
            x_t = torch.cat([s[0] for s in samples])
            timesteps = torch.tensor([s[1] for s in samples], device=device)
            concept_text = torch.cat([t.embedding for t in live]).to(device=device, dtype=dtype)
            blank_text = blank.expand(len(live), -1, -1)
            with torch.no_grad():  # the frozen model: same UNet, no eraser active, no graph
                with runtime.per_row([None] * (2 * len(live))):
                    frozen = unet(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
                                  torch.cat([concept_text, blank_text])).sample.float()
            eps_concept, eps_blank = frozen.chunk(2)
            original = eps_concept - eps_blank
            if dense:  # a dense increment changes the blank prompt's prediction too: both passes learn
                with runtime.per_row([shared.concept.name] * (2 * len(live))):
                    edited = unet(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
                                  torch.cat([concept_text, blank_text])).sample.float()
                edited_concept, edited_blank = edited.chunk(2)
                losses = correlation_loss(original, edited_concept - edited_blank)
                values = [float(v) for v in losses.detach()]
                eta = balance_weights(values)
                regulariser = l1_norm_per_layer(shared.parameters)
                objective = sum(e * loss for e, loss in zip(eta, losses)) + config.lam * regulariser
                owners = [shared]
                shared.optimizer.zero_grad(set_to_none=True)
                objective.backward()
                objective_value = float(objective.detach())
            else:  # eps(theta + dW_i, x_t, c_0) == eps(theta, x_t, c_0): reuse the frozen pass
                owners = live
                for owner in owners:
                    owner.optimizer.zero_grad(set_to_none=True)
                values, regularisers, objective_value = [], [], 0.0
                chunk = config.concepts_per_pass or len(live)  # graph passes of `chunk` concepts at a time
                for first in range(0, len(live), chunk):
                    part, rows = live[first : first + chunk], slice(first, first + chunk)
                    with runtime.per_row([t.concept.name for t in part]):
                        change = unet(x_t[rows], timesteps[rows], concept_text[rows]).sample.float() - eps_blank[rows]
                    losses = correlation_loss(original[rows], change)
                    part_regularisers = [l1_norm_per_layer(t.parameters) for t in part]
                    objective = sum(losses[i] + config.lam * part_regularisers[i] for i in range(len(part)))
                    objective.backward()  # disjoint parameters: per-chunk gradients are the full ones
                    values += [float(v) for v in losses.detach()]
                    regularisers += [float(r.detach()) for r in part_regularisers]
                    objective_value += float(objective.detach())
            grads_finite = all(
                p.grad is None or bool(torch.isfinite(p.grad).all()) for o in owners for p in o.parameters
            )
            if not math.isfinite(objective_value) or not grads_finite:
                raise TrainingError(
                    f"the loss became non-finite at iteration {owners[0].stop.steps + 1} "
                    f"(L_cor = {values}); the increments were left at their last finite values. "
                    f"Lower the learning rate (lr={config.lr if not dense else config.gcirs_lr}) or beta."
                )
            for owner in owners:
                owner.optimizer.step()
            elapsed = time.monotonic() - started
            if dense:
                combined = sum(e * v for e, v in zip(eta, values))
                shared.history.append(combined)
                shared.regulariser.append(float(regulariser.detach()))
                shared.seconds += elapsed
                if shared.stop.update(combined):
                    shared.done = shared.stopped_early = True
            else:
                for i, track in enumerate(live):
                    track.history.append(values[i])
                    track.regulariser.append(regularisers[i])
                    track.seconds += elapsed / len(live)
                    if track.stop.update(values[i]):
                        track.done = track.stopped_early = True
            bar.update(1)
            bar.set_postfix({t.concept.name: f"{t.history[-1]:+.2e}/{t.stop.value:+.1e}" for t in owners})
            if checkpoint_dir is not None and (
                owners[0].stop.steps % config.checkpoint_every == 0 or time.monotonic() - last_checkpoint > 300
            ):
                save_checkpoint(checkpoint_dir, tracks, "dense" if dense else "wd", config)
                last_checkpoint = time.monotonic()
    except BaseException:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, tracks, "dense" if dense else "wd", config)
        raise
    finally:
        bar.close()
    for track in tracks:
        track.done = True
    if checkpoint_dir is not None:
        save_checkpoint(checkpoint_dir, tracks, "dense" if dense else "wd", config)


# --------------------------------------------------------------------------- the public entry point
def _new_track(pipe, concept: Concept, eraser: Eraser, lr: float, index: int, config: TrainConfig,
               latents: torch.Tensor, embedding: torch.Tensor) -> _Track:
    generator = torch.Generator().manual_seed(config.seed * 100_003 + index)
    return _Track(
        concept=concept, eraser=eraser, optimizer=torch.optim.Adam(list(eraser.weights.values()), lr=lr),
        generator=generator, stop=MomentumStop(config.alpha, config.tau, config.warmup),
        latents=latents, embedding=embedding,
    )


def _zero_weights(pipe, layers: Sequence[str], columns: int | None) -> dict[str, torch.Tensor]:
    """Trainable `w`s initialised to zero (Eq. 10): `d_out x m`, or `d_out x d_in` for dense increments."""
    weights = {}
    for layer in layers:
        weight = pipe.unet.get_submodule(layer)
        weight = getattr(weight, "base_layer", weight).weight
        shape = (weight.shape[0], columns if columns is not None else weight.shape[1])
        weights[layer] = torch.nn.Parameter(torch.zeros(shape, device=weight.device, dtype=torch.float32))
    return weights


def _check_inputs(concepts: list[Concept], known: list[Concept], protected: list[str], mode: str) -> None:
    if not concepts:
        raise TrainingError("no concept to erase: pass at least one concept")
    if mode not in MODES:
        raise TrainingError(f"mode must be one of {MODES}, got {mode!r}")
    names = [c.name for c in concepts] + [k.name for k in known]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TrainingError(f"concept names must be unique (each is an adapter name); repeated: {duplicates}; "
                            f"a concept to erase must not also be listed as known")
    erase_prompts = {c.prompt: c.name for c in concepts}
    for other in known:
        if other.prompt in erase_prompts:
            raise TrainingError(f"known concept {other.name!r} has the same prompt as concept "
                                f"{erase_prompts[other.prompt]!r} ({other.prompt!r}): its null space would "
                                f"exclude the very prompt to erase")
    prompts = [c.prompt for c in concepts]
    if len(set(prompts)) != len(prompts):
        raise TrainingError(f"two concepts share a prompt: {prompts}")
    for c in concepts:
        if not c.prompt.strip() or c.prompt in protected:
            raise TrainingError(f"concept {c.name!r} has prompt {c.prompt!r}, which is blank or protected: "
                                f"it cannot be erased without changing what must stay exact")


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
) -> list[Eraser]:
    """Train one eraser per concept (Alg. 1-2) and return them (not loaded onto the pipeline).

    Args:
        pipe: a Stable Diffusion pipeline (the base model; left unchanged).
        concepts: what to erase: `"name"`, `"name=prompt"`, `Concept` or `(name, prompt)`.
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

    Example:
        >>> erasers = train_erasers(pipe, ["vangogh=a painting by van gogh", "picasso=a painting by picasso"])
        >>> for e in erasers: e.save(f"{e.name}.safetensors")
    """
    config = config or TrainConfig()
    config.validate()
    concepts = [Concept.parse(c) for c in concepts]
    known = [Concept.parse(k) for k in (known or [])]
    protected = list(protected)
    _check_inputs(concepts, known, protected, mode)
    if shard is not None and (mode not in ("simultaneous", "separate") or not 0 <= shard[0] < shard[1]):
        raise TrainingError(f"shard={shard} needs mode simultaneous or separate and 0 <= rank < world_size; "
                            f"iterative and gcirs increments depend on each other")
    selected = [i for i in range(len(concepts)) if shard is None or i % shard[1] == shard[0]]
    if resume and checkpoint_dir is None:
        raise TrainingError("resume=True needs the checkpoint_dir of the interrupted run")
    pipe = attach(pipe)
    runtime = pipe._sepme(create=True)
    clashes = [c.name for c in concepts if c.name in runtime.erasers]
    if clashes:
        raise TrainingError(f"erasers named {clashes} are loaded on this pipeline; unload them before training")
    if runtime.fused:
        raise TrainingError("erasers are fused into the weights; call pipe.unfuse_sepme() before training")

    # Everything that can fail on bad input happens before any image is generated.
    texts = encode_prompts(pipe, ["", *(c.prompt for c in concepts), *(k.prompt for k in known), *protected])
    blank = texts[:1]
    concept_text = {c.name: texts[1 + i : 2 + i] for i, c in enumerate(concepts)}
    known_text = list(texts[1 + len(concepts) : 1 + len(concepts) + len(known)])
    protected_text = list(texts[1 + len(concepts) + len(known) :])
    plan = []  # (concept, dense?, known concepts its basis excludes, basis)
    for i, concept in enumerate(concepts):
        if mode == "gcirs" or (mode == "iterative" and i == 0):
            plan.append((concept, True, {}, None))
            continue
        others = concepts[:i] if mode == "iterative" else [c for c in concepts if c != concept]
        rows = [blank, *(concept_text[c.name] for c in others), *known_text, *protected_text]
        basis = null_space_basis(rows, rtol=config.rtol)
        excluded = {c.name: c.prompt for c in others} | {k.name: k.prompt for k in known}
        plan.append((concept, False, excluded, basis))

    base_fp = fingerprint(pipe, getattr(runtime, "fused_originals", None))
    latents = reference_latents(pipe, [concepts[i] for i in selected], config, reference_images, cache_dir,
                                progress=progress)
    layers = [f"{path}.{proj}" for path in sorted(cross_attention_modules(pipe.unet)) for proj in ("to_k", "to_v")]
    dense_layers = [f"{path}.{proj}" for path in sorted(cross_attention_modules(pipe.unet))
                    for proj in ("to_q", "to_k", "to_v", "to_out.0")]

    def make_track(index: int, concept: Concept, dense: bool, excluded: dict, basis) -> _Track:
        weights = _zero_weights(pipe, dense_layers if dense else layers, None if dense else basis.shape[1])
        eraser = Eraser.__new__(Eraser)  # validated after training (the zero w's are parameters)
        eraser.name, eraser.prompt, eraser.basis, eraser.weights = concept.name, concept.prompt, basis, weights
        eraser.beta = 1.0 if dense else config.beta  # dense increments are the weights' change itself
        eraser.known, eraser.protected, eraser.metadata = excluded, [] if dense else list(protected), {}
        runtime.add(concept.name, eraser, trainable=True)
        first = concepts[0] if concept.name not in latents else concept
        return _new_track(pipe, concept, eraser, config.gcirs_lr if dense else config.lr, index, config,
                          latents[first.name], concept_text[first.name])

    shared_dense = mode == "gcirs" and len(concepts) > 1
    if shared_dense:
        # Alg. 1 on several concepts: one dense increment shared by all, losses balanced by eta (Eq. 3).
        groups = [[(0, Concept("+".join(c.name for c in concepts), concepts[0].prompt), True, {}, None)]]
    else:
        entries = [(i, *p) for i, p in enumerate(plan) if i in selected]
        separable = [e for e in entries if not e[2]]
        groups = [[e] for e in entries if e[2]]
        if mode in ("simultaneous", "iterative") and separable:
            groups.append(separable)  # iterative: bases differ, but the increments still train together
        else:
            groups.extend([e] for e in separable)

    checkpoint_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    trained: dict[str, _Track] = {}
    started = time.monotonic()
    try:
        with _frozen_model(pipe):
            for g, group in enumerate(groups):
                tracks = [make_track(*entry) for entry in group]
                if shared_dense:  # one track per concept, all sharing the increment, optimiser and stop
                    shared = tracks[0]
                    tracks += [_Track(c, shared.eraser, shared.optimizer, shared.generator, shared.stop,
                                      latents[c.name], concept_text[c.name]) for c in concepts[1:]]
                folder = None
                if checkpoint_root is not None:
                    folder = checkpoint_root / f"group-{g}"
                    folder.mkdir(parents=True, exist_ok=True)
                    if resume:
                        load_checkpoint(folder, tracks, "dense" if group[0][2] else "wd", config)
                    elif _checkpoint_path(folder).exists():
                        _checkpoint_path(folder).unlink()
                dense = group[0][2]
                _optimise(pipe, tracks, dense, config, blank, folder, progress,
                          f"{'G-CiRs' if dense else 'SepME'} {'+'.join(t.concept.name for t in tracks)}")
                for track in tracks[:1] if shared_dense else tracks:
                    trained[track.concept.name] = track
    finally:
        for track in trained.values():
            runtime.discard(track.concept.name)
        for concept in concepts:
            runtime.discard(concept.name)
        if shared_dense:
            runtime.discard("+".join(c.name for c in concepts))
        if not runtime.erasers:
            pipe.unload_sepme()

    erasers = []
    base_model = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
    for name, track in trained.items():
        eraser = track.eraser
        eraser.weights = {k: v.detach().clone().requires_grad_(False) for k, v in eraser.weights.items()}
        eraser.metadata = {
            "base_model": base_model,
            "fingerprint": base_fp,
            "training": {
                "method": "gcirs" if eraser.basis is None else "sepme",
                "mode": mode,
                "config": asdict(config),
                "concepts": [c.prompt for c in concepts] if shared_dense else [track.concept.prompt],
            },
            "stats": {
                "iterations": track.stop.steps,
                "stopped_early": track.stopped_early,
                "final_l_cor": track.history[-1] if track.history else None,
                "final_l_mom": track.stop.value,
                "seconds": round(track.seconds, 3),
                "total_seconds": round(time.monotonic() - started, 3),
            },
            "history": {"l_cor": track.history, "regulariser": track.regulariser},
        }
        eraser.validate(f"trained eraser {name!r}")
        eraser.metadata["stats"]["dtheta_p"] = eraser.dtheta_p()
        erasers.append(eraser)
    return erasers


def write_report(erasers: Sequence[Eraser], folder: str | Path) -> tuple[Path, Path]:
    """`training_report.json` (settings, statistics, loss histories) and `loss_curves.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = {e.name: {"prompt": e.prompt, "known": e.known, "protected": e.protected, **e.metadata}
              for e in erasers}
    for entry in report.values():
        entry.pop("fingerprint", None)
    json_path = folder / "training_report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, eraser in enumerate(erasers):
        color = f"C{index}"
        history = eraser.metadata.get("history", {})
        l_cor = history.get("l_cor") or history.get("loss", [])  # baselines record their own loss
        momentum, smoothed = 0.0, []
        alpha = eraser.metadata.get("training", {}).get("config", {}).get("alpha", 0.9)
        for value in l_cor:
            momentum = alpha * momentum + (1 - alpha) * value
            smoothed.append(momentum)
        axes[0].plot(l_cor, alpha=0.3, color=color)
        axes[0].plot(smoothed, label=f"{eraser.name} (L_mom)", color=color)
        axes[1].plot(history.get("regulariser", []), label=eraser.name, color=color)
    axes[0].axhline(0.0, color="black", linewidth=0.8)
    axes[0].set(title="L_cor per iteration and its momentum (Eq. 2, 4)", xlabel="iteration")
    axes[1].set(title="||w||_1 / M (Eq. 11)", xlabel="iteration")
    for axis in axes:
        axis.legend(fontsize=8)
    figure.tight_layout()
    png_path = folder / "loss_curves.png"
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return json_path, png_path


# --------------------------------------------------------------------------- `sepme erase`
METHODS = ("sepme", "gcirs", "esd", "ablation", "fmn", "uce")  # `sepme erase --method`; baselines in baselines.py


def _concept_list(values: Sequence[str] | None) -> list[str]:
    """Repeated flags; a value without `=` may also list several names separated by commas."""
    result = []
    for value in values or []:
        result.extend(v.strip() for v in value.split(",") if v.strip()) if "=" not in value else result.append(value)
    return result


def eraser_filename(name: str) -> str:
    """`Van Gogh` -> `van-gogh.safetensors`."""
    import re

    return (re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-").lower() or "eraser") + ".safetensors"


def _erase_command(args: Any) -> int:
    from .base_model import load_pipeline

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    out = Path(args.out)
    # Under `accelerate launch` (or torchrun) each process trains its share of the concepts.
    from accelerate import PartialState

    device = args.device
    state = PartialState(cpu=device == "cpu" or (device is None and not torch.cuda.is_available()))
    shard = (state.process_index, state.num_processes) if state.num_processes > 1 else None
    if shard is not None and device is None:
        device = str(state.device)
    method = args.method
    if args.anchor is not None and method in ("sepme", "gcirs"):
        raise TrainingError(f"--anchor applies to --method ablation or uce, not {method}")
    if args.resume and method not in ("sepme", "gcirs"):
        raise TrainingError(f"--resume is not supported for --method {method} (baselines keep no checkpoints)")
    pipe = load_pipeline(args.model, device, args.dtype)
    if method in ("sepme", "gcirs"):
        erasers = train_erasers(
            pipe, _concept_list(args.concept), known=_concept_list(args.known), protected=args.protect or [],
            mode="gcirs" if method == "gcirs" else args.mode, config=config,
            reference_images=args.reference_images, cache_dir=out / "reference",
            checkpoint_dir=out / "checkpoints" / (f"rank-{shard[0]}" if shard else "main"), resume=args.resume,
            progress=not args.quiet, shard=shard,
        )
    else:  # a baseline (issue 7): one dense eraser per concept
        from .baselines import BASELINE_CLI_FIELDS, BaselineConfig, train_baseline

        baseline_config = BaselineConfig.from_train_config(
            config, **{name: getattr(args, name) for name in BASELINE_CLI_FIELDS})
        erasers = train_baseline(
            pipe, _concept_list(args.concept), method, anchor=args.anchor, config=baseline_config,
            known=_concept_list(args.known), protected=args.protect or [], reference_images=args.reference_images,
            cache_dir=out / "reference", progress=not args.quiet, shard=shard,
        )
    for eraser in erasers:
        path = eraser.save(out / eraser_filename(eraser.name))
        print(f"{eraser.name}: {path}  (iterations {eraser.metadata['stats']['iterations']}, "
              f"||dtheta||_p {eraser.metadata['stats']['dtheta_p']:.4g})")
    if shard is not None:
        state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        erasers = [Eraser.load(out / eraser_filename(Concept.parse(c).name)) for c in _concept_list(args.concept)]
    json_path, png_path = write_report(erasers, out)
    print(f"report: {json_path}, {png_path}")
    return 0


def register_cli(subparsers: Any) -> None:
    """`sepme erase --model M --concept NAME[=PROMPT] ... [--known ...] [--protect ...] [--mode ...] [--out DIR]`."""
    parser = subparsers.add_parser(
        "erase", help="train one eraser per concept (SepME / G-CiRs / ESD / ablation / FMN / UCE)",
        description="Train erasers and write DIR/<name>.safetensors, a training report (JSON) and loss curves "
                    "(PNG). Under `accelerate launch`, concepts are split across processes.",
    )
    parser.add_argument("--model", required=True, help="local diffusers folder or Hub id of the base model")
    parser.add_argument("--concept", action="append", required=True, metavar="NAME[=PROMPT]",
                        help="a concept to erase (repeat, or comma-separate names)")
    parser.add_argument("--known", action="append", metavar="NAME[=PROMPT]",
                        help="a concept kept exact by every eraser's basis (repeat, or comma-separate names)")
    parser.add_argument("--protect", action="append", metavar="PROMPT", help="an extra prompt kept exact")
    parser.add_argument("--method", choices=METHODS, default="sepme",
                        help="sepme (weight decoupling, --mode), gcirs (= --mode gcirs), or a baseline: esd (ESD-x), "
                             "ablation (Concept Ablation), fmn (Forget-Me-Not), uce (closed-form UCE)")
    parser.add_argument("--anchor", metavar="PROMPT",
                        help="anchor prompt c* of --method ablation / uce (default 'a painting' / ''); for an "
                             "object pass a generic prompt of its kind")
    parser.add_argument("--mode", choices=MODES, default="simultaneous", help="SepME mode (--method sepme)")
    parser.add_argument("--out", "-o", default="erasers", help="output folder (default: ./erasers)")
    parser.add_argument("--reference-images", help="folder with one sub-folder of images per concept name")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/checkpoints")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    defaults = TrainConfig()
    for item in fields(TrainConfig):
        default = getattr(defaults, item.name)
        kind = float if isinstance(default, float) or default is None else int
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, type=kind, default=default,
                            help=f"(default {default})")
    from .baselines import add_baseline_arguments

    add_baseline_arguments(parser)
    parser.set_defaults(func=_erase_command)
