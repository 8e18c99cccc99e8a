"""Rank-r erasers: `dW = beta * B @ (A S_p^T)`, a small standard LoRA that keeps SepME's exactness."""

import itertools

import pytest
import torch

import sepme_adapter
from sepme_adapter import BaseModelMismatchError, EraserFileError
from sepme_adapter.certificate import leakage_certificate
from sepme_adapter.formats import read_safetensors
from sepme_adapter.hub import export_lora, file_size, model_card
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.training import TrainConfig, train_erasers
from sepme_adapter.unet import layer_weight
from sepme_adapter.verify import verify_eraser

from .helpers import (
    CONCEPTS,
    PROTECTED,
    assert_erasing_keeps_the_excluded_prompts_exact,
    interrupt_training_at,
    make_eraser,
    make_rank_eraser,
    recording,
    unet_output,
)

SUBSETS = [list(s) for r in range(1, 4) for s in itertools.combinations(CONCEPTS, r)]
PAIRS = [f"{n}={p}" for n, p in CONCEPTS.items()]
# as tests/test_training.py: a random-weight UNet barely listens to its text, so a large beta
QUICK = dict(images_per_concept=2, reference_steps=2, lr=0.1, beta=0.1, max_iterations=8, warmup=2, rank=2,
             basis="exact")  # rank r < the basis dimensions (a contrastive basis has 2: full rank is already small)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return tmp_path_factory.mktemp("reference-cache")


def train(pipe, references, concepts=PAIRS, **kwargs):
    config = TrainConfig(**{**QUICK, **kwargs.pop("config", {})})
    return train_erasers(pipe, concepts, protected=PROTECTED, config=config, cache_dir=references,
                         progress=False, **kwargs)


@pytest.mark.parametrize("stored", [False, True], ids=["as-trained", "from-file"])
@pytest.mark.parametrize("erased", SUBSETS, ids=lambda s: "+".join(s))
def test_rank_r_erasers_keep_blank_known_and_protected_keys_and_values_exact(erased, stored):
    pipe = sepme_adapter.attach(recording(tiny_pipeline()))
    erasers = {name: make_rank_eraser(pipe, name, rank=r, seed=i, stored=stored)
               for i, (name, r) in enumerate(zip(CONCEPTS, (1, 2, 4)))}
    assert_erasing_keeps_the_excluded_prompts_exact(pipe, erasers, erased)


def test_a_rank_r_file_holds_only_the_low_rank_factors_and_round_trips(pipe, tmp_path):
    eraser = make_rank_eraser(pipe, "vangogh", rank=4)
    path = eraser.save(tmp_path / "vangogh.safetensors")
    tensors, header = read_safetensors(path)
    assert "basis" not in tensors and header["rank"] == "4" and header["format_version"] == "2"
    layers = sorted(eraser.weights)
    assert sorted(tensors) == sorted([f"{p}.down" for p in layers] + [f"{p}.w" for p in layers])
    for layer in layers:
        assert tensors[f"{layer}.down"].shape == (4, eraser.text_width)
        assert tensors[f"{layer}.w"].shape == (eraser.weights[layer].shape[0], 4)
    loaded = sepme_adapter.Eraser.load(path)
    assert loaded.rank == 4 and loaded.separable and loaded.basis is None
    assert loaded.text_width == eraser.text_width and loaded.known == eraser.known
    for layer in layers:
        torch.testing.assert_close(loaded.delta(layer), eraser.delta(layer), rtol=1e-6, atol=0)
    assert file_size(eraser) == path.stat().st_size
    full = make_eraser(pipe, "vangogh")
    assert path.stat().st_size < full.save(tmp_path / "full.safetensors").stat().st_size
    listed = sepme_adapter.attach(tiny_pipeline())
    listed.load_sepme(path)
    assert listed.list_sepme()["vangogh"]["rank"] == 4 and listed.list_sepme()["vangogh"]["separable"]


def test_run_time_increments_fused_weights_and_explicit_deltas_agree_for_rank_r(tmp_path):
    pipe = sepme_adapter.attach(tiny_pipeline())
    erasers = [make_rank_eraser(pipe, "vangogh", rank=4, stored=True), make_rank_eraser(pipe, "picasso", rank=1, seed=1)]
    for eraser in erasers:
        pipe.load_sepme(eraser)
    run_time = unet_output(pipe)
    pipe.fuse_sepme()
    fused = unet_output(pipe)
    pipe.unfuse_sepme()
    explicit = sepme_adapter.attach(tiny_pipeline())
    with torch.no_grad():
        for layer in erasers[0].weights:
            weight = layer_weight(explicit.unet, layer)
            weight += sum(e.delta(layer) for e in erasers)
    torch.testing.assert_close(run_time, fused, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run_time, unet_output(explicit), rtol=1e-4, atol=1e-5)
    pipe.set_erased([])
    torch.testing.assert_close(unet_output(pipe), unet_output(sepme_adapter.attach(tiny_pipeline())), rtol=0, atol=0)


