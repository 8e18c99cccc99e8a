"""Baselines in the same harness: ESD-x, Concept Ablation, Forget-Me-Not and UCE."""

import json

import numpy as np
import pytest
import torch

import sepme_adapter
from sepme_adapter import Eraser, SepMEWarning, TrainingError
from sepme_adapter.baselines import (
    METHODS,
    BaselineConfig,
    capture_attention,
    concept_token_positions,
    esd_loss,
    train_baseline,
)
from sepme_adapter.cli import main
from sepme_adapter.loader import erasure_runtime
from sepme_adapter.pipelines import load_pipeline
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.text import encode_prompts
from sepme_adapter.training import Concept
from sepme_adapter.unet import base_linear, cross_attention_modules

from .helpers import CONCEPTS, PROTECTED, generate, keys_and_values, recording, unet_output

VANGOGH = "van gogh=a painting by van gogh"  # the name appears in the prompt: FMN finds its tokens
PICASSO = "picasso=a painting by picasso"
# A random-weight UNet barely listens to its text, so the tests use larger learning rates than SD needs.
QUICK = dict(images_per_concept=2, reference_steps=2, esd_lr=1e-3, esd_iterations=8, ablation_lr=1e-3,
             ablation_iterations=8, fmn_lr=1e-2, fmn_iterations=6, probe_samples=3)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return tmp_path_factory.mktemp("reference-cache")


