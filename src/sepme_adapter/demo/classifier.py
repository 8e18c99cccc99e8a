"""Small CNN classifiers that tell which demo concept an image shows (one per concept family).

They play the role of the paper's evaluation classifiers (ResNet50 for objects, ResNet18
for artist styles): accuracy on generated images measures whether a concept is still there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .world import LABELS, to_tensor


class ConceptCNN(nn.Module):
    """Three conv stages and a linear head over globally pooled features; input NCHW in [0, 1]."""

    def __init__(self, num_labels: int, width: int = 16):
        super().__init__()

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *stage(3, width),
            nn.MaxPool2d(2),
            *stage(width, 2 * width),
            nn.MaxPool2d(2),
            *stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2.0 - 1.0))


class ConceptClassifier:
    """A trained `ConceptCNN` with its labels; `predict` names the concept in each image."""

    def __init__(self, family: str, labels: Sequence[str], model: ConceptCNN):
        self.family = family
        self.labels = list(labels)
        self.model = model.eval()

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image | torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Class logits (N x labels) for PIL images, CHW tensors, or a float NCHW tensor in [0, 1]."""
        batch = to_tensor(images)
        if batch.shape[-2:] != (32, 32):
            batch = nn.functional.interpolate(batch, size=(32, 32), mode="bilinear", antialias=True)
        device = next(self.model.parameters()).device
        return self.model(batch.to(device).clamp(0, 1)).cpu()

    def predict(self, images: Sequence[Image.Image | torch.Tensor] | torch.Tensor) -> list[str]:
        """The label of each image."""
        return [self.labels[i] for i in self.logits(images).argmax(dim=1).tolist()]

    def save(self, folder: str | Path) -> None:
        """Write `<family>.safetensors` and `<family>.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, folder / f"{self.family}.safetensors")
        config = {"family": self.family, "labels": self.labels, "width": self.model.head.in_features // 4}
        (folder / f"{self.family}.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, folder: str | Path, family: str) -> ConceptClassifier:
        """Load the classifier that `save` wrote for `family`."""
        folder = Path(folder)
        config = json.loads((folder / f"{family}.json").read_text())
        model = ConceptCNN(len(config["labels"]), width=config["width"])
        model.load_state_dict(load_file(folder / f"{family}.safetensors"))
        return cls(family, config["labels"], model)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise of random strength, so generated (imperfect) images are read like renders."""
    n = images.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=generator) * 0.6
    smooth = nn.functional.avg_pool2d(nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = (1 - blur) * images + blur * smooth
    noise = (
        torch.randn(images.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.06
    )
    return (images + noise).clamp(0, 1)


def train_classifier(
    family: str,
    sample: Callable[[int, np.random.Generator], tuple[torch.Tensor, list[str]]],
    steps: int,
    batch_size: int = 64,
    width: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    held_out: int = 1000,
) -> tuple[ConceptClassifier, float]:
    """Train the classifier of `family` on batches from `sample(n, rng) -> (images, labels)`.

    Returns the classifier and its accuracy on `held_out` fresh images (no augmentation).
    """
    labels = LABELS[family]
    index = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ConceptCNN(len(labels), width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc=f"{family} classifier"):
        images, names = sample(batch_size, rng)
        target = torch.tensor([index[n] for n in names])
        loss = nn.functional.cross_entropy(model(_augment(images, generator)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    classifier = ConceptClassifier(family, labels, model)
    images, names = sample(held_out, np.random.default_rng(seed + 1))
    accuracy = float(np.mean([p == n for p, n in zip(classifier.predict(images), names)]))
    return classifier, accuracy
