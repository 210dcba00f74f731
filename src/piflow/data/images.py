"""Offline image datasets for class-conditional training.

Every dataset here is an `ImageDataset`: item `i` is `(image, label)` with `image` a float32 (C, H, W) tensor
scaled to [-1, 1] (latents: returned unscaled) and `label` a 0-d int64 tensor, so a default `DataLoader`
collates batches to (B, C, H, W) float32 and (B,) int64. Sources:

- `load_digits_dataset`: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).
- `load_idx_dataset`: Fashion-MNIST (Debian package `dataset-fashion-mnist`) or MNIST from IDX files, read
  by our own `read_idx` (plain or gzip-compressed).
- `ImageFolderDataset`: a folder of PNG/JPEG files, optionally one sub-folder per class.
- `LatentDataset`: pre-computed latents from `.npy` or `.safetensors`.

`make_image_dataset(name, split, **kwargs)` dispatches by name. scikit-learn and Pillow are optional
dependencies (`pip install 'piflow[images]'`) and are imported only when needed.

This module holds the factory and re-exports the datasets, which live in `image_dataset` (the base),
`digits`, `idx`, `image_folder` and `latents`.
"""
from __future__ import annotations

from typing import Any

from piflow.data.digits import load_digits_dataset
from piflow.data.idx import (
    DEFAULT_FASHION_MNIST_ROOT,
    DEFAULT_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    load_idx_dataset,
    read_idx,
    write_idx,
)
from piflow.data.image_dataset import ImageDataset
from piflow.data.image_folder import ImageFolderDataset
from piflow.data.latents import LatentDataset

__all__ = [
    "IMAGE_DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_MNIST_ROOT",
    "ImageDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "load_digits_dataset",
    "load_idx_dataset",
    "make_image_dataset",
    "read_idx",
    "write_idx",
]

IMAGE_DATASET_NAMES: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "image-folder", "latents")
LABELS_ONLY = "classes"      # a distillation "dataset" of class labels only (data-free π-ID of a class-conditional teacher)


def make_image_dataset(name: str, split: str = "train", **kwargs: Any) -> ImageDataset:
    """Build an image dataset by name: one of `IMAGE_DATASET_NAMES`.

    - "digits": `load_digits_dataset(split, **kwargs)` (split train/test/all).
    - "fashion-mnist" / "mnist": `load_idx_dataset(split=split, kind=name, **kwargs)` (split train/test).
    - "image-folder": `ImageFolderDataset(**kwargs)` (root=..., image_size=...).
    - "latents": `LatentDataset(**kwargs)` (path=...).
    The folder and latent datasets have no built-in splits: `split` must be "train" or "all" for them (point
    `root` / `path` at the split you want). Underscores in `name` are accepted for dashes.
    """
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key == "digits":
        return load_digits_dataset(split=split, **kwargs)
    if key in ("fashion-mnist", "mnist"):
        return load_idx_dataset(split=split, kind=key, **kwargs)
    if key in ("image-folder", "latents"):
        if split not in ("train", "all"):
            raise ValueError(f"split must be 'train' or 'all' for {key!r} (it has no built-in splits; point "
                             f"{'root' if key == 'image-folder' else 'path'} at the split's data), got {split!r}")
        return ImageFolderDataset(**kwargs) if key == "image-folder" else LatentDataset(**kwargs)
    raise ValueError(f"name must be one of {list(IMAGE_DATASET_NAMES)}, got {name!r}")
