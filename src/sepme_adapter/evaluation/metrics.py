"""Image metrics against the original model's image, and `||dtheta||_p` of the increments.

The paper's image metric is LPIPS (AlexNet). LPIPS needs the ImageNet AlexNet weights, which cannot be
downloaded offline; `image_metric` then falls back to a pixel metric under its own name, 1-SSIM, rather
than printing "LPIPS" for a network with random weights. Pass the weights (`sepme eval --lpips-weights`),
or put them in torch's hub cache, to measure real LPIPS.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..extras import require

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, as torch.hub caches it


class ImageMetric(Protocol):
    """A distance between the original and the edited image: 0 = identical, larger = more changed."""

    name: str  # the column label in the tables
    description: str  # what it is, for the tables' footnote

    def __call__(self, first: Sequence[Image.Image], second: Sequence[Image.Image]) -> list[float]: ...


def cached_alexnet_weights() -> Path | None:
    """The ImageNet AlexNet weights in torch's hub cache, if present."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    return path if path.is_file() else None


class LPIPSMetric:
    """LPIPS with AlexNet (the paper's metric). `weights`: torchvision's ImageNet AlexNet state dict (default:
    torch's hub cache); without them it refuses, unless `random_backbone=True`, which runs the lpips code on a
    randomly initialised AlexNet and names itself accordingly (only to test plumbing: that is not LPIPS)."""

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None,
                 random_backbone: bool = False) -> None:
        lpips = require("lpips", "LPIPS")
        path = Path(weights).expanduser() if weights is not None else cached_alexnet_weights()
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found: {path} (torchvision's ImageNet AlexNet state dict, "
                                    f"{ALEXNET_FILE})")
        if path is None and not random_backbone:
            raise FileNotFoundError(f"LPIPS needs the ImageNet AlexNet weights ({ALEXNET_FILE}): pass their path, "
                                    f"or put them in {Path(torch.hub.get_dir()) / 'checkpoints'}")
        self.pretrained_backbone = path is not None
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # backbone loaded below
        if path is not None:
            _load_alexnet_features(self.model, path)
            self.name, self.description = "LPIPS", f"AlexNet with ImageNet weights ({path.name}), 0 = unchanged"
        else:
            self.name = "random-AlexNet distance"
            self.description = "the lpips code on a randomly initialised AlexNet (a plumbing check, not LPIPS)"
        self.backbone = self.description
        self.model = self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, first: Sequence[Image.Image], second: Sequence[Image.Image]) -> list[float]:
        a, b = to_tensor(first), to_tensor(second)
        if a.shape[-1] < 64:  # AlexNet's strided layers need at least ~64 pixels
            a = torch.nn.functional.interpolate(a, size=64, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=64, mode="bilinear", align_corners=False)
        return self.model(a.to(self.device) * 2 - 1, b.to(self.device) * 2 - 1).flatten().cpu().tolist()


def _load_alexnet_features(model: Any, path: Path) -> None:
    """Copy torchvision's AlexNet `features.N` weights into lpips' slices (which hold the same modules by N)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    if not features:
        raise ValueError(f"{path}: not an AlexNet state dict (no 'features.' weights)")
    loaded = 0
    for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
        for index, module in getattr(model.net, slice_name).named_children():
            for param_name, param in module.named_parameters():
                param.data.copy_(features[f"{index}.{param_name}"])
                loaded += 1
    if loaded == 0:
        raise ValueError(f"{path}: no AlexNet layer matched lpips' backbone")


class SSIMDistance:
    """1 - SSIM (structural similarity; Gaussian window 11, sigma 1.5, per RGB channel, averaged), a pixel
    metric needing no weights: 0 for identical images."""

    name = "1-SSIM"
    description = ("a pixel metric, 1 - structural similarity (11x11 Gaussian window), 0 = unchanged; LPIPS "
                   "needs the ImageNet AlexNet weights: `sepme eval --lpips-weights`")
    backbone = description

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = device

    @torch.no_grad()
    def __call__(self, first: Sequence[Image.Image], second: Sequence[Image.Image]) -> list[float]:
        return (1 - ssim(to_tensor(first), to_tensor(second))).clamp(min=0).tolist()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image of two NCHW batches in [0, 1] (Wang et al. 2004, constants K1 0.01, K2 0.03)."""
    a, b = a.double(), b.double()
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, kernel, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.mean(dim=(1, 2, 3)).float()


def image_metric(device: str | torch.device = "cpu", lpips_weights: str | Path | None = None) -> Any:
    """LPIPS when its AlexNet weights are given or cached; otherwise 1-SSIM, a pixel metric under its own name."""
    if lpips_weights is not None or cached_alexnet_weights() is not None:
        return LPIPSMetric(device, lpips_weights)
    return SSIMDistance(device)


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