def baseline(pipe, references, method, concepts=(VANGOGH,), **kwargs):
    config = BaselineConfig(**{**QUICK, **kwargs.pop("config", {})})
    return train_baseline(pipe, list(concepts), method, config=config, cache_dir=references, progress=False, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_makes_a_dense_eraser_that_the_loader_toggles_bit_exactly(method, references, tmp_path):
    pipe = sepme_adapter.attach(tiny_pipeline())
    before = unet_output(pipe, "a painting by van gogh")
    image = generate(pipe, "a painting by van gogh")
    (eraser,) = baseline(pipe, references, method)
    assert eraser.basis is None and eraser.beta == 1.0 and not eraser.separable
    assert eraser.metadata["training"]["method"] == method and eraser.metadata["fingerprint"]["digest"]
    stats = eraser.metadata["stats"]
    assert stats["seconds"] >= 0 and stats["dtheta_p"] > 0 and "peak_memory_mb" in stats
    assert all(layer.split("attn2.")[-1] in ("to_q", "to_k", "to_v", "to_out.0") for layer in eraser.weights)
    if method == "uce":
        assert all(layer.endswith(("to_k", "to_v")) for layer in eraser.weights) and stats["iterations"] == 0
    assert pipe.list_sepme() == {}  # training leaves nothing loaded
    assert torch.equal(unet_output(pipe, "a painting by van gogh"), before)

    pipe.load_sepme(eraser.save(tmp_path / "eraser.safetensors"))  # through a file: fingerprint checked
    erased = unet_output(pipe, "a painting by van gogh")
    assert (erased - before).abs().max() > 1e-4
    pipe.set_erased([])
    assert torch.equal(unet_output(pipe, "a painting by van gogh"), before)
    assert np.array_equal(generate(pipe, "a painting by van gogh"), image)


def test_dense_baselines_combined_warn_that_there_is_no_separation(pipe, references):
    erasers = baseline(pipe, references, "uce", concepts=(VANGOGH, PICASSO), anchor="a painting")
    assert [e.name for e in erasers] == ["van gogh", "picasso"]
    for eraser in erasers:
        pipe.load_sepme(eraser, erase=False)
    with pytest.warns(SepMEWarning, match="no exact separation"):
        pipe.set_erased(["van gogh", "picasso"])


def test_uce_keeps_preserved_keys_and_values_and_maps_the_concept_to_the_anchor(references):
    pipe = sepme_adapter.attach(recording(tiny_pipeline()))
    kept = ["", CONCEPTS["cezanne"], *PROTECTED]  # blank, other and known concepts, protected prompts
    prompts = [*kept, "a painting by van gogh", "a painting"]
    original = keys_and_values(pipe, prompts)
    # the tiny random text encoder's token embeddings overlap a lot, so preservation needs a larger
    # lambda_p than UCE's default 0.1 (which moves these keys by up to ~25% here)
    (eraser,) = baseline(pipe, references, "uce", anchor="a painting", known=["cezanne=" + CONCEPTS["cezanne"]],
                         protected=PROTECTED, config={"uce_preserve_scale": 10.0})
    assert eraser.metadata["training"]["preserve"] == kept
    pipe.load_sepme(eraser)
    edited = keys_and_values(pipe, prompts)
    # tail alignment (UCE's release): "gogh", end and padding tokens (5-7) -> "painting", end, padding (2-4)
    concept_rows, anchor_rows = slice(5, 8), slice(2, 5)
    for key in original:
        scale = original[key].abs().max()
        assert (edited[key][: len(kept)] - original[key][: len(kept)]).abs().max() <= 0.03 * scale, key
        before = (original[key][3, concept_rows] - original[key][4, anchor_rows]).norm()
        after = (edited[key][3, concept_rows] - original[key][4, anchor_rows]).norm()
        assert after < 0.5 * before, key


def test_uce_is_the_closed_form_of_its_paper(pipe):
    config = BaselineConfig(uce_tokens="all", uce_lambda=0.3, uce_preserve_scale=0.7)
    (eraser,) = train_baseline(pipe, [VANGOGH], "uce", anchor="a painting", config=config, progress=False)
    concept, anchor, preserved = encode_prompts(pipe, ["a painting by van gogh", "a painting", ""]).double()
    layer = next(iter(eraser.weights))
    w = base_linear(pipe.unet.get_submodule(layer)).weight.detach().double()
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    # W' = (sum W c*_i c_i^T + lambda_p sum W c_j c_j^T + lambda W)(sum c_i c_i^T + lambda_p sum c_j c_j^T + lambda I)^-1
    numerator = w @ anchor.T @ concept + 0.7 * w @ preserved.T @ preserved + 0.3 * w
    denominator = concept.T @ concept + 0.7 * preserved.T @ preserved + 0.3 * eye
    expected = numerator @ torch.linalg.inv(denominator)
    assert torch.allclose(w + eraser.delta(layer).double(), expected, atol=1e-4 * float(expected.abs().max()))


def test_the_esd_target_is_negative_guidance_away_from_the_concept(pipe):
    runtime = erasure_runtime(pipe, create=True)
    text = encode_prompts(pipe, ["a painting by van gogh", ""])
    x_t, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([400])
    with torch.no_grad():
        eps_concept, eps_blank = pipe.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), text).sample.chunk(2)
        zero = Eraser("z", "z", None, {layer + ".to_k": torch.zeros_like(base_linear(m.to_k).weight)
                                        for layer, m in cross_attention_modules(pipe.unet).items()}, beta=1.0)
        runtime.add("z", zero)
        loss = esd_loss(pipe.unet, runtime, "z", x_t, t, text[:1], text[1:], eta=1.0)
    # with no change yet: |eps_f - (eps_0 - (eps_f - eps_0))|^2 = 4 |eps_f - eps_0|^2
    assert float(loss) == pytest.approx(4 * float(((eps_concept - eps_blank) ** 2).mean()), rel=1e-4)


@pytest.mark.parametrize("method", ["esd", "ablation"])
def test_esd_and_ablation_losses_fall(pipe, references, method):
    (eraser,) = baseline(pipe, references, method)
    stats, history = eraser.metadata["stats"], eraser.metadata["history"]["loss"]
    assert len(history) == 8 and stats["iterations"] == 8
    assert stats["probe_loss_after"] < 0.7 * stats["probe_loss_before"]  # the same fixed (x_t, t) samples
    assert sum(history[-3:]) < sum(history[:3])
    if method == "ablation":
        assert eraser.metadata["training"]["anchor"] == "a painting"  # the default anchor
        assert all(layer.endswith(("to_k", "to_v")) for layer in eraser.weights)


