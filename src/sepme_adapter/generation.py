"""Batched generation: many (prompt, seed, erased set) images in few pipeline calls.

`generate_batched(pipe, jobs, ...)` packs jobs into pipeline calls of `batch_size` images: the
seeds of several prompts in one call (one `torch.Generator` per image, so each image's starting
noise is its own), and different erased subsets of the loaded erasers in the same UNet call
(`ErasureRuntime.per_row`: each batch row gets its own job's erasers). With classifier-free
guidance the pipeline doubles the batch (`[unconditional rows, conditional rows]`); the
unconditional row of a job gets exactly that job's erasers too, as `set_erased` would give it.

Every image is a function of its job alone: it equals the image `pipe(prompt, generator=
torch.Generator().manual_seed(seed))` gives with `set_erased(erased)` (the names in load order),
up to float round-off from batching (matrix products of a different batch size may round
differently). In float64 the tests require 1e-10 and observe bit-identical images on CPU; in
float32 batched and single images differ by about 1e-6 (0-1 scale) on CPU, below an 8-bit level.

Identical jobs are generated once. The erased set the pipeline had before is untouched.

FLUX / SD3 pipelines are called with the T5 length their erasers are made for (`text.text_sequence_length`).
`guidance_scale` means classifier-free guidance on every pipeline: on a FLUX transformer without a guidance
embedding it becomes `true_cfg_scale` with the blank negative prompt (FLUX's own `guidance_scale` only feeds
guidance-distilled transformers, which get it as before); FLUX makes the unconditional prediction in a call of
its own, so each of its transformer calls has one row per image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .loader import erasure_runtime
from .mmdit import denoiser, is_flux
from .text import text_sequence_length


@dataclass(frozen=True)
class Job:
    """One image: a prompt, a seed and the names of the erasers active for it (empty: the original model)."""

    prompt: str
    seed: int
    erased: tuple[str, ...] = ()


def uses_true_cfg(pipe: Any) -> bool:
    """A FLUX pipeline whose transformer has no guidance embedding: guidance is `true_cfg_scale` (two calls)."""
    return is_flux(pipe) and not getattr(denoiser(pipe).config, "guidance_embeds", False)


def uses_guidance(pipe: Any, guidance_scale: float) -> bool:
    """Whether the pipeline runs classifier-free guidance (an unconditional prediction per image), as diffusers
    decides (with `pipeline_arguments`' FLUX true CFG)."""
    if is_flux(pipe):
        return guidance_scale > 1 and uses_true_cfg(pipe)
    return guidance_scale > 1 and getattr(denoiser(pipe).config, "time_cond_proj_dim", None) is None


def pipeline_arguments(pipe: Any, guidance_scale: float, count: int) -> dict[str, Any]:
    """The call arguments that make `guidance_scale` classifier-free guidance for a batch of `count` prompts:
    `guidance_scale` (SD v1 / v2 / XL, SD3, guidance-distilled FLUX); on FLUX without a guidance embedding also
    `true_cfg_scale` and a blank `negative_prompt` per prompt (> 1 only). FLUX / SD3: `max_sequence_length` too."""
    arguments: dict[str, Any] = {"guidance_scale": guidance_scale}
    length = text_sequence_length(pipe)
    if length is not None:
        arguments["max_sequence_length"] = length
    if guidance_scale > 1 and uses_true_cfg(pipe):
        arguments |= {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * count}
    return arguments


def canonical_jobs(pipe: Any, jobs: Iterable[Job | tuple[str, int] | tuple[str, int, Sequence[str]]]) -> list[Job]:
    """Jobs with each erased set in load order and without repeats; unknown eraser names raise KeyError."""
    runtime = erasure_runtime(pipe)
    loaded = list(runtime.erasers) if runtime is not None else []
    result = []
    for job in jobs:
        job = job if isinstance(job, Job) else Job(job[0], int(job[1]), tuple(job[2]) if len(job) > 2 else ())
        if isinstance(job.erased, str):
            raise TypeError(f"Job.erased must be a sequence of eraser names, got the string {job.erased!r}")
        unknown = sorted(set(job.erased) - set(loaded))
        if unknown:
            raise KeyError(f"no eraser named {unknown} is loaded; loaded: {loaded}")
        wanted = set(job.erased)
        result.append(Job(job.prompt, int(job.seed), tuple(n for n in loaded if n in wanted)))
    return result


@contextlib.contextmanager
def _row_plan(pipe: Any, erased: list[tuple[str, ...]], guidance: bool) -> Iterator[None]:
    """Per-row erasers for one pipeline call, with a check that every denoiser call has the expected batch
    (`guidance`: the unconditional rows come first in the same call; FLUX makes them in a call of its own)."""
    runtime = erasure_runtime(pipe)
    if runtime is None:
        yield
        return
    rows = erased + erased if guidance and not is_flux(pipe) else erased

    def check(module: Any, args: Any, kwargs: Any) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if sample is not None and sample.shape[0] != len(rows):
            raise RuntimeError(f"generate_batched planned {len(rows)} denoiser rows per call, the pipeline passed "
                               f"{sample.shape[0]}; each row would not get its own job's erasers")

    handle = denoiser(pipe).register_forward_pre_hook(check, with_kwargs=True)
    try:
        with runtime.per_row(rows):
            yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_batched(
    pipe: Any,
    jobs: Sequence[Job | tuple[str, int] | tuple[str, int, Sequence[str]]],
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 32,
    output_type: str = "pil",
    on_batch: Callable[[int], None] | None = None,
    **pipeline_kwargs: Any,
) -> list[Any]:
    """One output per job, in the order of `jobs` (PIL images, or latents / arrays for `output_type`).

    `batch_size`: images per pipeline call (the UNet sees twice as many rows with guidance).
    `on_batch(n)` is called after each call with the number of images it made (progress bars).
    Other keyword arguments go to every pipeline call (e.g. `height`, `width`, `negative_prompt`), over those of
    `pipeline_arguments` (FLUX: true CFG with a blank negative prompt; FLUX / SD3: the T5 length).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    canonical = canonical_jobs(pipe, jobs)
    unique = list(dict.fromkeys(canonical))
    guidance = uses_guidance(pipe, guidance_scale)
    made: dict[Job, Any] = {}
    disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            generators = [torch.Generator().manual_seed(job.seed) for job in chunk]
            with _row_plan(pipe, [job.erased for job in chunk], guidance):
                arguments = {**pipeline_arguments(pipe, guidance_scale, len(chunk)), **pipeline_kwargs}
                output = pipe([job.prompt for job in chunk], generator=generators, num_inference_steps=steps,
                              output_type=output_type, **arguments).images
            made.update(zip(chunk, output))
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        pipe.set_progress_bar_config(disable=disabled)
    return [made[job] for job in canonical]
