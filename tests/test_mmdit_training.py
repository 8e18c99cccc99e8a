"""Training SepME erasers on FLUX and SD3 (tiny random pipelines) with the flow-matching objective: the velocity
difference `v(x_t, c) - v(x_t, c_0)` in the role of the noise-prediction difference D (`training/denoise.py`).

Each trained eraser loads with `load_sepme`, keeps the known, protected and blank prompts' context rows exact (up to
its float32 basis's round-off, measured in float64 where the pipeline adds none), changes the erased concept's
transformer output, and moves the concept's guidance direction away from the original's (rho below 1)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import sepme_adapter
from sepme_adapter import Eraser
from sepme_adapter.baselines import train_baseline
from sepme_adapter.cli import main
from sepme_adapter.mmdit import CONTEXT_LAYER, MMDIT_POOLED_LAYER
from sepme_adapter.testing import tiny_flux_pipeline, tiny_pipeline, tiny_sd3_pipeline
from sepme_adapter.text import encode_prompts_pooled
from sepme_adapter.training import Concept, TrainConfig, train_erasers
from sepme_adapter.training.denoise import FlowSchedule
from sepme_adapter.training.harness import noisy_latents
from sepme_adapter.training.reference import reference_latents

from .helpers import first_block_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
LENGTH = 8  # the tiny pipelines' T5 length (max_sequence_length)
CONCEPTS = ["vangogh=a painting by van gogh", "picasso=a painting by picasso"]
KNOWN = {"cezanne": "a painting by cezanne"}
PROTECTED = ["watermark"]
# small and fast: a few reference images at 16 x 16, a step size large enough to move in 40 iterations, a probe
# target it does not reach (so every run takes the same 40 iterations)
CONFIG = dict(max_iterations=40, images_per_concept=2, reference_steps=2, resolution=16, probe_every=5, probe_size=8,
              eta=0.1, erase_to=-2.0)


@pytest.fixture(params=sorted(BUILDERS))
def kind(request):
    return request.param


def inputs(pipe, prompts, sigma=0.6, seed=1):
    """One transformer call for `prompts` at a fixed noisy latent (what one denoising step does)."""
    text, pooled = encode_prompts_pooled(pipe, prompts)
    n, generator, dtype = len(prompts), torch.Generator().manual_seed(seed), pipe.transformer.dtype
    if isinstance(pipe, FluxPipeline):
        latent = torch.randn(1, 64, 4, generator=generator).expand(n, -1, -1)
        found = dict(hidden_states=latent, timestep=torch.full((n,), sigma), img_ids=FluxPipeline.
                     _prepare_latent_image_ids(n, 8, 8, "cpu", dtype), txt_ids=torch.zeros(text.shape[1], 3))
    else:
        latent = torch.randn(1, 4, 16, 16, generator=generator).expand(n, -1, -1, -1)
        found = dict(hidden_states=latent, timestep=torch.full((n,), 1000 * sigma))
    found |= dict(encoder_hidden_states=text, pooled_projections=pooled)
    return {k: v.to(dtype) for k, v in found.items()}


@torch.no_grad()
def velocity(pipe, prompts, **kwargs):
    return pipe.transformer(**inputs(pipe, list(prompts), **kwargs)).sample.double()


def context_rows(pipe, prompts):
    """What the first joint block reads: the context rows (`context_embedder`'s output) and `temb`."""
    return first_block_inputs(pipe, lambda: velocity(pipe, prompts))


def relative(after, before):
    """Per prompt: `||after - before|| / ||before||`."""
    return ((after - before).flatten(1).norm(dim=1) / before.flatten(1).norm(dim=1)).tolist()


def guidance_rho(pipe, prompt, names):
    """The concept's guidance direction `D = v(c) - v(c_0)` with `names` erased, correlated with the original's:
    `sum(D_o * D_n) / sum(D_o^2)` over a few noise levels (1: unchanged, 0: gone)."""
    originals, edited = [], []
    for k, sigma in enumerate((0.3, 0.6, 0.9)):
        pipe.set_erased([])
        v = velocity(pipe, [prompt, ""], sigma=sigma, seed=k)
        originals.append(v[0] - v[1])
        pipe.set_erased(names)
        v = velocity(pipe, [prompt, ""], sigma=sigma, seed=k)
        edited.append(v[0] - v[1])
    pipe.set_erased([])
    original, new = torch.stack(originals), torch.stack(edited)
    return float((original * new).sum() / original.pow(2).sum())


def test_flow_matching_noise_is_the_interpolation_the_scheduler_uses():
    """`x_t = (1 - sigma) x_0 + sigma eps` with sigma in (0, 1], drawn per stratum and shifted as the scheduler."""
    latents = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    schedule = FlowSchedule(shift=3.0)
    x_t, sigma, index = noisy_latents(latents, torch.Generator().manual_seed(5), schedule, 10, torch.device("cpu"))
    replay = torch.Generator().manual_seed(5)  # the same draws: index, stratum, position, noise
    assert index == int(torch.randint(3, (1,), generator=replay))
    step = int(torch.randint(10, (1,), generator=replay))
    raw = (step + float(torch.rand((), generator=replay))) / 10
    assert sigma == pytest.approx(3 * raw / (1 + 2 * raw), rel=1e-12) and 0 < sigma <= 1
    noise = torch.randn(latents[:1].shape, generator=replay).double()  # drawn in float32, as the DDPM path
    assert torch.allclose(x_t, (1 - sigma) * latents[index : index + 1] + sigma * noise, rtol=0, atol=1e-12)
    # the shift pushes every level towards noise (SD3's shift 3), and FLUX's dynamic shift grows with the image
    assert all(FlowSchedule(shift=3.0).shifted(s) > s for s in (0.1, 0.5, 0.9))
    config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    assert FlowSchedule.of(config, 4096).shifted(0.5) > FlowSchedule.of(config, 256).shifted(0.5) > 0.5


def test_trained_erasers_load_keep_known_rows_and_erase(kind, tmp_path):
    pipe = BUILDERS[kind]()
    erasers = train_erasers(pipe, CONCEPTS, known=[f"{k}={p}" for k, p in KNOWN.items()], protected=PROTECTED,
                            config=TrainConfig(**CONFIG), cache_dir=tmp_path / "refs", progress=False)
    assert sorted(e.name for e in erasers) == ["picasso", "vangogh"]
    rows = LENGTH if kind == "flux" else 2 * LENGTH  # SD3: CLIP rows, then T5 rows
    for eraser in erasers:
        assert sorted(eraser.weights) == sorted([CONTEXT_LAYER, MMDIT_POOLED_LAYER])
        assert eraser.metadata["text_length"] == rows and eraser.metadata["max_sequence_length"] == LENGTH
        # the objective moved the way it should: the probes' rho (1 before training) fell, check after check
        probes = [p["rho"] for p in eraser.metadata["history"]["probes"]]
        assert len(probes) == (CONFIG["max_iterations"] - TrainConfig().warmup) // CONFIG["probe_every"]
        assert probes[-1] < probes[0] < 1, probes
        assert sum(b < a for a, b in zip(probes, probes[1:])) >= len(probes) // 2, probes
        eraser.save(tmp_path / f"{eraser.name}.safetensors")

    # float64: the pipeline adds no round-off, so what the known prompts see is the eraser's own (its float32
    # basis), which its leakage certificate measures
    wide = sepme_adapter.attach(BUILDERS[kind]().to(torch.float64))
    for eraser in erasers:
        wide.load_sepme(str(tmp_path / f"{eraser.name}.safetensors"), erase=False)
    assert isinstance(Eraser.load(tmp_path / "vangogh.safetensors"), Eraser)
    kept = ["", "a painting by cezanne", "watermark", "a painting by picasso"]
    prompts = [*kept, "a painting by van gogh"]
    before = context_rows(wide, prompts)
    wide.set_erased(["vangogh"])
    after = context_rows(wide, prompts)
    certificate = next(e for e in erasers if e.name == "vangogh").metadata["certificate"]["max_leakage"]
    assert certificate <= 1e-4
    for part in ("context", "temb"):
        changes = relative(after[part], before[part])
        assert max(changes[:-1]) <= certificate * (1 + 1e-6) + 1e-12, (part, changes, certificate)
        assert changes[-1] > 1e-2, (part, changes)  # the erased concept's rows move
    # the transformer output: the known prompts' unchanged to round-off, the concept's changed, and its guidance
    # direction turned away from the original's
    wide.set_erased([])
    original = velocity(wide, prompts)
    wide.set_erased(["vangogh"])
    erased = velocity(wide, prompts)
    changes = relative(erased, original)
    assert max(changes[:-1]) <= 1e-4 * changes[-1] and changes[-1] > 1e-3, changes
    rho = guidance_rho(wide, "a painting by van gogh", ["vangogh"])
    assert rho < 0.5, rho  # (the pooled increment, solved after training, adds to what the context rows did)


def test_options_that_do_not_carry_over_are_refused_by_name():
    flux = tiny_flux_pipeline()
    for kwargs, named in ((dict(mode="iterative"), "mode='iterative'"), (dict(mode="gcirs"), "mode='gcirs'"),
                          (dict(config=TrainConfig(rank=2)), "rank=2"),
                          (dict(config=TrainConfig(after_name_weight=0.5)), "after_name_weight=0.5")):
        with pytest.raises(sepme_adapter.TrainingError, match=f"not supported: {named}"):
            train_erasers(flux, CONCEPTS, progress=False, **kwargs)
    with pytest.raises(sepme_adapter.TrainingError, match="has no UNet"):
        train_baseline(flux, CONCEPTS, "esd", progress=False)
    with pytest.raises(sepme_adapter.TrainingError, match="resolution"):
        train_erasers(tiny_pipeline(), CONCEPTS, config=TrainConfig(resolution=64), progress=False)


def test_sepme_erase_trains_a_saved_flux_folder(tmp_path):
    folder = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(folder)
    out = tmp_path / "erasers"
    code = main(["erase", "--model", str(folder), *(f"--concept={c}" for c in CONCEPTS), "-o", str(out),
                 "--max-iterations", "6", "--images-per-concept", "1", "--reference-steps", "1", "--resolution", "16",
                 "--device", "cpu", "--quiet"])
    assert code == 0
    pipe = sepme_adapter.attach(tiny_flux_pipeline())
    for name in ("vangogh", "picasso"):
        eraser = Eraser.load(out / f"{name}.safetensors")
        assert "Flux" in eraser.metadata["pipeline"] and eraser.metadata["stats"]["iterations"] == 6
        assert math.isfinite(eraser.metadata["stats"]["final_rho"])
        pipe.load_sepme(eraser, erase=False)  # the fingerprint of the folder's model is the tiny pipeline's


def test_user_images_become_latents_in_the_space_the_transformer_denoises(kind, tmp_path):
    """A user's reference images are encoded into the layout of the pipeline's own `output_type="latent"` (FLUX:
    packed), as diffusers' own FLUX / SD3 training scripts encode: `(mean - shift_factor) * scaling_factor`."""
    pipe = BUILDERS[kind]()
    call = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=LENGTH, output_type="latent")
    made = pipe("a painting by van gogh", generator=torch.Generator().manual_seed(0), **call).images
    image = pipe("a painting by van gogh", generator=torch.Generator().manual_seed(0), **call | {"output_type": "pil"})
    (tmp_path / "vangogh").mkdir()
    image.images[0].save(tmp_path / "vangogh" / "0.png")
    concept = Concept("vangogh", "a painting by van gogh")
    latents = reference_latents(pipe, [concept], TrainConfig(resolution=16), tmp_path, progress=False)["vangogh"]
    assert latents.shape == made.shape
    pixels = torch.from_numpy(np.asarray(image.images[0], dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        mean = pipe.vae.encode(pixels).latent_dist.mean
    expected = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    if kind == "flux":
        expected = FluxPipeline._pack_latents(expected, *expected.shape)
    assert torch.allclose(latents, expected, rtol=1e-5, atol=1e-6)
