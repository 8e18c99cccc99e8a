"""Containment: the retain distribution, the contrastive basis, the containment term, the probe stop and the
collateral certificate. Claims decided by round-off are checked in float64."""

import pytest
import torch

from sepme_adapter.basis import contrastive_basis, energy_gram, null_space_basis
from sepme_adapter.certificate import collateral_certificate
from sepme_adapter.retain import anchor_prompt, first_row_after, retain_prompts, stems, vocabulary_words
from sepme_adapter.text import encode_prompts
from sepme_adapter.training import TrainConfig, train_erasers
from sepme_adapter.training.concepts import Concept, derived_phrasings
from sepme_adapter.training.objective import target_loss
from sepme_adapter.unet import layer_weight
from sepme_adapter.verify import verify_eraser

QUICK = dict(images_per_concept=2, reference_steps=2, beta=0.1, eta=0.05, max_iterations=12, warmup=2,
             probe_every=4, probe_size=4, retain_vocabulary=40, retain_stems=6, name_contexts=6)


def train(pipe, tmp_path, concepts=("vangogh=a painting by vangogh",), **overrides):
    return train_erasers(pipe, list(concepts), config=TrainConfig(**{**QUICK, **overrides}),
                         cache_dir=tmp_path / "cache", progress=False)


def test_the_retain_distribution_is_seeded_never_says_the_name_and_keeps_its_held_out_part_apart(pipe):
    concepts = [("vangogh", ["a painting by vangogh"])]
    first = retain_prompts(pipe.tokenizer, concepts, vocabulary=50, stems_per_prompt=10, held_out=50, seed=3,
                           contexts=5)
    assert first == retain_prompts(pipe.tokenizer, concepts, vocabulary=50, stems_per_prompt=10, held_out=50,
                                   seed=3, contexts=5)
    assert first != retain_prompts(pipe.tokenizer, concepts, vocabulary=50, stems_per_prompt=10, held_out=50,
                                   seed=4, contexts=5)
    assert first.train and first.held_out and not set(first.train) & set(first.held_out)
    assert not any("vangogh" in p for p in (*first.train, *first.held_out))
    assert any(p.startswith("a painting by ") for p in first.train)  # the stem with other words
    assert all("vangogh" in p for p in first.contexts["vangogh"])
    limit = pipe.tokenizer.model_max_length
    assert all(len(pipe.tokenizer(p)["input_ids"]) <= limit for p in (*first.train, *first.held_out))


def test_vocabulary_words_and_stems():
    vocab = {"paint</w>": 0, "painting</w>": 1, "van</w>": 2, "gogh</w>": 3, "pa": 4, "<|endoftext|>": 5,
             "a</w>": 6}
    assert vocabulary_words(vocab, exclude=["gogh"]) == ["paint", "painting", "van"]
    assert stems("a painting by Van Gogh", "van gogh") == ["a painting by {}"]
    assert stems("a painting by van gogh", "vangogh") == ["{} painting by van gogh", "a {} by van gogh",
                                                          "a painting {} van gogh", "a painting by {} gogh",
                                                          "a painting by van {}"]


def test_the_contrastive_basis_lies_in_the_exact_null_space_and_prefers_the_concept():
    generator = torch.Generator().manual_seed(0)
    d = 24
    excluded = torch.randn(6, d, generator=generator, dtype=torch.float64)
    exact = null_space_basis(excluded).double()
    concept = [torch.randn(3, d, generator=generator, dtype=torch.float64)]
    retain = [torch.randn(3, d, generator=generator, dtype=torch.float64) for _ in range(30)]
    basis, contrasts = contrastive_basis(exact, concept, retain, 2)
    basis = basis.double()
    assert basis.shape == (d, 2) and contrasts[0] >= contrasts[1] > 0
    assert torch.allclose(basis.T @ basis, torch.eye(2, dtype=torch.float64), atol=1e-6)
    assert float((excluded @ basis).norm()) <= 1e-5 * float(excluded.norm())  # exact on what Eq. 8 excludes
    # the concept's energy per unit of retain energy is higher on the kept directions than on the null space
    def ratio(s):
        return float(torch.trace(energy_gram(concept, s)) / torch.trace(energy_gram(retain, s)))
    assert ratio(basis) > 2 * ratio(exact)


