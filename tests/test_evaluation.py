"""The evaluation harness on a tiny pipeline with a simple stand-in classifier."""

import json

import numpy as np
import pytest
from PIL import Image

from sepme_adapter.evaluation import (
    EvalConcept,
    LPIPSMetric,
    SSIMDistance,
    all_subsets,
    concepts_from_csv,
    evaluate,
    image_grid,
    image_metric,
    markdown_table,
    scenario_subsets,
    write_results,
)

from .helpers import CONCEPTS, make_eraser


def brightness_classifier(threshold):
    """Recognises a concept when the image is brighter than the threshold (a deterministic stand-in)."""
    return lambda name, images: [float(np.asarray(i).mean()) > threshold for i in images]


@pytest.fixture(scope="module")
def lpips_metric():
    return image_metric()  # offline: 1-SSIM (the ImageNet AlexNet for LPIPS is not here)


def test_every_subset_gets_accuracy_lpips_and_restoration_drift(pipe, lpips_metric, tmp_path):
    for i, name in enumerate(CONCEPTS):
        pipe.load_sepme(make_eraser(pipe, name, seed=i, scale=20000.0), erase=False)
    concepts = [EvalConcept(n, [p], [p.replace("a painting by", "in the style of")], seeds=[0, 1])
                for n, p in CONCEPTS.items()]
    results = evaluate(pipe, concepts, brightness_classifier(120.0), all_subsets(list(CONCEPTS)), steps=2,
                       metric=lpips_metric, progress=False, keep_images=True)
    assert [e["erased"] for e in results["subsets"]] == all_subsets(list(CONCEPTS))
    assert set(results["original"]["accuracy"]) == set(CONCEPTS)
    for entry in results["subsets"]:
        for name in CONCEPTS:
            if name in entry["erased"]:
                assert entry["distance"][name] > 1e-4 and entry["max_pixel_change"][name] > 0.01
            else:  # restored: its exact prompt renders as in the original model (up to 8-bit rounding)
                assert entry["max_pixel_change"][name] <= 1 / 255 + 1e-6
                assert entry["distance"][name] < 1e-3
        assert entry["dtheta_p"] > 0
    assert pipe.get_erased() == []
    table = markdown_table(results)
    assert "vangogh, picasso, cezanne" in table and "Held-out paraphrases" in table and "cezanne 1-SSIM" in table and "LPIPS |" not in table
    json_path, md_path = write_results(results, tmp_path)
    assert json.loads(json_path.read_text())["subsets"][0]["erased"] == ["vangogh"]
    images = results["_images"]
    grid = image_grid({n: [images[col][n][0] for col in ("original", "vangogh")] for n in CONCEPTS},
                      ["original", "vangogh erased"], tmp_path / "grid.png")
    assert grid.read_bytes()[:4] == b"\x89PNG"


def test_scenarios_and_prompt_files(tmp_path):
    assert scenario_subsets(["a", "b", "c"], "iterative") == [["a"], ["a", "b"], ["a", "b", "c"]]
    assert scenario_subsets(["a", "b"], "single") == [["a"], ["b"]]
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text("case_number,prompt,evaluation_seed,concept\n0,a painting by van gogh,7,vangogh\n"
                        "1,starry night by van gogh,9,vangogh\n")
    (concept,) = concepts_from_csv(csv_path, images_per_prompt=2)
    assert concept.name == "vangogh" and concept.seeds == [7, 8, 9, 10] and len(concept.prompts) == 2
    with pytest.raises(ValueError, match="scenario"):
        scenario_subsets(["a"], "all")


def test_held_out_and_compositions_are_measured_separately_with_both_halves(pipe, lpips_metric):
    """Each image is judged for what it shows: a composition for its concept and for its partner; the classifier
    runs once per concept asked about per window, over all states' images at once."""
    for i, name in enumerate(CONCEPTS):
        pipe.load_sepme(make_eraser(pipe, name, seed=i, scale=20000.0), erase=False)
    calls = []

    def classify(name, images):  # a stand-in: exact prompts are 'recognised', the rest by brightness
        calls.append((name, len(images)))
        return brightness_classifier(120.0)(name, images)

    concepts = [EvalConcept("vangogh", [CONCEPTS["vangogh"]], ["in the style of vangogh"], [0, 1],
                            compositions=[("a painting by van gogh and picasso", "picasso")]),
                EvalConcept("picasso", [CONCEPTS["picasso"]], [], [0, 1],
                            compositions=[("a painting by van gogh and picasso", "vangogh")])]
    results = evaluate(pipe, concepts, classify, [["vangogh"], ["picasso", "vangogh"]], steps=2, metric=lpips_metric,
                       progress=False, batch_size=4)
    # 3 states x (2 exact + 1 held-out + 1 shared composition prompt) x 2 seeds, each generated once
    assert results["generation"]["images"] == 3 * 4 * 2
    assert sorted(n for n, _ in calls) == ["picasso", "picasso", "vangogh", "vangogh"]  # 2 windows x 2 names
    for entry in [results["original"], *results["subsets"]]:
        assert set(entry["accuracy"]) == {"vangogh", "picasso"} and set(entry["paraphrase_accuracy"]) == {"vangogh"}
        assert set(entry["composition_accuracy"]) == set(entry["composition_partner_accuracy"]) == {"vangogh", "picasso"}
        # the shared composition images: vangogh's partner half is picasso's own half, and vice versa
        assert entry["composition_partner_accuracy"]["vangogh"] == entry["composition_accuracy"]["picasso"]
    summary = results["subsets"][0]["summary"]
    assert summary["erased_exact"] == results["subsets"][0]["accuracy"]["vangogh"]
    assert results["subsets"][1]["summary"]["kept_half_ratio"] is None  # both halves erased: nothing kept
    table = markdown_table(results)
    assert "Compositions" in table and "vangogh: other half" in table and "Summary" in table


