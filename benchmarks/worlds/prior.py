"""The zoo's shared image prior: one denoiser that has seen every glyph and texture kind, built once and
cached, from which every world's denoiser starts.

A world's build has 15 CPU minutes, about 900 denoiser steps: enough to learn which name means which glyph
or texture, not enough to learn to draw a grid or a crescent from the demo world's five shapes and three
styles. The prior learns the drawing once, for all worlds: the demo world's architecture, warm-started from
its denoiser, trained unconditionally (every caption blank) on random glyphs of every kind, painted flat or
in random textures of every kind, at random parameters and hues (`spec.glyph_params`, `spec.texture_params`).
It names no concept of any world, so it favours none. Cached under
`$SEPME_WORLDS_DIR/prior-<steps>x<batch>/`; its CPU time is reported once, apart from the worlds'.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sepme_adapter.demo import ASSETS as DEMO_ASSETS
from sepme_adapter.demo.build import Recipe, _timed, sd_conditioning, train_unet
from sepme_adapter.demo.world import CaptionBatch, to_tensor

from . import worlds_dir
from .spec import GLYPH_KINDS, PLAIN, TEXTURE_KINDS, glyph_params, render_params, texture_params

PRIOR_FORMAT = 1  # bump when the prior's recipe changes (a cached prior of another format is rebuilt)
PLAIN_SHARE = 0.25  # share of glyphs painted in one flat colour, as a world's "plain" style


def sample_prior_batch(batch_size: int, rng: np.random.Generator, caption_dropout: float = 1.0) -> CaptionBatch:
    """Random glyphs of every kind in random textures of every kind (or flat), all with the blank caption."""
    images, objects, styles = [], [], []
    for _ in range(batch_size):
        glyph = glyph_params(str(rng.choice(GLYPH_KINDS)), rng)
        paint = None if rng.random() < PLAIN_SHARE else texture_params(str(rng.choice(TEXTURE_KINDS)),
                                                                         float(rng.random()), rng)
        images.append(render_params(glyph, paint, rng))
        objects.append(glyph["kind"])
        styles.append(PLAIN if paint is None else paint["kind"])
    return CaptionBatch(to_tensor(images), [""] * batch_size, objects, styles)


def prior_dir(steps: int, batch: int) -> Path:
    """The cache folder of the prior trained `steps` x `batch` (the tests' tiny one lives apart)."""
    return worlds_dir() / f"prior-{steps}x{batch}"


def build_prior(out: Path, steps: int, batch: int) -> dict:
    """Train the prior into `out/unet` (atomically: a partial folder, then a rename); return its report."""
    work = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    recipe = replace(Recipe(), seed=7, unet_steps=steps, unet_batch=batch, caption_dropout=1.0,
                     min_snr_gamma=5.0)
    vae = AutoencoderKL.from_pretrained(DEMO_ASSETS / "pipeline" / "vae").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(DEMO_ASSETS / "pipeline" / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(DEMO_ASSETS / "pipeline" / "text_encoder").eval()
    demo_unet = UNet2DConditionModel.from_pretrained(DEMO_ASSETS / "pipeline" / "unet")
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear")
    timings: dict[str, dict[str, float]] = {}
    with _timed(timings, "prior"):
        unet, losses = train_unet(recipe, vae, sd_conditioning(tokenizer, text_encoder), noise_scheduler,
                                  np.random.default_rng([7, 5]), warm_start=demo_unet.state_dict(),
                                  sample_batch=sample_prior_batch)
    unet.save_pretrained(work / "unet", safe_serialization=True)
    report = {"format": PRIOR_FORMAT, "steps": steps, "batch": batch, "timings": timings,
              "loss_last_100": float(np.mean(losses[-100:])), "torch_threads": torch.get_num_threads()}
    (work / "prior.json").write_text(json.dumps(report, indent=2))
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return report


def _is_built(folder: Path) -> bool:
    try:
        return json.loads((folder / "prior.json").read_text()).get("format") == PRIOR_FORMAT
    except (OSError, ValueError):
        return False


def ensure_prior(steps: int, batch: int) -> tuple[Path, dict]:
    """The prior's folder (built here first if missing; concurrent builders wait for one) and its report."""
    folder = prior_dir(steps, batch)
    if not _is_built(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _is_built(folder):
                started = time.perf_counter()
                print(f"[build] the zoo's shared image prior ({steps} steps, once) -> {folder}", flush=True)
                build_prior(folder, steps, batch)
                print(f"[build] prior built in {time.perf_counter() - started:.0f} s", flush=True)
    return folder, json.loads((folder / "prior.json").read_text())
