"""Reference images `x_0` for training (paper Sec. 4.2: images of the concept by the original model).

Generated once per concept prompt with fixed seeds and cached on disk (PNGs to look at, the exact
latents in safetensors, and a manifest), so reruns and other modes reuse them; or read from a
user folder with one sub-folder per concept name.

FLUX / SD3: the latents are what the pipeline's `output_type="latent"` returns, the space the transformer
denoises in (`(vae latent - shift_factor) * scaling_factor`; FLUX: packed, `pipe._pack_latents`), made by the
pipeline itself at `config.resolution` (default: its own size) and `text.text_sequence_length(pipe)` T5 tokens,
with `config.guidance_scale` as `generation.pipeline_arguments` passes it (FLUX without a guidance embedding: true
classifier-free guidance against the blank prompt).
"""

from __future__ import annotations

import contextlib
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
from ..generation import Job, generate_batched, pipeline_arguments, uses_true_cfg
from ..loader import erasure_runtime
from ..mmdit import denoiser, is_transformer
from ..text import text_sequence_length
from .denoise import is_flux

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "blank"


def pipeline_resolution(pipe: Any, config: Any = None) -> int:
    """The pipeline's image size in pixels: UNet sample size times the VAE's scale; FLUX / SD3:
    `config.resolution`, else the pipeline's default size."""
    if not is_transformer(denoiser(pipe)):
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    chosen = getattr(config, "resolution", None)
    return int(chosen) if chosen is not None else int(pipe.default_sample_size * pipe.vae_scale_factor)


def _manifest(pipe: Any, prompt: str, config: Any) -> dict[str, Any]:
    manifest = {
        "prompt": prompt,
        "seeds": [config.seed * 1000 + k for k in range(config.images_per_concept)],
        "steps": config.reference_steps,
        "guidance_scale": config.guidance_scale,
        "resolution": pipeline_resolution(pipe, config),
        "base_model": fingerprint(pipe)["digest"],
    }
    if is_transformer(denoiser(pipe)):
        manifest["max_sequence_length"] = text_sequence_length(pipe)
    if uses_true_cfg(pipe) and config.guidance_scale > 1:  # FLUX: guidance_scale is true CFG, not the embedding
        manifest["true_cfg_scale"] = config.guidance_scale
    return manifest


def _cached(folder: Path | None, manifest: dict[str, Any]) -> torch.Tensor | None:
    if folder is None:
        return None
    cached, manifest_path = folder / "latents.safetensors", folder / "manifest.json"
    if cached.is_file() and manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return load_file(str(cached))["latents"]
    return None


