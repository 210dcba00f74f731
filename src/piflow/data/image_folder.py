"""`ImageFolderDataset`: PNG/JPEG files from a folder (optionally one sub-folder per class), read with Pillow."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from piflow.checks import is_int, positive_int
from piflow.errors import DataError
from piflow.data.image_dataset import ImageDataset
from piflow.data.raw_images import IMAGES_EXTRA_HINT

__all__ = ["ImageFolderDataset"]

_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def _import_pillow():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(f"ImageFolderDataset needs Pillow; {IMAGES_EXTRA_HINT}") from error
    return Image


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


class ImageFolderDataset(ImageDataset):
    """PNG/JPEG images from a folder, loaded lazily with Pillow, as (channels, image_size, image_size) in [-1, 1].

    Layout: either one sub-folder per class (`root/<class>/**/*.png`; sorted folder names give labels 0..K-1
    and `class_names`) or a flat folder of images (one class, label 0). Hidden files/folders are ignored.

    With `center_crop=True` each image is resized so its shorter side is `image_size` (bicubic) and then
    center-cropped; with `center_crop=False` images must be square and are only resized (a non-square image
    raises ValueError when loaded).
    """

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3, center_crop: bool = True,
                 extensions: Sequence[str] = _IMAGE_EXTENSIONS) -> None:
        self.image_mode = {3: "RGB", 1: "L"}.get(channels) if is_int(channels) else None
        if self.image_mode is None:
            raise ValueError(f"channels must be 3 (RGB) or 1 (grayscale), got {channels!r}")
        self.image_size = positive_int(image_size, "image_size")
        self.center_crop = bool(center_crop)
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        if not self.extensions:
            raise ValueError("extensions must name at least one file extension, e.g. ('.png', '.jpg')")
        _import_pillow()  # fail early with an install hint
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise ValueError(f"root must be a directory of images, got file {self.root}")
        self.files, labels, class_names = self._scan()
        self._labels = labels
        self.value_range = (0.0, 255.0)
        self._set_metadata((int(channels), self.image_size, self.image_size), labels,
                           len(class_names) if class_names else 1, class_names)

    def _is_image(self, path: Path) -> bool:
        return path.is_file() and not _is_hidden(path) and path.suffix.lower() in self.extensions

    def _images_under(self, folder: Path) -> list[Path]:
        """Sorted image files anywhere below `folder`, skipping hidden files and folders."""
        return sorted(p for p in folder.rglob("*") if self._is_image(p)
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))

    def _scan(self) -> tuple[list[Path], np.ndarray, tuple[str, ...] | None]:
        """Return (files, labels (N,) int64, class_names or None for a flat folder)."""
        top_files = sorted(p for p in self.root.iterdir() if self._is_image(p))
        subdirs = sorted((p for p in self.root.iterdir() if p.is_dir() and not _is_hidden(p)), key=lambda p: p.name)
        per_class = {d.name: self._images_under(d) for d in subdirs}
        if any(per_class.values()):
            if top_files:
                raise DataError(f"root {self.root} mixes class sub-folders with {len(top_files)} loose images "
                                f"(e.g. {top_files[0].name}); use either class sub-folders or a flat folder")
            empty = [name for name, files in per_class.items() if not files]
            if empty:
                raise DataError(f"class folders without {'/'.join(self.extensions)} images in {self.root}: {empty}")
            class_names = tuple(per_class)
            files = [f for name in class_names for f in per_class[name]]
            labels = np.concatenate([np.full(len(per_class[name]), k, dtype=np.int64)
                                     for k, name in enumerate(class_names)])
            return files, labels, class_names
        if not top_files:
            raise DataError(f"no images with extensions {list(self.extensions)} found in {self.root}")
        return top_files, np.zeros(len(top_files), dtype=np.int64), None

    def _load_image(self, i: int) -> Tensor:
        """Load, convert, resize and crop image `i` -> float32 (C, image_size, image_size) in [-1, 1]."""
        Image = _import_pillow()
        path = self.files[i]
        size = self.image_size
        try:
            with Image.open(path) as img:
                img = img.convert(self.image_mode)
        except (OSError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {path}: {error}") from None
        width, height = img.size
        if not self.center_crop and width != height:
            raise DataError(f"image {path} is {width}x{height}, but center_crop=False needs square images; "
                            f"use center_crop=True")
        if (width, height) != (size, size):
            scale = size / min(width, height)
            new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
            resample = getattr(Image, "Resampling", Image).BICUBIC
            img = img.resize(new_size, resample=resample)
            left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
        pixels = np.asarray(img, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
        return self._scale(pixels)

    def _all_images(self) -> Tensor:
        out = torch.empty((len(self),) + self.image_shape, dtype=torch.float32)
        for i in range(len(self)):
            out[i] = self._load_image(i)
        return out

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, len={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")
