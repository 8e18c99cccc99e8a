"""Erasers as standard LoRA files, and erasers beside a user's own LoRA and IP-Adapter."""

import itertools
import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

import sepme_adapter
from sepme_adapter import Eraser, EraserFileError
from sepme_adapter.fingerprint import fingerprint
from sepme_adapter.hub import SEPME_LORA_KEY, export_lora
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.text import encode_prompts
from sepme_adapter.unet import cross_attention_modules

from .helpers import CONCEPTS

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")

PROMPTS = ["a painting by van gogh", "a painting by picasso", "a painting by cezanne", ""]
ALL_SUBSETS = [list(s) for r in range(0, 4) for s in itertools.combinations(CONCEPTS, r)]


def unet_output(pipe, encoder_hidden_states=None, **kwargs):
    text = encode_prompts(pipe, PROMPTS) if encoder_hidden_states is None else encoder_hidden_states
    latents = torch.randn(len(text), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, 500, text, **kwargs).sample


def user_lora(unet, seed=0, rank=4):
    """A random 'style' LoRA on to_q / to_k / to_v of every attention layer, as diffusers saves them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")) and hasattr(module, "to_q"):
            for proj in ("to_q", "to_k", "to_v"):
                linear = getattr(module, proj)
                state[f"unet.{name}.{proj}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) / 4
                state[f"unet.{name}.{proj}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) / 4
    return state


def explicit(lora=None, lora_scale=1.0, erasers=()):
    """A fresh pipeline whose weights hold `W + lora_scale * B @ A + sum of dW` (the expected combination)."""
    pipe = tiny_pipeline()
    with torch.no_grad():
        for key, lora_a in (lora or {}).items():
            if key.endswith(".lora_A.weight"):
                path = key[len("unet."): -len(".lora_A.weight")]
                lora_b = lora[key.replace("lora_A", "lora_B")]
                pipe.unet.get_submodule(path).weight += lora_scale * lora_b @ lora_a
        for eraser in erasers:
            for path in eraser.weights:
                pipe.unet.get_submodule(path).weight += eraser.delta(path)
    return pipe


def close(a, b):
    return torch.allclose(a, b, rtol=0, atol=2e-5 * float(b.abs().max()))


def dense_eraser(pipe, name="vangogh", seed=5):
    """A G-CiRs-style dense eraser (no basis) on to_k / to_v / to_q / to_out.0 of every attn2."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for path, module in sorted(cross_attention_modules(pipe.unet).items()):
        for proj in ("to_k", "to_v", "to_q", "to_out.0"):
            d_out, d_in = module.get_submodule(proj).weight.shape
            weights[f"{path}.{proj}"] = torch.randn(d_out, d_in, generator=generator) * 300
    return Eraser(name=name, prompt=CONCEPTS[name], basis=None, weights=weights, beta=1e-4,
                  metadata={"base_model": "tiny-random", "fingerprint": fingerprint(pipe)})


# ------------------------------------------------------------------ standard LoRA export
def test_plain_diffusers_lora_route_matches_load_sepme_for_every_subset(pipe, erasers, tmp_path):
    files = export_lora(list(erasers.values()), tmp_path)
    assert [f.name for f in files] == [f"{name}.safetensors" for name in erasers]
    plain = tiny_pipeline()  # no sepme-adapter methods: vanilla diffusers
    for name, file in zip(erasers, files):
        plain.load_lora_weights(str(file), adapter_name=name)
    for eraser in erasers.values():
        pipe.load_sepme(eraser, erase=False)
    original = unet_output(tiny_pipeline())
    for subset in ALL_SUBSETS:
        pipe.set_erased(subset)
        if subset:
            plain.enable_lora()
            plain.set_adapters(subset)  # adapter weights 1.0: the increments add up
        else:
            plain.disable_lora()
        expected = unet_output(pipe)
        assert close(unet_output(plain), expected), subset
        if not subset:
            assert torch.equal(unet_output(plain), original) and torch.equal(expected, original)
        else:
            assert not close(expected, original), subset  # the erasers do act


