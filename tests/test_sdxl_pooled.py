"""SDXL's pooled path: the pooled text embedding enters the UNet through `add_embedding.linear_1`,
not `attn2`, so an eraser also carries a pooled increment `beta * w S_pool^T` on that layer's pooled-text
columns, `S_pool` the null space of the excluded prompts' pooled embeddings. The same guarantees as the
`attn2` increments: nothing erased is bit-identical, excluded prompts keep their added embedding exactly for
every subset, run time == fused == explicit weights, file and LoRA round trips, training."""

import itertools

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import sepme_adapter
from sepme_adapter.errors import EraserFileError
from sepme_adapter.hub import export_lora
from sepme_adapter.testing import tiny_sdxl_pipeline
from sepme_adapter.testing.conformance import random_eraser
from sepme_adapter.text import added_cond_kwargs, encode_prompts_pooled
from sepme_adapter.training import TrainConfig, train_erasers
from sepme_adapter.unet import POOLED_LAYER

from .helpers import (
    CONCEPTS,
    PROTECTED,
    assert_erasing_keeps_the_excluded_prompts_exact,
    recording,
    unet_output,
)

SUBSETS = [list(s) for r in range(1, 4) for s in itertools.combinations(CONCEPTS, r)]


def pooled_erasers(pipe):
    return {name: random_eraser(pipe, name, CONCEPTS, PROTECTED, seed=i, pooled=True) for i, name in enumerate(CONCEPTS)}


def added_embedding(pipe, prompts, zeros=False):
    """`add_embedding`'s output (what the pooled path adds to the time embedding) for each prompt (`zeros`: for
    zero pooled embeddings, SDXL's unconditional branch)."""
    _, pooled = encode_prompts_pooled(pipe, prompts)
    conditions = added_cond_kwargs(pipe, pooled * 0 if zeros else pooled)["added_cond_kwargs"]
    unet = pipe.unet
    with torch.no_grad():
        time_embeds = unet.add_time_proj(conditions["time_ids"].flatten()).reshape(len(prompts), -1)
        return unet.add_embedding(torch.cat([conditions["text_embeds"], time_embeds], dim=-1))


def generate(pipe, prompt="a painting by van gogh"):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=generator, output_type="np").images


def test_the_pooled_increment_changes_only_the_pooled_text_columns_and_idle_is_bit_identical():
    pipe = sepme_adapter.attach(tiny_sdxl_pipeline())
    erasers = pooled_erasers(pipe)
    eraser = erasers["vangogh"]
    width = encode_prompts_pooled(pipe, ["a"])[1].shape[-1]
    delta = eraser.delta(POOLED_LAYER)
    assert delta.shape == pipe.unet.add_embedding.linear_1.weight.shape
    assert delta[:, :width].abs().max() > 0 and not delta[:, width:].any()  # time-id columns untouched
    reference = generate(sepme_adapter.attach(tiny_sdxl_pipeline()))
    for e in erasers.values():
        pipe.load_sepme(e, erase=False)
    assert (generate(pipe) == reference).all()
    pipe.set_erased(["vangogh"])
    assert not (generate(pipe) == reference).all()
    pipe.set_erased([])
    assert (generate(pipe) == reference).all()


@pytest.mark.parametrize("erased", SUBSETS, ids=lambda s: "+".join(s))
def test_excluded_prompts_keep_their_added_embedding_keys_and_values_for_every_subset(erased):
    pipe = sepme_adapter.attach(recording(tiny_sdxl_pipeline()))
    erasers = pooled_erasers(pipe)
    kept = ["", *PROTECTED, *(CONCEPTS[n] for n in CONCEPTS if n not in erased)]
    changed = [CONCEPTS[n] for n in erased]
    before = added_embedding(pipe, kept + changed)
    assert_erasing_keeps_the_excluded_prompts_exact(pipe, erasers, erased)  # attn2 keys and values
    after = added_embedding(pipe, kept + changed)
    n, scale = len(kept), before.abs().max()
    assert (after[:n] - before[:n]).abs().max() <= 1e-5 * scale
    assert (after[n:] - before[n:]).abs().max() > 1e-2 * scale


