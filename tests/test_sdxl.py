"""SDXL and SD 2.x on tiny random-weight pipelines: the loader's guarantees on SDXL's two text
encoders (prompt embeddings of both side by side), its pooled / time-id added conditions in training, the
zero unconditional branch of `force_zeros_for_empty_prompt`, and v-prediction training."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

import sepme_adapter
from sepme_adapter.hub import base_pipeline_class, export_lora, model_card
from sepme_adapter.pipelines import load_pipeline
from sepme_adapter.testing import tiny_pipeline, tiny_sdxl_pipeline
from sepme_adapter.text import (
    added_cond_kwargs,
    encode_prompts,
    encode_prompts_pooled,
    unconditional_embeddings,
)
from sepme_adapter.training import TrainConfig, train_erasers
from sepme_adapter.verify import verify_eraser

from .helpers import (
    CONCEPTS,
    PROTECTED,
    assert_erasing_keeps_the_excluded_prompts_exact,
    keys_and_values,
    make_eraser,
    recording,
    unet_output,
)

SUBSETS = [list(s) for r in range(1, 4) for s in itertools.combinations(CONCEPTS, r)]
PROMPT = "a painting by van gogh"


@pytest.fixture
def xl():
    return sepme_adapter.attach(tiny_sdxl_pipeline())


@pytest.fixture
def xl_erasers(xl):
    return {name: make_eraser(xl, name, seed=i) for i, name in enumerate(CONCEPTS)}


def generate_xl(pipe, prompt=PROMPT, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images


def test_prompt_embeddings_are_both_encoders_side_by_side_as_the_pipeline_builds_them(xl):
    embeds, pooled = encode_prompts_pooled(xl, ["", PROMPT])
    assert embeds.shape == (2, 8, 64) and pooled.shape == (2, 32)  # 32 + 32 wide tokens, 32-wide pooled
    own, negative, own_pooled, negative_pooled = xl.encode_prompt(PROMPT, device="cpu")
    assert torch.equal(embeds[1], own[0])
    torch.testing.assert_close(pooled[1], own_pooled[0], rtol=0, atol=1e-6)  # batch-size round-off only
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, the blank *conditional* prompt is not
    assert not negative.any() and not negative_pooled.any()
    blank, blank_pooled = unconditional_embeddings(xl)
    assert not blank.any() and not blank_pooled.any()
    assert embeds[0].abs().sum() > 0 and torch.equal(encode_prompts(xl, [""])[0], embeds[0])
    plain = tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False)
    assert torch.equal(unconditional_embeddings(plain)[0], encode_prompts(plain, [""]))
    assert encode_prompts_pooled(tiny_pipeline(), ["a"])[1] is None and added_cond_kwargs(tiny_pipeline(), None) == {}


def test_nothing_erased_is_bit_identical_and_erasing_changes_the_image(xl, xl_erasers):
    reference = generate_xl(sepme_adapter.attach(tiny_sdxl_pipeline()))
    for eraser in xl_erasers.values():
        xl.load_sepme(eraser, erase=False)
    assert np.array_equal(generate_xl(xl), reference)
    xl.set_erased(["vangogh"])
    assert not np.array_equal(generate_xl(xl), reference)
    xl.set_erased([])
    assert np.array_equal(generate_xl(xl), reference)
    xl.unload_sepme()
    assert np.array_equal(generate_xl(xl), reference)


@pytest.mark.parametrize("erased", SUBSETS, ids=lambda s: "+".join(s))
def test_blank_known_and_protected_prompts_keep_their_keys_and_values(erased):
    pipe = sepme_adapter.attach(recording(tiny_sdxl_pipeline()))
    erasers = {name: make_eraser(pipe, name, seed=i) for i, name in enumerate(CONCEPTS)}
    original = assert_erasing_keeps_the_excluded_prompts_exact(pipe, erasers, erased)
    assert len(original) == 2 * 11  # every attn2 of the SDXL-architecture UNet


def test_the_zero_unconditional_branch_is_untouched_by_every_eraser(xl, xl_erasers):
    zeros, zeros_pooled = unconditional_embeddings(xl)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = xl.unet(x, 500, zeros, **added_cond_kwargs(xl, zeros_pooled)).sample
        for eraser in xl_erasers.values():
            xl.load_sepme(eraser)
        after = xl.unet(x, 500, zeros, **added_cond_kwargs(xl, zeros_pooled)).sample
    assert xl.get_erased() == list(CONCEPTS) and torch.equal(before, after)


def test_runtime_fused_and_explicit_weights_agree(xl, xl_erasers):
    for eraser in xl_erasers.values():
        xl.load_sepme(eraser)
    xl.set_erased(["vangogh", "cezanne"])
    runtime = unet_output(xl)
    explicit = tiny_sdxl_pipeline()
    with torch.no_grad():
        for name in ("vangogh", "cezanne"):
            for path in xl_erasers[name].weights:
                explicit.unet.get_submodule(path).weight += xl_erasers[name].delta(path)
    assert not torch.allclose(runtime, unet_output(tiny_sdxl_pipeline()), atol=1e-3)
    torch.testing.assert_close(runtime, unet_output(explicit), rtol=1e-4, atol=1e-5)
    weights = {k: v.clone() for k, v in xl.unet.state_dict().items()}
    xl.fuse_sepme()
    torch.testing.assert_close(unet_output(xl), runtime, rtol=1e-4, atol=1e-5)
    xl.unfuse_sepme()
    assert all(torch.equal(v, weights[k]) for k, v in xl.unet.state_dict().items())
    assert torch.equal(unet_output(xl), runtime)


@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
def test_load_lora_weights_of_the_export_equals_set_erased(xl, xl_erasers, tmp_path, rank):
    eraser = xl_erasers["vangogh"]
    if rank is not None:  # a rank-r eraser on the same basis: w = B A
        generator = torch.Generator().manual_seed(5)
        m = eraser.basis.shape[1]
        eraser = sepme_adapter.Eraser(
            name="vangogh", prompt=eraser.prompt, basis=eraser.basis, beta=eraser.beta, known=eraser.known,
            protected=eraser.protected, metadata=eraser.metadata,
            down={k: torch.randn(rank, m, generator=generator) / m**0.5 for k in sorted(eraser.weights)},
            weights={k: torch.randn(w.shape[0], rank, generator=generator) * 2000.0 * m**0.5
                     for k, w in sorted(eraser.weights.items())},
        )
    path = export_lora(eraser, tmp_path / "vangogh.safetensors")[0]
    xl.load_sepme(eraser)
    plain = tiny_sdxl_pipeline()
    assert isinstance(plain, StableDiffusionXLPipeline)
    plain.load_lora_weights(str(path), adapter_name="vangogh")
    torch.testing.assert_close(unet_output(plain), unet_output(xl), rtol=1e-4, atol=1e-5)
    plain.disable_lora()
    assert not torch.allclose(unet_output(plain), unet_output(xl), atol=1e-4)
    assert sepme_adapter.Eraser.load(path).name == "vangogh"  # load_sepme reads the export back


def test_file_round_trip_fingerprint_verify_certificate_and_model_card(xl, xl_erasers, tmp_path):
    path = xl_erasers["picasso"].save(tmp_path / "picasso.safetensors")
    assert xl.load_sepme(path) == "picasso" and xl.get_erased() == ["picasso"]
    sd_width = sepme_adapter.attach(tiny_pipeline())  # SD v1-style 64-wide text, another UNet
    with pytest.raises(sepme_adapter.BaseModelMismatchError):
        sd_width.load_sepme(path)
    other = sepme_adapter.attach(tiny_sdxl_pipeline(seed=7))  # same architecture, other weights
    with pytest.raises(sepme_adapter.BaseModelMismatchError, match="trained on base model"):
        other.load_sepme(path)
    report = verify_eraser(xl, xl_erasers["picasso"])
    assert report["ok"] and report["certificate"] <= 1e-5 and report["concept_change"] > 1e-3
    eraser = xl_erasers["picasso"]
    assert base_pipeline_class([eraser]) == "StableDiffusionPipeline"  # 64-wide text, nothing recorded
    eraser.metadata["pipeline"] = "StableDiffusionXLPipeline"  # what training records
    assert base_pipeline_class([eraser]) == "StableDiffusionXLPipeline"
    card = str(model_card([("picasso.safetensors", eraser)], "org/xl-erasers"))
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "StableDiffusionPipeline" not in card


def test_attach_serves_every_sdxl_pipeline_and_auto_pipelines(tmp_path):
    base = tiny_sdxl_pipeline()
    eraser = make_eraser(sepme_adapter.attach(base), "vangogh")
    image = Image.new("RGB", (16, 16), (120, 60, 200))
    mask = Image.new("L", (16, 16), 255)
    for cls, extra in ((StableDiffusionXLImg2ImgPipeline, {"image": image, "strength": 1.0}),
                       (StableDiffusionXLInpaintPipeline, {"image": image, "mask_image": mask, "strength": 1.0})):
        reference = generate_xl(cls.from_pipe(tiny_sdxl_pipeline()), **extra)
        pipe = sepme_adapter.attach(cls.from_pipe(tiny_sdxl_pipeline()))
        pipe.load_sepme(eraser, erase=False)
        assert np.array_equal(generate_xl(pipe, **extra), reference), cls.__name__
        pipe.set_erased(["vangogh"])
        assert not np.array_equal(generate_xl(pipe, **extra), reference), cls.__name__
    for auto in (AutoPipelineForImage2Image, AutoPipelineForInpainting):
        pipe = sepme_adapter.attach(auto.from_pipe(base))
        assert type(pipe).__name__.startswith("StableDiffusionXL") and pipe.load_sepme(eraser) == "vangogh"
        pipe.unload_sepme()
    base.save_pretrained(tmp_path / "xl")
    loaded = load_pipeline(str(tmp_path / "xl"), device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline) and loaded.load_sepme(eraser) == "vangogh"
    subclass = sepme_adapter.SepMEStableDiffusionXLPipeline.from_pretrained(tmp_path / "xl")
    assert subclass.load_sepme(eraser) == "vangogh"


def _train(pipe, iterations):
    config = TrainConfig(max_iterations=iterations, images_per_concept=2, reference_steps=2)
    return train_erasers(pipe, ["vangogh=a painting by van gogh", "picasso=a painting by picasso"],
                         protected=PROTECTED, config=config, progress=False)


def _trained_erasers_toggle_exactly(pipe, erasers):
    pipe = sepme_adapter.attach(recording(pipe))
    kept = ["", *PROTECTED, CONCEPTS["picasso"]]
    original = dict(keys_and_values(pipe, kept))  # a copy: the recording processors keep writing to their log
    reference = unet_output(pipe)
    for eraser in erasers:
        pipe.load_sepme(eraser, erase=False)
    assert torch.equal(unet_output(pipe), reference)
    pipe.set_erased(["vangogh"])
    assert not torch.equal(unet_output(pipe), reference)
    edited = keys_and_values(pipe, kept)
    for key in original:
        assert (edited[key] - original[key]).abs().max() <= 1e-5 * original[key].abs().max(), key


def test_training_on_sdxl_passes_pooled_embeddings_and_time_ids():
    pipe = tiny_sdxl_pipeline()
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("added_cond_kwargs")), with_kwargs=True)
    erasers = _train(pipe, 12)
    handle.remove()
    assert calls and all(c is not None and c["time_ids"].shape[-1] == 6 for c in calls)
    for eraser in erasers:
        rho = eraser.metadata["history"]["rho"]
        assert len(rho) == 12 and rho[-1] < rho[0]
        assert eraser.metadata["pipeline"] == "StableDiffusionXLPipeline" and eraser.certificate <= 1e-5
    _trained_erasers_toggle_exactly(pipe, erasers)


def test_a_v_prediction_pipeline_trains_an_eraser_that_toggles_exactly():
    pipe = sepme_adapter.attach(tiny_pipeline(prediction_type="v_prediction"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    erasers = _train(pipe, 30)
    # L_cor (Eq. 2) on the model's own output (here v) on fixed noisy latents at several timesteps, before
    # (no eraser: mean(D_o^2)) and after training; D is linear in the output, so the objective needs no change
    generator = torch.Generator().manual_seed(11)
    x_t = torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([100, 300, 600, 900])
    text = encode_prompts(pipe, [CONCEPTS["vangogh"], ""])
    concept, blank = text[:1].expand(4, -1, -1), text[1:].expand(4, -1, -1)

    def direction():
        with torch.no_grad():
            return pipe.unet(x_t, timesteps, concept).sample - pipe.unet(x_t, timesteps, blank).sample

    original = direction()
    pipe.load_sepme(erasers[0])
    after = float((original * direction()).mean())
    assert after < 0.8 * float((original * original).mean())
    pipe.unload_sepme()
    for eraser in erasers:
        assert eraser.metadata["history"]["rho"][-1] < eraser.metadata["history"]["rho"][0]
    _trained_erasers_toggle_exactly(pipe, erasers)
