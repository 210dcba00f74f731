"""`LatentDataset`: pre-computed latents (e.g. VAE encodings) from `.npy` or `.safetensors` files, or a folder of
latent shards written by `piflow encode-images`."""
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

    Sources: a `.npy` array (N, C, H, W) with optional labels in the sibling `<stem>_labels.npy`, a
    `.safetensors` file with key "latents" (N, C, H, W) and optional "labels" (N,), or a folder of such
    safetensors shards (`piflow encode-images`): the shards its index.json lists, in order, or without an index
    every `shard-*.safetensors` sorted by name, concatenated (same latent shape and dtype in every shard). Without
    labels every item has label 0. `.npy` files are memory-mapped when `mmap=True`. A shard folder's index gives
    `num_classes` (unless given) and `class_names`, and is kept as `index` (its VAE scaling, for decoding); shards
    written with ``--store-std`` also give `latent_stds`, and `batch` then samples the posterior.
    """

    _items_name = "latents"

    def __init__(self, path: str | os.PathLike, num_classes: int | None = None, mmap: bool = True) -> None:
        self.path = Path(path)
        self.index: dict | None = None
        self.latent_stds: np.ndarray | None = None       # posterior stds (`encode-images --store-std`)
        class_names = None
        suffix = self.path.suffix.lower()
        if self.path.is_dir():
            latents, labels, self.latent_stds, self.index = self._load_shard_folder(self.path)
            listed = (self.index or {}).get("num_classes")
            if num_classes is None and isinstance(listed, int) and not isinstance(listed, bool) and listed > 0:
                num_classes = listed
            names = (self.index or {}).get("class_names")
            if isinstance(names, list) and len(names) == num_classes:
                class_names = names
        elif not self.path.is_file():
            raise FileNotFoundError(f"latent file or shard folder not found: {self.path}")
        elif suffix == ".npy":
            latents = self._load_npy(self.path, mmap)
            labels_path = self.path.with_name(f"{self.path.stem}_labels.npy")
            labels = self._load_npy(labels_path, False) if labels_path.is_file() else None
        elif suffix == ".safetensors":
            latents, labels = self._load_safetensors(self.path)
        else:
            raise ValueError(f"path must end with .npy or .safetensors (or be a folder of latent shards), got "
                             f"{self.path}")
        if not isinstance(latents, np.ndarray) or latents.ndim != 4:
            raise DataError(f"{self.path}: latents must have shape (N, C, H, W), got shape {np.shape(latents)}")
        try:
            super().__init__(latents, labels, num_classes=num_classes, class_names=class_names, value_range=None)
        except ValueError as error:

            raise DataError(f"{self.path}: {error}") from None

    def batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """As `ImageDataset.batch`; latents stored with their posterior stds are drawn from the posterior
        (mean + std·ε, ε from `generator`) when a generator is given, as REPA's training does."""
        latents, labels = super().batch(indices)
        if self.latent_stds is not None and generator is not None:
            stds = torch.from_numpy(np.asarray(self.latent_stds[np.asarray(indices.cpu(), dtype=np.int64)],
                                               dtype=np.float32))
            latents = latents + stds * torch.randn(latents.shape, generator=generator)
        return latents, labels

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

    @staticmethod
    def _load_shard_folder(folder: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict | None]:
        """(latents, labels or None, posterior stds or None, index or None) of a folder of safetensors shards; shapes, dtypes and the
        index's counts are checked from the headers first, then the shards are read into one array (each
        shard's latents checked for NaN/Inf, naming the shard)."""
        from safetensors import safe_open

        from piflow.data.image_dataset import _check_finite_items
        from piflow.files import read_json

        index_path = folder / "index.json"
        index, counts = None, None
        if index_path.is_file():
            index = read_json(index_path, "latent shard index")
            names = index.get("shards") if isinstance(index, dict) else None
            if not isinstance(names, list) or not names or not all(
                    isinstance(n, str) and Path(n).name == n and n.endswith(".safetensors") for n in names):
                raise DataError(f"latent shard index {index_path} must list its shards as .safetensors file names "
                                f"inside the folder (key 'shards')")
            counts = index.get("counts")
            if counts is not None and (not isinstance(counts, list) or len(counts) != len(names)):
                raise DataError(f"latent shard index {index_path}: 'counts' must give one count per shard")
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"latent shard folder {folder} misses {len(missing)} shards listed in "
                                        f"index.json, e.g. {missing[0]}")
        else:
            names = sorted(p.name for p in folder.glob("shard-*.safetensors") if p.is_file())
            if not names:
                raise FileNotFoundError(f"latent shard folder {folder} holds neither index.json nor "
                                        f"shard-*.safetensors files")
        floats = {"F16": np.float16, "BF16": np.float32, "F32": np.float32, "F64": np.float64}
        headers = []                                    # (path, rows, latent shape, dtype, has labels)
        for k, name in enumerate(names):
            path = folder / name
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys = set(handle.keys())
                    if "latents" not in keys:
                        raise DataError(f"latent shard {path} has no 'latents' (keys: {sorted(keys)})")
                    latent = handle.get_slice("latents")
                    shape, dtype = tuple(latent.get_shape()), latent.get_dtype()
                    has_stds = "latent_stds" in keys
                    if has_stds and tuple(handle.get_slice("latent_stds").get_shape()) != shape:
                        raise DataError(f"latent shard {path}: latent_stds must have the latents' shape {shape}")
                    label_info = None
                    if "labels" in keys:
                        labels = handle.get_slice("labels")
                        label_info = (tuple(labels.get_shape()), labels.get_dtype())
            except DataError:
                raise
            except Exception as error:      # SafetensorError, OSError: truncated or not safetensors
                raise DataError(f"latent shard {path} is not a readable safetensors file ({type(error).__name__})") \
                    from None
            if len(shape) != 4 or shape[0] < 1:
                raise DataError(f"latent shard {path}: latents must have shape (N, C, H, W), got {shape}")
            if dtype not in floats:
                raise DataError(f"latent shard {path}: latents must be floating point, got {dtype}")
            if label_info is not None and (label_info[0] != (shape[0],) or label_info[1][0] not in "IU"):
                raise DataError(f"latent shard {path}: labels must be ({shape[0]},) integers, got shape "
                                f"{label_info[0]} of {label_info[1]}")
            if counts is not None and counts[k] != shape[0]:
                raise DataError(f"latent shard {path} holds {shape[0]} latents, but index.json says {counts[k]}; "
                                f"rerun `piflow encode-images` on the folder")
            if headers and (shape[1:], dtype) != (headers[0][2], headers[0][3]):
                raise DataError(f"latent shard {path} holds {dtype} latents of shape {shape[1:]}, but "
                                f"{headers[0][0].name} holds {headers[0][3]} latents of shape {headers[0][2]}")
            if headers and (label_info is None) != (not headers[0][4]):
                raise DataError(f"latent shards {headers[0][0].name} and {name} disagree on having labels")
            if headers and has_stds != headers[0][5]:
                raise DataError(f"latent shards {headers[0][0].name} and {name} disagree on having latent_stds")
            headers.append((path, shape[0], shape[1:], dtype, label_info is not None, has_stds))
        total = sum(h[1] for h in headers)
        latents = np.empty((total, *headers[0][2]), dtype=floats[headers[0][3]])
        labels = np.empty(total, dtype=np.int64) if headers[0][4] else None
        stds = np.empty_like(latents) if headers[0][5] else None
        start = 0
        for path, rows, _, _, has_labels, has_stds in headers:
            with safe_open(str(path), framework="pt") as handle:
                for key, target in (("latents", latents), ("latent_stds", stds if has_stds else None)):
                    if target is None:
                        continue
                    block = handle.get_tensor(key)
                    block = (block.float() if block.dtype == torch.bfloat16 else block).numpy()
                    _check_finite_items(block, f"{key} of shard {path}")
                    target[start:start + rows] = block
                if has_labels:
                    labels[start:start + rows] = handle.get_tensor("labels").numpy()
            start += rows
        return latents, labels, stds, index

    def __repr__(self) -> str:
        return (f"LatentDataset(path={str(self.path)!r}, len={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")
