"""The paper's style classifier for real models (App. C): a ResNet18 whose fully connected head alone
is trained on images the original model generates for each concept prompt and the blank prompt.

20 epochs, a cyclical (one-cycle) learning rate peaking at 0.01, a 70/30 train / held-out split.
ImageNet weights come from torchvision's cache when present; otherwise the backbone is random
(the tests run that way, offline) and the saved config says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..extras import require
from ..generation import Job, generate_batched
from .metrics import to_tensor
from .protocol import Classify

BLANK_LABEL = "blank"


def _resnet18(num_labels: int, pretrained: bool) -> torch.nn.Module:
    torchvision = require("torchvision", "the ResNet-18 classifier")

    weights = torchvision.models.ResNet18_Weights.DEFAULT if pretrained else None
    model = torchvision.models.resnet18(weights=weights)
    model.fc = torch.nn.Linear(model.fc.in_features, num_labels)
    return model


def _imagenet_weights_cached() -> bool:
    torchvision = require("torchvision", "the ResNet-18 classifier")

    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


def _batch(images: Sequence[Image.Image]) -> torch.Tensor:
    pixels = torch.nn.functional.interpolate(to_tensor(images), size=224, mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def train_style_classifier(
    pipe: Any, prompts: dict[str, str], out: str | Path, images_per_label: int = 50, epochs: int = 20,
    peak_lr: float = 0.01, steps: int = 25, guidance_scale: float = 7.5, seed: int = 0, progress: bool = True,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Generate images per label (`prompts`: label -> prompt, plus the blank prompt; by the original model, all
    labels' seeds batched together, `batch_size` per pipeline call) and fit the head."""
    labels = [*prompts, BLANK_LABEL]
    texts = [*prompts.values(), ""]
    jobs = [Job(text, seed * 100_000 + index * 1000 + k) for index, text in enumerate(texts)
            for k in range(images_per_label)]
    with tqdm(total=len(jobs), desc="classifier images", unit="img", disable=not progress) as bar:
        images = generate_batched(pipe, jobs, steps, guidance_scale, batch_size, on_batch=bar.update)
    targets = [index for index in range(len(texts)) for _ in range(images_per_label)]
    pretrained = _imagenet_weights_cached()
    model = _resnet18(len(labels), pretrained)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("fc."))
    with torch.no_grad():  # the backbone is frozen: compute its features once
        backbone = torch.nn.Sequential(*list(model.children())[:-1]).eval()
        features = torch.cat([backbone(_batch(images[i : i + 32])).flatten(1) for i in range(0, len(images), 32)])
    target = torch.tensor(targets)
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    split = int(0.7 * len(order))
    train, held_out = order[:split], order[split:]
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=peak_lr, momentum=0.9)
    batches_per_epoch = max(1, (len(train) + 31) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lr, epochs=epochs,
                                                   steps_per_epoch=batches_per_epoch)
    for epoch in range(epochs):
        shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch))]
        for start in range(0, len(shuffled), 32):
            rows = shuffled[start : start + 32]
            loss = torch.nn.functional.cross_entropy(model.fc(features[rows]), target[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        accuracy = float((model.fc(features[held_out]).argmax(1) == target[held_out]).float().mean())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.fc.state_dict().items()}, str(out / "head.safetensors"))
    config = {"labels": labels, "prompts": dict(zip(labels, texts)), "held_out_accuracy": accuracy,
              "imagenet_backbone": pretrained, "images_per_label": images_per_label, "epochs": epochs,
              "peak_lr": peak_lr}
    (out / "classifier.json").write_text(json.dumps(config, indent=2))
    return config


def load_style_classifier(folder: str | Path, device: str = "cpu") -> Classify:
    """The `Classify` of a folder written by `train_style_classifier` (`--classifier resnet18:FOLDER`)."""
    folder = Path(folder)
    config = json.loads((folder / "classifier.json").read_text())
    model = _resnet18(len(config["labels"]), config["imagenet_backbone"])
    model.fc.load_state_dict(load_file(str(folder / "head.safetensors")))
    model = model.eval().to(device)

    @torch.no_grad()
    def classify(name: str, images: Sequence[Image.Image]) -> list[bool]:
        predicted = model(_batch(images).to(device)).argmax(1).cpu().tolist()
        return [config["labels"][p] == name for p in predicted]

    return classify
