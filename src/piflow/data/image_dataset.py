"""`ImageDataset`: the in-memory (or memory-mapped) container every image dataset in `piflow.data` builds on.

Item `i` is `(image, label)`: `image` a float32 (C, H, W) tensor scaled to [-1, 1] from its raw units (or
unscaled with `value_range=None`, e.g. latents) and `label` a 0-d int64 tensor.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from piflow.checks import is_int, positive_int
from piflow.errors import DataError

__all__ = ["ImageDataset"]

# Default cap on the float32 size of `ImageDataset.tensors()`.
_DEFAULT_MAX_TENSOR_BYTES = 8 * 2**30


def _check_finite_items(array: np.ndarray, name: str, chunk_bytes: int = 64 * 2**20) -> None:
    """ValueError naming the first item (index along axis 0) of `array` that holds NaN or ±Inf; one chunked pass,
    so memory-mapped files are not read into memory at once."""
    item_bytes = max(int(np.prod(array.shape[1:])) * array.dtype.itemsize, 1)
    step = max(chunk_bytes // item_bytes, 1)
    for start in range(0, array.shape[0], step):
        block = np.asarray(array[start:start + step])
        finite = np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
        if not finite.all():
            index = start + int(np.argmin(finite))

            raise DataError(f"{name} hold NaN or Inf values (first bad item: index {index})")


class ImageDataset(Dataset):
    """Class-conditional image dataset held in memory (or memory-mapped).

    Floating-point images are checked once for NaN/Inf (a `piflow.errors.DataError` names the first bad index).

    Images are stored in their raw units (e.g. uint8 0..255) and scaled on access:
    `image = (raw - low) / (high - low) * 2 - 1` for `value_range=(low, high)`; `value_range=None` means no
    scaling (the stored values are returned as float32, e.g. latents).

    Args:
        images: (N, C, H, W) numpy array or tensor, N >= 1.
        labels: (N,) integer labels in [0, num_classes); None gives every image label 0.
        num_classes: number of classes; default max(label) + 1 (1 without labels).
        class_names: optional names, one per class.
        value_range: (low, high) raw range mapped to [-1, 1], or None for no scaling.

    Attributes:
        num_classes: number of classes K.
        image_shape: (C, H, W) of every item.
        class_names: tuple of K names, or None.
    """

    _items_name = "images"

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor | Sequence[int] | None = None, *,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 value_range: tuple[float, float] | None = None) -> None:
        if isinstance(images, Tensor):
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array or tensor of shape (N, C, H, W), got "
                             f"{type(images).__name__}")
        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"images must have shape (N, C, H, W) with N >= 1, got shape {tuple(images.shape)}")
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(f"images must have an integer or floating dtype, got {images.dtype}")
        if np.issubdtype(images.dtype, np.floating):
            _check_finite_items(images, self._items_name)
        self._images = images
        self._labels = self._validate_labels(labels, images.shape[0])
        self._set_metadata(tuple(int(s) for s in images.shape[1:]), self._labels, num_classes, class_names)
        self.value_range = self._validate_value_range(value_range)

    # -- validation / metadata --------------------------------------------------------------------------------

    @staticmethod
    def _validate_labels(labels: Any, num_items: int) -> np.ndarray:
        """Return labels as a (N,) int64 array (zeros when `labels` is None)."""
        if labels is None:
            return np.zeros(num_items, dtype=np.int64)
        if isinstance(labels, Tensor):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels)
        if labels.shape != (num_items,):
            raise ValueError(f"labels must have shape ({num_items},), got shape {tuple(labels.shape)}")
        if num_items and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if num_items and int(labels.min()) < 0:
            raise ValueError(f"labels must be non-negative, got minimum {int(labels.min())}")
        return labels.astype(np.int64, copy=True)

    @staticmethod
    def _validate_value_range(value_range: Any) -> tuple[float, float] | None:
        if value_range is None:
            return None
        try:
            low, high = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise ValueError(f"value_range must be a (low, high) pair of floats or None, got {value_range!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"value_range must be finite with high > low, got {value_range!r}")
        return (low, high)

    def _set_metadata(self, image_shape: tuple[int, int, int], labels: np.ndarray, num_classes: int | None,
                      class_names: Sequence[str] | None) -> None:
        """Validate and set `image_shape`, `num_classes` and `class_names`."""
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
        self.image_shape: tuple[int, int, int] = image_shape
        max_label = int(labels.max()) if labels.size else -1
        if num_classes is None:
            num_classes = max(max_label + 1, 1)
        num_classes = positive_int(num_classes, "num_classes")
        if max_label >= num_classes:
            raise ValueError(f"labels must be < num_classes={num_classes}, got label {max_label}")
        self.num_classes: int = int(num_classes)
        if class_names is not None:
            class_names = tuple(str(c) for c in class_names)
            if len(class_names) != self.num_classes:
                raise ValueError(f"class_names must have num_classes={self.num_classes} entries, "
                                 f"got {len(class_names)}")
        self.class_names: tuple[str, ...] | None = class_names

    # -- access ---------------------------------------------------------------------------------------------

    @property
    def labels(self) -> Tensor:
        """(N,) int64 labels of the whole dataset."""
        return torch.from_numpy(self._labels.copy())

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def _index(self, index: Any) -> int:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        n = len(self)
        if i < -n or i >= n:
            raise IndexError(f"index {i} out of range for dataset of length {n}")
        return i % n

    def _scale(self, raw: np.ndarray) -> Tensor:
        """Raw (..., C, H, W) array -> float32 tensor, mapped to [-1, 1] when `value_range` is set."""
        out = torch.from_numpy(np.array(raw, dtype=np.float32, copy=True))
        if self.value_range is not None:
            low, high = self.value_range
            out.sub_(low).mul_(2.0 / (high - low)).sub_(1.0)
        return out

    def _load_image(self, i: int) -> Tensor:
        """Image `i` as a float32 (C, H, W) tensor (scaled)."""
        return self._scale(self._images[i])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Return (image float32 (C, H, W), label int64 0-d tensor)."""
        i = self._index(index)
        return self._load_image(i), torch.tensor(int(self._labels[i]), dtype=torch.long)

    def batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(images float32 (B, C, H, W), labels int64 (B,)) of the items at `indices` (B,): a training batch
        converted on its own, so datasets larger than `tensors()` allows (ImageNet latents) train too. `generator`
        serves datasets whose items are random draws (`LatentDataset` with posterior stds)."""
        index = np.asarray(indices.cpu(), dtype=np.int64)
        return self._scale(self._images[index]), torch.from_numpy(np.asarray(self._labels[index], dtype=np.int64))

    def _all_images(self) -> Tensor:
        """All images as a float32 (N, C, H, W) tensor (scaled)."""
        return self._scale(self._images)

    def tensors(self, max_bytes: int | None = _DEFAULT_MAX_TENSOR_BYTES) -> tuple[Tensor, Tensor]:
        """Return the whole dataset as (images float32 (N, C, H, W), labels int64 (N,)).

        Raises ValueError if the float32 images would exceed `max_bytes` (None: no limit); iterate with a
        `DataLoader` instead for such datasets.
        """
        needed = len(self) * math.prod(self.image_shape) * 4
        if max_bytes is not None:
            if not is_int(max_bytes) or max_bytes < 0:
                raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
            if needed > max_bytes:
                raise DataError(f"max_bytes={max_bytes}: the dataset needs {needed} bytes as float32 (N, C, H, W) "
                                f"images; pass a larger max_bytes (or None) or iterate with a DataLoader")
        return self._all_images(), self.labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(len={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")
