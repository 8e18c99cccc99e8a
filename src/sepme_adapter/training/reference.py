"""Reference images `x_0` for training (paper Sec. 4.2: images of the concept by the original model).

Generated once per concept prompt with fixed seeds and cached on disk (PNGs to look at, the exact
latents in safetensors, and a manifest), so reruns and other modes reuse them; or read from a
user folder with one sub-folder per concept name.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import TrainingError
from ..fingerprint import fingerprint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "blank"


def pipeline_resolution(pipe: Any) -> int:
    """The pipeline's image size in pixels (UNet sample size times the VAE's scale)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _manifest(pipe: Any, prompt: str, config: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "seeds": [config.seed * 1000 + k for k in range(config.images_per_concept)],
        "steps": config.reference_steps,
        "guidance_scale": config.guidance_scale,
        "resolution": pipeline_resolution(pipe),
        "base_model": fingerprint(pipe)["digest"],
    }


@torch.no_grad()
def generate_reference(pipe: Any, prompt: str, config: Any, folder: Path | None) -> torch.Tensor:
    """Latents of `images_per_concept` images of `prompt` by the original model (cached in `folder`)."""
    manifest = _manifest(pipe, prompt, config)
    if folder is not None:
        cached = folder / "latents.safetensors"
        manifest_path = folder / "manifest.json"
        if cached.is_file() and manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
            return load_file(str(cached))["latents"]
    generators = [torch.Generator().manual_seed(seed) for seed in manifest["seeds"]]
    latents = pipe(
        prompt, num_images_per_prompt=len(generators), generator=generators, output_type="latent",
        num_inference_steps=config.reference_steps, guidance_scale=config.guidance_scale,
    ).images
    latents = latents.detach().float().cpu()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        images = pipe.vae.decode(latents.to(pipe.vae.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor)
        pixels = ((images.sample.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
        for seed, image in zip(manifest["seeds"], pixels.numpy()):
            Image.fromarray(image).save(folder / f"{seed}.png")
        save_file({"latents": latents.contiguous()}, str(folder / "latents.safetensors"))
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return latents


@torch.no_grad()
def encode_images(pipe: Any, paths: Sequence[Path]) -> torch.Tensor:
    """VAE latents (mean, scaled) of user images, resized to the pipeline's resolution."""
    size = pipeline_resolution(pipe)
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1
    latents = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    return (latents * pipe.vae.config.scaling_factor).float().cpu()


def user_latents(pipe: Any, concepts: Sequence[Any], user_folder: str | Path) -> dict[str, torch.Tensor]:
    """Latents of the user's images, one sub-folder per concept name (all checked before any is read)."""
    root = Path(user_folder)
    files = {}
    for concept in concepts:
        folder = root / concept.name
        found = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise TrainingError(f"reference folder {str(folder)!r} for concept {concept.name!r} is missing or "
                                f"has no images ({', '.join(IMAGE_SUFFIXES)}); give one sub-folder per "
                                f"concept name, or omit reference_images to generate them")
        files[concept.name] = found
    return {concept.name: encode_images(pipe, files[concept.name]) for concept in concepts}


def reference_latents(
    pipe: Any,
    concepts: Sequence[Any],
    config: Any,
    user_folder: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Latents `x_0` per concept name, on the UNet's device and dtype.

    A user folder must hold one sub-folder of images per concept name; this is checked for
    every concept before any image is read or generated.
    """
    device, dtype = pipe.unet.device, pipe.unet.dtype
    if user_folder is not None:
        return {name: latents.to(device, dtype) for name, latents in user_latents(pipe, concepts, user_folder).items()}
    result: dict[str, torch.Tensor] = {}
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        for concept in tqdm(concepts, desc="reference images", disable=not progress, leave=False):
            key = hashlib.sha256(concept.prompt.encode()).hexdigest()[:8]
            folder = Path(cache_dir) / f"{_slug(concept.prompt)}-{key}" if cache_dir is not None else None
            result[concept.name] = generate_reference(pipe, concept.prompt, config, folder).to(device, dtype)
    finally:
        pipe.set_progress_bar_config(disable=was_disabled)
    return result