def test_the_basis_spares_the_rows_after_the_name_when_asked():
    """Concept energy on e0 (the name's own row) and, more, on e1 (the rows after it, shared with what follows);
    with the after-name rows avoided, the one kept direction turns from e1 to e0."""
    d = 8
    eye = torch.eye(d, dtype=torch.float64)
    concept = [torch.stack([eye[0], 1.5 * eye[1]])]
    retain = [eye[i : i + 1] for i in range(d)]  # every direction used alike
    after = [eye[1:2] for _ in range(4)]
    plain, _ = contrastive_basis(eye, concept, retain, 1)
    spared, _ = contrastive_basis(eye, concept, retain, 1, after=after, after_weight=1.0)
    assert abs(float(plain[1, 0])) > 0.99 and abs(float(spared[0, 0])) > 0.99
    assert torch.equal(contrastive_basis(eye, concept, retain, 1, after=after, after_weight=0.0)[0], plain)


def test_first_row_after_the_name(pipe):
    tokenizer = pipe.tokenizer
    for prompt in ("a painting by vangogh", "vangogh style", "a cat by vangogh on a red chair"):
        start = first_row_after(tokenizer, prompt, "vangogh")
        prefix = prompt[: prompt.index("vangogh")]
        with_name = tokenizer(prefix + "vangogh")["input_ids"]
        assert start == len(with_name) - 1 and tokenizer(prompt)["input_ids"][: start] == with_name[:-1]
    assert first_row_after(tokenizer, "a painting", "vangogh") is None


def test_the_anchor_is_the_prompt_with_the_name_cut_out():
    assert anchor_prompt("a painting by vangogh", "vangogh") == "a painting by"
    assert anchor_prompt("a cat by Van Gogh on a chair", "van_gogh") == "a cat by on a chair"
    assert anchor_prompt("vangogh style", "vangogh") == "style"
    assert anchor_prompt("a starry night", "vangogh") == ""  # not spelled: the blank prompt


def test_the_anchor_objective_measures_from_each_rows_anchor(pipe, tmp_path):
    from sepme_adapter.training.containment import Probes
    from sepme_adapter.training.steps import text_row

    seen = {}
    draw = Probes.draw.__func__

    def spy(cls, *args):  # the training loop passes every argument by position, the anchors last
        seen["embedding"], seen["anchors"] = args[3], args[-1]
        return draw(cls, *args)

    Probes.draw = classmethod(spy)
    try:
        erasers = train(pipe, tmp_path, objective="anchor", context_share=0.5, erase_to=10.0)
    finally:
        Probes.draw = classmethod(draw)
    anchors, contexts = seen["anchors"]
    # one anchor per reference latent (the concept prompt without its name), one per name-in-context prompt
    assert torch.equal(anchors, encode_prompts(pipe, ["a painting by"]).expand(len(seen["embedding"]), -1, -1))
    assert contexts is not None and 1 <= len(contexts) <= QUICK["name_contexts"]  # those that fit the tokenizer
    assert erasers[0].metadata["stats"]["stop_reason"] == "erased" and erasers[0].certificate <= 1e-5
    # a training sample's text and its anchor come from the same prompt
    config = TrainConfig(**{**QUICK, "objective": "anchor", "context_share": 1.0})

    class Track:
        embedding, anchors = seen["embedding"], seen["anchors"][0]
        contexts, context_anchors = torch.arange(6.0).view(6, 1, 1), torch.arange(6.0).view(6, 1, 1) + 10
        generator = torch.Generator().manual_seed(0)

    row, anchor = text_row(Track, 0, config)
    assert float(anchor) == float(row) + 10


def test_the_target_loss_is_zero_exactly_at_the_reversed_direction():
    original = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.allclose(target_loss(original, -0.5 * original, 0.5), torch.zeros(2, dtype=torch.float64))
    assert bool((target_loss(original, original, 0.5) > 0).all())


def test_one_prompt_derives_phrasings_of_its_kind():
    derived = derived_phrasings(Concept("pimsa", "a painting by pimsa"))
    assert derived.prompts[0] == "a painting by pimsa" and "pimsa style" in derived.prompts
    assert not any(p.startswith("a photo of") for p in derived.prompts)
    assert derived_phrasings(Concept("vangogh", "a painting by van gogh")).prompts == ("a painting by van gogh",)


