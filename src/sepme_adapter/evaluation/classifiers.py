"""Classifiers for ACC: a callable `classify(concept, images) -> [bool]` from a spec string."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image

from ..extras import require
from .protocol import Classify
from .style_classifier import load_style_classifier


def torchvision_classifier(arch: str, classes: dict[str, int], device: str = "cpu") -> Classify:
    """An ImageNet torchvision model (the paper: ResNet50 on Imagenette classes); `classes` maps concept -> index.

    The weights come from torchvision's cache (`torch.hub`); offline without them, this fails with
    torchvision's own message.
    """
    torchvision = require("torchvision", "a torchvision classifier")  # imported here: it costs seconds

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    model = torchvision.models.get_model(arch, weights=weights).eval().to(device)
    preprocess = weights.transforms()

    @torch.no_grad()
    def classify(name: str, images: Sequence[Image.Image]) -> list[bool]:
        batch = torch.stack([preprocess(i.convert("RGB")) for i in images]).to(device)
        return (model(batch).argmax(dim=1).cpu() == classes[name]).tolist()

    return classify


def classifier_from_spec(spec: str, device: str = "cpu",
                         named: Mapping[str, Callable[[str], Classify]] | None = None) -> Classify:
    """`resnet18:FOLDER` (from `sepme train-classifier`), `torchvision:resnet50:church=497,...`,
    `package.module:function` (a `Classify`), or a name in `named` (name -> factory taking the device;
    the command line passes `demo`: the demo world's classifiers, which evaluation does not import)."""
    if named and spec in named:
        return named[spec](device)
    if spec.startswith("resnet18:"):
        return load_style_classifier(spec.split(":", 1)[1], device)
    if spec.startswith("torchvision:"):
        _, arch, mapping = (spec.split(":", 2) + [""])[:3]
        classes = {k: int(v) for k, v in (item.split("=") for item in mapping.split(",") if item)}
        if not classes:
            raise ValueError("torchvision classifiers need concept=imagenet_index pairs: "
                             "torchvision:resnet50:church=497,parachute=701")
        return torchvision_classifier(arch, classes, device)
    module, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"--classifier {spec!r}: use 'demo', 'torchvision:ARCH:name=index,...' or 'module:function'")
    return getattr(importlib.import_module(module), attribute)
