"""FLUX and SD3 on tiny random-weight pipelines: the increment on `context_embedder` (and the pooled one on
`time_text_embed.text_embedder.linear_1`) keeps the known prompts' context rows exact, toggles, fuses, exports as
a LoRA that the vanilla pipelines' `load_lora_weights` read, and is refused on another base model."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

import sepme_adapter
from sepme_adapter.hub import LORA_FOLDER, base_pipeline_class, export_lora, model_card, push_to_hub
from sepme_adapter.mmdit import CONTEXT_LAYER, MMDIT_POOLED_LAYER
from sepme_adapter.testing import tiny_flux_pipeline, tiny_pipeline, tiny_sd3_pipeline
from sepme_adapter.testing.conformance import random_eraser
from sepme_adapter.text import encode_prompts_pooled, text_sequence_length
from sepme_adapter.training import train_erasers
from sepme_adapter.verify import verify_eraser

from .helpers import CONCEPTS, PROTECTED, first_block_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
CLASSES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
SUBSETS = [list(s) for r in range(1, 4) for s in itertools.combinations(CONCEPTS, r)]
LENGTH = 8  # the tiny pipelines' T5 length (max_sequence_length)


@pytest.fixture(params=sorted(BUILDERS))
def kind(request):
    return request.param


def build(kind, **kwargs):
    return BUILDERS[kind](**kwargs)


def erasers_for(pipe, dtype=torch.float32):
    return {name: random_eraser(pipe, name, CONCEPTS, PROTECTED, seed=i, pooled=True, dtype=dtype)
            for i, name in enumerate(CONCEPTS)}


def float64(pipe):
    """The pipeline in float64, where the null space's exactness is not hidden by float32 round-off."""
    return pipe.to(torch.float64)


def generate(pipe, prompt="a painting by van gogh", **kwargs):
    return pipe(prompt, height=16, width=16, num_inference_steps=2, max_sequence_length=LENGTH,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def transformer_inputs(pipe, prompts):
    """The transformer call for `prompts` at a fixed noisy latent and timestep (what one denoising step does)."""
    text, pooled = encode_prompts_pooled(pipe, prompts)
    n, generator, dtype = len(prompts), torch.Generator().manual_seed(1), pipe.transformer.dtype
    if isinstance(pipe, FluxPipeline):
        ids = FluxPipeline._prepare_latent_image_ids(n, 8, 8, "cpu", dtype)
        inputs = dict(hidden_states=torch.randn(n, 64, 4, generator=generator), encoder_hidden_states=text,
                      pooled_projections=pooled, timestep=torch.full((n,), 0.5), img_ids=ids,
                      txt_ids=torch.zeros(text.shape[1], 3))
    else:
        inputs = dict(hidden_states=torch.randn(n, 4, 16, 16, generator=generator), encoder_hidden_states=text,
                      pooled_projections=pooled, timestep=torch.full((n,), 500.0))
    return {k: v.to(dtype) for k, v in inputs.items()}


def transformer_output(pipe, prompts=("a painting by van gogh", "")):
    with torch.no_grad():
        return pipe.transformer(**transformer_inputs(pipe, list(prompts))).sample


def context_rows(pipe, prompts):
    """What the first joint block reads: the context rows (`context_embedder`'s output) and `temb` (time and
    pooled text, through `time_text_embed`)."""
    return first_block_inputs(pipe, lambda: transformer_output(pipe, prompts))


def test_the_tiny_pipelines_encode_as_the_pipeline_does(kind):
    pipe = build(kind)
    assert text_sequence_length(pipe) == LENGTH and text_sequence_length(tiny_pipeline()) is None
    text, pooled = encode_prompts_pooled(pipe, ["", "a painting by picasso"])
    if kind == "flux":
        own, own_pooled, _ = pipe.encode_prompt("a painting by picasso", None, max_sequence_length=LENGTH)
    else:
        own, _, own_pooled, _ = pipe.encode_prompt("a painting by picasso", None, None, max_sequence_length=LENGTH,
                                                   do_classifier_free_guidance=False)
    assert text.shape[1] == (LENGTH if kind == "flux" else 2 * LENGTH)  # SD3: CLIP rows, then T5 rows
    # the same rows up to the round-off of another batch size (float32: far below 1e-5 of their size)
    assert (text[1] - own[0]).abs().max() <= 1e-5 * own.abs().max()
    assert (pooled[1] - own_pooled[0]).abs().max() <= 1e-5 * own_pooled.abs().max()


def test_attached_but_idle_is_bit_identical_and_unload_restores_the_weights(kind):
    reference = generate(build(kind))
    pipe = sepme_adapter.attach(build(kind))
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    for eraser in erasers_for(pipe).values():
        pipe.load_sepme(eraser, erase=False)
    assert np.array_equal(generate(pipe), reference)
    pipe.set_erased(["vangogh"])
    assert not np.array_equal(generate(pipe), reference)
    pipe.set_erased([])
    assert np.array_equal(generate(pipe), reference)
    pipe.set_erased(["picasso", "cezanne"])
    pipe.unload_sepme()
    assert np.array_equal(generate(pipe), reference)
    assert not hasattr(pipe.transformer, "_sepme_runtime")
    assert not pipe.transformer.context_embedder._forward_hooks
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())