def test_fmn_moves_attention_off_the_concept_tokens(pipe, references):
    assert concept_token_positions(pipe, Concept.parse(VANGOGH)) == [4, 5]  # BOS a painting by [van gogh]
    assert concept_token_positions(pipe, Concept.parse("vg=a painting by van gogh")) == [1, 2, 3, 4, 5]
    (eraser,) = baseline(pipe, references, "fmn")
    assert eraser.metadata["training"]["tokens"] == ["van</w>", "gogh</w>"]
    assert eraser.metadata["stats"]["probe_loss_after"] < 0.7 * eraser.metadata["stats"]["probe_loss_before"]

    def concept_attention():
        maps = []
        runtime = erasure_runtime(pipe, create=True)
        text = encode_prompts(pipe, ["a painting by van gogh"])
        with torch.no_grad(), capture_attention(runtime, maps):
            pipe.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), 300, text)
        return float(sum(m[..., 4:6].sum() / m.sum() for m in maps))

    before = concept_attention()
    pipe.load_sepme(eraser)
    assert concept_attention() < 0.7 * before
    pipe.set_erased([])
    assert concept_attention() == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("sld", {}, "method must be one of"),
        ("esd", {"anchor": "a painting"}, "anchor applies to"),
        ("ablation", {"anchor": "a painting by van gogh"}, "anchor"),
        ("esd", {"config": {"esd_lr": float("nan")}}, "finite"),
        ("uce", {"config": {"uce_tokens": "some"}}, "uce_tokens"),
    ],
)
def test_bad_input_fails_before_any_work(pipe, tmp_path, method, kwargs, message):
    with pytest.raises(TrainingError, match=message):
        baseline(pipe, tmp_path / "cache", method, **kwargs)
    assert not (tmp_path / "cache").exists()


CLI = ["--concept", "vangogh=a painting by van gogh", "--concept", "picasso=a painting by picasso", "--quiet",
       "--device", "cpu", "--images-per-concept", "2", "--reference-steps", "2"]


def test_sepme_erase_method_uce_works_from_a_saved_model_folder(model_folder, tmp_path, capsys):
    assert main(["erase", "--model", str(model_folder), "--out", str(tmp_path), "--method", "uce",
                 "--anchor", "a painting", "--protect", "watermark", "--uce-lambda", "0.2", *CLI]) == 0
    eraser = Eraser.load(tmp_path / "vangogh.safetensors")
    training = eraser.metadata["training"]
    assert training["method"] == "uce" and training["anchor"] == "a painting" and not eraser.separable
    assert training["config"]["uce_lambda"] == 0.2 and "watermark" in training["preserve"]
    assert json.loads((tmp_path / "training_report.json").read_text())["picasso"]["training"]["method"] == "uce"
    pipe = load_pipeline(str(model_folder), device="cpu")
    assert sorted(pipe.load_sepme(tmp_path, erase=False)) == ["picasso", "vangogh"]
    assert main(["erase", "--model", str(model_folder), "--out", str(tmp_path), "--method", "esd",
                 "--anchor", "x", *CLI]) == 2
    assert "anchor" in capsys.readouterr().err


def test_sepme_eval_compare_puts_every_method_in_one_table(model_folder, tmp_path, capsys):
    folders = {}
    for method, extra in (("uce", []), ("esd", ["--esd-lr", "1e-3", "--esd-iterations", "2"])):
        folders[method] = tmp_path / method
        assert main(["erase", "--model", str(model_folder), "--out", str(folders[method]), "--method", method,
                     *extra, *CLI]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_folder), "--compare", f"uce={folders['uce']}", str(folders["esd"]),
                 "--classifier", "tests.helpers:brightness", "--scenario", "single", "--seeds", "1",
                 "--steps", "2", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(e["method"], e["erased_concepts"]) for e in results["subsets"]] == [
        ("uce", ["picasso"]), ("uce", ["vangogh"]), ("esd", ["picasso"]), ("esd", ["vangogh"])]
    assert all(e["dtheta_p"] > 0 and e["train_seconds"] >= 0 for e in results["subsets"])
    table = (out / "results.md").read_text()
    assert "| uce | vangogh |" in table and "| esd | picasso |" in table and "||dtheta||_p" in table
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "--model", str(model_folder), "--quiet", "--device", "cpu"]) == 2