def test_runtime_fused_and_explicit_weights_agree_with_the_pooled_increment():
    pipe = sepme_adapter.attach(tiny_sdxl_pipeline())
    erasers = pooled_erasers(pipe)
    for eraser in erasers.values():
        pipe.load_sepme(eraser)
    pipe.set_erased(["vangogh", "cezanne"])
    runtime = unet_output(pipe)
    explicit = tiny_sdxl_pipeline()
    without_pooled = tiny_sdxl_pipeline()
    with torch.no_grad():
        for name in ("vangogh", "cezanne"):
            for path in erasers[name].weights:
                explicit.unet.get_submodule(path).weight += erasers[name].delta(path)
                if path != POOLED_LAYER:
                    without_pooled.unet.get_submodule(path).weight += erasers[name].delta(path)
    torch.testing.assert_close(runtime, unet_output(explicit), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(runtime, unet_output(without_pooled), atol=1e-4)  # the pooled increment acts
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.fuse_sepme()
    assert not torch.equal(pipe.unet.add_embedding.linear_1.weight, weights["add_embedding.linear_1.weight"])
    torch.testing.assert_close(unet_output(pipe), runtime, rtol=1e-4, atol=1e-5)
    pipe.unfuse_sepme()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())


def test_file_and_lora_round_trips_keep_the_pooled_basis(tmp_path):
    pipe = sepme_adapter.attach(tiny_sdxl_pipeline())
    eraser = pooled_erasers(pipe)["vangogh"]
    loaded = sepme_adapter.Eraser.load(eraser.save(tmp_path / "vangogh.safetensors"))
    assert torch.equal(loaded.pooled_basis, eraser.pooled_basis)
    assert torch.equal(loaded.delta(POOLED_LAYER), eraser.delta(POOLED_LAYER))
    path = export_lora(eraser, tmp_path / "vangogh-lora.safetensors")[0]
    exported = sepme_adapter.Eraser.load(path)
    delta = eraser.delta(POOLED_LAYER)  # lora_B = beta * w, read back as lora_B / beta: float32 round-off
    assert (exported.delta(POOLED_LAYER) - delta).abs().max() <= 1e-5 * delta.abs().max()
    pipe.load_sepme(eraser)
    plain = tiny_sdxl_pipeline()
    assert isinstance(plain, StableDiffusionXLPipeline)
    plain.load_lora_weights(str(path), adapter_name="vangogh")
    assert hasattr(plain.unet.add_embedding.linear_1, "lora_A")  # diffusers put a LoRA on that layer too
    torch.testing.assert_close(unet_output(plain), unet_output(pipe), rtol=1e-4, atol=1e-5)
    tensors = eraser.state_dict()
    del tensors["pooled_basis"]
    with pytest.raises(EraserFileError, match="pooled increment needs its basis"):
        sepme_adapter.Eraser.from_state_dict(tensors, eraser.header(), source="edited.safetensors")
    sd = sepme_adapter.attach(tiny_sdxl_pipeline(text_widths=(32, 48)))  # another pooled width
    with pytest.raises(sepme_adapter.BaseModelMismatchError):
        sd.load_sepme(eraser)


def _train(pipe, **config):
    settings = dict(max_iterations=12, images_per_concept=2, reference_steps=2) | config
    return train_erasers(pipe, ["vangogh=a painting by van gogh", "picasso=a painting by picasso"],
                         protected=PROTECTED, config=TrainConfig(**settings), progress=False)


@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
def test_training_gives_every_sdxl_eraser_a_solved_exact_pooled_increment(tmp_path, rank):
    pipe = sepme_adapter.attach(tiny_sdxl_pipeline())
    erasers = _train(pipe, rank=rank)
    kept = ["", *PROTECTED, CONCEPTS["picasso"]]
    before = added_embedding(pipe, [*kept, CONCEPTS["vangogh"]])
    for eraser in erasers:
        assert eraser.has_pooled and eraser.certificate <= 1e-5
        assert eraser.metadata["certificate"]["prompts"] == 3  # blank, watermark, the other concept
        assert eraser.metadata["basis"]["pooled_dimensions"] == eraser.pooled_basis.shape[1]
        assert eraser.weights[POOLED_LAYER].abs().max() > 0
        pipe.load_sepme(sepme_adapter.Eraser.load(eraser.save(tmp_path / f"{eraser.name}.safetensors")), erase=False)
    pipe.set_erased(["vangogh"])
    after = added_embedding(pipe, [*kept, CONCEPTS["vangogh"]])
    scale = before.abs().max()
    assert (after[:3] - before[:3]).abs().max() <= 1e-5 * scale and (after[3] - before[3]).abs().max() > 1e-4 * scale
    # the solved pooled increment: the erased concept's prompt gets the unconditional branch's pooled-path output
    unconditional = added_embedding(pipe, [CONCEPTS["vangogh"]], zeros=True)
    assert (after[3] - unconditional[0]).abs().max() <= 1e-3 * (before[3] - unconditional[0]).abs().max()
    pipe.unload_sepme()
    assert not _train(pipe, max_iterations=2, pooled_increment=False)[0].has_pooled
