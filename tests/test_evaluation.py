"""The evaluation harness (issue 4) on a tiny pipeline with a simple stand-in classifier."""

import json

import numpy as np
import pytest

from sepme_adapter.evaluation import (
    EvalConcept,
    LPIPSMetric,
    all_subsets,
    concepts_from_csv,
    evaluate,
    image_grid,
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
    return LPIPSMetric()


def test_every_subset_gets_accuracy_lpips_and_restoration_drift(pipe, lpips_metric, tmp_path):
    for i, name in enumerate(CONCEPTS):
        pipe.load_sepme(make_eraser(pipe, name, seed=i, scale=20000.0), erase=False)
    concepts = [EvalConcept(n, [p], [p.replace("a painting by", "in the style of")], seeds=[0, 1])
                for n, p in CONCEPTS.items()]
    results = evaluate(pipe, concepts, brightness_classifier(120.0), all_subsets(list(CONCEPTS)), steps=2,
                       lpips=lpips_metric, progress=False, keep_images=True)
    assert [e["erased"] for e in results["subsets"]] == all_subsets(list(CONCEPTS))
    assert set(results["original"]["accuracy"]) == set(CONCEPTS)
    for entry in results["subsets"]:
        for name in CONCEPTS:
            if name in entry["erased"]:
                assert entry["lpips"][name] > 1e-4 and entry["max_pixel_change"][name] > 0.01
            else:  # restored: its exact prompt renders as in the original model (up to 8-bit rounding)
                assert entry["max_pixel_change"][name] <= 1 / 255 + 1e-6
                assert entry["lpips"][name] < 1e-3
        assert entry["dtheta_p"] > 0
    assert pipe.get_erased() == []
    table = markdown_table(results)
    assert "vangogh, picasso, cezanne" in table and "Paraphrase" in table and "random weights" in table
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