@torch.no_grad()
def _store(pipe: Any, latents: torch.Tensor, manifest: dict[str, Any], folder: Path) -> None:
    """PNGs to look at, the exact latents and the manifest that says what they are."""
    folder.mkdir(parents=True, exist_ok=True)
    latents = latents.to(pipe.vae.device, pipe.vae.dtype)
    if is_transformer(denoiser(pipe)):  # FLUX / SD3: unpack (FLUX), unscale, unshift
        if latents.ndim == 3:
            size = manifest["resolution"]
            latents = type(pipe)._unpack_latents(latents, size, size, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
        images = pipe.vae.decode(latents)
    else:
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    pixels = ((images.sample.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
    for seed, image in zip(manifest["seeds"], pixels.numpy()):
        Image.fromarray(image).save(folder / f"{seed}.png")
    save_file({"latents": latents.contiguous()}, str(folder / "latents.safetensors"))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def generate_references(pipe: Any, prompts: Sequence[str], config: Any, folders: Sequence[Path | None],
                        batch_size: int = 16, progress: bool = False) -> list[torch.Tensor]:
    """Latents of `images_per_concept` images per prompt by the original model, cached per prompt in its folder.

    The prompts not cached are generated together (`generate_batched`: several prompts' seeds per pipeline
    call, every image as it would be made alone), always by the original model whatever is erased.
    """
    manifests = [_manifest(pipe, prompt, config) for prompt in prompts]
    found = [_cached(folder, manifest) for folder, manifest in zip(folders, manifests)]
    missing = [i for i, latents in enumerate(found) if latents is None]
    jobs = [Job(prompts[i], seed) for i in missing for seed in manifests[i]["seeds"]]
    with tqdm(total=len(jobs), desc="reference images", unit="img", disable=not progress or not jobs,
              leave=False) as bar:
        if is_transformer(denoiser(pipe)):
            made = flow_references(pipe, jobs, config, batch_size, on_batch=bar.update)
        else:
            made = generate_batched(pipe, jobs, config.reference_steps, config.guidance_scale, batch_size,
                                    output_type="latent", on_batch=bar.update)
    offset = 0
    for i in missing:
        count = len(manifests[i]["seeds"])
        found[i] = torch.stack(made[offset : offset + count]).detach().float().cpu()
        offset += count
        if folders[i] is not None:
            _store(pipe, found[i], manifests[i], folders[i])
    return found  # type: ignore[return-value]


@torch.no_grad()
def flow_references(pipe: Any, jobs: Sequence[Job], config: Any, batch_size: int = 16,
                    on_batch: Any = None) -> list[torch.Tensor]:
    """FLUX / SD3: the latents of each job's image (`output_type="latent"`; FLUX: packed), by the original model
    (no eraser active, whatever is loaded), `batch_size` images of one prompt per pipeline call, each from its
    own `torch.Generator` seeded with the job's seed."""
    size = pipeline_resolution(pipe, config)
    runtime = erasure_runtime(pipe)
    made: list[torch.Tensor] = []
    for first in range(0, len(jobs), batch_size):
        part = list(jobs[first : first + batch_size])
        groups: dict[str, list[Job]] = {}
        for job in part:
            groups.setdefault(job.prompt, []).append(job)
        by_job: dict[int, torch.Tensor] = {}
        for prompt, group in groups.items():
            plan = runtime.per_row([]) if runtime is not None else contextlib.nullcontext()
            with plan:
                latents = pipe(prompt=[prompt] * len(group), height=size, width=size,
                               num_inference_steps=config.reference_steps,
                               generator=[torch.Generator().manual_seed(job.seed) for job in group],
                               output_type="latent",
                               **pipeline_arguments(pipe, config.guidance_scale, len(group))).images
            for job, latent in zip(group, latents):
                by_job[id(job)] = latent
        made += [by_job[id(job)] for job in part]
        if on_batch is not None:
            on_batch(len(part))
    return made


def generate_reference(pipe: Any, prompt: str, config: Any, folder: Path | None) -> torch.Tensor:
    """Latents of `images_per_concept` images of `prompt` by the original model (cached in `folder`)."""
    return generate_references(pipe, [prompt], config, [folder])[0]


@torch.no_grad()
def encode_images(pipe: Any, paths: Sequence[Path], config: Any = None) -> torch.Tensor:
    """VAE latents (mean, scaled) of user images, resized to the pipeline's resolution (FLUX / SD3: shifted
    as their pipelines do; FLUX: packed)."""
    size = pipeline_resolution(pipe, config)
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1
    latents = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    if not is_transformer(denoiser(pipe)):
        return (latents * pipe.vae.config.scaling_factor).float().cpu()
    latents = (latents - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
    if is_flux(pipe):
        latents = type(pipe)._pack_latents(latents, *latents.shape)
    return latents.float().cpu()


def user_latents(pipe: Any, concepts: Sequence[Any], user_folder: str | Path,
                 config: Any = None) -> dict[str, torch.Tensor]:
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
    return {concept.name: encode_images(pipe, files[concept.name], config) for concept in concepts}


def reference_latents(
    pipe: Any,
    concepts: Sequence[Any],
    config: Any,
    user_folder: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Latents `x_0` per concept name, on the denoiser's device and dtype.

    A user folder must hold one sub-folder of images per concept name; this is checked for
    every concept before any image is read or generated.
    """
    device, dtype = denoiser(pipe).device, denoiser(pipe).dtype
    if user_folder is not None:
        return {name: latents.to(device, dtype)
                for name, latents in user_latents(pipe, concepts, user_folder, config).items()}
    folders = [Path(cache_dir) / f"{_slug(c.prompt)}-{hashlib.sha256(c.prompt.encode()).hexdigest()[:8]}"
               if cache_dir is not None else None for c in concepts]
    latents = generate_references(pipe, [c.prompt for c in concepts], config, folders, progress=progress)
    return {concept.name: found.to(device, dtype) for concept, found in zip(concepts, latents)}
