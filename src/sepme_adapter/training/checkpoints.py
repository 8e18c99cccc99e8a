"""Resumable checkpoints: increments, Adam moments, random states and loss histories of every concept."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import TrainingError
from ..formats import atomic_save_safetensors
from .config import TrainConfig
from .track import ConceptTrack

METADATA_KEY = "sepme_checkpoint"


def checkpoint_path(folder: Path) -> Path:
    return folder / "checkpoint.safetensors"


def _track_tensors(i: int, track: ConceptTrack) -> dict[str, torch.Tensor]:
    tensors = {f"{i}/w/{layer}": w.detach().cpu().contiguous() for layer, w in track.eraser.weights.items()}
    tensors.update({f"{i}/down/{layer}": a.detach().cpu().contiguous() for layer, a in track.eraser.down.items()})
    for j, slot in track.optimizer.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{i}/adam/{j}/{key}"] = slot[key].detach().cpu().contiguous()
        tensors[f"{i}/adam/{j}/step"] = torch.as_tensor(slot["step"], dtype=torch.float64).reshape(1)
    tensors[f"{i}/rng"] = track.generator.get_state()
    return tensors


def _track_state(track: ConceptTrack) -> dict[str, Any]:
    return {
        "name": track.concept.name, "prompt": track.concept.prompt, "history": track.history,
        "relative": track.relative, "regulariser": track.regulariser, "momentum": track.stop.value,
        "steps": track.stop.steps, "below": track.stop.below,
        "done": track.done, "stopped_early": track.stopped_early, "seconds": track.seconds,
    }


def save_checkpoint(folder: Path, tracks: Sequence[ConceptTrack], mode: str, config: TrainConfig) -> Path:
    """Increments, Adam moments, RNG states and loss history of every concept, written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mode": mode, "config": asdict(config), "tracks": []}
    seen: set[int] = set()
    for i, track in enumerate(tracks):
        if id(track.eraser) in seen:  # G-CiRs on several concepts: one increment shared by all tracks
            state["tracks"].append({"name": track.concept.name, "prompt": track.concept.prompt, "shared": True})
            continue
        seen.add(id(track.eraser))
        tensors.update(_track_tensors(i, track))
        state["tracks"].append(_track_state(track))
    path = checkpoint_path(folder)
    atomic_save_safetensors(tensors, path, {METADATA_KEY: json.dumps(state)})
    return path


def _check_matches(folder: Path, state: dict[str, Any], tracks: Sequence[ConceptTrack], mode: str,
                   config: TrainConfig) -> None:
    names = [(t["name"], t["prompt"]) for t in state["tracks"]]
    path = checkpoint_path(folder)
    if state["mode"] != mode or names != [(t.concept.name, t.concept.prompt) for t in tracks]:
        raise TrainingError(f"the checkpoint in {folder} is for mode {state['mode']!r} and concepts {names}; "
                            f"use another --out folder or delete {path.name} to start over")
    if state["config"] != asdict(config):
        raise TrainingError(f"the checkpoint in {folder} was made with other settings ({state['config']}); "
                            f"resume with the same settings or delete {path.name}")


def _restore_track(i: int, track: ConceptTrack, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, w in track.eraser.weights.items():
            w.copy_(tensors[f"{i}/w/{layer}"])
        for layer, a in track.eraser.down.items():  # rank r: the A factors
            a.copy_(tensors[f"{i}/down/{layer}"])
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
    track.relative = list(saved["relative"])
    track.stop.value, track.stop.steps, track.stop.below = saved["momentum"], saved["steps"], saved["below"]
    track.done, track.stopped_early, track.seconds = saved["done"], saved["stopped_early"], saved["seconds"]


def load_checkpoint(folder: Path, tracks: Sequence[ConceptTrack], mode: str, config: TrainConfig) -> bool:
    """Restore `tracks` from the folder's checkpoint; False when there is none."""
    path = checkpoint_path(folder)
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as reader:
        state = json.loads((reader.metadata() or {})[METADATA_KEY])
    _check_matches(folder, state, tracks, mode, config)
    tensors = load_file(str(path))
    for i, (track, saved) in enumerate(zip(tracks, state["tracks"])):
        if not saved.get("shared"):
            _restore_track(i, track, saved, tensors)
    return True
