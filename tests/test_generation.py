"""Batched generation: every image is a function of (prompt, seed, erased set) alone."""

import numpy as np
import pytest
import torch

from sepme_adapter.generation import Job, canonical_jobs, generate_batched
from sepme_adapter.loader import erasure_runtime

from .helpers import CONCEPTS, make_eraser

NAMES = list(CONCEPTS)
SUBSETS = [(), ("vangogh",), ("picasso", "cezanne"), ("vangogh", "picasso", "cezanne")]


def standalone(pipe, job, steps, guidance_scale):
    """The image made on its own: one prompt, one seed, the job's erasers set with `set_erased`."""
    pipe.set_erased(list(job.erased))
    generator = torch.Generator().manual_seed(job.seed)
    image = pipe(job.prompt, generator=generator, num_inference_steps=steps, guidance_scale=guidance_scale,
                 output_type="np").images[0]
    pipe.set_erased([])
    return image


@pytest.fixture
def pipe64(pipe):
    pipe.to(dtype=torch.float64)
    for i, name in enumerate(NAMES):
        pipe.load_sepme(make_eraser(pipe, name, seed=i, scale=20000.0), erase=False)
    return pipe


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_batched_images_equal_images_made_alone_in_float64(pipe64, guidance_scale):
    """Prompts, seeds and erased subsets mixed in one UNet call give the images each job gives alone:
    equal to 1e-10 in float64 (round-off of a different batch size is all batching may change)."""
    prompts = [*CONCEPTS.values(), "a photo"]
    jobs = [Job(p, seed, subset) for p in prompts for seed in (0, 3) for subset in SUBSETS]
    pipe64.set_erased(["cezanne"])  # the pipeline's own erased set plays no part and is kept
    counted = []
    images = generate_batched(pipe64, jobs, steps=3, guidance_scale=guidance_scale, batch_size=7,
                              output_type="np", on_batch=counted.append)
    assert pipe64.get_erased() == ["cezanne"] and sum(counted) == len(jobs) and max(counted) == 7
    pipe64.set_erased([])
    worst = 0.0
    for job, image in zip(jobs, images):
        alone = standalone(pipe64, job, 3, guidance_scale)
        worst = max(worst, float(np.abs(image - alone).max()))
    assert worst <= 1e-10, worst
    # not vacuous: the erasers change their concepts' images
    original = {(j.prompt, j.seed): im for j, im in zip(jobs, images) if not j.erased}
    changed = [float(np.abs(im - original[(j.prompt, j.seed)]).max()) for j, im in zip(jobs, images)
               if j.erased == ("vangogh",) and j.prompt == CONCEPTS["vangogh"]]
    assert min(changed) > 1e-3


def test_float32_batches_match_to_round_off_and_repeat_exactly(pipe):
    for i, name in enumerate(NAMES):
        pipe.load_sepme(make_eraser(pipe, name, seed=i, scale=20000.0), erase=False)
    jobs = [Job(p, s, subset) for p in CONCEPTS.values() for s in (0, 1) for subset in SUBSETS[:3]]
    first = generate_batched(pipe, jobs, steps=2, guidance_scale=5.0, batch_size=18, output_type="np")
    again = generate_batched(pipe, list(reversed(jobs)), steps=2, guidance_scale=5.0, batch_size=5,
                             output_type="np")[::-1]
    # float32: batching changes round-off only (a few 1e-7 on this CPU); an 8-bit level is 3.9e-3
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, again)) < 1e-4
    assert np.array_equal(np.stack(first), np.stack(generate_batched(
        pipe, jobs, steps=2, guidance_scale=5.0, batch_size=18, output_type="np")))


def test_jobs_are_canonical_and_checked(pipe):
    for i, name in enumerate(NAMES):
        pipe.load_sepme(make_eraser(pipe, name, seed=i), erase=False)
    jobs = canonical_jobs(pipe, [("a", 1, ["cezanne", "vangogh"]), ("a", 1), Job("a", 1, ("vangogh", "cezanne"))])
    assert jobs == [Job("a", 1, ("vangogh", "cezanne")), Job("a", 1, ()), Job("a", 1, ("vangogh", "cezanne"))]
    with pytest.raises(KeyError, match="monet"):
        canonical_jobs(pipe, [Job("a", 1, ("monet",))])
    with pytest.raises(TypeError, match="string"):
        canonical_jobs(pipe, [Job("a", 1, "vangogh")])
    counted = []
    images = generate_batched(pipe, jobs, steps=1, batch_size=8, on_batch=counted.append)
    assert counted == [2] and images[0] is images[2]  # identical jobs are generated once


