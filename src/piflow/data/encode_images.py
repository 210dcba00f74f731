"""`piflow encode-images`: ImageNet-style images → VAE latent shards (the "train cache" of latent-space π-ID).

Sources (`scan_image_folder`, `scan_tar_shards`):

* an ImageNet-style class folder, ``root/<class_name>/**/*.JPEG|jpg|jpeg|png|webp``: the sorted sub-folder names are
  the classes, labels 0..C-1 (ImageNet's standard synset order is the sorted wnid order); a class index JSON
  (``{"n01440764": 0, …}``, or the ``{"0": ["n01440764", "tench"], …}`` layout) gives the labels instead. A folder
  without sub-folders is one class (label 0). A class folder without images keeps its label and is noted.
* webdataset ``.tar`` shards: each sample is an image member (``<key>.jpg|jpeg|png|webp``) and a ``<key>.cls`` text
  member holding its integer label. The tars are read with `tarfile` (members are read into memory, never
  extracted to disk; nothing in them is executed).

Preprocessing (`adm_center_crop`): ADM's (guided-diffusion's) center crop, re-derived: RGB; while the shorter side is
at least twice the resolution, halve both sides (integer division) with a BOX filter; then resize with BICUBIC so
that the shorter side equals the resolution (the other side rounded); then crop the center resolution × resolution
(offsets ``(side - resolution) // 2``); pixels to [-1, 1] as ``x / 127.5 - 1``.

Encoding (`encode_images`): a diffusers `AutoencoderKL` (`load_vae`); ``latents = (posterior mean - shift_factor) ×
scaling_factor`` (shift 0 when the VAE's config has none); with ``store_std`` also ``latent_stds = posterior std ×
scaling_factor``, so that ``latents + latent_stds · ε`` is a posterior sample in the same units; with ``flip`` every
image is followed by its horizontally flipped copy, encoded separately (``flipped = 1``).

Output folder: ``shard-00000.safetensors`` … (``shard_size`` source images each; twice as many latents with
``flip``), each with ``latents`` (N, C, H/f, W/f) in the chosen dtype, ``labels`` (N,) int64, ``flipped`` (N,)
uint8, ``indices`` (N,) int64 (the source image's position in the scan order), optional ``latent_stds``, and string
metadata (format, vae, scaling_factor, shift_factor, resolution, preprocessing, …, a hash of the shard's images);
plus ``index.json`` (shards, counts, classes, latent scaling; `LatentDataset` reads the folder). Decoding:
``vae.decode(latents / scaling_factor + shift_factor)``.

Resuming and ranks: each shard is written atomically; a shard that exists with the same settings and the same
images is kept, a missing or unreadable one is (re)written (with the temporary file a killed write left), a shard
written with other settings or from other images is an error (use a new folder). Under torchrun, shard k belongs to
rank k mod WORLD_SIZE; rank 0 writes index.json after a barrier when a process group is initialised, otherwise the
call that finds every shard complete writes it.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

from piflow.errors import ConfigError, DataError, require
from piflow.integrations.diffusers.vae import load_vae, vae_factors, vae_location  # noqa: F401 (re-exported)

__all__ = ["FORMAT", "PREPROCESSING", "ImageItem", "ImageSource", "EncodeResult", "adm_center_crop",
           "preprocess_image", "to_model_input", "read_class_index", "scan_image_folder", "expand_shard_list",
           "scan_tar_shards", "vae_location", "load_vae", "encode_images", "shard_name"]

FORMAT = "piflow-latent-shards-v1"
PREPROCESSING = "adm-center-crop"
FOLDER_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".webp")      # compared lower-case (ImageNet: .JPEG)
TAR_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_MAX_CLS_BYTES = 1024
PathLike = Union[str, os.PathLike]


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _pillow():
    return require("PIL.Image", "piflow encode-images")


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------

def adm_center_crop(image, size: int):
    """ADM's center crop of a PIL image to `size` × `size` (see the module docstring); the image's mode is kept
    (convert to RGB first)."""
    Image = _pillow()
    resampling = getattr(Image, "Resampling", Image)
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """Encoded image bytes → (size, size, 3) uint8 RGB after `adm_center_crop`; an unreadable image is a
    `DataError` naming `name`."""
    Image = _pillow()
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:    # UnidentifiedImageError is an OSError
        from piflow.files import one_line

        raise DataError(f"cannot read image {name}: {one_line(error, 200)}") from None
    return np.asarray(adm_center_crop(rgb, size), dtype=np.uint8)


def to_model_input(pixels: Sequence[np.ndarray]) -> Tensor:
    """(H, W, 3) uint8 arrays → a float32 (B, 3, H, W) batch in [-1, 1] (``x / 127.5 - 1``)."""
    batch = torch.from_numpy(np.stack([np.ascontiguousarray(p) for p in pixels]))
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------

class ImageItem(NamedTuple):
    name: str                   # stable id: "<class>/<file>" (folder) or "<tar file name>/<member>" (tar)
    label: int
    path: str                   # the image file, or the tar file
    member: Optional[str]       # the tar member (None for a folder image)


@dataclass
class ImageSource:
    """The images to encode, in a fixed order (shard k holds items [k·shard_size, (k+1)·shard_size))."""
    kind: str                                   # "image-folder" or "webdataset"
    items: list[ImageItem]
    num_classes: int
    class_names: Optional[tuple[str, ...]]
    locations: tuple[str, ...]                  # the folder, or the tar files (absolute)
    empty_classes: tuple[str, ...] = ()

    def describe(self) -> dict:
        key = "root" if self.kind == "image-folder" else "shards"
        return {"kind": self.kind, key: self.locations[0] if self.kind == "image-folder" else list(self.locations)}


def read_class_index(path: PathLike, option: str = "class index") -> dict[str, int]:
    """A JSON class index → {class name: label}, labels exactly 0..C-1. Accepted layouts: ``{"name": label}`` or
    ``{"label": ["name", description…]}`` (the common ImageNet ``imagenet_class_index.json``)."""
    from piflow.files import read_json

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option} {path} does not exist")
    try:
        data = read_json(path, option)
    except DataError as error:
        raise ConfigError(str(error)) from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{option} {path} must be a non-empty JSON object mapping class folder names to labels")
    if all(isinstance(v, list) and v and isinstance(v[0], str) for v in data.values()):
        if not all(re.fullmatch(r"\d+", k) for k in data):
            raise ConfigError(f"{option} {path}: in the {{\"label\": [\"name\", …]}} layout every key must be a "
                              f"label (digits)")
        mapping = {v[0]: int(k) for k, v in data.items()}
        if len(mapping) != len(data):
            raise ConfigError(f"{option} {path} names a class twice")
    else:
        bad = [k for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise ConfigError(f"{option} {path}: labels must be integers, got {data[bad[0]]!r} for {bad[0]!r}")
        mapping = dict(data)
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ConfigError(f"{option} {path}: the labels must be 0..{len(mapping) - 1}, each once")
    return mapping


def _class_names(mapping: Mapping[str, int]) -> tuple[str, ...]:
    return tuple(name for name, _ in sorted(mapping.items(), key=lambda item: item[1]))


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _folder_images(folder: Path) -> list[Path]:
    """The image files anywhere below `folder`, hidden files and folders skipped, sorted by relative path."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(Path(directory, f) for f in files
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in FOLDER_EXTENSIONS)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def scan_image_folder(root: PathLike, class_index: Optional[Mapping[str, int]] = None,
                      option: str = "image folder") -> ImageSource:
    """The images of an ImageNet-style class folder (see the module docstring); `option` names the argument in
    error messages (e.g. "--images")."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{option} {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"{option} {root} is a file; give the folder that holds one sub-folder per class")
    subdirs = sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    loose = sorted(p for p in root.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in FOLDER_EXTENSIONS)
    extensions = "/".join(FOLDER_EXTENSIONS)
    root_abs = str(root.resolve())
    if not subdirs:
        if not loose:
            raise ConfigError(f"{option} {root} holds no {extensions} images (expected one sub-folder per class)")
        if class_index is not None:
            raise ConfigError(f"{option} {root} has no class sub-folders, so a class index does not apply")
        items = [ImageItem(p.name, 0, str(p), None) for p in loose]
        return ImageSource("image-folder", items, 1, None, (root_abs,))
    if loose:
        raise ConfigError(f"{option} {root} mixes class sub-folders with {len(loose)} loose images (e.g. "
                          f"{loose[0].name}); use one sub-folder per class")
    if class_index is not None:
        unknown = [d.name for d in subdirs if d.name not in class_index]
        if unknown:
            raise ConfigError(f"class folders {unknown[:5]} of {option} {root} are not in the class index "
                              f"({len(unknown)} unknown)")
        labels = {d.name: class_index[d.name] for d in subdirs}
        num_classes, class_names = len(class_index), _class_names(class_index)
        subdirs = sorted(subdirs, key=lambda d: labels[d.name])
    else:
        labels = {d.name: k for k, d in enumerate(subdirs)}
        num_classes, class_names = len(subdirs), tuple(d.name for d in subdirs)
    items, empty = [], []
    for folder in subdirs:
        files = _folder_images(folder)
        if not files:
            empty.append(folder.name)
        items.extend(ImageItem(f"{folder.name}/{f.relative_to(folder).as_posix()}", labels[folder.name], str(f), None)
                     for f in files)
    if not items:
        raise ConfigError(f"{option} {root}: none of its {len(subdirs)} class folders holds {extensions} images")
    return ImageSource("image-folder", items, num_classes, class_names, (root_abs,), tuple(empty))


def expand_shard_list(text: str, option: str = "shards") -> list[Path]:
    """Comma-separated tar paths → paths. An entry may hold one numeric brace range (``train-{0000..0127}.tar``,
    zero-padded as written) or glob characters (``*?[``, sorted matches)."""
    paths: list[Path] = []
    for entry in (part.strip() for part in str(text).split(",")):
        if not entry:
            continue
        match = re.search(r"\{(\d+)\.\.(\d+)\}", entry)
        if match:
            first, last = match.group(1), match.group(2)
            if int(last) < int(first):
                raise ConfigError(f"{option}: the range {match.group(0)} in {entry!r} counts down")
            width = len(first) if first.startswith("0") else 0
            paths.extend(Path(entry[:match.start()] + str(k).zfill(width) + entry[match.end():])
                         for k in range(int(first), int(last) + 1))
        elif any(c in entry for c in "*?["):
            matches = sorted(glob.glob(entry))
            if not matches:
                raise ConfigError(f"{option}: no file matches {entry!r}")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(entry))
    if not paths:
        raise ConfigError(f"{option} names no tar files")
    return paths


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's (key, extension): the extension is everything after the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def scan_tar_shards(paths: Sequence[PathLike], class_index: Optional[Mapping[str, int]] = None,
                    option: str = "shards") -> ImageSource:
    """The samples of webdataset tar shards, in file order (see the module docstring). A class index, if given,
    names the classes (by label) and fixes their number; labels must lie below it."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{option} lists {repeated[0]} twice (tar file names must be distinct)")
    items: list[ImageItem] = []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{option}: {path} does not exist" if not path.exists() else
                              f"{option}: {path} is not a file")
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(path, "r:*") as archive:
                for member in archive:
                    if not member.isfile() or posixpath.basename(member.name).startswith("."):
                        continue
                    key, extension = _split_member(member.name)
                    sample = samples.setdefault(key, {})
                    if extension in TAR_IMAGE_EXTENSIONS:
                        if "image" in sample:
                            raise DataError(f"{path}: sample {key!r} holds two images ({sample['image']} and "
                                            f"{member.name})")
                        sample["image"] = member.name
                    elif extension == "cls":
                        handle = archive.extractfile(member)
                        text = handle.read(_MAX_CLS_BYTES + 1) if handle is not None else b""
                        try:
                            label = int(text.decode("ascii").strip())
                        except (UnicodeDecodeError, ValueError):
                            label = -1
                        if len(text) > _MAX_CLS_BYTES or label < 0:
                            raise DataError(f"{path}: {member.name} must hold a non-negative integer label, got "
                                            f"{text[:40]!r}")
                        sample["label"] = label
        except (tarfile.TarError, EOFError) as error:
            raise ConfigError(f"{option}: {path} is not a readable tar file ({error})") from None
        for key, sample in samples.items():
            if "image" in sample and "label" not in sample:
                raise DataError(f"{path}: sample {key!r} has an image but no .cls label")
            if "label" in sample and "image" not in sample:
                raise DataError(f"{path}: sample {key!r} has a .cls label but no "
                                f"{'/'.join(TAR_IMAGE_EXTENSIONS)} image")
            if "image" in sample:
                items.append(ImageItem(f"{path.name}/{sample['image']}", sample["label"], str(path.resolve()),
                                       sample["image"]))
    if not items:
        raise ConfigError(f"{option}: the tar files hold no samples (an image member with a .cls label)")
    top = max(item.label for item in items)
    if class_index is not None:
        if top >= len(class_index):
            raise DataError(f"{option}: label {top} is not below the class index's {len(class_index)} classes")
        num_classes, class_names = len(class_index), _class_names(class_index)
    else:
        num_classes, class_names = top + 1, None
    return ImageSource("webdataset", items, num_classes, class_names, tuple(str(p.resolve()) for p in paths))