def test_exported_files_load_back_as_the_same_erasers(pipe, erasers, tmp_path):
    eraser = erasers["picasso"]
    path = export_lora(eraser, tmp_path / "lora" / "picasso.safetensors")[0]
    back = Eraser.load(path)
    assert (back.name, back.prompt, back.known, back.protected, back.beta, back.metadata) == (
        eraser.name, eraser.prompt, eraser.known, eraser.protected, eraser.beta, eraser.metadata)
    assert torch.equal(back.basis, eraser.basis)
    assert all(torch.allclose(back.weights[k], w, rtol=1e-6, atol=0) for k, w in eraser.weights.items())
    assert pipe.load_sepme(path) == "picasso"  # load_sepme accepts exports
    runtime_output = unet_output(pipe)
    pipe.unload_sepme()
    assert sorted(pipe.load_sepme(tmp_path / "lora")) == ["picasso"]  # a folder of exports, too
    pipe.unload_sepme()
    plain = tiny_pipeline()
    plain.load_lora_weights(eraser.to_lora()[0], adapter_name="picasso")  # in memory, no metadata
    assert close(unet_output(plain), runtime_output)


def test_a_dense_eraser_exports_as_an_exact_full_rank_lora(pipe, tmp_path):
    dense = dense_eraser(pipe)
    path = export_lora(dense, tmp_path / "dense.safetensors")[0]
    plain = tiny_pipeline()
    plain.load_lora_weights(str(path), adapter_name="dense")
    pipe.load_sepme(dense)
    expected = unet_output(pipe)
    assert close(unet_output(plain), expected)
    assert close(unet_output(explicit(erasers=[dense])), expected)
    back = Eraser.load(path)
    assert back.basis is None and sorted(back.weights) == sorted(dense.weights)
    assert all(torch.allclose(back.weights[k], w, rtol=1e-6, atol=1e-3) for k, w in dense.weights.items())


def test_damaged_or_foreign_lora_files_are_refused_clearly(erasers, tmp_path):
    path = export_lora(erasers["vangogh"], tmp_path / "v.safetensors")[0]
    tensors, header = sepme_adapter.formats.read_safetensors(path)
    first = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[first] = tensors[first] * 2
    save_file(tensors, tmp_path / "edited.safetensors", metadata=header)
    with pytest.raises(EraserFileError, match="lora_A differs"):
        Eraser.load(tmp_path / "edited.safetensors")
    del tensors[first]
    save_file(tensors, tmp_path / "half.safetensors", metadata=header)
    with pytest.raises(EraserFileError, match="lack lora_A or lora_B"):
        Eraser.load(tmp_path / "half.safetensors")
    del header[SEPME_LORA_KEY]  # someone's own LoRA: no SepME header
    save_file(tensors, tmp_path / "style.safetensors", metadata=header)
    with pytest.raises(EraserFileError, match="plain LoRA file.*load_lora_weights"):
        Eraser.load(tmp_path / "style.safetensors")


# ------------------------------------------------------------------ beside a user's LoRA
def test_a_user_lora_and_erasers_never_change_each_other(pipe, erasers):
    style = user_lora(pipe.unet)
    original = unet_output(pipe)
    pipe.load_lora_weights(style, adapter_name="style")
    lora_only = unet_output(pipe)
    assert close(lora_only, unet_output(explicit(style)))

    pipe.load_sepme(erasers["vangogh"])
    pipe.load_sepme(erasers["picasso"])
    both = unet_output(pipe)
    assert close(both, unet_output(explicit(style, erasers=[erasers["vangogh"], erasers["picasso"]])))

    pipe.set_erased([])  # erasers off: the LoRA's output, bit for bit
    assert torch.equal(unet_output(pipe), lora_only)
    pipe.set_erased(["vangogh", "picasso"])
    pipe.disable_lora()  # LoRA off: the erasure alone
    assert close(unet_output(pipe), unet_output(explicit(erasers=[erasers["vangogh"], erasers["picasso"]])))
    pipe.enable_lora()
    assert torch.equal(unet_output(pipe), both)

    pipe.unload_sepme()  # unloading the erasers leaves the LoRA bit-identical
    assert torch.equal(unet_output(pipe), lora_only)
    assert pipe.get_list_adapters() == {"unet": ["style"]}

    pipe.load_sepme(erasers["cezanne"])
    pipe.unload_lora_weights()  # unloading the LoRA keeps the eraser
    assert pipe.get_erased() == ["cezanne"]
    assert close(unet_output(pipe), unet_output(explicit(erasers=[erasers["cezanne"]])))
    pipe.unload_sepme()
    assert torch.equal(unet_output(pipe), original)


