"""`sepme verify`: erasers that act and leak nowhere pass; an inert eraser or a wrong fused model fails."""

import torch

from sepme_adapter.cli import main
from sepme_adapter.eraser import Eraser
from sepme_adapter.testing import tiny_pipeline

from .helpers import make_eraser


def test_verify_passes_working_erasers_and_fails_an_inert_one(tmp_path, capsys):
    model = tmp_path / "model"
    pipe = tiny_pipeline()
    pipe.save_pretrained(model)
    good = make_eraser(pipe, "vangogh").save(tmp_path / "vangogh.safetensors")
    inert = make_eraser(pipe, "picasso")
    inert.weights = {k: torch.zeros_like(w) for k, w in inert.weights.items()}
    inert.save(tmp_path / "inert" / "picasso.safetensors")
    assert main(["verify", "--model", str(model), "--erasers", str(good), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and str(good) in out  # names the file
    assert "leak:" in out and "certificate:" in out  # and says what the two numbers are
    assert main(["verify", "--model", str(model), "--erasers", str(tmp_path / "inert")]) == 1
    assert "does nothing" in capsys.readouterr().out


def test_verify_checks_a_fused_model_against_base_plus_increments(tmp_path, capsys):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    eraser = make_eraser(pipe, "vangogh")
    path = eraser.save(tmp_path / "vangogh.safetensors")
    with torch.no_grad():
        for layer in eraser.weights:
            pipe.unet.get_submodule(layer).weight += eraser.delta(layer)
    pipe.save_pretrained(tmp_path / "fused")
    args = ["verify", "--model", str(tmp_path / "base"), "--erasers", str(path)]
    assert main([*args, "--fused-model", str(tmp_path / "fused")]) == 0
    assert main([*args, "--fused-model", str(tmp_path / "base")]) == 1  # nothing was fused into it
    assert "FAIL" in capsys.readouterr().out
    assert Eraser.load(path).name == "vangogh"
