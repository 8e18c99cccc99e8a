"""Training erasers: the paper's objective, modes, guarantees, resume and bad input."""

import pytest
import torch

import sepme_adapter
from sepme_adapter import EmptyNullSpaceError, TrainingError
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.training import Concept, TrainConfig, correlation_loss, steps, train_erasers, write_report
from sepme_adapter.training.concepts import merge_concepts

from .helpers import CONCEPTS, PROTECTED, interrupt_training_at, keys_and_values, recording

PAIRS = [f"{n}={p}" for n, p in CONCEPTS.items()]
# A random-weight UNet barely listens to its text, so the tests use a larger beta than SD needs.
QUICK = dict(images_per_concept=2, reference_steps=2, lr=0.1, beta=0.1, max_iterations=12, warmup=2)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return tmp_path_factory.mktemp("reference-cache")


def train(pipe, references, concepts=PAIRS[:2], **kwargs):
    config = TrainConfig(**{**QUICK, **kwargs.pop("config", {})})
    return train_erasers(pipe, concepts, protected=PROTECTED, config=config, cache_dir=references,
                         progress=False, **kwargs)


def test_the_correlation_loss_is_the_mean_of_the_elementwise_product():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(correlation_loss(a, b), (a * b).mean(dim=(1, 2, 3)))


def test_the_loss_falls_and_the_momentum_early_stop_triggers(pipe, references):
    (eraser,) = train(pipe, references, PAIRS[:1], config={"max_iterations": 200, "tau": 0.0, "warmup": 5,
                                                           "stop": "momentum", "objective": "correlation"})
    stats, history = eraser.metadata["stats"], eraser.metadata["history"]["l_cor"]
    assert stats["stopped_early"] and stats["iterations"] < 200
    assert stats["final_l_mom"] <= 0.0
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5
    assert eraser.dtheta_p() > 0 and eraser.metadata["fingerprint"]["digest"]


@pytest.fixture
def pipe64():
    """The tiny pipeline in float64: batched and single UNet calls then agree far below any tolerance, on any
    CPU (in float32 their round-off differs by kernel, and Adam amplifies it where a gradient is ~0)."""
    return sepme_adapter.attach(tiny_pipeline().to(torch.float64))


def assert_same_erasers(first, second):
    """Same names and bases; loss histories and increments equal to 1e-6 relative."""
    assert [e.name for e in first] == [e.name for e in second]
    for a, b in zip(first, second):
        assert torch.equal(a.basis, b.basis)
        assert a.metadata["history"]["l_cor"] == pytest.approx(b.metadata["history"]["l_cor"], rel=1e-6)
        for layer, w in a.weights.items():
            assert w.dtype == torch.float64 and a.delta(layer).norm() > 0, layer
            assert (w - b.weights[layer]).norm() <= 1e-6 * w.norm(), layer


def test_separate_mode_gives_the_same_erasers_as_simultaneous(pipe64, references):
    together = train(pipe64, references, PAIRS, mode="simultaneous")
    one_by_one = train(pipe64, references, PAIRS, mode="separate")
    assert_same_erasers(together, one_by_one)


def test_iterative_bases_only_know_earlier_concepts_and_start_with_gcirs(pipe, references):
    erasers = train(pipe, references, PAIRS, mode="iterative")
    assert [e.name for e in erasers] == list(CONCEPTS)
    first, second, third = erasers
    assert not first.separable and first.metadata["training"]["method"] == "gcirs"
    assert any(layer.endswith("to_q") for layer in first.weights)
    assert second.known == {"vangogh": [CONCEPTS["vangogh"]]}  # known concepts are prompt lists
    assert third.known == {"vangogh": [CONCEPTS["vangogh"]], "picasso": [CONCEPTS["picasso"]]}
    pipe.load_sepme(first, erase=False)  # the loader toggles a G-CiRs increment too
    pipe.load_sepme(second, erase=False)
    pipe.set_erased(["vangogh"])
    with pytest.warns(sepme_adapter.SepMEWarning, match="no exact separation"):
        pipe.set_erased(["vangogh", "picasso"])  # a dense increment carries no separation guarantee


