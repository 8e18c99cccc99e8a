"""The FLUX demo world: `python -m sepme_adapter.demo.build --model flux --quick` into a folder, and
`sepme demo --model flux --quick` on that build (the shipped world is built with the same command, without
`--quick`)."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from sepme_adapter import Eraser, demo
from sepme_adapter.cli import main
from sepme_adapter.demo import build
from sepme_adapter.demo.job import ERASED, KEPT

# a smaller transformer than the quick build's default: what the tests need is every stage, not quality
TINY = ("--flux-width 32 --flux-heads 2 --flux-double-layers 1 --flux-single-layers 1 --flux-batch 8 "
        "--flux-steps 4 --unet-warmup 2 --checkpoint-every 2 --eval-seeds 1 --eval-extra-seeds 1").split()


@pytest.fixture(scope="module")
def flux_world(tmp_path_factory):
    """A quick FLUX world next to the shipped SD world's pipeline and classifiers (what the build reads)."""
    out = tmp_path_factory.mktemp("assets")
    for part in ("pipeline", "classifiers"):
        (out / part).symlink_to(demo.ASSETS / part, target_is_directory=True)
    build.main(["--model", "flux", "--quick", "--out", str(out), *TINY])
    return out


@pytest.mark.slow
def test_the_quick_flux_build_writes_a_flux_pipeline_recipe_and_samples(flux_world):
    folder = flux_world / "flux"
    assert (folder / "samples.png").is_file() and not (folder / "_work").exists()
    report = json.loads((folder / "recipe.json").read_text())
    assert {"text", "transformer", "quality_gate", "total"} <= set(report["timings"])
    assert all("cpu_s" in t for t in report["timings"].values())
    gate = report["quality_gate"]
    assert gate["min_accuracy"] == 0.85 and gate["gated"] == "canonical prompts and paraphrases"
    assert set(gate["settings"][0]["paraphrases"]) == set(demo.CONCEPTS)
    assert report["recipe"]["flux_steps"] == 4 and report["pipeline"]["transformer_parameters"] > 0

    pipe = demo.world_sized(FluxPipeline.from_pretrained(folder / "pipeline"))
    transformer = pipe.transformer
    assert not transformer.config.guidance_embeds and transformer.config.in_channels == 16  # 4 channels, 2x2
    assert transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model == 96
    assert transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.shift_factor == 0.0 and pipe.scheduler.config.use_dynamic_shifting
    for word in demo.VOCABULARY:  # each caption word is one T5 token
        assert len(pipe.tokenizer_2(word, add_special_tokens=False).input_ids) == 1, word
    assert pipe.tokenizer_2.model_max_length == 10
    images = pipe("a circle", negative_prompt="", true_cfg_scale=5.0, num_inference_steps=2, max_sequence_length=10,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()  # 32x32 by default (world_sized)


def test_the_shared_training_loop_resumes_from_its_checkpoint(tmp_path):
    """`train_denoiser` (every demo denoiser's loop): killed after a checkpoint and rerun, the same result."""
    recipe = build.Recipe(unet_warmup=2, checkpoint_every=2)

    def train(checkpoint, stop_after=None):
        torch.manual_seed(0)
        model, calls = torch.nn.Linear(3 * 32 * 32, 1), []

        def sample(n, rng, dropout):
            if stop_after is not None and len(calls) == stop_after:
                raise KeyboardInterrupt
            calls.append(n)
            return demo.sample_caption_batch(n, rng, dropout)

        def loss_of(model, batch, generator):
            noise = torch.randn(len(batch.images), 1, generator=generator)
            return (model(batch.images.flatten(1)) - noise).square().mean()

        return build.train_denoiser(recipe, model, loss_of, np.random.default_rng(1), 6, 1e-2, 4, checkpoint,
                                    sample, name="test")

    whole, whole_losses = train(None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "state.pt", stop_after=5)  # killed in step 6; the checkpoint holds 4 steps
    resumed, losses = train(tmp_path / "state.pt")
    assert losses == whole_losses
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_a_missing_flux_world_names_its_build_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m sepme_adapter.demo.build --model flux"):
        demo.load_pipeline("flux")
    assert main(["demo", "--model", "flux", "--quick", "--quiet", "--out", str(tmp_path / "out")]) == 2
    assert "--model flux`" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_demo_runs_on_the_flux_world(flux_world, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "ASSETS", flux_world)
    assert main(["demo", "--model", "flux", "--quick", "--quiet", "--seeds", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["model"] == "flux" and results["concepts"] == [*ERASED, *KEPT]
    assert len(results["subsets"]) == 7
    for name in ERASED:
        eraser = Eraser.load(tmp_path / "erasers" / f"{name}.safetensors")
        assert eraser.metadata["pipeline"] == "FluxPipeline" and eraser.has_pooled
        assert sorted(eraser.weights) == ["context_embedder", "time_text_embed.text_embedder.linear_1"]
        assert eraser.metadata["max_sequence_length"] == 10 and eraser.certificate <= 1e-4
    for subset in results["subsets"]:
        for name in ERASED:
            if name not in subset["erased"]:  # restored: its exact prompts render as in the original
                assert subset["max_pixel_change"][name] <= 1 / 255 + 1e-6
    for name in ("grid.png", "results.md", "erasers/orvan.safetensors"):
        assert (tmp_path / name).is_file(), name
