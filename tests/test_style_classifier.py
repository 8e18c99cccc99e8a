"""`sepme train-classifier`: the paper's ResNet18-head classifier (random backbone offline)."""

import json

from sepme_adapter.cli import main
from sepme_adapter.evaluation import classifier_from_spec, generate
from sepme_adapter.testing import tiny_pipeline


def test_train_classifier_writes_a_head_that_sepme_eval_can_use(tmp_path):
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    out = tmp_path / "classifier"
    assert main(["train-classifier", "--model", str(model), "--concept", "vangogh=a painting by van gogh",
                 "--concept", "picasso=a painting by picasso", "--images", "6", "--epochs", "3", "--steps", "2",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    config = json.loads((out / "classifier.json").read_text())
    assert config["labels"] == ["vangogh", "picasso", "blank"] and config["imagenet_backbone"] is False
    assert 0.0 <= config["held_out_accuracy"] <= 1.0 and config["epochs"] == 3
    classify = classifier_from_spec(f"resnet18:{out}")
    images = generate(tiny_pipeline(), "a painting by van gogh", [0, 1], steps=2, guidance_scale=7.5)
    assert len(classify("vangogh", images)) == 2