@pytest.mark.parametrize("erased", SUBSETS, ids=lambda s: "+".join(s))
def test_known_prompts_keep_their_context_rows_in_every_subset(kind, erased):
    pipe = sepme_adapter.attach(float64(build(kind)))
    restored = [n for n in CONCEPTS if n not in erased]
    kept = ["", *PROTECTED, *(CONCEPTS[n] for n in restored)]
    changed = [CONCEPTS[n] for n in erased]
    original = context_rows(pipe, kept + changed)
    for eraser in erasers_for(pipe, torch.float64).values():
        pipe.load_sepme(eraser, erase=False)
    pipe.set_erased(erased)
    edited = context_rows(pipe, kept + changed)
    n = len(kept)
    for key in ("context", "temb"):  # temb: the pooled increment's null space keeps the known prompts too
        scale = original[key].abs().max()
        # in float64, c S_p is float64 round-off (~1e-16 of c): far below 1e-10 of the rows' size on any machine
        assert (edited[key][:n] - original[key][:n]).abs().max() <= 1e-10 * scale, key
        assert (edited[key][n:] - original[key][n:]).abs().amax(dim=tuple(range(1, edited[key].ndim))).min() \
            > 1e-2 * scale, key  # every erased concept did change


def test_runtime_fused_and_explicit_weights_agree(kind):
    pipe = sepme_adapter.attach(build(kind))
    erasers = erasers_for(pipe)
    for eraser in erasers.values():
        pipe.load_sepme(eraser, erase=False)
    pipe.set_erased(["vangogh", "cezanne"])
    runtime = transformer_output(pipe)
    explicit = build(kind)
    with torch.no_grad():
        for name in ("vangogh", "cezanne"):
            for path in erasers[name].weights:
                explicit.transformer.get_submodule(path).weight += erasers[name].delta(path)
    assert not torch.allclose(runtime, transformer_output(build(kind)), atol=1e-3)
    torch.testing.assert_close(runtime, transformer_output(explicit), rtol=1e-4, atol=1e-5)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.fuse_sepme()
    assert not torch.equal(pipe.transformer.context_embedder.weight, weights["context_embedder.weight"])
    torch.testing.assert_close(transformer_output(pipe), runtime, rtol=1e-4, atol=1e-5)
    with pytest.raises(sepme_adapter.SepMEStateError, match="fused"):
        pipe.set_erased([])
    pipe.unfuse_sepme()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())
    assert torch.equal(transformer_output(pipe), runtime)


