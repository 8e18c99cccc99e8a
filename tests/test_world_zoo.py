"""The world zoo (`benchmarks/worlds`, `benchmarks/world_zoo.py`): determinism, renderer, quick build and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.worlds import ZOO, World, load_world  # noqa: E402
from benchmarks.worlds.spec import PLAIN, TEXTURE_KINDS, make_spec, render_array  # noqa: E402

from sepme_adapter.testing.tokenizer import write_word_tokenizer  # noqa: E402

QUICK_SEED = 13  # world_zoo.py --quick's world


def test_zoo_declares_roles():
    roles = list(ZOO.values())
    assert roles.count("tuning") >= 2 and roles.count("held-out") >= 3
    assert set(roles) == {"tuning", "held-out"}


def test_spec_is_a_function_of_the_seed(tmp_path):
    assert make_spec(11).to_json() == make_spec(11).to_json()
    a, b = make_spec(11), make_spec(12)
    assert set(a.objects) | set(a.styles) != set(b.objects) | set(b.styles)
    files = []
    for folder in ("a", "b"):
        write_word_tokenizer(tmp_path / folder, a.vocabulary, a.max_tokens)
        files.append([(tmp_path / folder / f).read_bytes() for f in ("vocab.json", "merges.txt")])
    assert files[0] == files[1]
    tokenizer = write_word_tokenizer(tmp_path / "c", a.vocabulary, a.max_tokens)
    for name in (*a.objects, *a.styles):  # concept names are single tokens
        assert len(tokenizer(name).input_ids) == 3


@pytest.mark.parametrize("seed", [*ZOO, 0, 1, 2, 3, 4, 5])
def test_spec_ranges(seed):
    spec = make_spec(seed)
    assert 64 <= spec.text_width <= 256 and 8 <= spec.max_tokens <= 24 and 1 <= spec.text_layers <= 3
    assert len(spec.objects) == 3 and len(spec.styles) == 3  # format 4: six concepts
    assert {p["kind"] for p in spec.styles.values()} <= set(TEXTURE_KINDS) and "grid" not in TEXTURE_KINDS
    for p in spec.objects.values():  # format 10: no 4-point stars or thin crosses
        assert p["kind"] != "star" or p["points"] >= 5
        assert p["kind"] != "cross" or p["arm"] >= 0.31
    assert all(p["value_b"] <= 0.45 for p in spec.styles.values())  # a dark second colour: contrast
    assert len(set(spec.objects) | set(spec.styles) | {PLAIN}) == len(spec.objects) + len(spec.styles) + 1
    for templates in (spec.object_templates, spec.style_templates):
        assert 2 <= len(templates) <= 4  # the first is canonical, the rest are held-out phrasings
    assert 2 <= len(spec.composition_templates) <= 3
    obj, style = next(iter(spec.objects)), next(iter(spec.styles))
    for text in (*spec.prompts(obj), *spec.prompts(style), *spec.compositions(obj, style)):
        assert len(text.split()) + 2 <= spec.max_tokens  # no caption is truncated


def test_renderer():
    spec = make_spec(11)
    image = render_array(spec, next(iter(spec.objects)), PLAIN, np.random.default_rng(0))
    assert image.shape == (32, 32, 3) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    again = render_array(spec, next(iter(spec.objects)), PLAIN, np.random.default_rng(0))
    assert np.array_equal(image, again)
    batch = spec.sample_batch(12, np.random.default_rng(1))
    assert batch.images.shape == (12, 3, 32, 32) and len(batch.captions) == 12
    # every glyph covers a fair share of the image, and textured glyphs show more than one colour
    for obj in spec.objects:
        rng = np.random.default_rng(2)
        for style in spec.styles:
            img = render_array(spec, obj, style, rng)
            background = img[0, 0]
            covered = np.abs(img - background).sum(-1) > 0.05
            assert 0.04 < covered.mean() < 0.8, (obj, style)
    for seed in (11, 12, 13):  # styles of a world look different from each other
        spec = make_spec(seed)
        means = [np.mean([render_array(spec, o, s, np.random.default_rng(3)) for o in spec.objects], 0)
                 for s in spec.styles]
        for i in range(len(means)):
            for j in range(i):
                assert np.abs(means[i] - means[j]).mean() > 0.01


def test_format_10_kinds_and_noise_split_at_the_glyphs_median():
    """No arrows or rings; a noise style paints exactly half of the glyph's disc in each colour."""
    from benchmarks.worlds.spec import _X, _Y, GLYPH_KINDS, texture

    assert "arrow" not in GLYPH_KINDS and "rings" not in TEXTURE_KINDS
    noise = next(p for p in make_spec(11).styles.values() if p["kind"] == "noise")
    rng = np.random.default_rng(0)
    for _ in range(8):
        cx, cy = rng.uniform(12.0, 20.0, size=2)  # as `render_array` draws them
        r = rng.uniform(8.5, 11.0)
        paint = texture(noise, _X, _Y, cx, cy, r, rng)
        disc = paint[np.hypot(_X - cx, _Y - cy) <= r]
        colours, counts = np.unique(disc, axis=0, return_counts=True)
        assert len(colours) == 2 and abs(int(counts[0]) - int(counts[1])) <= 1, counts