class _Reader:
    """Reads the encoded bytes of items: files directly, tar members through `tarfile` (the last few tars kept
    open, each with its member table)."""

    def __init__(self, keep_open: int = 2):
        self.keep_open = keep_open
        self.archives: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def read(self, item: ImageItem) -> bytes:
        try:
            if item.member is None:
                return Path(item.path).read_bytes()
            archive, members = self._archive(item.path)
            member = members.get(item.member)
            handle = archive.extractfile(member) if member is not None else None
            if handle is None:
                raise DataError(f"tar file {item.path} no longer holds {item.member} (changed since the scan?)")
            return handle.read()
        except (OSError, tarfile.TarError) as error:
            raise DataError(f"cannot read image {item.name} from {item.path}: {error}") from None

    def _archive(self, path: str):
        if path not in self.archives:
            while len(self.archives) >= self.keep_open:
                oldest = next(iter(self.archives))
                self.archives.pop(oldest)[0].close()
            archive = tarfile.open(path, "r:*")
            self.archives[path] = (archive, {m.name: m for m in archive.getmembers() if m.isfile()})
        return self.archives[path]

    def close(self) -> None:
        for archive, _ in self.archives.values():
            archive.close()
        self.archives.clear()


# ----------------------------------------------------------------------------------------------------------------
# the VAE
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class EncodeResult:
    out: Path
    num_images: int
    num_latents: int
    num_shards: int
    rank: int
    world_size: int
    written: list[int] = field(default_factory=list)     # shards this call encoded
    kept: list[int] = field(default_factory=list)        # shards of this rank found complete
    index_written: bool = False
    notes: list[str] = field(default_factory=list)


