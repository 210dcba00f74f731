"""scikit-learn's bundled 8x8 handwritten digits as an `ImageDataset` (scikit-learn imported on use)."""
from __future__ import annotations

import numpy as np

from piflow.checks import is_int, positive_int
from piflow.data.image_dataset import ImageDataset
from piflow.data.raw_images import IMAGES_EXTRA_HINT, check_split, resize_raw

__all__ = ["DIGIT_CLASSES", "load_digits_dataset"]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: (train_indices, test_indices), each sorted ascending."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = int(round(test_fraction * members.size))
        test.append(members[:num_test])
        train.append(members[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_dataset(split: str = "train", test_fraction: float = 0.2, seed: int = 0,
                        image_size: int = 8) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 grayscale images, 10 classes) as an `ImageDataset`.

    Pixel values 0..16 are mapped to [-1, 1]; items are (1, image_size, image_size). The train/test split is
    stratified by class and deterministic given `seed`; `split="all"` returns every image.
    """
    split = check_split(split, ("train", "test", "all"))
    image_size = positive_int(image_size, "image_size")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    try:
        test_fraction = float(test_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}") from None
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(f"load_digits_dataset needs scikit-learn; {IMAGES_EXTRA_HINT}") from error

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        train_idx, test_idx = _stratified_split(labels, test_fraction, int(seed))
        keep = train_idx if split == "train" else test_idx
        if keep.size == 0:
            raise ValueError(f"test_fraction={test_fraction} leaves the {split!r} split empty")
        raw, labels = raw[keep], labels[keep]
    raw = resize_raw(raw, image_size)
    np.clip(raw, 0.0, 16.0, out=raw)
    return ImageDataset(raw, labels, num_classes=10, class_names=DIGIT_CLASSES, value_range=(0.0, 16.0))
