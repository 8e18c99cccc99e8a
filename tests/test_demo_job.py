"""`sepme demo --quick`: the main job runs offline and writes the promised files and numbers."""

import json

import pytest

from sepme_adapter import Eraser
from sepme_adapter.cli import main
from sepme_adapter.demo import CONCEPTS
from sepme_adapter.demo.job import ERASED, KEPT, TRAIN_TEMPLATES, compositions, demo_concepts, phrasings


def test_the_demo_measures_training_held_out_and_composition_prompts_apart():
    concepts = {c.name: c for c in demo_concepts(ERASED, KEPT, seeds=3)}
    for name in ERASED:
        c = concepts[name]
        assert c.prompts == phrasings(name, TRAIN_TEMPLATES) and CONCEPTS[name].prompt in c.prompts
        assert c.paraphrases and not set(c.paraphrases) & set(c.prompts)  # held out: never trained on
        for prompt, partner in c.compositions:  # "a circle by orvan": the style and an object of the other family
            assert name in prompt.split() and partner in prompt.split()
            assert CONCEPTS[partner].family != CONCEPTS[name].family
    # an erased concept's composition is also measured for its kept partner (same prompt, no extra images)
    prompt, partner = compositions("pimsa", [0])[0]
    assert prompt == "a square by pimsa" and (prompt, "pimsa") in concepts[partner].compositions
    assert concepts["selune"].paraphrases and not concepts["circle"].paraphrases  # shares the styles' phrasings
    with pytest.raises(ValueError, match="both trained on and held out"):
        demo_concepts(ERASED, KEPT, 3, train=(0, 1), held_out=(1,))


@pytest.mark.slow  # about three minutes on 2 busy CPU cores
def test_the_quick_demo_erases_restores_and_reports(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--seeds", "2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["concepts"] == [*ERASED, *KEPT]
    assert set(results["original"]["accuracy"]) == set(results["concepts"])
    assert len(results["subsets"]) == 7  # every non-empty subset of the three erasers
    everything = next(s for s in results["subsets"] if len(s["erased"]) == 3)
    for measure in ("accuracy", "paraphrase_accuracy", "composition_accuracy", "composition_partner_accuracy"):
        assert set(ERASED) <= set(everything[measure])
    # erased concepts are recognised less (how much is the training's business; the generalisation targets are
    # checked on the full demo)
    assert everything["summary"]["erased_exact"] <= 0.5
    for subset in results["subsets"]:
        for name in ERASED:
            if name not in subset["erased"]:  # restored: its exact prompts render as in the original
                assert subset["max_pixel_change"][name] <= 1 / 255 + 1e-6
                assert subset["distance"][name] < 1e-3
    assert results["generation"]["images"] > 0 and results["settings"]["batch_size"] > 1
    for name in ("grid.png", "results.md", "erasers/orvan.safetensors", "erasers/loss_curves.png"):
        assert (tmp_path / name).is_file(), name
    out = capsys.readouterr().out
    assert "| orvan, pimsa, kadrel |" in out and "Held-out paraphrases" in out and "Compositions" in out


@pytest.mark.slow
def test_the_quick_demo_runs_on_the_sdxl_world_with_pooled_increments(tmp_path):
    assert main(["demo", "--model", "sdxl", "--quick", "--quiet", "--seeds", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["model"] == "sdxl" and results["settings"]["pooled_increment"]
    assert len(results["subsets"]) == 7
    for name in ERASED:
        eraser = Eraser.load(tmp_path / "erasers" / f"{name}.safetensors")
        assert eraser.has_pooled and eraser.certificate <= 1e-5
        assert eraser.metadata["pipeline"] == "StableDiffusionXLPipeline"
    for subset in results["subsets"]:
        for name in ERASED:
            if name not in subset["erased"]:
                assert subset["max_pixel_change"][name] <= 1 / 255 + 1e-6
