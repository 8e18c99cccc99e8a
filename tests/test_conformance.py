"""Conformance: every diffusers feature in `sepme_adapter.testing.conformance` behaves with erasers
loaded (bit-identical to plain diffusers) and active (equal to the base model with the increments
in its weights) exactly as plain diffusers does."""

import pytest

from sepme_adapter.testing import tiny_sdxl_pipeline
from sepme_adapter.testing.conformance import CONCEPTS, FEATURES, STATES, Setup, check_feature, random_eraser

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SLOW = {"torch_compile"}  # dynamo traces the UNet once per erased set: about 15 s on one CPU thread


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize(
    "feature", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FEATURES]
)
def test_a_diffusers_feature_behaves_as_in_plain_diffusers(feature, state, tmp_path):
    check_feature(feature, state, workdir=tmp_path)


SDXL = Setup(make_pipeline=tiny_sdxl_pipeline,
             make_erasers=lambda pipe: [random_eraser(pipe, name, seed=i, pooled=True) for i, name in enumerate(CONCEPTS)])


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize(
    "feature", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FEATURES]
)
def test_a_diffusers_feature_behaves_as_in_plain_diffusers_on_sdxl_with_pooled_increments(feature, state, tmp_path):
    check_feature(feature, state, SDXL, workdir=tmp_path)
