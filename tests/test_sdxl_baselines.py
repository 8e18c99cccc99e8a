"""The baselines (ESD-x, Concept Ablation, Forget-Me-Not, UCE) on an SDXL UNet: every UNet call
of the training-based methods carries the pooled text embeddings and time ids, and each dense eraser loads
with `load_sepme`, changes the UNet's output and toggles off bit-exactly."""

import pytest
import torch

import sepme_adapter
from sepme_adapter.baselines import METHODS, BaselineConfig, train_baseline
from sepme_adapter.testing import tiny_sdxl_pipeline

from .helpers import unet_output

QUICK = dict(images_per_concept=2, reference_steps=2, esd_lr=1e-3, esd_iterations=3, ablation_lr=1e-3,
             ablation_iterations=3, fmn_lr=1e-2, fmn_iterations=3, probe_samples=1)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return tmp_path_factory.mktemp("xl-reference-cache")


@pytest.mark.parametrize("method", METHODS)
def test_each_baseline_trains_on_sdxl_and_its_eraser_loads_and_changes_the_unet(method, references, tmp_path):
    pipe = sepme_adapter.attach(tiny_sdxl_pipeline())
    before = unet_output(pipe)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("added_cond_kwargs")), with_kwargs=True)
    try:
        (eraser,) = train_baseline(pipe, ["van gogh=a painting by van gogh"], method, config=BaselineConfig(**QUICK),
                                   cache_dir=references, progress=False)
    finally:
        handle.remove()
    assert bool(calls) == (method != "uce")  # UCE is closed-form: no UNet call
    assert all(c is not None and c["time_ids"].shape[-1] == 6 for c in calls)  # the reference images' too
    assert all(c["text_embeds"].shape[0] == c["time_ids"].shape[0] for c in calls)
    assert eraser.basis is None and eraser.metadata["training"]["method"] == method
    assert eraser.metadata["pipeline"] == "StableDiffusionXLPipeline" and eraser.dtheta_p() > 0
    assert pipe.list_sepme() == {} and torch.equal(unet_output(pipe), before)

    pipe.load_sepme(eraser.save(tmp_path / "eraser.safetensors"))
    assert (unet_output(pipe) - before).abs().max() > 1e-5
    pipe.set_erased([])
    assert torch.equal(unet_output(pipe), before)
