"""`FeatureClassifier`, piflow's small CNN whose penultimate layer is the image feature space, and
`extract_features` (batched, no-grad features and optionally logits).

Conv stages (3x3 conv, GroupNorm, SiLU; stride 2 between stages) -> global average pool -> linear + SiLU giving
the feature vector (N, feature_dim) -> linear logits (N, num_classes). Inputs are (N, C, H, W) with H, W >= 8.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from piflow.checks import is_int, positive_int

__all__ = ["FeatureClassifier", "extract_features", "check_images", "MIN_IMAGE_SIZE"]

MIN_IMAGE_SIZE = 8
_RANGE_TOLERANCE = 1e-3


def check_images(x: Any, name: str, in_channels: Optional[int] = None, check_range: bool = False) -> Tensor:
    """Validate a float image batch (N, C, H, W) with H, W >= 8 (and optionally values in [-1, 1])."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a (N, C, H, W) tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"{name} must have {in_channels} channel(s), got shape {tuple(x.shape)}")
    if x.shape[2] < MIN_IMAGE_SIZE or x.shape[3] < MIN_IMAGE_SIZE:
        raise ValueError(f"{name} must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels, "
                         f"got shape {tuple(x.shape)}")
    if check_range and x.numel():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < -1.0 - _RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
            raise ValueError(f"{name} must be scaled to [-1, 1], got values in [{low:.4g}, {high:.4g}]")
    return x


def _conv_block(in_ch: int, out_ch: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(math.gcd(groups, out_ch), out_ch),
        nn.SiLU(),
    )


class FeatureClassifier(nn.Module):
    """Small CNN classifier whose penultimate layer is piflow's image feature space.

    Args:
        in_channels: image channels C.
        num_classes: number of classes (logits dimension).
        feature_dim: size of the feature vector returned by `features` (default 128).
        widths: channels of each conv stage; every stage after the first halves H and W (stride 2).
        groups: GroupNorm groups (clipped to divide each width).
        stem_stride: stride (1 or 2) of the first stage; 2 makes 28x28 / 32x32 inputs ~4x cheaper.

    Inputs are (N, C, H, W) with H, W >= 8; global average pooling makes any such size work.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 128,
                 widths: Sequence[int] = (32, 64, 128), groups: int = 8, stem_stride: int = 1) -> None:
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.num_classes = positive_int(num_classes, "num_classes")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        self.feature_dim = positive_int(feature_dim, "feature_dim")
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) == 0:
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        self.widths = tuple(positive_int(w, "widths") for w in widths)
        self.groups = positive_int(groups, "groups")
        if not is_int(stem_stride) or stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem_stride = int(stem_stride)
        stages = []
        previous = self.in_channels
        for index, width in enumerate(self.widths):
            stride = self.stem_stride if index == 0 else 2
            stages.append(nn.Sequential(_conv_block(previous, width, stride, self.groups),
                                        _conv_block(width, width, 1, self.groups)))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.project = nn.Linear(previous, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serializable)."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "feature_dim": self.feature_dim,
                "widths": list(self.widths), "groups": self.groups, "stem_stride": self.stem_stride}

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, feature_dim) of images x (N, C, H, W), H, W >= 8."""
        check_images(x, "x", self.in_channels)
        h = self.stages(x.to(self.project.weight.dtype))  # (N, widths[-1], H', W')
        return F.silu(self.project(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes) of images x (N, C, H, W)."""
        return self.head(self.features(x))


@torch.no_grad()
def extract_features(model: FeatureClassifier, images: Tensor, batch_size: int = 512,
                     return_logits: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Features (N, feature_dim) (and logits (N, num_classes) if `return_logits`) of images (N, C, H, W).

    Runs in batches without gradients, on the model's device; outputs are float32 on the images' device.
    Images should be in [-1, 1] like the training data (clamp generated samples first).
    """
    if not isinstance(model, FeatureClassifier):
        raise ValueError(f"model must be a FeatureClassifier, got {type(model).__name__}")
    check_images(images, "images", model.in_channels)
    batch_size = positive_int(batch_size, "batch_size")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, logits = [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            f = model.features(images[start:start + batch_size].to(device))
            features.append(f.float())
            if return_logits:
                logits.append(model.head(f).float())
    finally:
        model.train(was_training)
    empty = torch.empty(0, model.feature_dim)
    out = (torch.cat(features) if features else empty).to(images.device)
    if not return_logits:
        return out
    out_logits = (torch.cat(logits) if logits else torch.empty(0, model.num_classes)).to(images.device)
    return out, out_logits
