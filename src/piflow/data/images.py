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
"""
from __future__ import annotations

import gzip
import math
import numbers
import operator
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

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

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_MNIST_ROOT = "/usr/share/datasets/mnist"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

_IMAGES_EXTRA_HINT = "install it with: pip install 'piflow[images]'"

# Default cap on the float32 size of `ImageDataset.tensors()`.
_DEFAULT_MAX_TENSOR_BYTES = 8 * 2**30


# ----------------------------------------------------------------------------------------------------------------
# Small validation helpers
# ----------------------------------------------------------------------------------------------------------------

def _is_int(value: object) -> bool:
    """True for Python/numpy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value: object, name: str) -> int:
    if not _is_int(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_split(split: object, allowed: Sequence[str]) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}")
    return str(split)


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
            from piflow.errors import DataError

            raise DataError(f"{name} hold NaN or Inf values (first bad item: index {index})")


# ----------------------------------------------------------------------------------------------------------------
# ImageDataset: the common in-memory container
# ----------------------------------------------------------------------------------------------------------------

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
        if not _is_int(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
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
            if not _is_int(max_bytes) or max_bytes < 0:
                raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
            if needed > max_bytes:
                raise ValueError(f"max_bytes={max_bytes}: the dataset needs {needed} bytes as float32 (N, C, H, W) "
                                 f"images; pass a larger max_bytes (or None) or iterate with a DataLoader")
        return self._all_images(), self.labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(len={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")


# ----------------------------------------------------------------------------------------------------------------
# Resizing / padding helpers (raw units, (N, C, H, W))
# ----------------------------------------------------------------------------------------------------------------

def _resize_raw(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Bilinearly resize raw (N, C, H, W) images to (N, C, size, size); uint8 input stays uint8 (rounded)."""
    if images.shape[-2:] == (size, size):
        return images
    is_uint8 = images.dtype == np.uint8
    out = np.empty(images.shape[:2] + (size, size), dtype=np.uint8 if is_uint8 else np.float32)
    downsampling = size < max(images.shape[-2:])
    for start in range(0, images.shape[0], chunk):
        block = torch.from_numpy(np.asarray(images[start:start + chunk], dtype=np.float32))
        block = F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=downsampling)
        if is_uint8:
            block = block.round_().clamp_(0, 255)
        out[start:start + chunk] = block.numpy()
    return out


def _pad_raw(images: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad raw (N, C, H, W) images symmetrically to (N, C, pad_to, pad_to) (extra row/col at bottom/right)."""
    height, width = images.shape[-2:]
    if pad_to < max(height, width):
        raise ValueError(f"pad_to must be >= the image size {max(height, width)}, got {pad_to}")
    top, left = (pad_to - height) // 2, (pad_to - width) // 2
    out = np.zeros(images.shape[:2] + (pad_to, pad_to), dtype=images.dtype)
    out[:, :, top:top + height, left:left + width] = images
    return out


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------------------------

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
    split = _check_split(split, ("train", "test", "all"))
    image_size = _positive_int(image_size, "image_size")
    if not _is_int(seed):
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
        raise ImportError(f"load_digits_dataset needs scikit-learn; {_IMAGES_EXTRA_HINT}") from error

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        train_idx, test_idx = _stratified_split(labels, test_fraction, int(seed))
        keep = train_idx if split == "train" else test_idx
        if keep.size == 0:
            raise ValueError(f"test_fraction={test_fraction} leaves the {split!r} split empty")
        raw, labels = raw[keep], labels[keep]
    raw = _resize_raw(raw, image_size)
    np.clip(raw, 0.0, 16.0, out=raw)
    return ImageDataset(raw, labels, num_classes=10, class_names=_DIGIT_CLASSES, value_range=(0.0, 16.0))


# ----------------------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)
# ----------------------------------------------------------------------------------------------------------------

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (numpy dtype kind, itemsize) -> IDX type code, for writing.
_IDX_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file is gzip-compressed (detected by its magic bytes)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, ValueError) as error:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({error})") from None
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed, into a native-endian numpy array.

    Header: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions D, then D big-endian uint32 sizes; the data follows big-endian.
    Raises ValueError on a bad magic number, unknown type code, or a truncated / over-long file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, need at least a 4-byte magic number)")
    zero0, zero1, type_code, num_dims = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or num_dims < 1:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with type code "
                         f"TT in {sorted(f'0x{c:02X}' for c in _IDX_DTYPES)} and DD >= 1 dimensions)")
    header_size = 4 + 4 * num_dims
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_size} for {num_dims} dims)")
    shape = struct.unpack(f">{num_dims}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = header_size + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "over-long"
        raise ValueError(f"{path}: {problem} IDX file: shape {shape} of {dtype.name} needs {expected} bytes, "
                         f"got {len(data)}")
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_size)
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzip-compressed when `path` ends with `.gz`)."""
    array = np.asarray(array)
    code = _IDX_CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(f"array dtype must be one of uint8, int8, int16, int32, float32, float64; got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array must have 1..255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


_IDX_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fashion-mnist": (DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES),
    "mnist": (DEFAULT_MNIST_ROOT, _DIGIT_CLASSES),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx_file(root: Path, stem: str) -> Path | None:
    """Find `<stem>` in root under its standard spellings ('train-images-idx3-ubyte', '.'-variant, '.gz')."""
    dotted = stem[::-1].replace("-", ".", 1)[::-1]  # train-images-idx3-ubyte -> train-images-idx3.ubyte
    alt = stem.replace("-idx", ".idx")  # train-images-idx3-ubyte -> train-images.idx3-ubyte
    for name in (stem, alt, dotted):
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _missing_idx_message(kind: str, root: Path, missing: list[str]) -> str:
    if kind == "fashion-mnist":
        how = ("install the Debian package with `apt-get install dataset-fashion-mnist` (files go to "
               f"{DEFAULT_FASHION_MNIST_ROOT}) or pass root=<folder with the IDX files>")
    else:
        how = f"put the standard MNIST IDX files in {root} (or pass root=<folder with the IDX files>)"
    return f"{kind} files not found in {root}: missing {', '.join(missing)} (optionally .gz); {how}"


def load_idx_dataset(root: str | os.PathLike | None = None, split: str = "train", kind: str = "fashion-mnist",
                     image_size: int | None = None, pad_to: int | None = None) -> ImageDataset:
    """Fashion-MNIST or MNIST from standard IDX files as an `ImageDataset` of (1, H, W) images in [-1, 1].

    Files: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
    `t10k-labels-idx1-ubyte`, each optionally `.gz`. `root` defaults to /usr/share/datasets/fashion-mnist
    (Debian `dataset-fashion-mnist`) or /usr/share/datasets/mnist. `image_size` resizes 28 -> image_size
    (bilinear); `pad_to` then zero-pads (background, -1) to pad_to x pad_to, e.g. 28 -> 32.
    """
    if kind not in _IDX_KINDS:
        raise ValueError(f"kind must be one of {list(_IDX_KINDS)}, got {kind!r}")
    split = _check_split(split, ("train", "test"))
    if image_size is not None:
        image_size = _positive_int(image_size, "image_size")
    if pad_to is not None:
        pad_to = _positive_int(pad_to, "pad_to")
    default_root, class_names = _IDX_KINDS[kind]
    root = Path(default_root if root is None else root)
    prefix = _IDX_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_idx_file(root, stem) for stem in stems]
    missing = [stem for stem, path in zip(stems, found) if path is None]
    if missing:
        raise FileNotFoundError(_missing_idx_message(kind, root, missing))
    images_path, labels_path = found
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                         f"of shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels of shape (N,), got shape {labels.shape}")
    if labels.size and int(labels.max()) >= len(class_names):
        raise ValueError(f"{labels_path}: labels must be in [0, {len(class_names)}), got {int(labels.max())}")
    raw = images[:, None]  # (N, 1, H, W) uint8
    if image_size is not None:
        raw = _resize_raw(raw, image_size)
    if pad_to is not None:
        raw = _pad_raw(raw, pad_to)
    return ImageDataset(raw, labels.astype(np.int64), num_classes=len(class_names), class_names=class_names,
                        value_range=(0.0, 255.0))


# ----------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------

_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def _import_pillow():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(f"ImageFolderDataset needs Pillow; {_IMAGES_EXTRA_HINT}") from error
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
        self.image_mode = {3: "RGB", 1: "L"}.get(channels) if _is_int(channels) else None
        if self.image_mode is None:
            raise ValueError(f"channels must be 3 (RGB) or 1 (grayscale), got {channels!r}")
        self.image_size = _positive_int(image_size, "image_size")
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
                raise ValueError(f"root {self.root} mixes class sub-folders with {len(top_files)} loose images "
                                 f"(e.g. {top_files[0].name}); use either class sub-folders or a flat folder")
            empty = [name for name, files in per_class.items() if not files]
            if empty:
                raise ValueError(f"class folders without {'/'.join(self.extensions)} images in {self.root}: {empty}")
            class_names = tuple(per_class)
            files = [f for name in class_names for f in per_class[name]]
            labels = np.concatenate([np.full(len(per_class[name]), k, dtype=np.int64)
                                     for k, name in enumerate(class_names)])
            return files, labels, class_names
        if not top_files:
            raise ValueError(f"no images with extensions {list(self.extensions)} found in {self.root}")
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
            raise ValueError(f"cannot read image {path}: {error}") from None
        width, height = img.size
        if not self.center_crop and width != height:
            raise ValueError(f"image {path} is {width}x{height}, but center_crop=False needs square images; "
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


# ----------------------------------------------------------------------------------------------------------------
# Pre-computed latents
# ----------------------------------------------------------------------------------------------------------------

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
            raise ValueError(f"{self.path}: latents must have shape (N, C, H, W), got shape {np.shape(latents)}")
        try:
            super().__init__(latents, labels, num_classes=num_classes, value_range=None)
        except ValueError as error:
            from piflow.errors import DataError

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


# ----------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------

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
