"""piflow's own feature network for image metrics (no pretrained Inception weights are available offline).

`FeatureClassifier` is a small CNN classifier for images (N, C, H, W), H, W >= 8 (8x8 digits, 28x28
(Fashion-)MNIST, 32x32, ...): conv stages (3x3 conv, GroupNorm, SiLU; stride 2 between stages) -> global
average pool -> linear + SiLU giving the feature vector (N, feature_dim) -> linear logits (N, num_classes).
Its penultimate features feed FD / KID / precision-recall in `piflow.eval.image_metrics`; metrics computed with
it are "FD in the features of piflow's classifier", comparable only between runs sharing one checkpoint.

- `train_feature_classifier(images, labels, num_classes, ...)`: seeded AdamW training with random shifts.
- `extract_features(model, images)`: batched, no-grad features (and optionally logits).
- `save_feature_classifier(model, directory, metrics)` / `load_feature_classifier(directory)`:
  ``config.json`` + ``model.safetensors`` + ``metrics.json``, each written atomically.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from piflow.files import atomic_write, dumps_json

__all__ = [
    "FeatureClassifier",
    "train_feature_classifier",
    "extract_features",
    "save_feature_classifier",
    "load_feature_classifier",
    "FEATURE_CLASSIFIER_FORMAT",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "METRICS_NAME",
]

FEATURE_CLASSIFIER_FORMAT = "piflow-feature-classifier"
_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.json"
MIN_IMAGE_SIZE = 8
_RANGE_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------

def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_images(x: Any, name: str, in_channels: Optional[int] = None, check_range: bool = False) -> Tensor:
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


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

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
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.num_classes = _positive_int(num_classes, "num_classes")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        self.feature_dim = _positive_int(feature_dim, "feature_dim")
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) == 0:
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        self.widths = tuple(_positive_int(w, "widths") for w in widths)
        self.groups = _positive_int(groups, "groups")
        if isinstance(stem_stride, bool) or not isinstance(stem_stride, numbers.Integral) \
                or stem_stride not in (1, 2):
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
        _check_images(x, "x", self.in_channels)
        h = self.stages(x.to(self.project.weight.dtype))  # (N, widths[-1], H', W')
        return F.silu(self.project(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes) of images x (N, C, H, W)."""
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
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
    images = _check_images(images, "images", check_range=True)
    num_classes = _positive_int(num_classes, "num_classes")
    if images.shape[0] < 1:
        raise ValueError("images must contain at least one image")
    labels = _check_labels(labels, "labels", images.shape[0], num_classes)
    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    lr = _positive_float(lr, "lr")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if max_shift is None:
        max_shift = 1 if min(images.shape[2], images.shape[3]) < 16 else 2
    if isinstance(max_shift, bool) or not isinstance(max_shift, numbers.Integral) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    if stem_stride is None:
        stem_stride = 1 if min(images.shape[2], images.shape[3]) < 16 else 2
    if (val_images is None) != (val_labels is None):
        raise ValueError("val_images and val_labels must be given together")
    if val_images is not None:
        val_images = _check_images(val_images, "val_images", images.shape[1], check_range=True)
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
            batch = _random_shift(images[index], int(max_shift), generator)
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


@torch.no_grad()
def extract_features(model: FeatureClassifier, images: Tensor, batch_size: int = 512,
                     return_logits: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Features (N, feature_dim) (and logits (N, num_classes) if `return_logits`) of images (N, C, H, W).

    Runs in batches without gradients, on the model's device; outputs are float32 on the images' device.
    Images should be in [-1, 1] like the training data (clamp generated samples first).
    """
    if not isinstance(model, FeatureClassifier):
        raise ValueError(f"model must be a FeatureClassifier, got {type(model).__name__}")
    _check_images(images, "images", model.in_channels)
    batch_size = _positive_int(batch_size, "batch_size")
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


# ----------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------

def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (dumps_json(data, sort_keys=True) + "\n").encode("utf-8"))


def save_feature_classifier(model: FeatureClassifier, directory: Union[str, Path],
                            metrics: dict[str, Any]) -> Path:
    """Write config.json, model.safetensors and metrics.json (holding its accuracy) into `directory`.

    Each file goes to a temporary file first and is renamed into place (os.replace), so a crash never leaves
    a half-written file. Returns the directory path.
    """
    from safetensors.torch import save as safetensors_bytes

    if not isinstance(model, FeatureClassifier):
        raise ValueError(f"model must be a FeatureClassifier, got {type(model).__name__}")
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict (e.g. from train_feature_classifier), got {type(metrics).__name__}")
    try:
        json.dumps(metrics)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metrics must be JSON-serializable: {error}") from None
    if not isinstance(directory, (str, Path)):
        raise ValueError(f"directory must be a str or Path, got {type(directory).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    data = safetensors_bytes(state, metadata={"format": FEATURE_CLASSIFIER_FORMAT})
    atomic_write(directory / WEIGHTS_NAME, data)
    config = {"format": FEATURE_CLASSIFIER_FORMAT, "version": _FORMAT_VERSION, **model.config()}
    _write_json(directory / CONFIG_NAME, config)
    _write_json(directory / METRICS_NAME, metrics)
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"feature classifier file {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_feature_classifier(directory: Union[str, Path],
                            map_location: Union[str, torch.device] = "cpu") -> tuple[FeatureClassifier, dict]:
    """Load ``(model, metrics)`` saved by `save_feature_classifier`; the model is in eval mode, frozen.

    Raises FileNotFoundError when the directory or one of its three files is missing, and ValueError when the
    config is not a piflow feature classifier or the weights do not match it.
    """
    from piflow.files import load_safetensors

    if not isinstance(directory, (str, Path)):
        raise ValueError(f"directory must be a str or Path, got {type(directory).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"feature classifier directory {directory} does not exist")
    config = _read_json(directory / CONFIG_NAME)
    if config.get("format") != FEATURE_CLASSIFIER_FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME} is not a piflow feature classifier config "
                         f"(format {config.get('format')!r}, expected {FEATURE_CLASSIFIER_FORMAT!r})")
    if config.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} has unsupported version {config.get('version')!r}")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"feature classifier file {weights_path} is missing")
    metrics = _read_json(directory / METRICS_NAME)
    kwargs = {key: config.get(key) for key in ("in_channels", "num_classes", "feature_dim", "widths", "groups")}
    kwargs["stem_stride"] = config.get("stem_stride", 1)
    try:
        model = FeatureClassifier(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / CONFIG_NAME} has invalid model settings: {error}") from None
    state = load_safetensors(weights_path, "feature classifier weights")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(state) if expected[name].shape != state[name].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"{weights_path} does not match {CONFIG_NAME}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape-mismatched {mismatched[:5]}")
    model.load_state_dict(state)
    model.to(map_location).eval().requires_grad_(False)
    return model, metrics
