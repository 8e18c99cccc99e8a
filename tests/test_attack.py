"""The adversarial prompt attack (`evaluation/attack.py`, `sepme attack`): its mechanics on tiny pipelines.

Float64 where a comparison would otherwise be decided by round-off.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import sepme_adapter
from sepme_adapter.cli import main
from sepme_adapter.errors import SepMEStateError
from sepme_adapter.evaluation.attack import (
    AttackConfig,
    attack_concept,
    attack_erasers,
    candidate_ids,
    denoising_loss,
    draw_samples,
    encode_with_vectors,
    nearest_tokens,
    prompt_template,
    reference_latents,
    token_table,
)
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.text import encode_prompts

from .helpers import brightness, make_eraser

CONCEPTS = {"picasso": "a painting by picasso", "cezanne": "a painting by cezanne"}
PROMPT = CONCEPTS["picasso"]


def tiny(dtype=torch.float64):
    """A tiny random pipeline reading 12 tokens (room for 3 adversarial tokens), with a picasso eraser loaded."""
    pipe = sepme_adapter.attach(tiny_pipeline(max_length=12)).to(dtype)
    pipe.load_sepme(make_eraser(pipe, "picasso", concepts=CONCEPTS), erase=False)
    return pipe


def small(**overrides):
    settings = dict(tokens=3, iterations=12, samples=2, probes=4, references=2, reference_steps=2,
                    guidance_scale=1.0)
    return AttackConfig(**{**settings, **overrides})


def test_the_template_puts_the_slots_before_or_after_the_prompt_and_refuses_overlong_prompts():
    pipe = tiny()
    words = pipe.tokenizer(PROMPT, add_special_tokens=False).input_ids
    ids, slots = prompt_template(pipe, PROMPT, 3, "prefix")
    assert ids.shape == (1, 12) and slots == [1, 2, 3] and ids[0, 4:8].tolist() == words
    ids, slots = prompt_template(pipe, PROMPT, 3, "suffix")
    assert slots == [5, 6, 7] and ids[0, 1:5].tolist() == words and ids[0, 8] == pipe.tokenizer.eos_token_id
    plain, _ = prompt_template(pipe, PROMPT, 0, "prefix")  # no slots: exactly what the pipeline encodes
    expected = encode_prompts(pipe, [PROMPT])  # (float32 or the pipeline's float64, on the CPU)
    torch.testing.assert_close(pipe.text_encoder(plain)[0].to(expected.dtype), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exceeds the text encoder's 12"):
        prompt_template(pipe, PROMPT, 7, "prefix")
    with pytest.raises(ValueError, match="position"):
        prompt_template(pipe, PROMPT, 1, "middle")


def test_the_word_vocabulary_holds_tokens_that_tokenize_back_to_themselves():
    pipe = tiny()
    tokenizer = pipe.tokenizer
    words, every = candidate_ids(tokenizer, "words").tolist(), candidate_ids(tokenizer, "all").tolist()
    specials = set(tokenizer.all_special_ids)
    assert not specials & set(every) and len(every) == len(tokenizer) - len(specials)
    assert set(words) < set(every)
    for i in words:
        assert tokenizer(tokenizer.decode([i]).strip(), add_special_tokens=False).input_ids == [i]
    for word in ("painting", "picasso", "watermark"):  # every word of the tokenizer's list is a candidate
        assert tokenizer(word, add_special_tokens=False).input_ids[0] in words
    with pytest.raises(ValueError, match="vocabulary"):
        candidate_ids(tokenizer, "letters")


def test_the_projection_picks_the_nearest_token_by_cosine():
    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    candidates = torch.tensor([3, 7, 11, 40])
    chosen = nearest_tokens(torch.stack([table[7] * 3.0, table[40] + 1e-6 * table[3]]), table, candidates)
    assert chosen.tolist() == [7, 40]
    assert set(nearest_tokens(torch.randn(20, 16, dtype=torch.float64), table, candidates).tolist()) <= {3, 7, 11, 40}


def test_token_vectors_at_the_slots_encode_as_the_pipeline_encodes_the_same_tokens():
    pipe = tiny()
    ids, slots = prompt_template(pipe, PROMPT, 2, "prefix")
    chosen = pipe.tokenizer("van gogh", add_special_tokens=False).input_ids
    encoded = encode_with_vectors(pipe, ids, slots, token_table(pipe)[chosen])
    torch.testing.assert_close(encoded, pipe.text_encoder(ids.index_put((torch.tensor([0, 0]), torch.tensor(slots)),
                                                                       torch.tensor(chosen)))[0], rtol=1e-12, atol=1e-12)
    expected = encode_prompts(pipe, ["van gogh " + PROMPT])  # the text, as the pipeline encodes it
    torch.testing.assert_close(encoded.to(expected.dtype), expected, rtol=0, atol=0)
    vectors = token_table(pipe)[chosen].clone().requires_grad_(True)  # and gradients reach the vectors
    (gradient,) = torch.autograd.grad(encode_with_vectors(pipe, ids, slots, vectors).square().sum(), [vectors])
    assert gradient.abs().sum() > 0


def test_the_attack_lowers_the_erased_models_loss_with_real_tokens_on_an_undefended_eraser():
    pipe = tiny()
    config = small(iterations=20)
    references = reference_latents(pipe, PROMPT, config)
    pipe.set_erased(["picasso"])
    result = attack_concept(pipe, "picasso", PROMPT, config, references, progress=False)
    losses = result.losses
    # the eraser does something to its own concept's images ...
    assert losses["plain"] > losses["original"]
    # ... and the searches find conditions on which the erased model denoises them better than with the prompt
    assert losses["continuous"] < losses["plain"]
    assert losses["discrete"] < losses["plain"]
    # by searching: both end below the random tokens they start from
    assert losses["continuous"] < result.continuous_history[0] and losses["discrete"] < result.history[0]
    # the discrete prompt is made of real vocabulary tokens, typed as text it encodes to the same ids
    assert set(result.token_ids) <= set(candidate_ids(pipe.tokenizer, "words").tolist())
    assert result.tokens == pipe.tokenizer.convert_ids_to_tokens(result.token_ids)
    assert result.round_trip and result.text.endswith(PROMPT)
    typed = pipe.tokenizer(result.text, padding="max_length", max_length=12).input_ids
    assert typed == result.prompt_ids[0].tolist()
    # its reported loss is the loss of those tokens on the fixed probes, recomputed here from the text alone
    probes = draw_samples(references, config.probes, torch.Generator().manual_seed(config.seed * 7919 + 1),
                          pipe.scheduler.alphas_cumprod, "epsilon")
    with torch.no_grad():
        again = float(denoising_loss(pipe, probes, pipe.text_encoder(torch.tensor([typed]))[0]))
    assert again == pytest.approx(losses["discrete"], rel=1e-9)
    assert pipe.get_erased() == ["picasso"]


def test_the_attack_is_seeded():
    pipe = tiny()
    pipe.set_erased(["picasso"])
    config = small(iterations=6, continuous=False)
    references = reference_latents(pipe, PROMPT, config)
    first = attack_concept(pipe, "picasso", PROMPT, config, references, progress=False)
    second = attack_concept(pipe, "picasso", PROMPT, config, references, progress=False)
    assert first.token_ids == second.token_ids and first.history == second.history
    assert first.losses["continuous"] is None and first.continuous_vectors is None


def test_fused_weights_meet_the_same_attack_as_run_time_increments():
    pipe = tiny()
    config = small(iterations=8)
    targets = [("picasso", "picasso", PROMPT)]
    run_time = attack_erasers(pipe, targets, brightness, config, seeds=[0, 1], steps=2, guidance_scale=1.0,
                              progress=False)
    fused = attack_erasers(pipe, targets, brightness, config, seeds=[0, 1], steps=2, guidance_scale=1.0,
                           fused=True, progress=False)
    a, b = run_time["attacks"][0], fused["attacks"][0]
    assert a["token_ids"] == b["token_ids"]
    # fuse_sepme adds the increment in float32 (`weight.float() + delta`), so float32 round-off of the weights
    # (about 6e-8 relative) is the only difference left
    for key in ("plain", "discrete", "continuous"):
        assert b["losses"][key] == pytest.approx(a["losses"][key], rel=1e-6)
    assert b["asr"]["original"] is None and a["asr"]["original"] is not None  # no original model while fused
    assert pipe.get_erased() == [] and not sepme_adapter.loader.erasure_runtime(pipe).fused


def test_references_need_the_original_model():
    pipe = tiny()
    pipe.set_erased(["picasso"])
    pipe.fuse_sepme()
    with pytest.raises(SepMEStateError, match="fused"):
        reference_latents(pipe, PROMPT, small())
    with pytest.raises(SepMEStateError, match="fused"):
        attack_erasers(pipe, [("picasso", "picasso", PROMPT)], brightness, small(), progress=False)


def test_bad_settings_are_refused_before_any_work():
    for bad in (dict(tokens=0), dict(position="middle"), dict(vocabulary="letters"), dict(step_size=0.0),
                dict(iterations=-1), dict(guidance_scale=float("nan"))):
        with pytest.raises(ValueError):
            small(**bad).validate()


def test_the_command_attacks_an_eraser_on_the_demo_world_and_writes_the_prompts(tmp_path, capsys):
    from sepme_adapter import demo
    from sepme_adapter.testing.conformance import random_eraser

    pipe = sepme_adapter.attach(demo.load_pipeline())
    concepts = {name: demo.CONCEPTS[name].prompt for name in ("orvan", "pimsa")}
    random_eraser(pipe, "orvan", concepts, protected=()).save(tmp_path / "orvan.safetensors")
    out = tmp_path / "out"
    code = main(["attack", "--erasers", str(tmp_path / "orvan.safetensors"), "--quick", "--quiet", "--threads", "1",
                 "--position", "suffix", "--tokens", "2", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    entry = results["attacks"][0]
    assert entry["eraser"] == "orvan" and entry["position"] == "suffix" and len(entry["token_ids"]) == 2
    assert entry["text"].startswith("a painting by orvan") and entry["round_trip"]
    assert set(entry["token_ids"]) <= set(candidate_ids(pipe.tokenizer, "words").tolist())
    assert results["seeds"] == [0, 1] and results["config"]["iterations"] == 8 and results["steps"] == 10
    for key in ("pre", "discrete", "continuous", "original"):
        assert 0.0 <= entry["asr"][key] <= 1.0
    assert (out / "prompts.txt").read_text() == f"orvan\t{entry['text']}\n"
    assert load_file(str(out / "continuous.safetensors"))["orvan"].shape == (2, pipe.text_encoder.config.hidden_size)
    assert entry["text"] in printed and "post-attack ASR" in (out / "results.md").read_text()


@pytest.mark.parametrize(("flags", "message"), [
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--step-size", "-1"], "--step-size must be > 0"),
    (["--concepts", "nosuch"], "no loaded eraser named ['nosuch']"),
    (["--tokens", "9"], "exceeds the text encoder's 10"),
])
def test_the_command_refuses_bad_input_in_one_line(tmp_path, capsys, flags, message):
    from sepme_adapter import demo
    from sepme_adapter.testing.conformance import random_eraser

    pipe = sepme_adapter.attach(demo.load_pipeline())
    random_eraser(pipe, "orvan", {"orvan": demo.CONCEPTS["orvan"].prompt, "pimsa": demo.CONCEPTS["pimsa"].prompt},
                  protected=()).save(tmp_path / "orvan.safetensors")
    code = main(["attack", "--erasers", str(tmp_path / "orvan.safetensors"), "--quick", "--quiet", *flags,
                 "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_the_commands_sampler_is_the_demo_worlds():
    from sepme_adapter.cli import attack
    from sepme_adapter.demo.job import GUIDANCE, STEPS

    assert attack.DEMO_SAMPLER == (STEPS, GUIDANCE)


def test_the_commands_flags_reach_the_attack_settings():
    from sepme_adapter.cli import build_parser
    from sepme_adapter.cli.attack import settings

    args = build_parser(["attack"]).parse_args(
        ["attack", "--erasers", "e.safetensors", "--tokens", "2", "--position", "suffix", "--iterations", "5",
         "--step-size", "0.5", "--samples", "3", "--probes", "6", "--references", "7", "--vocabulary", "all",
         "--no-continuous", "--seed", "4", "--seeds", "3", "--steps", "9", "--guidance-scale", "2.5", "--quick"])
    config, seeds, steps, guidance = settings(args)
    assert (config.tokens, config.position, config.iterations, config.step_size, config.samples, config.probes,
            config.references, config.vocabulary, config.continuous, config.seed) == (
        2, "suffix", 5, 0.5, 3, 6, 7, "all", False, 4)
    assert (seeds, steps, guidance, config.reference_steps, config.guidance_scale) == (3, 9, 2.5, 9, 2.5)
    quick, _, quick_steps, _ = settings(build_parser(["attack"]).parse_args(["attack", "--erasers", "e", "--quick"]))
    plain, plain_seeds, plain_steps, plain_guidance = settings(build_parser(["attack"]).parse_args(
        ["attack", "--erasers", "e", "--model", "m"]))
    assert quick.iterations < plain.iterations and quick_steps < plain_steps
    assert (plain_seeds, plain_steps, plain_guidance) == (10, 25, 7.5) and plain == AttackConfig(
        reference_steps=25, guidance_scale=7.5)


def test_post_attack_asr_counts_a_seed_when_the_prompt_or_the_found_prompt_draws_the_concept():
    from sepme_adapter.evaluation.attack import attack_success

    pipe = tiny()
    pipe.set_erased(["picasso"])
    config = small(iterations=1)
    result = attack_concept(pipe, "picasso", PROMPT, config, reference_latents(pipe, PROMPT, config), progress=False)
    # prompt, found, the random start (control), continuous, original
    answers = iter([[True, False], [False, True], [True, False], [False, False], [True, True]])
    asked = []

    def classify(name, images):
        asked.append((name, len(images)))
        return next(answers)

    rates = attack_success(pipe, result, classify, [0, 1], steps=2, guidance_scale=1.0)
    assert asked == [("picasso", 2)] * 5
    assert rates == {"pre": 0.5, "discrete": 1.0, "discrete_alone": 0.5, "random": 0.5, "random_alone": 0.5,
                     "continuous": 0.5, "continuous_alone": 0.0, "original": 1.0}
    from sepme_adapter.evaluation.attack import candidate_ids

    assert len(result.start_token_ids) == config.tokens  # the control prefix: real tokens of the vocabulary
    assert set(result.start_token_ids) <= set(candidate_ids(pipe.tokenizer, config.vocabulary).tolist())
    assert pipe.get_erased() == ["picasso"]