def test_the_diffusers_lora_export_of_a_rank_r_eraser_is_rank_r_and_equals_set_erased(tmp_path):
    pipe = sepme_adapter.attach(tiny_pipeline())
    eraser = make_rank_eraser(pipe, "vangogh", rank=2)
    path = export_lora(eraser, tmp_path / "lora.safetensors")[0]
    tensors, _ = read_safetensors(path)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {2}
    pipe.load_sepme(eraser)
    plain = tiny_pipeline()
    plain.load_lora_weights(str(path), adapter_name="vangogh")
    torch.testing.assert_close(unet_output(plain), unet_output(pipe), rtol=1e-4, atol=1e-5)
    again = sepme_adapter.Eraser.load(path)  # load_sepme reads the export back
    assert again.rank == 2
    for layer in eraser.weights:
        expected = eraser.delta(layer)  # float32 round-off of beta * B / beta, relative to the increment
        torch.testing.assert_close(again.delta(layer), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_certificate_and_verify_handle_rank_r_erasers(pipe):
    eraser = make_rank_eraser(pipe, "vangogh", rank=4, stored=True)
    assert leakage_certificate(pipe, eraser)["max_leakage"] < 1e-5
    report = verify_eraser(pipe, eraser)
    assert report["ok"], report["problems"]
    card = str(model_card([("vangogh.safetensors", eraser)], "org/erasers"))
    assert "| 4 |" in card and "rank 4, file size" in card


def test_malformed_or_misfitting_rank_r_erasers_are_refused(pipe, tmp_path):
    eraser = make_rank_eraser(pipe, "vangogh", rank=3, stored=True)
    layer = sorted(eraser.weights)[0]
    tensors, header = eraser.state_dict(), eraser.header()
    bad = dict(tensors)
    bad[f"{layer}.down"] = bad[f"{layer}.down"][:2]  # rank 2 down-projection, rank 3 B
    with pytest.raises(EraserFileError, match="r must match"):
        sepme_adapter.Eraser.from_state_dict(bad, header)
    missing = {k: v for k, v in tensors.items() if k != f"{layer}.down"}
    with pytest.raises(EraserFileError, match="down-projection per layer"):
        sepme_adapter.Eraser.from_state_dict(missing, header)
    with pytest.raises(EraserFileError, match="no basis"):
        sepme_adapter.Eraser.from_state_dict({**tensors, "basis": torch.eye(eraser.text_width)}, header)
    wide = sepme_adapter.attach(tiny_pipeline(text_width=96))
    with pytest.raises(BaseModelMismatchError):
        wide.load_sepme(eraser)


def test_training_at_rank_r_gives_exact_rank_r_erasers_and_separate_equals_simultaneous(references, tmp_path):
    pipe = sepme_adapter.attach(tiny_pipeline().to(torch.float64))  # float64: modes agree far below tolerance
    together = train(pipe, references, mode="simultaneous")
    one_by_one = train(pipe, references, mode="separate")
    for a, b in zip(together, one_by_one):
        assert a.rank == 2 and a.metadata["training"]["config"]["rank"] == 2
        assert a.certificate is not None and a.certificate < 1e-6  # exact basis (<= 1e-5 promised)
        for layer in a.weights:
            assert a.down[layer].shape == (2, a.basis.shape[1]) and a.delta(layer).norm() > 0, layer
            assert (a.delta(layer) - b.delta(layer)).norm() <= 1e-6 * a.delta(layer).norm(), layer
        loaded = sepme_adapter.Eraser.load(a.save(tmp_path / f"{a.name}.safetensors"))
        assert loaded.rank == 2 and loaded.basis is None


def test_an_interrupted_rank_r_run_resumes_to_the_same_result(pipe, references, tmp_path, monkeypatch):
    expected = train(pipe, references, PAIRS[:2])
    restore = interrupt_training_at(monkeypatch, 2 * 4 + 1)  # two concepts per iteration: stops in iteration 5
    with pytest.raises(KeyboardInterrupt):
        train(pipe, references, PAIRS[:2], checkpoint_dir=tmp_path, config={"checkpoint_every": 2})
    restore()
    resumed = train(pipe, references, PAIRS[:2], checkpoint_dir=tmp_path, resume=True, config={"checkpoint_every": 2})
    for a, b in zip(expected, resumed):
        for layer in a.weights:
            torch.testing.assert_close(a.delta(layer), b.delta(layer), rtol=1e-4, atol=1e-7)


def test_a_rank_at_least_the_basis_dimension_trains_full_rank_and_bad_ranks_are_refused(pipe, references):
    (eraser,) = train(pipe, references, PAIRS[:1], config={"rank": 10_000, "max_iterations": 2})
    assert eraser.rank is None and not eraser.down
    for bad in (0, -1, 2.5, True):
        with pytest.raises(sepme_adapter.TrainingError, match="rank"):
            TrainConfig(rank=bad).validate()