def test_sepme_eval_reports_held_out_phrasings_and_compositions(model_folder, tmp_path):
    from sepme_adapter import attach
    from sepme_adapter.cli import main
    from sepme_adapter.pipelines import load_pipeline

    base = attach(load_pipeline(str(model_folder), "cpu"))
    for i, name in enumerate(["vangogh", "picasso"]):
        make_eraser(base, name, seed=i, scale=20000.0).save(tmp_path / "erasers" / f"{name}.safetensors")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model_folder), "--erasers", str(tmp_path / "erasers"), "--classifier",
                 "tests.helpers:brightness", "--scenario", "single", "--paraphrases", "--composition",
                 "vangogh+picasso=a painting by van gogh and picasso", "--seeds", "2", "--steps", "2",
                 "--batch-size", "5", "--threads", "1", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    prompts = results["prompts"]["vangogh"]
    assert prompts["exact"] == [CONCEPTS["vangogh"]]  # what the eraser was trained on
    # the templates, phrased with the concept's name, that it was not trained on
    assert prompts["held_out"] == ["a painting by vangogh", "vangogh style", "in the style of vangogh"]
    assert prompts["compositions"] == [["a painting by van gogh and picasso", "picasso"]]
    assert results["prompts"]["picasso"]["compositions"] == [["a painting by van gogh and picasso", "vangogh"]]
    assert results["generation"]["batch_size"] == 5 and results["generation"]["threads"] == 1
    assert "summary" in results["subsets"][0]
    assert "Compositions" in (out / "results.md").read_text()


def test_the_tables_say_lpips_only_when_real_lpips_weights_were_used(tmp_path, monkeypatch):
    import torch
    import torchvision

    from sepme_adapter.evaluation import metrics

    monkeypatch.setattr(metrics, "cached_alexnet_weights", lambda: None)  # as on a machine without the cache
    assert isinstance(image_metric(), SSIMDistance) and image_metric().name == "1-SSIM"
    with pytest.raises(FileNotFoundError, match="ImageNet AlexNet"):
        LPIPSMetric()
    random = LPIPSMetric(random_backbone=True)  # the lpips code on a random AlexNet: plumbing only
    assert "LPIPS" not in random.name
    results = {"concepts": ["a"], "erasers": ["a"], "original": {"accuracy": {"a": 1.0}},
               "image_metric": {"name": SSIMDistance.name, "description": SSIMDistance.description},
               "subsets": [{"erased": ["a"], "accuracy": {"a": 0.0}, "distance": {"a": 0.25},
                            "max_pixel_change": {"a": 0.5}, "dtheta_p": 1.0}]}
    table = markdown_table(results)
    assert "a 1-SSIM" in table and "LPIPS |" not in table and "--lpips-weights" in table
    # --lpips-weights: torchvision's AlexNet state dict (here random, saved as a user's file would be)
    features = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    torch.save(features, tmp_path / "alexnet.pth")
    real = image_metric(lpips_weights=tmp_path / "alexnet.pth")
    assert isinstance(real, LPIPSMetric) and real.name == "LPIPS"
    assert torch.equal(real.model.net.slice1[0].weight.cpu(), features["features.0.weight"])
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    assert real([image], [image])[0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="not found"):
        LPIPSMetric(weights=tmp_path / "missing.pth")


def test_ssim_distance_is_zero_for_identical_images_and_grows_with_change():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    metric = SSIMDistance()
    same, changed, inverted = metric([Image.fromarray(base)] * 3, [Image.fromarray(base), Image.fromarray(noisy),
                                                                   Image.fromarray(255 - base)])
    assert same == pytest.approx(0.0, abs=1e-6) and 0 < changed < inverted
