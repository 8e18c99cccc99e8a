"""Defaults that need no tuning: per-layer step sizes from the model's own scale, and a stop that waits."""

import pytest
import torch

from sepme_adapter.training import Concept, TrainConfig, train_erasers
from sepme_adapter.training.calibration import layer_learning_rate
from sepme_adapter.training.objective import MomentumStop, relative_correlation
from sepme_adapter.unet import layer_weight

from .helpers import make_eraser


def test_the_step_size_follows_the_model_scale_and_not_the_text_scale(pipe):
    eraser = make_eraser(pipe, "vangogh")
    layer = next(iter(eraser.weights))
    weight = layer_weight(pipe.unet, layer)
    text = torch.randn(2, 8, eraser.text_width, generator=torch.Generator().manual_seed(0)).double()
    weight = weight.double()  # float64: 10 * w and 7 * text are exact, so the rel=1e-9 checks test the rule, not round-off
    config = TrainConfig()
    lr = layer_learning_rate(weight, eraser, layer, text, config)
    # keys scale with W: a 10x larger layer needs 10x larger steps for the same relative change
    assert layer_learning_rate(10 * weight, eraser, layer, text, config) == pytest.approx(10 * lr, rel=1e-9)
    # the text's overall scale cancels; beta is only a storage scale
    assert layer_learning_rate(weight, eraser, layer, 7 * text, config) == pytest.approx(lr, rel=1e-9)
    assert layer_learning_rate(weight, eraser, layer, text, TrainConfig(beta=1e-4)) == pytest.approx(1e4 * lr, rel=1e-9)


def test_the_default_stop_waits_for_a_sustained_drop_not_one_noisy_sample():
    stop = MomentumStop(alpha=0.0, tau=-0.25, warmup=2, value=1.0, patience=3)
    decisions = [stop.update(x) for x in [1.0, 1.0, -1.0, 0.5, -1.0, -1.0, -1.0]]
    assert decisions == [False, False, False, False, False, False, True]
    d = torch.randn(3, 4, 8, 8)
    assert torch.allclose(relative_correlation(d, d), torch.ones(3))
    assert torch.allclose(relative_correlation(d, -2 * d), torch.full((3,), -2.0))


@pytest.mark.slow
def test_defaults_erase_on_a_model_nobody_tuned_for_and_keep_the_known_prompts_exact(pipe, tmp_path):
    # the random tiny pipeline: untrained, text width 64; the paper's settings leave rho at 1.00 here
    concepts = [Concept("vangogh", prompts=("a painting by van gogh", "van gogh style")),
                Concept("dog", prompts=("a photo of a dog", "a dog"))]
    erasers = train_erasers(pipe, concepts, config=TrainConfig(images_per_concept=2, reference_steps=3),
                            cache_dir=tmp_path, progress=False)
    for eraser in erasers:
        rho = eraser.metadata["history"]["rho"]
        assert sum(rho[-10:]) / 10 < 0.5, eraser.name  # the concept's noise direction is decorrelated
        # the fixed probes, not one noisy sample, judge the erasure: their rho is at most 0 (uncorrelated or reversed)
        assert eraser.metadata["history"]["probes"] and eraser.metadata["stats"]["probe_rho"] <= 0.0
        assert eraser.certificate <= 1e-5  # exact basis: known and blank prompts untouched
    paper = train_erasers(pipe, concepts[:1], config=TrainConfig.paper(images_per_concept=2, reference_steps=3,
                                                                        max_iterations=60), cache_dir=tmp_path,
                          progress=False)[0]
    assert sum(paper.metadata["history"]["rho"][-10:]) / 10 > 0.95  # the paper's SD v1.4 values learn nothing here
