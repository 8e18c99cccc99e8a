"""Baselines in the same harness (issue 7): ESD-x, Concept Ablation, Forget-Me-Not and UCE.

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
- `x_t` comes from reference images of the original model (`reference.py`, as for SepME) noised at
  a random timestep (`training._noisy_latents`), one sample per iteration. ESD samples `x_t` by
  partially denoising with the model being trained; AbConcept uses images of the anchor (we do
  too: ablation's reference images are generated from the anchor prompt); FMN uses concept images.
- Only weights (no biases) of `attn2` change: an `Eraser` stores weight increments only.
- FMN's preliminary textual-inversion step is not run (attention re-steering only) and
  AbConcept's optional prior-preservation loss on anchor images is not used.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor
from tqdm.auto import tqdm

from .base_model import base_linear, cross_attention_modules, encode_prompts, fingerprint
from .eraser import Eraser
from .errors import TrainingError
from .loader import attach
from .processor import ErasureRuntime, SepMEAttnProcessor
from .reference import reference_latents
from .training import (
    Concept,
    TrainConfig,
    _check_inputs,
    _frozen_model,
    _noisy_latents,
    _zero_weights,
    check_numbers,
)

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
_SHARED_FIELDS = ("seed", "images_per_concept", "reference_steps", "guidance_scale", "ddim_steps")


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
    seed: int = 0
    images_per_concept: int = 8
    reference_steps: int = 50
    guidance_scale: float = 7.5
    ddim_steps: int = 50

    @classmethod
    def from_train_config(cls, config: TrainConfig, **overrides: Any) -> BaselineConfig:
        """Reference-image settings from a `TrainConfig` (so SepME and baselines share images)."""
        return cls(**{name: getattr(config, name) for name in _SHARED_FIELDS}, **overrides)

    def validate(self) -> None:
        """Refuse NaN, infinite, negative or unknown values before any work starts."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, str):
                allowed = ("tail", "all") if item.name == "uce_tokens" else tuple(LAYER_SETS)
                if value not in allowed:
                    raise TrainingError(f"BaselineConfig.{item.name} must be one of {allowed}, got {value!r}")
        check_numbers(self, positive=("esd_lr", "ablation_lr", "fmn_lr", "uce_lambda", "uce_erase_scale",
                                      "images_per_concept", "reference_steps", "ddim_steps"),
                      non_negative=("esd_iterations", "ablation_iterations", "fmn_iterations", "uce_preserve_scale",
                                    "probe_samples", "guidance_scale", "esd_eta"))


# BaselineConfig fields `sepme erase` exposes as flags (`--esd-lr` ...); the others come from TrainConfig's flags
BASELINE_CLI_FIELDS = tuple(f.name for f in fields(BaselineConfig) if f.name not in _SHARED_FIELDS)


def add_baseline_arguments(parser: Any) -> None:
    """`sepme erase` flags for the baselines' hyperparameters (`--esd-lr`, `--uce-lambda`, ...)."""
    group = parser.add_argument_group("baselines (--method esd / ablation / fmn / uce)")
    defaults = BaselineConfig()
    for name in BASELINE_CLI_FIELDS:
        default = getattr(defaults, name)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, str):
            choices = ("tail", "all") if name == "uce_tokens" else tuple(LAYER_SETS)
            group.add_argument(flag, dest=name, choices=choices, default=default, help=f"(default {default})")
        else:
            group.add_argument(flag, dest=name, type=type(default), default=default, help=f"(default {default})")