def test_gcirs_mode_trains_one_shared_dense_increment(pipe, references):
    (eraser,) = train(pipe, references, PAIRS[:2], mode="gcirs")
    assert eraser.name == "vangogh+picasso" and not eraser.separable
    assert eraser.metadata["training"]["concepts"] == [CONCEPTS["vangogh"], CONCEPTS["picasso"]]


def test_trained_erasers_keep_blank_known_and_protected_keys_and_values(references):
    pipe = sepme_adapter.attach(recording(tiny_pipeline()))
    erasers = train(pipe, references, PAIRS)
    kept = ["", *PROTECTED, CONCEPTS["picasso"], CONCEPTS["cezanne"]]
    original = keys_and_values(pipe, kept + [CONCEPTS["vangogh"]])
    for eraser in erasers:
        pipe.load_sepme(eraser, erase=False)
    pipe.set_erased(["vangogh"])
    edited = keys_and_values(pipe, kept + [CONCEPTS["vangogh"]])
    for key in original:
        scale = original[key].abs().max()
        assert (edited[key][:-1] - original[key][:-1]).abs().max() <= 1e-5 * scale, key
        assert (edited[key][-1] - original[key][-1]).abs().max() > 1e-7 * scale, key


def test_an_interrupted_run_resumes_to_the_same_result(pipe, references, tmp_path, monkeypatch):
    expected = train(pipe, references, PAIRS[:2])
    restore = interrupt_training_at(monkeypatch, 2 * 6 + 1)  # two concepts per iteration: stops in iteration 7
    with pytest.raises(KeyboardInterrupt):
        train(pipe, references, PAIRS[:2], checkpoint_dir=tmp_path)
    assert (tmp_path / "group-0" / "checkpoint.safetensors").is_file()
    restore()
    resumed = train(pipe, references, PAIRS[:2], checkpoint_dir=tmp_path, resume=True)
    for a, b in zip(expected, resumed):
        assert a.metadata["history"]["l_cor"] == pytest.approx(b.metadata["history"]["l_cor"], rel=1e-5)
        for layer in a.weights:
            assert torch.allclose(a.weights[layer], b.weights[layer], atol=1e-6), layer
    with pytest.raises(TrainingError, match="other settings"):
        train(pipe, references, PAIRS[:2], checkpoint_dir=tmp_path, resume=True, config={"lr": 0.5})


