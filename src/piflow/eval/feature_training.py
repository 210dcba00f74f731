"""`train_feature_classifier`: seeded AdamW training of a `FeatureClassifier` with random-shift augmentation."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from piflow.checks import is_int, positive_float, positive_int
from piflow.eval.feature_model import FeatureClassifier, check_images

__all__ = ["train_feature_classifier"]


def _check_labels(y: Any, name: str, count: int, num_classes: int) -> Tensor:
    if not torch.is_tensor(y):
        raise ValueError(f"{name} must be a (N,) integer tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != count:
        raise ValueError(f"{name} must have shape ({count},) to match the images, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if count and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return y.to(torch.int64)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image of x (B, C, H, W) by its own random (dy, dx) in [-max_shift, max_shift] (edge padding)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)[None, :]  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)[None, :]  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _accuracy(model: FeatureClassifier, images: Tensor, labels: Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start:start + batch_size]).sum())
    return correct / images.shape[0]


def train_feature_classifier(images: Tensor, labels: Tensor, num_classes: int, epochs: int = 30,
                             batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                             val_images: Optional[Tensor] = None, val_labels: Optional[Tensor] = None,
                             progress: bool = False, *, feature_dim: int = 128,
                             widths: Sequence[int] = (32, 64, 128), weight_decay: float = 1e-4,
                             max_shift: Optional[int] = None,
                             stem_stride: Optional[int] = None) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Train a `FeatureClassifier` on images (N, C, H, W) in [-1, 1] with integer labels (N,).

    AdamW with linear warm-up then cosine decay; each batch is augmented by random shifts of up to
    `max_shift` pixels (default 1 for images smaller than 16 pixels, else 2). `stem_stride` defaults to 1 for
    images smaller than 16 pixels, else 2 (downsample at once: 28x28 trains ~4x faster). Deterministic for a
    given `seed` (initialization, shuffling and shifts all use it) on a given machine. Trains on `images.device`.

    Returns ``(model, metrics)``: the model in eval mode with gradients disabled, and metrics with
    ``val_accuracy`` (None without a validation set), ``train_accuracy``, ``train_loss`` (last epoch mean),
    ``epochs``, ``num_train``, ``num_val``.
    """
    images = check_images(images, "images", check_range=True)
    num_classes = positive_int(num_classes, "num_classes")
    if images.shape[0] < 1:
        raise ValueError("images must contain at least one image")
    labels = _check_labels(labels, "labels", images.shape[0], num_classes)
    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    lr = positive_float(lr, "lr")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if max_shift is None:
        max_shift = 1 if min(images.shape[2], images.shape[3]) < 16 else 2
    if not is_int(max_shift) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    if stem_stride is None:
        stem_stride = 1 if min(images.shape[2], images.shape[3]) < 16 else 2
    if (val_images is None) != (val_labels is None):
        raise ValueError("val_images and val_labels must be given together")
    if val_images is not None:
        val_images = check_images(val_images, "val_images", images.shape[1], check_range=True)
        if val_images.shape[0] < 1:
            raise ValueError("val_images must contain at least one image")
        val_labels = _check_labels(val_labels, "val_labels", val_images.shape[0], num_classes)
        val_images, val_labels = val_images.to(images.device, torch.float32), val_labels.to(images.device)

    device = images.device
    images, labels = images.to(torch.float32), labels.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = FeatureClassifier(images.shape[1], num_classes, feature_dim=feature_dim, widths=widths,
                                  stem_stride=stem_stride)
    model.to(device).train()
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(weight_decay))
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, min(total_steps // 10, 200))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    from piflow.progress import progress_bar

    bar = progress_bar(epochs, "feature classifier (epochs)", enabled=progress)
    epoch_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator).to(device)
        total, seen = 0.0, 0
        for start in range(0, images.shape[0], batch_size):
            index = order[start:start + batch_size]
            batch = random_shift(images[index], int(max_shift), generator)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * index.shape[0]
            seen += index.shape[0]
        epoch_loss = total / seen
        bar.set_postfix_str(f"loss {epoch_loss:.4f}")
        bar.update(1)
    bar.close()
    model.eval().requires_grad_(False)
    eval_batch = max(batch_size, 512)
    metrics: dict[str, Any] = {
        "val_accuracy": None if val_images is None else _accuracy(model, val_images, val_labels, eval_batch),
        "train_accuracy": _accuracy(model, images, labels, eval_batch),
        "train_loss": epoch_loss,
        "epochs": epochs,
        "num_train": int(images.shape[0]),
        "num_val": 0 if val_images is None else int(val_images.shape[0]),
    }
    return model, metrics
