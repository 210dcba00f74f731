"""IDX files (the MNIST format): `read_idx` / `write_idx`, and `load_idx_dataset` for Fashion-MNIST or MNIST.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (or any folder of the standard IDX files);
files may be plain or gzip-compressed.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np

from piflow.checks import positive_int
from piflow.errors import DataError
from piflow.data.digits import DIGIT_CLASSES
from piflow.data.image_dataset import ImageDataset
from piflow.data.raw_images import check_split, pad_raw, resize_raw

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "load_idx_dataset",
    "read_idx",
    "write_idx",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_MNIST_ROOT = "/usr/share/datasets/mnist"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

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
            raise DataError(f"{path}: corrupt or truncated gzip file ({error})") from None
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
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, need at least a 4-byte magic number)")
    zero0, zero1, type_code, num_dims = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or num_dims < 1:
        raise DataError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with type code "
                        f"TT in {sorted(f'0x{c:02X}' for c in _IDX_DTYPES)} and DD >= 1 dimensions)")
    header_size = 4 + 4 * num_dims
    if len(data) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_size} for {num_dims} dims)")
    shape = struct.unpack(f">{num_dims}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = header_size + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "over-long"
        raise DataError(f"{path}: {problem} IDX file: shape {shape} of {dtype.name} needs {expected} bytes, "
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
    "mnist": (DEFAULT_MNIST_ROOT, DIGIT_CLASSES),
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
        how = (f"run scripts/install_mnist.sh (files go to {DEFAULT_MNIST_ROOT}), put the standard MNIST IDX files in "
               f"{root} or pass root=<folder with the IDX files>")
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
    split = check_split(split, ("train", "test"))
    if image_size is not None:
        image_size = positive_int(image_size, "image_size")
    if pad_to is not None:
        pad_to = positive_int(pad_to, "pad_to")
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
        raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                        f"of shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: expected {images.shape[0]} labels of shape (N,), got shape {labels.shape}")
    if labels.size and int(labels.max()) >= len(class_names):
        raise DataError(f"{labels_path}: labels must be in [0, {len(class_names)}), got {int(labels.max())}")
    raw = images[:, None]  # (N, 1, H, W) uint8
    if image_size is not None:
        raw = resize_raw(raw, image_size)
    if pad_to is not None:
        raw = pad_raw(raw, pad_to)
    return ImageDataset(raw, labels.astype(np.int64), num_classes=len(class_names), class_names=class_names,
                        value_range=(0.0, 255.0))
