"""The paper's metrics: LPIPS against the original model's image, and `||dtheta||_p` of the increments."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class LPIPSMetric:
    """LPIPS with AlexNet (the paper's metric); a random AlexNet when ImageNet weights are unavailable."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        import lpips

        weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
        self.pretrained_backbone = weights.is_file()
        self.backbone = ("AlexNet (ImageNet)" if self.pretrained_backbone
                         else "AlexNet with random weights (ImageNet weights unavailable offline)")
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net="alex", pnet_rand=not self.pretrained_backbone, verbose=False)
        self.model = self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, first: Sequence[Image.Image], second: Sequence[Image.Image]) -> list[float]:
        a, b = to_tensor(first), to_tensor(second)
        if a.shape[-1] < 64:  # AlexNet's strided layers need at least ~64 pixels
            a = torch.nn.functional.interpolate(a, size=64, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=64, mode="bilinear", align_corners=False)
        return self.model(a.to(self.device) * 2 - 1, b.to(self.device) * 2 - 1).flatten().cpu().tolist()


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float NCHW in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255 for i in images])
                            ).permute(0, 3, 1, 2)


def dtheta_p(erasers: Sequence[Any]) -> float:
    """`||dtheta||_p = ||dtheta||_1 / M` of the summed increments (Eq. 4), M = modified layers."""
    totals: dict[str, torch.Tensor] = {}
    for eraser in erasers:
        for layer in eraser.weights:
            delta = eraser.delta(layer)
            totals[layer] = delta if layer not in totals else totals[layer] + delta
    return sum(float(d.abs().sum()) for d in totals.values()) / max(len(totals), 1)
