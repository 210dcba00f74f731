"""`LatentDataset`: pre-computed latents (e.g. VAE encodings) from `.npy` or `.safetensors` files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from piflow.data.image_dataset import ImageDataset
from piflow.errors import DataError

__all__ = ["LatentDataset"]


class LatentDataset(ImageDataset):
    """Pre-computed latents (e.g. VAE encodings), returned unscaled as float32 (C, H, W); latents holding NaN/Inf
    are refused with the file and the first bad index.

    Sources: a `.npy` array (N, C, H, W) with optional labels in the sibling `<stem>_labels.npy`, or a
    `.safetensors` file with key "latents" (N, C, H, W) and optional "labels" (N,). Without labels every item
    has label 0. `.npy` files are memory-mapped when `mmap=True`.
    """

    _items_name = "latents"

    def __init__(self, path: str | os.PathLike, num_classes: int | None = None, mmap: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"latent file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix == ".npy":
            latents = self._load_npy(self.path, mmap)
            labels_path = self.path.with_name(f"{self.path.stem}_labels.npy")
            labels = self._load_npy(labels_path, False) if labels_path.is_file() else None
        elif suffix == ".safetensors":
            latents, labels = self._load_safetensors(self.path)
        else:
            raise ValueError(f"path must end with .npy or .safetensors, got {self.path}")
        if not isinstance(latents, np.ndarray) or latents.ndim != 4:
            raise DataError(f"{self.path}: latents must have shape (N, C, H, W), got shape {np.shape(latents)}")
        try:
            super().__init__(latents, labels, num_classes=num_classes, value_range=None)
        except ValueError as error:

            raise DataError(f"{self.path}: {error}") from None

    @staticmethod
    def _load_npy(path: Path, mmap: bool) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from None

    @staticmethod
    def _load_safetensors(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        from piflow.files import load_safetensors

        tensors = load_safetensors(path, "latent file")
        if "latents" not in tensors:
            raise ValueError(f"{path}: expected key 'latents' (and optional 'labels'), found keys {sorted(tensors)}")

        def to_numpy(tensor: Tensor) -> np.ndarray:
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
                tensor = tensor.float()
            return tensor.numpy()

        labels = tensors.get("labels")
        return to_numpy(tensors["latents"]), None if labels is None else to_numpy(labels)

    def __repr__(self) -> str:
        return (f"LatentDataset(path={str(self.path)!r}, len={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")