def test_a_contained_eraser_keeps_listed_prompts_exact_and_stores_its_collateral_certificate(pipe, tmp_path):
    erasers = train(pipe, tmp_path, ["vangogh=a painting by vangogh", "picasso=a painting by picasso"])
    vangogh, picasso = erasers
    assert vangogh.metadata["basis"]["kind"] == "exact+contrastive"
    assert vangogh.basis.shape[1] == QUICK.get("basis_dimensions", TrainConfig().basis_dimensions)
    # the other concept's and the blank prompt's keys and values stay exact (relative change <= 1e-5)
    kept = encode_prompts(pipe, ["", "a painting by picasso"]).double()
    for layer in vangogh.weights:
        weight = layer_weight(pipe.unet, layer).detach().double()
        change = torch.linalg.matrix_norm(kept @ vangogh.delta(layer).double().T)
        assert bool((change <= 1e-5 * torch.linalg.matrix_norm(kept @ weight.T)).all())
    assert vangogh.certificate <= 1e-5
    # the collateral certificate equals a direct float64 computation over the stored held-out prompts
    stored = vangogh.metadata["collateral"]
    prompts = stored["held_out"]
    assert prompts and not any("vangogh" in p or "picasso" in p for p in prompts)
    texts = encode_prompts(pipe, prompts).double()
    direct = torch.zeros(len(prompts), dtype=torch.float64)
    for layer in vangogh.weights:
        weight = layer_weight(pipe.unet, layer).detach().double()
        delta = vangogh.delta(layer).double()
        direct = torch.maximum(direct, torch.linalg.matrix_norm(texts @ delta.T)
                               / torch.linalg.matrix_norm(texts @ weight.T))
    assert stored["max"] == pytest.approx(float(direct.max()), rel=1e-9)
    assert stored["median"] == pytest.approx(float(direct.median()), rel=1e-9)
    assert collateral_certificate(pipe, vangogh)["max"] == pytest.approx(float(direct.max()), rel=1e-9)
    assert picasso.metadata["collateral"]["max"] > 0


def test_the_probe_stop_is_deterministic_and_stops_when_erased(pipe, tmp_path):
    first = train(pipe, tmp_path, erase_to=10.0)  # rho <= 10 holds at the first check
    second = train(pipe, tmp_path, erase_to=10.0)
    for a, b in ((first[0], second[0]),):
        assert a.metadata["history"]["probes"] == b.metadata["history"]["probes"]
        assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
        assert a.metadata["stats"]["stop_reason"] == "erased"
        assert a.metadata["stats"]["iterations"] == QUICK["probe_every"]  # the first check after warm-up


def test_the_collateral_bound_returns_to_the_last_increment_within_it(pipe, tmp_path):
    (eraser,) = train(pipe, tmp_path, erase_to=-10.0, max_collateral=1e-12, max_iterations=12)
    assert eraser.metadata["stats"]["stop_reason"] == "collateral bound"
    assert all(float(w.abs().max()) == 0.0 for w in eraser.weights.values())  # the start: no increment yet
    report = verify_eraser(pipe, eraser, max_collateral=1e-12)
    assert report["collateral_max"] == 0.0


def test_verify_fails_an_eraser_above_max_collateral(pipe, tmp_path):
    (eraser,) = train(pipe, tmp_path, stop="momentum")
    measured = collateral_certificate(pipe, eraser)["max"]
    assert measured > 0
    failing = verify_eraser(pipe, eraser, max_collateral=measured / 2)
    assert not failing["ok"] and any("--max-collateral" in p for p in failing["problems"])
    assert not any("--max-collateral" in p for p in verify_eraser(pipe, eraser, max_collateral=measured * 2)["problems"])


def test_retain_prompts_from_flags_and_a_file(tmp_path):
    import argparse

    from sepme_adapter.cli.erase import retain_list
    from sepme_adapter.errors import TrainingError

    path = tmp_path / "retain.txt"
    path.write_text("\ufeffa painting by kadrel\n\n  a circle  \n", encoding="utf-8")
    args = argparse.Namespace(retain=["a photo of a dog"], retain_file=str(path))
    assert retain_list(args) == ["a photo of a dog", "a painting by kadrel", "a circle"]
    with pytest.raises(TrainingError, match="--retain-file"):
        retain_list(argparse.Namespace(retain=None, retain_file=str(tmp_path / "missing.txt")))


def test_the_self_check_says_when_no_exact_null_space_was_left(capsys):
    """`sepme erase`'s self-check warns, with the certificate and what helps, when the basis fell back to the
    compact one (a narrow text encoder filled by the prompts to keep), and stays quiet for an exact basis."""
    from types import SimpleNamespace

    from sepme_adapter.cli.erase import self_check

    def eraser(kind):
        return SimpleNamespace(name="drowea", certificate={"max_leakage": 1.5e-2},
                               metadata={"basis": {"kind": kind}, "stats": {}, "training": {"config": {}}})

    self_check(eraser("compact+contrastive"), "max_iterations")
    err = capsys.readouterr().err
    assert "no exact null space" in err and "1.5e-02" in err and "--max-leakage" in err
    self_check(eraser("exact+contrastive"), "max_iterations")
    assert "null space" not in capsys.readouterr().err