def test_per_row_takes_subsets_in_load_order(pipe):
    for i, name in enumerate(NAMES):
        pipe.load_sepme(make_eraser(pipe, name, seed=i), erase=False)
    runtime = erasure_runtime(pipe)
    with runtime.per_row([("cezanne", "vangogh"), None, "vangogh", ()]):
        plan = runtime.plan
        assert [name for name, _ in plan] == ["vangogh", "cezanne"]
        assert plan[0][1].tolist() == [0, 2] and plan[1][1].tolist() == [0]
    with runtime.per_row(["picasso", ("picasso",)]):
        assert runtime.plan == (("picasso", None),)  # every row: computed exactly as set_erased does
    assert runtime.plan == ()
    with pytest.raises(KeyError, match="monet"), runtime.per_row([("monet",)]):
        pass


def test_sdxl_batches_equal_images_made_alone_in_float64():
    """The same guarantee on an SDXL pipeline (pooled embeddings and time ids per row; zero unconditional branch)."""
    import sepme_adapter
    from sepme_adapter.testing import tiny_sdxl_pipeline

    xl = sepme_adapter.attach(tiny_sdxl_pipeline())
    xl.to(dtype=torch.float64)
    for i, name in enumerate(NAMES):
        xl.load_sepme(make_eraser(xl, name, seed=i, scale=20000.0), erase=False)
    jobs = [Job(p, seed, subset) for p in list(CONCEPTS.values())[:2] for seed in (0, 1) for subset in SUBSETS]
    images = generate_batched(xl, jobs, steps=2, guidance_scale=5.0, batch_size=6, output_type="np")
    worst = max(float(np.abs(image - standalone(xl, job, 2, 5.0)).max()) for job, image in zip(jobs, images))
    assert worst <= 1e-10, worst


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_flux_batches_equal_plain_flux_calls_in_float64(guidance_scale):
    """On FLUX, `guidance_scale` is true classifier-free guidance against the blank prompt (FluxPipeline's own
    `guidance_scale` only feeds guidance-distilled transformers): each batched image equals a plain per-prompt
    `FluxPipeline` call with `true_cfg_scale` and `negative_prompt=""`, the same seed and the job's erasers set."""
    import sepme_adapter
    from sepme_adapter.generation import pipeline_arguments, uses_guidance
    from sepme_adapter.testing import tiny_flux_pipeline
    from sepme_adapter.testing.conformance import random_eraser

    flux = sepme_adapter.attach(tiny_flux_pipeline()).to(torch.float64)
    for i, name in enumerate(NAMES):
        flux.load_sepme(random_eraser(flux, name, CONCEPTS, ["watermark"], seed=i, scale=20000.0, pooled=True,
                                      dtype=torch.float64), erase=False)
    assert uses_guidance(flux, guidance_scale) == (guidance_scale > 1)
    jobs = [Job(p, seed, subset) for p in list(CONCEPTS.values())[:2] for seed in (0, 1) for subset in SUBSETS]
    size = dict(height=16, width=16)
    images = generate_batched(flux, jobs, steps=2, guidance_scale=guidance_scale, batch_size=5, output_type="np",
                              **size)
    worst = 0.0
    for job, image in zip(jobs, images):
        flux.set_erased(list(job.erased))
        guidance = dict(true_cfg_scale=guidance_scale, negative_prompt="") if guidance_scale > 1 else {}
        alone = flux(job.prompt, generator=torch.Generator().manual_seed(job.seed), num_inference_steps=2,
                     max_sequence_length=8, output_type="np", **size, **guidance).images[0]
        flux.set_erased([])
        worst = max(worst, float(np.abs(image - alone).max()))
    assert worst <= 1e-10, worst
    original = {(j.prompt, j.seed): im for j, im in zip(jobs, images) if not j.erased}
    changed = [float(np.abs(im - original[(j.prompt, j.seed)]).max()) for j, im in zip(jobs, images)
               if j.erased == ("vangogh",) and j.prompt == CONCEPTS["vangogh"]]
    assert min(changed) > 1e-3  # not vacuous: the erasers change their concept's images
    if guidance_scale > 1:  # and guidance is applied: the unguided images differ
        unguided = generate_batched(flux, jobs[:1], steps=2, guidance_scale=1.0, output_type="np", **size)[0]
        assert float(np.abs(unguided - images[0]).max()) > 1e-3
    assert pipeline_arguments(flux, guidance_scale, 2) == {
        "guidance_scale": guidance_scale, "max_sequence_length": 8,
        **({"true_cfg_scale": guidance_scale, "negative_prompt": ["", ""]} if guidance_scale > 1 else {})}


def test_guidance_distilled_flux_keeps_its_guidance_embedding():
    """A FLUX transformer with a guidance embedding (FLUX.1-dev) gets `guidance_scale` as before, no true CFG."""
    from sepme_adapter.generation import pipeline_arguments, uses_guidance
    from sepme_adapter.testing import tiny_flux_pipeline, tiny_pipeline

    distilled = tiny_flux_pipeline(guidance_embeds=True)
    assert pipeline_arguments(distilled, 3.5, 2) == {"guidance_scale": 3.5, "max_sequence_length": 8}
    assert not uses_guidance(distilled, 3.5)
    assert pipeline_arguments(tiny_pipeline(), 7.5, 2) == {"guidance_scale": 7.5}  # SD: as it always was