# --------------------------------------------------------------------------- the methods' objectives
def esd_loss(unet: Any, runtime: ErasureRuntime, name: str, x_t: torch.Tensor, t: torch.Tensor,
             concept: torch.Tensor, blank: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD-x (Gandikota et al. 2023, Eq. 6 of ESD; SepME Sec. 2):
    `|| eps(theta', x_t, c_f) - [eps(theta, x_t, c_0) - eta (eps(theta, x_t, c_f) - eps(theta, x_t, c_0))] ||^2`.
    """
    with torch.no_grad(), runtime.per_row([None, None]):  # the frozen model theta: no increment
        frozen = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([concept, blank])).sample.float()
    eps_concept, eps_blank = frozen.chunk(2)
    target = eps_blank - eta * (eps_concept - eps_blank)
    with runtime.per_row([name]):
        edited = unet(x_t, t, concept).sample.float()
    return F.mse_loss(edited, target)


def ablation_loss(unet: Any, runtime: ErasureRuntime, name: str, x_t: torch.Tensor, t: torch.Tensor,
                  concept: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Concept Ablation, model-based (Kumari et al. 2023, Eq. 3; SepME Sec. 2):
    `|| eps(theta', x_t, c_f) - eps(theta, x_t, c*) ||^2`, `x_t` from images of the anchor `c*`.
    """
    with torch.no_grad(), runtime.per_row([None]):
        target = unet(x_t, t, anchor).sample.float()
    with runtime.per_row([name]):
        edited = unet(x_t, t, concept).sample.float()
    return F.mse_loss(edited, target)


def fmn_loss(unet: Any, runtime: ErasureRuntime, name: str, x_t: torch.Tensor, t: torch.Tensor,
             concept: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Forget-Me-Not attention re-steering (Zhang et al. 2023, Sec. 3; SepME Sec. 2): the L2 norm of
    every `attn2` attention probability on the concept's token positions, `|| cat_l A_l[:, :, pos] ||_2`
    (as FMN's `AttnController.loss`), with the edited model `theta'`.
    """
    maps: list[torch.Tensor] = []
    with capture_attention(runtime, maps), runtime.per_row([name]):
        unet(x_t, t, concept)
    index = torch.as_tensor(list(positions), dtype=torch.long, device=x_t.device)
    return torch.cat([m.index_select(-1, index).float().flatten() for m in maps]).norm()


@torch.no_grad()
def uce_increments(pipe: Any, prompt: str, anchor: str, preserve: Sequence[str], config: BaselineConfig
                   ) -> dict[str, torch.Tensor]:
    """UCE (Gandikota et al. 2024, Eq. 7-8): for every `attn2` `to_k` / `to_v` weight `W`,
    `W' = (s_e sum_i W c*_i c_i^T + s_p sum_j W c_j c_j^T + lambda W)(s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T + lambda I)^-1`
    (`v*_i = W c*_i`: UCE's "replace" edit). Since every term is `W` times a `d_in x d_in` matrix, the
    increment is `W' - W = s_e W (C* - C)^T C (C^T C s_e + s_p P^T P + lambda I)^-1`, computed once as a
    `d_in x d_in` matrix `G` and applied to every layer: `dW = W G`.

    `c_i`: the concept's token embeddings (`uce_tokens`: `tail` = its last word token onwards, aligned
    position by position with the anchor's, as UCE's release; `all` = every position); `c*_i`: the
    anchor's; `c_j`: every token of each preserved prompt.
    """
    texts = encode_prompts(pipe, [prompt, anchor, *preserve]).double()
    concept_rows, anchor_rows = texts[0], texts[1]
    if config.uce_tokens == "tail":
        lengths = _token_counts(pipe, [prompt, anchor])
        last = [max(n - 2, 0) for n in lengths]  # the last word token (BOS for a blank prompt)
        farthest, total = max(last), texts.shape[1]
        concept_rows = concept_rows[last[0] : total - (farthest - last[0])]
        anchor_rows = anchor_rows[last[1] : total - (farthest - last[1])]
    preserved = texts[2:].reshape(-1, texts.shape[-1])
    d_in = texts.shape[-1]
    gram = (config.uce_erase_scale * concept_rows.T @ concept_rows
            + config.uce_preserve_scale * preserved.T @ preserved
            + config.uce_lambda * torch.eye(d_in, dtype=torch.float64))
    # G = s_e (C* - C)^T C gram^-1; gram is symmetric positive definite (lambda > 0)
    change = config.uce_erase_scale * (anchor_rows - concept_rows).T @ concept_rows
    g = torch.linalg.solve(gram, change.T).T
    increments = {}
    for path, module in sorted(cross_attention_modules(pipe.unet).items()):
        for proj in LAYER_SETS["kv"]:
            weight = base_linear(getattr(module, proj)).weight.detach().to("cpu", torch.float64)
            increments[f"{path}.{proj}"] = (weight @ g).float()
    return increments


# --------------------------------------------------------------------------- attention capture (FMN)
class _ScoreRecorder:
    """A view of an attention module whose `get_attention_scores` also records the probabilities."""

    def __init__(self, attn: Any, store: list[torch.Tensor]) -> None:
        self.__dict__.update(_attn=attn, _store=store)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def get_attention_scores(self, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        probabilities = self._attn.get_attention_scores(query, key, attention_mask)
        self._store.append(probabilities)  # (batch * heads, image tokens, text tokens)
        return probabilities


class _CapturingProcessor:
    """diffusers' `AttnProcessor` (explicit softmax, so the maps exist) recording each attention map.

    It runs inside `SepMEAttnProcessor`, so `attn.to_q` / `attn.to_k` already add the increments.
    """

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store
        self.math = AttnProcessor()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_: Any
                 ) -> torch.Tensor:
        return self.math(_ScoreRecorder(attn, self.store), hidden_states, encoder_hidden_states, attention_mask,
                         temb)


@contextlib.contextmanager
def capture_attention(runtime: ErasureRuntime, store: list[torch.Tensor]) -> Iterator[None]:
    """Within the block every `attn2` computes attention explicitly and appends its probabilities to `store`.

    The processors SepME wrapped are put back afterwards (IP-Adapter or other custom processors are
    bypassed inside the block: FMN needs the plain text cross-attention maps).
    """
    runtime.verify_processors()
    saved = {}
    for path, module in runtime.attention.items():
        processor = module.processor
        if not (isinstance(processor, SepMEAttnProcessor) and processor.runtime is runtime):
            raise TrainingError(f"the attention processor of {path} is not SepME's; cannot capture attention maps")
        saved[path] = processor.inner
        processor.inner = _CapturingProcessor(store)
    try:
        yield
    finally:
        for path, inner in saved.items():
            runtime.attention[path].processor.inner = inner


def concept_token_positions(pipe: Any, concept: Concept) -> list[int]:
    """Token positions FMN suppresses: the concept's name where it appears in its prompt (spaces, `-`
    and `_` all count as word breaks, so `van-gogh` finds "van gogh"); otherwise every word token of
    the prompt (everything between the start and end tokens)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(concept.prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    for phrase in dict.fromkeys([concept.name, concept.name.replace("-", " ").replace("_", " ")]):
        wanted = tokenizer(phrase, add_special_tokens=False).input_ids
        for start in range(1, len(ids) - len(wanted) + 1):
            if wanted and ids[start : start + len(wanted)] == wanted:
                return list(range(start, start + len(wanted)))
    return list(range(1, max(len(ids) - 1, 2)))


def _token_counts(pipe: Any, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt including its start and end tokens (the attention mask's sum)."""
    tokenizer = pipe.tokenizer
    encoded = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True)
    return [int(sum(mask)) for mask in encoded.attention_mask]


# --------------------------------------------------------------------------- the fine-tuning loop
def _peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory since `_peak_memory_start`; None on CPU (not measurable per method there)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None


def _fine_tune(pipe: Any, eraser: Eraser, objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               latents: torch.Tensor, lr: float, iterations: int, config: BaselineConfig, index: int,
               progress: bool, description: str) -> dict[str, Any]:
    """Adam on the eraser's dense increments, read live by the processor (`runtime.add(trainable=True)`).

    `objective(x_t, t)` returns the method's loss with the increment active; `x_t` is a reference
    latent noised at a random timestep (`training._noisy_latents`). Returns the loss history and the
    objective on fixed probe samples before and after.
    """
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    parameters = list(eraser.weights.values())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    sampler = SimpleNamespace(generator=torch.Generator().manual_seed(config.seed * 100_003 + index),
                              latents=latents)
    probe_sampler = SimpleNamespace(generator=torch.Generator().manual_seed(config.seed * 100_003 + index + 50_000),
                                    latents=latents)

    def draw(source: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor]:
        x_t, t = _noisy_latents(source, alphas_cumprod, config, device)
        return x_t.to(dtype), torch.tensor([t], device=device)

    probes = [draw(probe_sampler) for _ in range(config.probe_samples)]

    def probe_loss() -> float | None:
        if not probes:
            return None
        with torch.no_grad():
            return sum(float(objective(x, t)) for x, t in probes) / len(probes)

    before = probe_loss()
    history: list[float] = []
    for step in tqdm(range(iterations), desc=description, disable=not progress, leave=False):
        x_t, t = draw(sampler)
        loss = objective(x_t, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = math.isfinite(float(loss.detach())) and all(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in parameters)
        if not finite:
            raise TrainingError(f"{description}: the loss became non-finite at iteration {step + 1}; lower the "
                                f"learning rate (lr={lr})")
        optimizer.step()
        history.append(float(loss.detach()))
    return {"history": history, "probe_loss_before": before, "probe_loss_after": probe_loss()}


# --------------------------------------------------------------------------- the public entry point
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
    concepts = [Concept.parse(c) for c in concepts]
    known = [Concept.parse(k) for k in (known or [])]
    protected = list(protected)
    _check_inputs(concepts, known, protected, "simultaneous")
    if anchor is not None and method not in ANCHOR_METHODS:
        raise TrainingError(f"an anchor applies to {' and '.join(ANCHOR_METHODS)}; {method} has no anchor "
                            f"({'it steers towards the blank prompt' if method == 'esd' else 'it is untargeted'})")
    if method in ANCHOR_METHODS:
        anchor = DEFAULT_ANCHORS[method] if anchor is None else anchor
        same = [c.name for c in concepts if c.prompt == anchor]
        if same:
            raise TrainingError(f"concepts {same} have the anchor {anchor!r} as their prompt; choose another --anchor")
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise TrainingError(f"shard={shard} needs 0 <= rank < world_size")
    selected = [c for i, c in enumerate(concepts) if shard is None or i % shard[1] == shard[0]]
    pipe = attach(pipe)
    runtime = pipe._sepme(create=True)
    if runtime.fused:
        raise TrainingError("erasers are fused into the weights; call pipe.unfuse_sepme() before training")
    base_fp = fingerprint(pipe, getattr(runtime, "fused_originals", None))
    base_model = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "")
    device = pipe.unet.device

    latents: dict[str, torch.Tensor] = {}
    if method in ("esd", "fmn"):
        latents = reference_latents(pipe, selected, config, reference_images, cache_dir, progress=progress)
    elif method == "ablation":  # AbConcept trains on images of the anchor, paired with the concept prompt
        latents = reference_latents(pipe, [Concept(c.name, anchor) for c in selected], config, reference_images,
                                    cache_dir, progress=progress)

    erasers = []
    started_all = time.monotonic()
    try:
        for index, concept in enumerate(selected):
            started = time.monotonic()
            _peak_memory_start(device)
            if method == "uce":
                preserve = ["", *(c.prompt for c in concepts if c != concept), *(k.prompt for k in known), *protected]
                weights = uce_increments(pipe, concept.prompt, anchor, preserve, config)
                result = {"history": [], "probe_loss_before": None, "probe_loss_after": None}
                extra = {"preserve": preserve, "tokens": config.uce_tokens, "layers": "kv"}
                iterations = 0
            else:
                with _frozen_model(pipe):
                    weights, result, extra, iterations = _train_one(
                        pipe, runtime, method, concept, anchor, latents.get(concept.name), config, index, progress)
            seconds = time.monotonic() - started
            weights = {k: v.detach().float().cpu().clone() for k, v in weights.items() if bool(v.abs().max() > 0)}
            if not weights:
                raise TrainingError(f"{method} left every layer unchanged for concept {concept.name!r} "
                                    f"(0 iterations or a zero learning rate?)")
            eraser = Eraser(name=concept.name, prompt=concept.prompt, basis=None, weights=weights, beta=1.0)
            eraser.metadata = {
                "base_model": base_model,
                "fingerprint": base_fp,
                "training": {
                    "method": method,
                    "paper": PAPERS[method],
                    "anchor": anchor,
                    "concepts": [concept.prompt],
                    "known": {k.name: k.prompt for k in known},
                    "protected": protected,
                    "x_t": None if method == "uce" else "reference images noised at a random timestep",
                    "config": asdict(config),
                    **extra,
                },
                "stats": {
                    "iterations": iterations,
                    "seconds": round(seconds, 3),
                    "total_seconds": round(time.monotonic() - started_all, 3),
                    "peak_memory_mb": _peak_memory_mb(device),
                    "final_loss": result["history"][-1] if result["history"] else None,
                    "probe_loss_before": result["probe_loss_before"],
                    "probe_loss_after": result["probe_loss_after"],
                },
                "history": {"loss": result["history"]},
            }
            eraser.metadata["stats"]["dtheta_p"] = eraser.dtheta_p()
            eraser.validate(f"{method} eraser {concept.name!r}")
            erasers.append(eraser)
    finally:
        if not runtime.erasers:
            pipe.unload_sepme()
    return erasers


def _train_one(pipe: Any, runtime: ErasureRuntime, method: str, concept: Concept, anchor: str | None,
               latents: torch.Tensor | None, config: BaselineConfig, index: int, progress: bool
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], int]:
    """One concept's ESD / ablation / FMN fine-tuning through a temporary trainable eraser."""
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    layers_key = getattr(config, f"{method}_layers")
    layers = [f"{path}.{proj}" for path in sorted(cross_attention_modules(unet)) for proj in LAYER_SETS[layers_key]]
    eraser = Eraser.__new__(Eraser)  # validated by the caller (the zero weights are parameters)
    eraser.name, eraser.prompt, eraser.basis = concept.name, concept.prompt, None
    eraser.weights, eraser.beta = _zero_weights(pipe, layers, None), 1.0
    eraser.known, eraser.protected, eraser.metadata = {}, [], {}
    name = f"__{method}__{concept.name}"  # never clashes with a loaded eraser
    prompts = [concept.prompt, "" if method == "esd" else (anchor or "")]
    texts = encode_prompts(pipe, prompts).to(device=device, dtype=dtype)
    concept_text, other_text = texts[:1], texts[1:]
    extra: dict[str, Any] = {"layers": layers_key}
    if method == "esd":
        def objective(x_t, t):
            return esd_loss(unet, runtime, name, x_t, t, concept_text, other_text, config.esd_eta)
    elif method == "ablation":
        def objective(x_t, t):
            return ablation_loss(unet, runtime, name, x_t, t, concept_text, other_text)
    else:
        positions = concept_token_positions(pipe, concept)
        ids = pipe.tokenizer(concept.prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
        extra["token_positions"] = positions
        extra["tokens"] = pipe.tokenizer.convert_ids_to_tokens([ids[p] for p in positions])

        def objective(x_t, t):
            return fmn_loss(unet, runtime, name, x_t, t, concept_text, positions)
    lr, iterations = getattr(config, f"{method}_lr"), getattr(config, f"{method}_iterations")
    runtime.add(name, eraser, trainable=True)
    try:
        result = _fine_tune(pipe, eraser, objective, latents, lr, iterations, config, index, progress,
                            f"{method} {concept.name}")
    finally:
        runtime.discard(name)
    return eraser.weights, result, extra, iterations


# --------------------------------------------------------------------------- side-by-side evaluation
def evaluate_methods(
    pipe: Any,
    methods: Sequence[tuple[str, str | Path]],
    classify: Any,
    scenario: str = "single",
    concepts: Sequence[Any] | None = None,
    seeds: Sequence[int] = tuple(range(10)),
    paraphrases: bool = False,
    allow_base_mismatch: bool = False,
    keep_images: bool = False,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate several methods' erasers on the same model, prompts, seeds and metrics, in one run.

    Each `(label, source)` is one method: an eraser file or folder (e.g. the `--out` of `sepme erase
    --method esd`). Its erasers load under adapter names `label:concept`, each method's subsets of the
    `scenario` (`evaluation.scenario_subsets`) are evaluated, and the original model is generated once.
    `concepts`: `EvalConcept`s, concept names (prompts from the erasers), or None (every erased concept).
    Returns `evaluation.evaluate`'s results plus `methods` (per method: its erasers' training method,
    seconds, peak memory, `||dtheta||_p`) and, per subset, `method`, `erased_concepts`, `train_seconds`
    and `peak_memory_mb`. Combinations of dense erasers carry no separation guarantee; the loader's
    warnings about it are silenced here (the table is the measurement).
    """
    import warnings

    from .evaluation import TEMPLATES, EvalConcept, default_prompt, evaluate, scenario_subsets
    from .loader import SepMEWarning, resolve_eraser_files

    labels = [label for label, _ in methods]
    if len(set(labels)) != len(labels) or any(not label or ":" in label for label in labels):
        raise ValueError(f"method labels must be unique, non-empty and without ':', got {labels}")
    by_method: dict[str, dict[str, Eraser]] = {}
    for label, source in methods:
        erasers = {}
        for path in resolve_eraser_files(source):
            eraser = Eraser.load(path)
            pipe.load_sepme(eraser, adapter_name=f"{label}:{eraser.name}", erase=False,
                            allow_base_mismatch=allow_base_mismatch)
            erasers[eraser.name] = eraser
        by_method[label] = erasers
    prompts: dict[str, str] = {}
    for erasers in by_method.values():
        for eraser in erasers.values():
            for part in eraser.name.split("+"):  # a shared G-CiRs eraser is named "a+b"
                prompts.setdefault(part, eraser.prompt if part == eraser.name else default_prompt(part))
    if concepts is None or all(isinstance(c, str) for c in concepts):
        names = list(prompts) if concepts is None else list(concepts)
        concepts = [EvalConcept(name, [prompts.get(name, default_prompt(name))],
                                [t.format(name) for t in TEMPLATES[1:]] if paraphrases else [], list(seeds))
                    for name in names]
    subsets, owners = [], []
    for label, erasers in by_method.items():
        for subset in scenario_subsets(list(erasers), scenario):
            subsets.append([f"{label}:{name}" for name in subset])
            owners.append((label, subset))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SepMEWarning)
        results = evaluate(pipe, concepts, classify, subsets, keep_images=keep_images, **evaluate_kwargs)
    for entry, (label, subset) in zip(results["subsets"], owners):
        stats = [by_method[label][name].metadata.get("stats", {}) for name in subset]
        peaks = [s["peak_memory_mb"] for s in stats if s.get("peak_memory_mb") is not None]
        entry["method"] = label
        entry["erased_concepts"] = [part for name in subset for part in name.split("+")]
        entry["train_seconds"] = sum(float(s.get("seconds", 0.0)) for s in stats)
        entry["peak_memory_mb"] = max(peaks) if peaks else None
    results["methods"] = {
        label: {
            "source": str(source),
            "erasers": {
                name: {"method": e.metadata.get("training", {}).get("method"), "separable": e.separable,
                       "dtheta_p": e.dtheta_p(), "seconds": e.metadata.get("stats", {}).get("seconds"),
                       "peak_memory_mb": e.metadata.get("stats", {}).get("peak_memory_mb")}
                for name, e in by_method[label].items()
            },
        }
        for label, source in methods
    }
    return results


def comparison_table(results: dict[str, Any]) -> str:
    """One markdown table for all methods: ACC and LPIPS per concept, the worst pixel change of the concepts
    left alone, `||dtheta||_p`, training seconds and peak memory (paper Tables 1-4 side by side)."""
    concepts = results["concepts"]
    lines = ["| method | erased | " + " | ".join(f"{c} ACC" for c in concepts) + " | "
             + " | ".join(f"{c} LPIPS" for c in concepts)
             + " | others max pixel change | ||dtheta||_p | train s | peak MB |",
             "|" + "---|" * (2 * len(concepts) + 6)]
    original = results["original"]["accuracy"]
    lines.append("| original | - | " + " | ".join(f"{original[c]:.2f}" for c in concepts) + " | "
                 + " | ".join("-" for _ in concepts) + " | - | 0 | - | - |")
    for entry in results["subsets"]:
        erased = set(entry.get("erased_concepts", entry["erased"]))
        acc = " | ".join(f"**{entry['accuracy'][c]:.2f}**" if c in erased else f"{entry['accuracy'][c]:.2f}"
                         for c in concepts)
        lp = " | ".join(f"{entry['lpips'][c]:.3f}" for c in concepts)
        others = [entry["max_pixel_change"][c] for c in concepts if c not in erased]
        peak = entry.get("peak_memory_mb")
        lines.append(f"| {entry.get('method', '-')} | {', '.join(sorted(erased, key=concepts.index))} | {acc} | "
                     f"{lp} | {f'{max(others):.1e}' if others else '-'} | {entry['dtheta_p']:.4g} | "
                     f"{entry.get('train_seconds', 0.0):.1f} | {'-' if peak is None else f'{peak:.0f}'} |")
    lines += ["", f"LPIPS backbone: {results['lpips_backbone']}. Bold: erased concepts. ||dtheta||_p = ||dtheta||_1 / M "
              "over the modified layers. Peak memory is measured on CUDA only ('-' on CPU). Dense erasers (G-CiRs, "
              "ESD, ablation, FMN, UCE) change other prompts too; only SepME's separable erasers keep their "
              "known prompts exact."]
    return "\n".join(lines)


def comparison_grid(results: dict[str, Any], path: str | Path) -> Path:
    """Image grid: one row per concept (its exact prompt, first seed), one column for the original model and
    one per method (the smallest evaluated subset of that method erasing the concept). Needs `keep_images`."""
    from .evaluation import image_grid

    images = results["_images"]
    methods = list(results["methods"])
    rows = {}
    for concept in results["concepts"]:
        row = [images["original"][concept][0]]
        for label in methods:
            erasing = [e for e in results["subsets"] if e.get("method") == label and concept in e["erased_concepts"]]
            entry = min(erasing, key=lambda e: len(e["erased"])) if erasing else None
            row.append(images["+".join(entry["erased"]) if entry else "original"][concept][0])
        rows[concept] = row
    return image_grid(rows, ["original", *methods], path)