def test_a_lora_loaded_after_the_erasers_and_fusing_both_orders_agree(pipe, erasers):
    style = user_lora(pipe.unet, seed=3)
    pipe.load_sepme(erasers["vangogh"])
    pipe.load_lora_weights(style, adapter_name="style")
    runtime = unet_output(pipe)
    assert close(runtime, unet_output(explicit(style, erasers=[erasers["vangogh"]])))
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.fuse_sepme()  # bakes into the base layer under the PEFT wrapper
    assert close(unet_output(pipe), runtime)
    pipe.unfuse_sepme()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(unet_output(pipe), runtime)


def test_the_lora_scale_in_cross_attention_kwargs_scales_the_lora_but_not_the_erasure(pipe, erasers):
    style = user_lora(pipe.unet, seed=1)
    pipe.load_lora_weights(style, adapter_name="style")
    pipe.load_sepme(erasers["vangogh"])
    scaled = unet_output(pipe, cross_attention_kwargs={"scale": 0.5})
    assert close(scaled, unet_output(explicit(style, lora_scale=0.5, erasers=[erasers["vangogh"]])))


def test_other_cross_attention_kwargs_reach_the_wrapped_processor(pipe, erasers):
    seen = []

    class FlagProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     flag=None):
            seen.append(flag)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    pipe.unet.set_attn_processor(FlagProcessor())
    plain = unet_output(pipe, cross_attention_kwargs={"flag": 7})
    pipe.load_sepme(erasers["vangogh"])
    seen.clear()
    erased = unet_output(pipe, cross_attention_kwargs={"flag": 7})
    assert len(seen) == len(pipe.unet.attn_processors) and set(seen) == {7}
    assert not close(erased, plain)


def ip_adapter_processors(unet, seed=0):
    """IP-Adapter processors on every attn2, installed the way `pipe.load_ip_adapter` installs them."""
    torch.manual_seed(seed)
    processors = {}
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            processor = IPAdapterAttnProcessor2_0(attn.to_k.out_features, attn.to_k.in_features, (4,), scale=0.8)
        processors[name] = processor
    return processors


def test_ip_adapter_processors_keep_the_erasure(pipe, erasers):
    text = encode_prompts(pipe, PROMPTS)
    image_tokens = torch.randn(len(PROMPTS), 4, text.shape[-1], generator=torch.Generator().manual_seed(2))
    with_image = torch.cat([text, image_tokens], dim=1)  # IP processors split off the last 4 tokens
    pipe.load_sepme(erasers["vangogh"])
    pipe.unet.set_attn_processor(ip_adapter_processors(pipe.unet))
    erased = unet_output(pipe, with_image)
    expected_pipe = explicit(erasers=[erasers["vangogh"]])
    expected_pipe.unet.set_attn_processor(ip_adapter_processors(expected_pipe.unet))
    assert close(erased, unet_output(expected_pipe, with_image))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # diffusers' processors, untouched: nothing to warn about
        pipe.set_erased([])
        reference = tiny_pipeline()
        reference.unet.set_attn_processor(ip_adapter_processors(reference.unet))
        assert torch.equal(unet_output(pipe, with_image), unet_output(reference, with_image))