@pytest.fixture(scope="module")
def worlds_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worlds")
    old = os.environ.get("SEPME_WORLDS_DIR")
    os.environ["SEPME_WORLDS_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("SEPME_WORLDS_DIR")
    else:
        os.environ["SEPME_WORLDS_DIR"] = old


@pytest.mark.slow
def test_quick_world_builds_and_loads(worlds_dir):
    world = load_world(QUICK_SEED, quick=True)
    assert isinstance(world, World) and world.seed == QUICK_SEED
    spec = make_spec(QUICK_SEED)
    assert set(world.concepts) == set(spec.objects) | set(spec.styles)
    obj, style = world.objects[0], world.styles[0]
    assert world.concepts[obj].prompt == spec.prompts(obj)[0]
    assert world.concepts[obj].paraphrases == tuple(spec.prompts(obj)[1:])
    assert all(obj in p and style in p for p in world.compositions(obj, style))
    recipe = json.loads((worlds_dir / f"{QUICK_SEED}-quick" / "recipe.json").read_text())
    assert recipe["build_cpu_s"] > 0 and "quality_gate" in recipe
    pipe = world.pipeline()
    assert pipe.text_encoder.config.hidden_size == spec.text_width == pipe.unet.config.cross_attention_dim
    schedule = pipe.scheduler.config  # format 11: v-prediction, zero terminal SNR, trailing DDIM steps
    assert (schedule.prediction_type, schedule.rescale_betas_zero_snr, schedule.timestep_spacing) == (
        "v_prediction", True, "trailing")
    images = pipe(world.concepts[obj].prompt, num_inference_steps=2, output_type="pil").images
    assert len(world.classify(obj, images)) == 1
    assert load_world(QUICK_SEED, quick=True).concepts == world.concepts  # cached: no rebuild
    demo = load_world("demo")
    assert demo.role == "tuning" and "circle" in demo.concepts
    assert demo.compositions("circle", "orvan")[0] == "a circle by orvan"


@pytest.mark.slow
def test_world_zoo_quick_prints_result(worlds_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEPME_WORLDS_DIR": str(worlds_dir)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "world_zoo.py"), "--quick", "--save",
                          str(tmp_path / "erasers"), "--json", str(tmp_path / "zoo.json")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = sorted(p.stem for p in (tmp_path / "erasers" / f"world-{QUICK_SEED}-quick").glob("*.safetensors"))
    result = json.loads((tmp_path / "zoo.json").read_text())["results"][0]
    assert saved == sorted(result["erased"]) and len(saved) == 3
    lines = out.stdout.splitlines()
    result = [line for line in lines if line.startswith("RESULT ")]
    assert result, out.stdout[-3000:]
    fields = dict(item.split("=") for item in result[-1].split()[1:])
    assert set(fields) == {"worlds", "exact_max", "para_max", "comp_max", "kept_worst", "restored_max"}
    assert float(fields["restored_max"]) == 0.0  # loaded, none active: the original model bit for bit
    assert any(line.startswith("TUNING ") for line in lines)


@pytest.mark.slow
def test_zoo_command_builds_or_reuses_and_checks_gates(worlds_dir, tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEPME_WORLDS_DIR": str(worlds_dir)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.worlds", "zoo", "--quick", "--seeds", str(QUICK_SEED)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]  # a --quick gate is reported, not enforced
    assert f"| {QUICK_SEED} | held-out-quick |" in out.stdout and "ZOO worlds=1 failed=0" in out.stdout
    assert (worlds_dir / f"{QUICK_SEED}-quick" / "recipe.json").exists()

    from benchmarks.worlds import build
    from benchmarks.worlds.__main__ import zoo

    for seed, passed in ((101, True), (102, False)):  # two built worlds, one below its gate: exit 1
        folder = worlds_dir / str(seed)
        folder.mkdir()
        (folder / "world.json").write_text(json.dumps({"format": build.FORMAT}))
        (folder / "recipe.json").write_text(json.dumps({"passed": passed, "build_cpu_s": 1.0, "quality_gate": {
            "worst": 0.9 if passed else 0.6, "min_accuracy": 0.85}}))
    capsys.readouterr()
    assert zoo([101]) == 0
    assert zoo([101, 102]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "| 102 | unlisted | 0.60 (>= 0.85) | no | 1.0 |" in lines and lines[-1] == "ZOO worlds=2 failed=1"


def test_build_set_overrides_parse_their_field_types():
    """`python -m benchmarks.worlds build --set KEY=VALUE` parses each field by its type; `zero_snr=False` is
    False (not `bool("False")`), and a bad key or value is refused before anything is built."""
    from benchmarks.worlds.__main__ import main, with_overrides
    from benchmarks.worlds.build import BuildSettings

    settings = with_overrides(BuildSettings(), ["zero_snr=False", "unet_steps=12", "unet_lr=0.5"])
    assert (settings.zero_snr, settings.unet_steps, settings.unet_lr) == (False, 12, 0.5)
    assert with_overrides(settings, ["zero_snr=true"]).zero_snr is True
    for bad in ("zero_snr=maybe", "unet_steps=many", "no_such_field=1"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            with_overrides(settings, [bad])
        with pytest.raises(SystemExit):
            main(["build", "--seed", "1", "--out", "/nonexistent/never-built", "--set", bad])


def test_denoiser_loss_options():
    """Min-SNR-gamma weights (min(SNR, gamma) / SNR per sample) and the high-timestep share of the zoo's builds;
    the demo world's recipe (both off) is the plain epsilon MSE on uniform timesteps."""
    import torch
    from diffusers import DDPMScheduler

    from sepme_adapter.demo.build import Recipe, _draw_timesteps, _weighted_mse

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    prediction, noise = torch.randn(64, 4, 2, 2, dtype=torch.float64), torch.randn(64, 4, 2, 2, dtype=torch.float64)
    timesteps = torch.arange(0, 1000, 1000 // 64)[:64]
    plain = Recipe()
    assert _weighted_mse(plain, scheduler, prediction, noise, timesteps) == torch.nn.functional.mse_loss(prediction, noise)
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = ((snr.clamp(max=5.0) / snr) * (prediction - noise).square().mean(dim=(1, 2, 3))).mean()
    weighted = _weighted_mse(Recipe(min_snr_gamma=5.0), scheduler, prediction, noise, timesteps)
    assert torch.isclose(weighted.double(), expected, rtol=1e-6)
    assert weighted < _weighted_mse(plain, scheduler, prediction, noise, timesteps)  # low-noise steps count less
    # v-prediction (the zoo's zero-terminal-SNR schedule): min(SNR, gamma) / (SNR + 1), finite at SNR = 0
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction",
                                            rescale_betas_zero_snr=True)
    alpha_bar = v_scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = ((snr.clamp(max=5.0) / (snr + 1)) * (prediction - noise).square().mean(dim=(1, 2, 3))).mean()
    v_weighted = _weighted_mse(Recipe(min_snr_gamma=5.0), v_scheduler, prediction, noise, timesteps)
    assert torch.isfinite(v_weighted) and torch.isclose(v_weighted.double(), expected, rtol=1e-6)
    generator = torch.Generator().manual_seed(0)
    assert (_draw_timesteps(Recipe(high_timestep_share=1.0), scheduler, 256, generator) >= 400).all()
    uniform = _draw_timesteps(plain, scheduler, 4096, generator)
    assert uniform.min() >= 0 and uniform.max() < 1000 and (uniform < 400).float().mean() > 0.35


def test_classifier_learns_decoded_images():
    """`build.decoded`: a share of the classifier's training images is replaced by their autoencoder round trip
    (what generated images are), labels untouched; share 0 is the sampler itself."""
    import torch
    from benchmarks.worlds.build import decoded
    from diffusers import AutoencoderKL

    from sepme_adapter.demo import ASSETS

    spec = make_spec(QUICK_SEED)
    sample = spec.classifier_sampler("style")
    vae = AutoencoderKL.from_pretrained(ASSETS / "pipeline" / "vae")
    assert decoded(sample, vae, 0.0) is sample
    raw, labels = sample(16, np.random.default_rng(3))
    mixed, mixed_labels = decoded(sample, vae, 0.5)(16, np.random.default_rng(3))
    assert mixed_labels == labels and mixed.shape == raw.shape
    changed = [not torch.equal(a, b) for a, b in zip(mixed, raw)]
    assert 0 < sum(changed) < 16
    assert mixed.min() >= 0 and mixed.max() <= 1


def test_decoded_latent_noise_and_faded_judges():
    """The faded judges (an option, not the default): `decoded(latent_noise=)` smudges the round trips (the same images are picked), and
    `_fade` lowers contrast and saturation, and is the identity at scale 0."""
    import torch
    from benchmarks.worlds.build import decoded
    from diffusers import AutoencoderKL

    from sepme_adapter.demo import ASSETS
    from sepme_adapter.demo.classifier import _fade

    spec = make_spec(QUICK_SEED)
    sample = spec.classifier_sampler("object")
    vae = AutoencoderKL.from_pretrained(ASSETS / "pipeline" / "vae")
    raw, _ = sample(16, np.random.default_rng(5))
    clean, _ = decoded(sample, vae, 0.5)(16, np.random.default_rng(5))
    noisy, _ = decoded(sample, vae, 0.5, latent_noise=0.5)(16, np.random.default_rng(5))
    picked = [not torch.equal(a, b) for a, b in zip(clean, raw)]
    assert picked == [not torch.equal(a, b) for a, b in zip(noisy, raw)] and any(picked)
    assert all(not torch.equal(a, b) for a, b, p in zip(noisy, clean, picked) if p)
    faded = _fade(raw, torch.Generator().manual_seed(0), 1.0)
    assert faded.shape == raw.shape and faded.min() >= 0 and faded.max() <= 1
    spread = lambda x: x.std(dim=(1, 2, 3))  # noqa: E731
    assert (spread(faded) <= spread(raw) + 1e-6).all() and (spread(faded) < spread(raw)).any()
    torch.testing.assert_close(_fade(raw, torch.Generator().manual_seed(0), 0.0), raw)


@pytest.mark.slow
def test_rebuild_reuses_the_denoiser_of_the_same_recipe(tmp_path):
    """A build into a folder holding a `DENOISER_FORMATS` world of the same recipe copies its denoiser and
    redoes only the judges and the gate; another recipe or spec trains its own."""
    from dataclasses import replace

    from benchmarks.worlds.build import FORMAT, QUICK, _reusable_denoiser, build_world

    from sepme_adapter.demo.build import Recipe

    out = tmp_path / "w"
    first = build_world(QUICK_SEED, out, QUICK)
    unet = (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert first["denoiser_reused_from_format"] is None
    again = build_world(QUICK_SEED, out, replace(QUICK, classifier_fade=0.2, classifier_steps=3))
    assert again["denoiser_reused_from_format"] == FORMAT and again["timings"]["unet"] == first["timings"]["unet"]
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet
    assert again["settings"]["classifier_fade"] == 0.2
    recipe = Recipe(**again["recipe"])
    spec = make_spec(QUICK_SEED)
    settings = replace(QUICK, classifier_fade=0.2, classifier_steps=3)
    assert _reusable_denoiser(out, recipe, spec, settings) is not None
    assert _reusable_denoiser(out, replace(recipe, unet_steps=recipe.unet_steps + 1), spec, settings) is None
    assert _reusable_denoiser(out, recipe, make_spec(QUICK_SEED + 1), settings) is None  # another world's denoiser
    assert _reusable_denoiser(out, recipe, spec, replace(settings, zero_snr=False)) is None  # another noise schedule


def test_judges_train_together_on_one_trunk_and_load_as_plain_classifiers(tmp_path):
    """`train_classifiers`: each batch is drawn once for both families; the two judges share the trunk, keep
    their own heads, load back as plain `ConceptClassifier`s with the same logits, and each reads its own
    family well above chance."""
    import torch

    from sepme_adapter.demo.classifier import ConceptClassifier, train_classifiers

    spec = make_spec(QUICK_SEED)
    draws = []

    def sample(n, rng):
        draws.append(n)
        return spec.judge_sampler()(n, rng)

    judges = train_classifiers(spec.labels, sample, steps=60, batch_size=32, seed=1)
    assert list(judges) == ["object", "style"] and len(draws) == 60
    trunks = [j.model.features.state_dict() for j in judges.values()]
    assert all(torch.equal(trunks[0][k], trunks[1][k]) for k in trunks[0])
    assert judges["object"].model.head.out_features == len(spec.labels["object"])
    assert judges["style"].model.head.out_features == len(spec.labels["style"])
    for family, judge in judges.items():
        judge.save(tmp_path)
        loaded = ConceptClassifier.load(tmp_path, family)
        images, labels = spec.judge_sampler()(64, np.random.default_rng(9))
        torch.testing.assert_close(loaded.logits(images), judge.logits(images), rtol=0, atol=0)
        accuracy = np.mean([p == t for p, t in zip(loaded.predict(images), labels[family])])
        assert accuracy > 1.5 / len(spec.labels[family]), (family, accuracy)
