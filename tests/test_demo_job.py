"""`sepme demo --quick`: the main job runs offline and writes the promised files and numbers."""

import json

import pytest

from sepme_adapter.cli import main
from sepme_adapter.demo.job import ERASED, KEPT


@pytest.mark.slow  # about two minutes on 2 CPU cores
def test_the_quick_demo_erases_restores_and_reports(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["concepts"] == [*ERASED, *KEPT]
    assert set(results["original"]["accuracy"]) == set(results["concepts"])
    assert len(results["subsets"]) == 7  # every non-empty subset of the three erasers
    everything = next(s for s in results["subsets"] if len(s["erased"]) == 3)
    for name in ERASED:  # erased concepts are no longer recognised
        assert everything["accuracy"][name] <= 0.25 < 0.5 <= results["original"]["accuracy"][name]
    for subset in results["subsets"]:
        for name in ERASED:
            if name not in subset["erased"]:  # restored: its exact prompt renders as in the original
                assert subset["max_pixel_change"][name] <= 1 / 255 + 1e-6
                assert subset["lpips"][name] < 1e-3
    for name in ("grid.png", "results.md", "erasers/orvan.safetensors", "erasers/loss_curves.png"):
        assert (tmp_path / name).is_file(), name
    assert "| orvan, pimsa, kadrel |" in capsys.readouterr().out