def test_a_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_increment(
        pipe, references, monkeypatch, tmp_path):
    real, calls = steps.correlation_loss, {"n": 0}

    def poisoned(a, b):
        calls["n"] += 1
        loss = real(a, b)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(steps, "correlation_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite at iteration 4.*last finite"):
        train(pipe, references, PAIRS[:1], checkpoint_dir=tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "group-0" / "checkpoint.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in saved.items() if "/w/" in k)
    assert pipe.list_sepme() == {}  # nothing left loaded on the pipeline


@pytest.mark.parametrize(
    "concepts, kwargs, error, message",
    [
        ([], {}, TrainingError, "no concept"),
        (["a=x", "b=x"], {}, TrainingError, "share a prompt"),
        (PAIRS[:1], {"known": ["vangogh=a painting"]}, TrainingError, "repeated"),
        (PAIRS[:1], {"known": ["other=a painting by van gogh"]}, TrainingError, "same prompt"),
        (PAIRS[:1], {"mode": "fastest"}, TrainingError, "mode must be"),
        (PAIRS[:1], {"config": {"lr": float("nan")}}, TrainingError, "finite"),
        (PAIRS[:1], {"config": {"lam": -1.0}}, TrainingError, ">= 0"),
        (PAIRS[:1], {"reference_images": "/nonexistent/folder"}, TrainingError, "missing or has no images"),
        (PAIRS[:1], {"known": [f"k{i}{j}={a} {b}" for i, a in enumerate("dog cat church photo".split())
                                for j, b in enumerate("drawing the of monet".split())],
                      "config": {"max_leakage": 0}},  # exact bases only
         EmptyNullSpaceError, "fewer known"),
    ],
)
def test_bad_input_fails_before_any_work(pipe, tmp_path, concepts, kwargs, error, message):
    config = TrainConfig(**{**QUICK, **kwargs.pop("config", {})})
    with pytest.raises(error, match=message):
        train_erasers(pipe, concepts, config=config, cache_dir=tmp_path / "cache", progress=False, **kwargs)
    assert not (tmp_path / "cache").exists()  # no reference image was generated


def test_concepts_parse_names_and_prompts():
    assert Concept.parse("vangogh=a painting by van gogh") == Concept("vangogh", "a painting by van gogh")
    assert Concept.parse("Van Gogh") == Concept("Van Gogh", "Van Gogh")
    styled = Concept.from_templates("vangogh", "style", "van gogh")
    assert styled.prompt == "a painting by van gogh" and "van gogh style" in styled.prompts
    assert merge_concepts([Concept.parse("a=x"), Concept.parse("b=z"), Concept.parse("a=y")]) == [
        Concept("a", prompts=("x", "y")), Concept("b", "z")]  # a repeated name adds prompts


def test_a_concept_given_as_several_prompts_trains_on_all_of_them_and_its_file_records_them(pipe, tmp_path):
    vangogh = Concept("vangogh", prompts=("a painting by van gogh", "van gogh style"))
    picasso = Concept("picasso", prompts=("a painting by picasso", "picasso style"))
    erasers = train_erasers(pipe, [vangogh, picasso], config=TrainConfig(**QUICK), cache_dir=tmp_path,
                            progress=False)
    by_name = {e.name: e for e in erasers}
    assert by_name["vangogh"].prompts == list(vangogh.prompts)
    assert by_name["vangogh"].known == {"picasso": list(picasso.prompts)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # reference images for every prompt
        p.name for p in tmp_path.iterdir() if any(w in p.name for w in ("van-gogh", "picasso")))
    assert len(list(tmp_path.iterdir())) == 4
    record = by_name["vangogh"].metadata["certificate"]
    assert record["prompts"] == 1 + 2 and record["max_leakage"] <= 1e-5  # exact basis: round-off only
    assert by_name["vangogh"].metadata["basis"]["kind"] == "exact+contrastive"  # inside the exact null space


def test_the_report_has_json_and_a_loss_curve_png(pipe, references, tmp_path):
    json_path, png_path = write_report(train(pipe, references, PAIRS[:2]), tmp_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vangogh" in json_path.read_text()


def test_reference_images_are_cached_and_reused(pipe, tmp_path):
    train(pipe, tmp_path, PAIRS[:1])
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "latents.safetensors", "manifest.json"]
    stamp = (folder / "latents.safetensors").stat().st_mtime_ns
    train(pipe, tmp_path, PAIRS[:1])
    assert (folder / "latents.safetensors").stat().st_mtime_ns == stamp


def test_user_reference_folders_are_used(pipe, tmp_path):
    from PIL import Image

    for name in ("vangogh",):
        (tmp_path / name).mkdir()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / name / "a.png")
    (eraser,) = train_erasers(pipe, PAIRS[:1], config=TrainConfig(**QUICK), reference_images=tmp_path,
                              progress=False)
    assert eraser.metadata["stats"]["iterations"] > 0


def test_gcirs_on_several_concepts_checkpoints_and_resumes(pipe, references, tmp_path):
    (whole,) = train(pipe, references, PAIRS[:2], mode="gcirs", checkpoint_dir=tmp_path / "a")
    (resumed,) = train(pipe, references, PAIRS[:2], mode="gcirs", checkpoint_dir=tmp_path / "a", resume=True)
    assert resumed.metadata["history"]["l_cor"] == whole.metadata["history"]["l_cor"]  # nothing left to do


def test_one_concept_per_graph_pass_trains_the_same_erasers(pipe64, references):
    batched = train(pipe64, references, PAIRS)
    chunked = train(pipe64, references, PAIRS, config={"concepts_per_pass": 1})
    assert_same_erasers(batched, chunked)


def test_protect_templates_adds_the_phrasings_around_the_names_to_every_basis(pipe, tmp_path):
    from sepme_adapter.training.concepts import template_stems

    concepts = [Concept("van gogh", prompts=("a painting by van gogh", "van gogh style"))]
    stems = template_stems(concepts)
    assert stems[:2] == ["a painting by", "style"] and "in the style of" in stems
    erasers = train_erasers(pipe, [*concepts, Concept("picasso", "a painting by picasso")],
                            config=TrainConfig(**QUICK, protect_templates=True), cache_dir=tmp_path, progress=False)
    assert all(set(stems) <= set(e.protected) for e in erasers)
    assert all(e.certificate is not None for e in erasers)  # the stems are covered by the certificate
