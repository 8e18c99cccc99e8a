"""The guarantees of the core adapter on tiny random-weight pipelines."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

import sepme_adapter
from sepme_adapter import BaseModelMismatchError, ErasureNotAppliedError, SepMEStateError, SepMEWarning
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.text import encode_prompts

from .helpers import (
    CONCEPTS,
    assert_erasing_keeps_the_excluded_prompts_exact,
    generate,
    keys_and_values,
    make_eraser,
    recording,
    unet_output,
)

SUBSETS = [list(s) for r in range(1, 4) for s in itertools.combinations(CONCEPTS, r)]


def test_nothing_erased_is_bit_identical_to_a_pipeline_that_never_loaded_an_eraser(pipe, erasers, tmp_path):
    reference = generate(sepme_adapter.attach(tiny_pipeline()), "a painting by van gogh")
    for eraser in erasers.values():
        pipe.load_sepme(eraser)
    erased = generate(pipe, "a painting by van gogh")
    assert not np.array_equal(erased, reference)  # the erasers do act
    pipe.set_erased([])
    assert np.array_equal(generate(pipe, "a painting by van gogh"), reference)
    pipe.set_erased(["picasso"])
    pipe.unload_sepme()
    assert np.array_equal(generate(pipe, "a painting by van gogh"), reference)


def every_forward_hook(module):
    return [h for m in module.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]


def test_erasers_leave_the_processors_alone_and_unloading_leaves_no_trace(pipe, erasers):
    before = dict(pipe.unet.attn_processors)
    state_keys = set(pipe.unet.state_dict())
    pipe.load_sepme(erasers["vangogh"])
    assert set(pipe.unet.state_dict()) == state_keys  # nothing of SepME's in save_pretrained
    loaded = pipe.unet.attn_processors  # diffusers' own processors, the same objects
    assert before.keys() == loaded.keys() and all(before[k] is loaded[k] for k in before)
    pipe.unload_sepme(["vangogh"])
    after = pipe.unet.attn_processors
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert not every_forward_hook(pipe.unet) and "save_pretrained" not in vars(pipe.unet)


@pytest.mark.parametrize("erased", SUBSETS, ids=lambda s: "+".join(s))
def test_blank_known_and_protected_prompts_keep_their_keys_and_values(erased):
    pipe = sepme_adapter.attach(recording(tiny_pipeline()))
    erasers = {name: make_eraser(pipe, name, seed=i) for i, name in enumerate(CONCEPTS)}
    # exact for the blank prompt, the protected prompts and every concept an active eraser knows
    assert_erasing_keeps_the_excluded_prompts_exact(pipe, erasers, erased)


def test_restoring_a_concept_gives_it_the_original_keys_and_values():
    pipe = sepme_adapter.attach(recording(tiny_pipeline()))
    original = keys_and_values(pipe, [CONCEPTS["picasso"]])
    for i, name in enumerate(CONCEPTS):
        pipe.load_sepme(make_eraser(pipe, name, seed=i))
    assert pipe.get_erased() == list(CONCEPTS)
    pipe.set_erased(["vangogh", "cezanne"])  # picasso restored
    restored = keys_and_values(pipe, [CONCEPTS["picasso"]])
    for key in original:
        assert torch.allclose(restored[key], original[key], rtol=0, atol=1e-5 * original[key].abs().max())


def test_runtime_fused_and_explicit_weights_agree(pipe, erasers):
    for eraser in erasers.values():
        pipe.load_sepme(eraser)
    pipe.set_erased(["vangogh", "cezanne"])
    runtime = unet_output(pipe)

    explicit = tiny_pipeline()
    with torch.no_grad():
        for name in ("vangogh", "cezanne"):
            for path in erasers[name].weights:
                explicit.unet.get_submodule(path).weight += erasers[name].delta(path)
    assert torch.allclose(runtime, unet_output(explicit), atol=1e-5)

    original_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.fuse_sepme()
    assert torch.allclose(unet_output(pipe), runtime, atol=1e-5)
    with pytest.raises(SepMEStateError, match="unfuse_sepme"):
        pipe.set_erased([])
    with pytest.raises(SepMEStateError, match="already fused"):
        pipe.fuse_sepme()
    pipe.unfuse_sepme()
    assert all(torch.equal(v, original_weights[k]) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(SepMEStateError, match="nothing is fused"):
        pipe.unfuse_sepme()
    assert torch.equal(unet_output(pipe), runtime)


def test_loading_from_a_file_and_a_folder(pipe, erasers, tmp_path):
    for name, eraser in erasers.items():
        eraser.save(tmp_path / f"{name}.safetensors")
    assert pipe.load_sepme(tmp_path / "vangogh.safetensors") == "vangogh"
    assert pipe.load_sepme(str(tmp_path), weight_name="picasso.safetensors", adapter_name="pc") == "pc"
    assert sorted(pipe.list_sepme()) == ["pc", "vangogh"]
    assert pipe.list_sepme()["pc"]["known"] == erasers["picasso"].known
    pipe.unload_sepme()
    assert sorted(pipe.load_sepme(tmp_path)) == sorted(CONCEPTS)  # a folder loads every eraser in it


def test_bad_names_are_refused_with_the_loaded_ones_listed(pipe, erasers):
    pipe.load_sepme(erasers["vangogh"])
    with pytest.raises(KeyError, match=r"\['monet'\].*loaded: \['vangogh'\]"):
        pipe.set_erased(["monet"])
    with pytest.raises(TypeError, match="list of names"):
        pipe.set_erased("vangogh")
    with pytest.raises(ValueError, match="more than once"):
        pipe.set_erased(["vangogh", "vangogh"])
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_sepme(erasers["vangogh"])
    assert pipe.get_erased() == ["vangogh"]


def test_an_eraser_for_another_width_or_another_base_model_is_refused(erasers, pipe):
    wider = sepme_adapter.attach(tiny_pipeline(text_width=96))
    with pytest.raises(BaseModelMismatchError, match="another model|text embeddings"):
        wider.load_sepme(erasers["vangogh"])
    assert wider.list_sepme() == {} and not every_forward_hook(wider.unet)
    other_base = sepme_adapter.attach(tiny_pipeline(seed=7))
    with pytest.raises(BaseModelMismatchError, match="allow_base_mismatch=True"):
        other_base.load_sepme(erasers["vangogh"])
    with pytest.warns(SepMEWarning, match="loaded anyway"):
        other_base.load_sepme(erasers["vangogh"], allow_base_mismatch=True)


def test_an_eraser_without_fingerprint_loads_with_a_warning(pipe):
    with pytest.warns(SepMEWarning, match="no base-model fingerprint"):
        pipe.load_sepme(make_eraser(pipe, "vangogh", with_fingerprint=False))


def test_same_model_in_half_precision_matches_the_fingerprint(erasers):
    half = sepme_adapter.attach(tiny_pipeline())
    half.unet.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SepMEWarning)
        half.load_sepme(erasers["vangogh"])


def test_combinations_without_a_separation_guarantee_warn(pipe):
    lone = make_eraser(pipe, "vangogh", concepts={"vangogh": CONCEPTS["vangogh"]})
    pipe.load_sepme(lone)
    with pytest.warns(SepMEWarning, match="no exact separation"):
        pipe.load_sepme(make_eraser(pipe, "picasso"))


def test_attention_slicing_on_and_off_keeps_the_erasure_without_a_word(pipe, erasers):
    pipe.load_sepme(erasers["vangogh"])
    expected = unet_output(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the processors are diffusers' business: nothing to re-wrap
        pipe.enable_attention_slicing(1)
        assert torch.allclose(unet_output(pipe), expected, atol=1e-5)
        pipe.disable_attention_slicing()
        assert torch.equal(unet_output(pipe), expected)


def test_fused_qkv_projections_keep_the_erasure(pipe, erasers):
    pipe.load_sepme(erasers["vangogh"])
    expected = unet_output(pipe)
    pipe.fuse_qkv_projections()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(unet_output(pipe), expected, atol=1e-5)  # the fused to_kv gets both increments
    pipe.unfuse_qkv_projections()
    assert torch.equal(unet_output(pipe), expected)


def test_a_processor_that_bypasses_to_k_is_refused_loudly(pipe, erasers):
    class Bypass(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            return hidden_states

    pipe.load_sepme(erasers["vangogh"])
    pipe.unet.set_attn_processor(Bypass())
    with pytest.raises(ErasureNotAppliedError, match="Bypass at .*attn2 computed attention without calling"):
        unet_output(pipe)
    pipe.set_erased([])  # nothing erased: nothing to apply, nothing refused
    unet_output(pipe)


@pytest.mark.parametrize("cls", [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline])
def test_img2img_and_inpaint_pipelines_erase_too(cls, erasers):
    base = tiny_pipeline()
    pipe = sepme_adapter.attach(cls(**base.components, requires_safety_checker=False))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    kwargs = {"image": image, "num_inference_steps": 4, "strength": 0.9, "output_type": "np"}
    if cls is StableDiffusionInpaintPipeline:
        kwargs.update(mask_image=torch.ones(1, 1, 16, 16), height=16, width=16)
    before = pipe("a painting by van gogh", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_sepme(erasers["vangogh"])
    after = pipe("a painting by van gogh", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not np.array_equal(before, after)
    pipe.set_erased([])
    assert np.array_equal(before, pipe("a painting by van gogh", generator=torch.Generator().manual_seed(0),
                                       **kwargs).images)


def test_the_subclass_pipeline_has_the_methods(pipe):
    sub = sepme_adapter.SepMEStableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    assert sub.get_erased() == [] and sepme_adapter.attach(sub) is sub


def test_fusing_refuses_fused_projections_and_weights_changed_in_between(pipe, erasers):
    pipe.load_sepme(erasers["vangogh"])
    pipe.fuse_qkv_projections()
    with pytest.raises(SepMEStateError, match="unfuse_qkv_projections"):
        pipe.fuse_sepme()
    pipe.unfuse_qkv_projections()
    pipe.fuse_sepme()
    weight = pipe.unet.get_submodule(next(iter(erasers["vangogh"].weights))).weight
    fused = weight.detach().clone()
    with torch.no_grad():
        weight += 0.5  # e.g. fuse_lora after fuse_sepme
        weight.copy_(fused)  # e.g. unfuse_lora: back to the fused weights
    with warnings.catch_warnings():
        warnings.simplefilter("error", SepMEWarning)
        pipe.unfuse_sepme()  # unchanged since fuse_sepme: the exact saved copy, no warning
    assert torch.equal(pipe.unet.get_submodule(next(iter(erasers["vangogh"].weights))).weight,
                       tiny_pipeline().unet.get_submodule(next(iter(erasers["vangogh"].weights))).weight)


def test_increments_reused_across_denoising_steps_follow_in_place_edits_and_toggles(pipe, erasers):
    pipe.load_sepme(erasers["vangogh"])
    text = encode_prompts(pipe, [CONCEPTS["vangogh"], ""])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = pipe.unet(latents, 500, text).sample
        assert torch.equal(pipe.unet(latents, 500, text).sample, first)  # the cached step
        text[0] = encode_prompts(pipe, [CONCEPTS["picasso"]])[0]  # edited in place: recomputed
        assert torch.equal(pipe.unet(latents, 500, text).sample, pipe.unet(latents, 500, text.clone()).sample)
        pipe.set_erased([])
        plain = pipe.unet(latents, 500, text).sample
    reference = tiny_pipeline()
    with torch.no_grad():
        assert torch.equal(plain, reference.unet(latents, 500, text).sample)