@pytest.mark.parametrize("rank", [None, 2], ids=["full-rank", "rank-2"])
def test_load_lora_weights_of_the_export_equals_set_erased(kind, tmp_path, rank):
    pipe = sepme_adapter.attach(build(kind))
    eraser = erasers_for(pipe)["vangogh"]
    if rank is not None:  # a rank-r eraser on the same bases: w = B A per layer
        generator = torch.Generator().manual_seed(5)
        bases = {p: eraser.basis_for(p).shape[1] for p in eraser.weights}
        eraser = sepme_adapter.Eraser(
            name="vangogh", prompt=eraser.prompt, basis=eraser.basis, beta=eraser.beta, known=eraser.known,
            protected=eraser.protected, metadata=eraser.metadata, pooled_basis=eraser.pooled_basis,
            down={p: torch.randn(rank, m, generator=generator) / m**0.5 for p, m in bases.items()},
            weights={p: torch.randn(w.shape[0], rank, generator=generator) * 2000.0 * bases[p] ** 0.5
                     for p, w in eraser.weights.items()},
        )
    path = export_lora(eraser, tmp_path / "vangogh.safetensors")[0]
    pipe.load_sepme(eraser)
    plain = build(kind)
    assert type(plain) is CLASSES[kind]
    plain.load_lora_weights(str(path), adapter_name="vangogh")
    assert sorted(k for k, _ in plain.transformer.named_modules() if k.endswith("lora_A")) == \
        sorted(f"{p}.lora_A" for p in (CONTEXT_LAYER, MMDIT_POOLED_LAYER))
    torch.testing.assert_close(transformer_output(plain), transformer_output(pipe), rtol=1e-4, atol=1e-5)
    plain.disable_lora()
    assert not torch.allclose(transformer_output(plain), transformer_output(pipe), atol=1e-4)
    read_back = sepme_adapter.Eraser.load(path)  # load_sepme reads the export back
    assert read_back.name == "vangogh" and sorted(read_back.weights) == sorted(eraser.weights)
    with pytest.raises(ValueError, match="kohya layout is for UNet"):
        eraser.to_lora("kohya")


def test_another_base_model_or_family_is_refused(kind, tmp_path):
    pipe = sepme_adapter.attach(build(kind))
    eraser = erasers_for(pipe)["picasso"]
    path = eraser.save(tmp_path / "picasso.safetensors")
    assert pipe.load_sepme(path) == "picasso" and pipe.get_erased() == ["picasso"]
    other = sepme_adapter.attach(build(kind, seed=7))  # same architecture, other weights
    with pytest.raises(sepme_adapter.BaseModelMismatchError, match="trained on base model"):
        other.load_sepme(path)
    assert not hasattr(other.transformer, "_sepme_runtime")  # a refused load leaves nothing behind
    other_kind = build("sd3" if kind == "flux" else "flux")  # the other transformer: its widths differ
    with pytest.raises(sepme_adapter.BaseModelMismatchError):
        sepme_adapter.attach(other_kind).load_sepme(path)
    sd = sepme_adapter.attach(tiny_pipeline())
    with pytest.raises(sepme_adapter.BaseModelMismatchError, match="FLUX / SD3 transformer.*UNet"):
        sd.load_sepme(path)
    sd_eraser = random_eraser(sd, "vangogh", CONCEPTS, PROTECTED)
    with pytest.raises(sepme_adapter.BaseModelMismatchError, match="UNet .* but .* FLUX / SD3 transformer"):
        pipe.load_sepme(sd_eraser)


def test_a_call_at_another_t5_length_is_refused_while_erasing(kind):
    pipe = sepme_adapter.attach(build(kind))
    pipe.load_sepme(erasers_for(pipe)["vangogh"])
    with pytest.raises(sepme_adapter.SepMEStateError, match="max_sequence_length"):
        pipe("a painting by van gogh", height=16, width=16, num_inference_steps=1, max_sequence_length=LENGTH + 4,
             output_type="np")
    pipe.set_erased([])  # nothing erased: any length is the original model
    pipe("a painting by van gogh", height=16, width=16, num_inference_steps=1, max_sequence_length=LENGTH + 4,
         output_type="np")


