"""The training loop: the bookkeeping around one step function (`steps.py`) per algorithm.

Weight-decoupled (Alg. 2): each concept keeps its own objective and its own momentum stop, so
optimising concepts together or one by one gives the same increments (their parameters are
disjoint; with Adam, eta_i would only rescale concept i's gradient). Dense G-CiRs (Alg. 1) shares
one increment, one objective and one momentum stop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import TrainingError
from ..loader import erasure_runtime
from .checkpoints import save_checkpoint
from .config import TrainConfig
from .containment import Probes
from .denoise import denoiser_call
from .harness import gradients_finite
from .steps import StepResult, decoupled_step, dense_step, sample_batch
from .track import ConceptTrack

CHECKPOINT_SECONDS = 300  # also checkpoint at least this often, whatever checkpoint_every says


@dataclass
class Checkpoints:
    """Saves the tracks every `checkpoint_every` iterations (or 5 minutes); nothing without a folder."""

    folder: Path | None
    tracks: list[ConceptTrack]
    mode: str
    config: TrainConfig
    last: float = field(default_factory=time.monotonic)

    def save(self) -> None:
        if self.folder is not None:
            save_checkpoint(self.folder, self.tracks, self.mode, self.config)
            self.last = time.monotonic()

    def save_if_due(self, steps: int) -> None:
        if steps % self.config.checkpoint_every == 0 or time.monotonic() - self.last > CHECKPOINT_SECONDS:
            self.save()


def live_tracks(tracks: list[ConceptTrack], dense: bool, config: TrainConfig) -> list[ConceptTrack]:
    """The concepts still training (a shared dense increment stops for all at once)."""
    if dense and tracks[0].done:
        return []
    return [t for t in tracks if not t.done and t.stop.steps < config.max_iterations]


def apply_step(result: StepResult, dense: bool, config: TrainConfig) -> None:
    """Step the optimisers, unless the loss or a gradient is non-finite (then the increments stay as they were)."""
    parameters = [p for owner in result.owners for p in owner.parameters]
    finite = math.isfinite(result.objective) and all(math.isfinite(v) for v in result.losses)
    if not finite or not gradients_finite(parameters):
        raise TrainingError(
            f"the loss became non-finite at iteration {result.owners[0].stop.steps + 1} "
            f"(L_cor = {result.losses}); the increments were left at their last finite values. "
            f"Lower the learning rate (lr={config.gcirs_lr if dense else config.lr}) or beta."
        )
    for owner in result.owners:
        owner.optimizer.step()


def probe_check(call: Any, runtime: Any, track: ConceptTrack, config: TrainConfig) -> None:
    """The probe stop, every `probe_every` iterations after warm-up (`training/containment.py`): stop once the
    probes' rho is at or below `erase_to`; if the held-out collateral passed `max_collateral`, return to the
    increments of the last check and stop there."""
    steps = track.stop.steps
    if track.probes is None or steps <= config.warmup or steps % config.probe_every:
        return
    rho = track.probes.rho(call, runtime, track.concept.name)
    collateral = track.collateral.summary(track.eraser) if track.collateral is not None else None
    track.probe_history.append({"step": steps, "rho": rho, **({} if collateral is None else {
        "collateral_median": collateral["median"], "collateral_max": collateral["max"]})})
    if config.max_collateral is not None and collateral is not None and collateral["max"] > config.max_collateral:
        if track.snapshot is not None:
            with torch.no_grad():
                for name, value in track.snapshot.items():
                    track.parameter(name).copy_(value)
        track.done, track.stop_reason = True, "collateral bound"
    elif rho <= config.erase_to:
        track.done = track.stopped_early = True
        track.stop_reason = "erased"
    else:
        track.take_snapshot()


def record(result: StepResult, seconds: float, stop_on: str) -> None:
    """Append each owner's loss, rho and regulariser, and let its momentum stop (Eq. 4) decide on `stop_on`."""
    for track, value, regulariser, rho in zip(result.owners, result.recorded, result.regularisers, result.relatives):
        track.history.append(value)
        track.relative.append(rho)
        track.regulariser.append(regulariser)
        track.seconds += seconds / len(result.owners)
        if track.stop.update(rho if stop_on == "rho" else value) and track.probes is None:
            track.done = track.stopped_early = True


def progress_text(track: ConceptTrack, config: TrainConfig) -> str:
    """The progress bar's view of one concept: where its stop statistic is, and the target that stops it,
    e.g. `rho +0.52 (avg +0.80) -> <= -0.25`."""
    if getattr(track, "probes", None) is not None:  # the probe stop: fixed probes every few iterations
        history = track.probe_history
        shown = f"probe rho {history[-1]['rho']:+.2f}" if history else f"rho {track.relative[-1]:+.2f}, probe rho"
        return f"{shown} -> <= {config.erase_to:+.2f}"
    statistic = "rho" if config.stop_on == "rho" else "l_cor"
    value = track.relative[-1] if config.stop_on == "rho" else track.history[-1]
    return f"{statistic} {value:+.2f} (avg {track.stop.value:+.2f}) -> <= {config.tau:+.2f}"


def optimise(pipe: Any, tracks: list[ConceptTrack], dense: bool, config: TrainConfig, blank: torch.Tensor,
             checkpoint_dir: Path | None, progress: bool, description: str,
             blank_pooled: torch.Tensor | None = None, resolution: int | None = None) -> None:
    """Run Alg. 1 (`dense=True`) or Alg. 2 (weight-decoupled) on the given concepts together until each stops.

    `blank_pooled`: the pooled embedding of `blank` for an SDXL UNet (every call gets the pipeline's default
    time ids too) or a FLUX / SD3 transformer; None for SD v1 / v2. `resolution`: FLUX / SD3's training image
    size (the denoiser call, `denoise.py`)."""
    runtime = erasure_runtime(pipe, create=True)
    call = denoiser_call(pipe, resolution, config.guidance_scale, blank_pooled is not None)
    blank = blank.to(device=call.model.device, dtype=call.model.dtype)
    checkpoints = Checkpoints(checkpoint_dir, tracks, "dense" if dense else "wd", config)
    bar = tqdm(total=config.max_iterations, desc=description, disable=not progress, leave=False,
               initial=max(t.stop.steps for t in tracks))
    if config.stop == "probe" and not dense:
        for track in tracks:
            if track.probes is None:
                track.probes = Probes.draw(call, runtime, track.latents, track.embedding, blank,
                                           config.ddim_steps, config.probe_size, track.probe_seed, track.pooled,
                                           blank_pooled, track.contexts if config.context_share else None,
                                           None if track.anchors is None or config.objective != "anchor" else
                                           (track.anchors, track.context_anchors))
                track.take_snapshot()
    try:
        while live := live_tracks(tracks, dense, config):
            started = time.monotonic()
            batch = sample_batch(call, runtime, live, blank, config, blank_pooled)
            if dense:
                result = dense_step(call, runtime, tracks[0], batch, config)
            else:
                result = decoupled_step(call, runtime, live, batch, config)
            apply_step(result, dense, config)
            record(result, time.monotonic() - started, config.stop_on)
            for track in result.owners:
                probe_check(call, runtime, track, config)
            bar.update(1)
            bar.set_postfix({t.concept.name: progress_text(t, config) for t in result.owners})
            checkpoints.save_if_due(result.owners[0].stop.steps)
    except BaseException:
        checkpoints.save()
        raise
    finally:
        bar.close()
    for track in tracks:
        track.done = True
    checkpoints.save()