def _items_hash(items: Iterable[ImageItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.name}\t{item.label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


_SETTING_KEYS = ("format", "vae", "scaling_factor", "shift_factor", "resolution", "preprocessing", "flip",
                 "store_std", "dtype", "shard_size")
_SOURCE_KEYS = ("shard", "num_images", "items_sha256")


def _shard_state(path: Path, expected: dict[str, str], count: int, shape: tuple[int, ...], store_std: bool) -> str:
    """"complete", "missing" or "unreadable"; a shard written with other settings or from other images is a
    `ConfigError` (the folder belongs to another encoding)."""
    from safetensors import safe_open

    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception:        # SafetensorError, OSError: truncated or not safetensors
        return "unreadable"
    for key in _SETTING_KEYS:
        if metadata.get(key) != expected[key]:
            raise ConfigError(f"{path} was encoded with {key}={metadata.get(key)!r}, not {expected[key]!r}; write "
                              f"to a new --out folder (or delete this one)")
    for key in _SOURCE_KEYS:
        if metadata.get(key) != expected[key]:
            raise ConfigError(f"{path} was encoded from other images than shard {expected['shard']} of this source "
                              f"(the images changed since?); write to a new --out folder (or delete this one)")
    wanted = {"latents": (count, *shape), "labels": (count,), "flipped": (count,), "indices": (count,)}
    if store_std:
        wanted["latent_stds"] = (count, *shape)
    if any(shapes.get(key) != value for key, value in wanted.items()):
        return "unreadable"
    return "complete"


def _decoded(items: Sequence[ImageItem], reader: _Reader, resolution: int, workers: int) -> Iterator[np.ndarray]:
    """The preprocessed images of `items`, in order; with `workers` > 0 decoded by a thread pool (Pillow releases
    the GIL) a window ahead of the consumer, the bytes read in this thread (tar files are not thread-safe)."""
    if workers <= 0:
        for item in items:
            yield preprocess_image(reader.read(item), resolution, item.name)
        return
    from concurrent.futures import ThreadPoolExecutor

    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="piflow-decode") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(preprocess_image, reader.read(item), resolution, item.name))
                if len(pending) > window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def encode_images(source: ImageSource, out: PathLike, vae, *, resolution: int = 256, vae_name: Optional[str] = None,
                  batch_size: int = 32, shard_size: int = 1000, flip: bool = False, store_std: bool = False,
                  dtype: str = "fp32", workers: int = 0, progress: bool = True, dist_info=None,
                  log: Optional[Callable[[str], None]] = None) -> EncodeResult:
    """Encode `source` into latent shards in `out` with `vae` (an AutoencoderKL, on the device to encode on); see
    the module docstring. `batch_size` counts VAE inputs (flipped copies included). `dist_info` (rank, world
    size) defaults to the process group's or torchrun's environment (`distributed.from_environment`). Returns what
    was written, kept and whether index.json was written."""
    from piflow.checks import is_int
    from piflow.files import save_safetensors
    from piflow.progress import progress_bar
    from piflow.train import distributed

    say = log or (lambda text: print(f"piflow encode-images: {text}", file=sys.stderr, flush=True))
    if not is_int(resolution) or resolution < 8 or resolution % 8:
        raise ConfigError(f"--resolution must be a positive multiple of 8, got {resolution!r}")
    for option, value in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value!r}")
    if not is_int(workers) or workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers!r}")
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    if not source.items:
        raise ConfigError("there are no images to encode")
    scaling, shift, channels, factor = vae_factors(vae)
    if resolution % factor:
        raise ConfigError(f"--resolution {resolution} must be divisible by the VAE's down-sampling factor {factor}")
    shape = (channels, resolution // factor, resolution // factor)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    info = dist_info if dist_info is not None else distributed.from_environment()
    store_dtype = STORE_DTYPES[dtype]
    vae_name = str(vae_name if vae_name is not None else vae.config.get("_name_or_path", ""))
    settings = {"format": FORMAT, "vae": vae_name, "scaling_factor": repr(scaling), "shift_factor": repr(shift),
                "resolution": str(resolution), "preprocessing": PREPROCESSING, "flip": str(int(bool(flip))),
                "store_std": str(int(bool(store_std))), "dtype": _DTYPE_NAMES[store_dtype],
                "shard_size": str(shard_size)}
    items = source.items
    num_shards = -(-len(items) // shard_size)
    copies = 2 if flip else 1

    def shard_items(shard: int) -> list[ImageItem]:
        return items[shard * shard_size:(shard + 1) * shard_size]

    def expected(shard: int) -> dict[str, str]:
        chosen = shard_items(shard)
        return {**settings, "shard": str(shard), "num_images": str(len(chosen)), "items_sha256": _items_hash(chosen)}

    def state(shard: int) -> str:
        return _shard_state(out / shard_name(shard), expected(shard), copies * len(shard_items(shard)), shape,
                            store_std)

    beyond = sorted(p.name for p in out.glob("shard-*.safetensors")
                    if re.fullmatch(r"shard-(\d+)\.safetensors", p.name)
                    and int(p.name[6:-12]) >= num_shards)
    if beyond:
        raise ConfigError(f"--out {out} holds {beyond[0]}, beyond the {num_shards} shards of this source (another "
                          f"encoding?); write to a new --out folder (or delete this one)")
    result = EncodeResult(out, len(items), copies * len(items), num_shards, info.rank, info.world_size)
    mine = [k for k in range(num_shards) if k % info.world_size == info.rank]
    todo = []
    for shard in mine:
        status = state(shard)
        if status == "complete":
            result.kept.append(shard)
        else:
            if status == "unreadable":
                result.notes.append(f"{shard_name(shard)} was unreadable or incomplete and is rewritten")
                say(result.notes[-1])
            todo.append(shard)
    device = next(vae.parameters()).device
    vae_dtype = next(vae.parameters()).dtype
    total = sum(len(shard_items(k)) for k in mine)
    done = sum(len(shard_items(k)) for k in result.kept)
    where = f" (rank {info.rank}/{info.world_size})" if info.world_size > 1 else ""
    bar = progress_bar(total, f"encoding images{where}", initial=done, enabled=progress and bool(todo))
    reader = _Reader()

    def encode_into(views: list[np.ndarray], means: list[Tensor], stds: list[Tensor]) -> None:
        """Encode `views` (then emptied), appending the scaled posterior means and stds."""
        x = to_model_input(views).to(device=device, dtype=vae_dtype)
        with torch.inference_mode():
            posterior = vae.encode(x).latent_dist
            means.append(((posterior.mean.float() - shift) * scaling).cpu())
            stds.append((posterior.std.float() * scaling).cpu())
        views.clear()

    try:
        for shard in todo:
            chosen = shard_items(shard)
            first = shard * shard_size
            means: list[Tensor] = []
            stds: list[Tensor] = []
            views: list[np.ndarray] = []
            flags, positions = [], []
            for offset, pixels in enumerate(_decoded(chosen, reader, resolution, workers)):
                for flipped in ((0, 1) if flip else (0,)):
                    views.append(pixels[:, ::-1] if flipped else pixels)
                    flags.append(flipped)
                    positions.append(first + offset)
                    if len(views) == batch_size:
                        encode_into(views, means, stds)
                bar.update(1)
            if views:
                encode_into(views, means, stds)
            tensors = {"latents": torch.cat(means).to(store_dtype),
                       "labels": torch.tensor([items[p].label for p in positions], dtype=torch.int64),
                       "flipped": torch.tensor(flags, dtype=torch.uint8),
                       "indices": torch.tensor(positions, dtype=torch.int64)}
            if store_std:
                tensors["latent_stds"] = torch.cat(stds).to(store_dtype)
            for key in ("latents", "latent_stds"):      # NaN from the VAE, or overflow of fp16
                bad = (~torch.isfinite(tensors[key].flatten(1)).all(dim=1)).nonzero() if key in tensors else []
                if len(bad):
                    item = items[positions[int(bad[0])]]
                    raise DataError(f"the {key} of {item.name} ({item.path}) hold NaN or Inf in "
                                    f"{_DTYPE_NAMES[store_dtype]}; {shard_name(shard)} was not written")
            path = out / shard_name(shard)
            for stale in out.glob(f".{path.name}.*.tmp"):      # left by a killed write of this shard
                stale.unlink(missing_ok=True)
            save_safetensors(path, tensors, metadata=expected(shard))
            result.written.append(shard)
    finally:
        bar.close()
        reader.close()

    if info.world_size > 1 and distributed.current().enabled:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.barrier()
        if not info.is_main:
            return result
    incomplete = [k for k in range(num_shards) if k not in result.written and k not in result.kept
                  and state(k) != "complete"]
    if incomplete:
        result.notes.append(f"{len(incomplete)} of {num_shards} shards (e.g. {shard_name(incomplete[0])}) are not "
                            f"written yet (other ranks); index.json is written by the call that completes them")
        return result
    counts = [copies * len(shard_items(k)) for k in range(num_shards)]
    index = {"format": FORMAT, "shards": [shard_name(k) for k in range(num_shards)], "counts": counts,
             "num_latents": sum(counts), "num_images": len(items), "shard_size": shard_size,
             "num_classes": source.num_classes,
             "class_names": list(source.class_names) if source.class_names is not None else None,
             "empty_classes": list(source.empty_classes),
             "latent_shape": list(shape), "dtype": _DTYPE_NAMES[store_dtype],
             "keys": ["latents", "labels", "flipped", "indices"] + (["latent_stds"] if store_std else []),
             "vae": vae_name, "scaling_factor": scaling, "shift_factor": shift,
             "decode": "images = vae.decode(latents / scaling_factor + shift_factor)",
             "resolution": resolution, "preprocessing": PREPROCESSING, "flip": bool(flip),
             "store_std": bool(store_std), "source": source.describe()}
    if store_std:
        index["latent_stds"] = "posterior std × scaling_factor: latents + latent_stds · ε is a posterior sample"
    from piflow.files import write_json

    write_json(out / "index.json", index)
    result.index_written = True
    return result


def index_summary(out: PathLike) -> str:
    """One line about an encoded folder's index.json (for the CLI)."""
    index = json.loads((Path(out) / "index.json").read_text(encoding="utf-8"))
    return (f"{index['num_latents']} latents of shape {tuple(index['latent_shape'])} ({index['num_images']} images"
            f"{', each with a flipped copy' if index['flip'] else ''}; {index['num_classes']} classes) in "
            f"{len(index['shards'])} shards")