def test_verify_certificate_and_refused_training_options(kind):
    pipe = sepme_adapter.attach(float64(build(kind)))
    eraser = erasers_for(pipe, torch.float64)["vangogh"]
    report = verify_eraser(pipe, eraser)
    assert report["ok"], report["problems"]
    # float64 rows and basis: what is left is round-off (the certificate computes the increment as fusing does)
    assert report["certificate"] <= 1e-10 and report["concept_change"] > 1e-3
    assert sorted(report["layers"]) == sorted([CONTEXT_LAYER, MMDIT_POOLED_LAYER])
    weak = random_eraser(pipe, "vangogh", CONCEPTS, PROTECTED, scale=1e-6, dtype=torch.float64)
    assert not verify_eraser(pipe, weak)["ok"]  # an increment too small to act fails as inert
    # training works (tests/test_mmdit_training.py); the options that do not carry over are refused by name
    with pytest.raises(sepme_adapter.TrainingError, match="not supported: mode='gcirs'"):
        train_erasers(pipe, ["vangogh=a painting by van gogh"], mode="gcirs")


class FolderHub:
    """`huggingface_hub.HfApi` writing into a local folder (one repo), for `push_to_hub` without a network."""

    def __init__(self, root):
        self.root = root

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def list_repo_files(self, repo_id, revision=None):
        folder = self.root / repo_id
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def hf_hub_download(self, repo_id, filename, revision=None):
        return str(self.root / repo_id / filename)

    def create_commit(self, repo_id, operations, commit_message=None, revision=None):
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(operation.path_or_fileobj)
        return commit_message


def test_push_to_a_folder_hub_then_load_with_sepme_and_with_plain_diffusers(kind, tmp_path, monkeypatch):
    import huggingface_hub

    pipe = sepme_adapter.attach(build(kind))
    erasers = erasers_for(pipe)
    monkeypatch.setattr(huggingface_hub, "HfApi", FolderHub(tmp_path / "hub"))
    push_to_hub([erasers["vangogh"], erasers["picasso"]], "org/erasers")
    repo = tmp_path / "hub" / "org" / "erasers"
    card = (repo / "README.md").read_text()
    pipeline_class = CLASSES[kind].__name__
    assert base_pipeline_class(list(erasers.values())) == pipeline_class
    assert f"{pipeline_class}.from_pretrained" in card and "context_embedder" in card and "kohya" not in card
    assert sorted(pipe.load_sepme(str(repo))) == ["picasso", "vangogh"] and pipe.get_erased() == ["picasso", "vangogh"]
    pipe.set_erased(["picasso"])
    plain = build(kind)
    # the file itself: for a local folder diffusers prefers a top-level file of that name (the eraser) to subfolder
    plain.load_lora_weights(str(repo / LORA_FOLDER / "picasso.safetensors"), adapter_name="p")
    torch.testing.assert_close(transformer_output(plain), transformer_output(pipe), rtol=1e-4, atol=1e-5)
    card = str(model_card([("v.safetensors", erasers["vangogh"])], "org/x"))
    assert "StableDiffusionPipeline" not in card


def test_the_sepme_pipeline_classes_load_from_a_saved_folder(kind, tmp_path):
    base = build(kind)
    eraser = erasers_for(sepme_adapter.attach(base))["vangogh"]
    base.save_pretrained(tmp_path / kind)
    cls = sepme_adapter.SepMEFluxPipeline if kind == "flux" else sepme_adapter.SepMEStableDiffusion3Pipeline
    pipe = cls.from_pretrained(tmp_path / kind)
    pipe.set_progress_bar_config(disable=True)
    reference = generate(pipe)
    assert pipe.load_sepme(eraser) == "vangogh" and pipe.list_sepme()["vangogh"]["pooled"]
    assert not np.array_equal(generate(pipe), reference)
    pipe.unload_sepme()
    assert np.array_equal(generate(pipe), reference)
