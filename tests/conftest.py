"""Shared fixtures: tiny random-weight pipelines, erasers built on their real null spaces, a saved model.

Helpers live in `tests/helpers.py`; test modules import them from there, never from each other.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import pytest
import torch

import sepme_adapter
from sepme_adapter.testing import tiny_pipeline

from .helpers import CONCEPTS, make_eraser

torch.set_num_threads(1)  # tiny models gain nothing from threads; avoids oversubscription


@pytest.fixture
def pipe():
    return sepme_adapter.attach(tiny_pipeline())


@pytest.fixture
def erasers(pipe):
    return {name: make_eraser(pipe, name, seed=i) for i, name in enumerate(CONCEPTS)}


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """A tiny random pipeline saved as a diffusers folder (what `sepme --model` loads)."""
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(folder)
    return folder
