"""ImageNet evaluation by the ADM protocol: FID, sFID, Inception Score, precision and recall of uint8 samples.

The ImageNet-256 numbers of ADM, DiT and π-Flow come from OpenAI's guided-diffusion ``evaluations/evaluator.py``
("the ADM evaluator", TensorFlow): 50,000 samples against the reference batch ``VIRTUAL_imagenet256_labeled.npz``
(10,000 ImageNet images). This module computes the same quantities in PyTorch:

* **Images**: uint8 RGB (N, H, W, 3) from an ``.npz`` whose ``arr_0`` holds them (the ADM sample and reference batch
  format; read with ``allow_pickle=False``, streamed batch by batch) or from a folder of 8-bit RGB ``.png`` files
  (sorted by name). Nothing is resized or converted here: the network resizes to 299×299 itself (TF1-exact bilinear,
  as the TF graph does) and maps [0, 255] to [-1, 1].
* **Network**: the TF Inception-v3 graph of 2015-12-05 (``classify_image_graph_def.pb``, the graph the ADM evaluator
  loads) as ported to PyTorch by torch-fidelity 0.3.0 (``FeatureExtractorInceptionV3``, "inception-v3-compat"): the
  same weights and layers; torch-fidelity reports its outputs match TensorFlow's up to float round-off (not verified
  here: no TensorFlow and no real weights offline). The weights file is loaded by piflow with
  ``torch.load(weights_only=True)`` (or from ``.safetensors``), never unpickled with code, and nothing is downloaded:
  `INCEPTION_WEIGHTS_URL` is where to get it. On CUDA, TF32 is switched off while features are extracted.
* **Features** per image: pool3 (2048, ADM's ``pool_3:0``); unbiased logits (1008: pool3 @ the softmax weights, no
  bias, as ADM's Inception Score takes them from ``softmax/logits/MatMul``); spatial features for sFID (ADM's
  ``mixed_6/conv:0``[..., :7] = the first 7 channels of torch-fidelity's ``Mixed_6d.branch1x1`` output after its
  ReLU, 17×17×7 = 2023, flattened in NHWC order as ADM does — torch-fidelity's weight converter maps ``mixed_6/conv``
  to ``Mixed_6d.branch1x1``; that the TF tensor is the post-ReLU one is the graph's naming, not checked here).
* **FID** = ||mu_s - mu_r||² + tr C_s + tr C_r - 2 tr sqrt(C_s C_r) on pool3, C the unbiased (N - 1) covariance as
  ``np.cov``; **sFID** the same on the spatial features. ADM takes tr sqrt(C_s C_r) from scipy's ``sqrtm``; here it
  is `piflow.eval.image_metrics.frechet_distance` (eigenvalues of sqrt(C_s) C_r sqrt(C_s)), or, when a set has no
  more images than feature dimensions, the nuclear norm of A_s A_r^T (A: centred features / sqrt(N - 1)), which is
  the same number in exact arithmetic and far cheaper then. Differences to ADM: round-off.
* **Inception Score** = mean over splits of exp(mean_i KL(p_i || p̄)), p_i = softmax of the unbiased logits, p̄ the
  split's mean, in float64 from log-softmax. Splits are consecutive, unshuffled blocks [i N / S, (i + 1) N / S): ADM
  uses blocks of 5,000, which for its 50,000 samples are exactly the default S = 10 here (for other N they differ);
  torch-fidelity's own IS shuffles first (seed 2020), ADM and piflow do not. ADM reports the mean only; so does this.
* **Precision / recall** (Kynkäänniemi et al. 2019, k = 3, pool3): `piflow.eval.image_metrics.
  precision_recall_density_coverage(reference, samples, k=3)` — precision = fraction of samples inside the ball of
  some reference image, recall = fraction of reference images inside the ball of some sample, a ball's radius being
  the distance to the 3rd-nearest *other* member of its own set, boundary inside (<=). That is ADM's definition (it
  compares squared distances; the same order). ADM computes those distances in float16 (float32 where float16
  overflows), piflow in float64, so a point within round-off of a boundary can count differently.
* **Reference statistics are recomputed** from ``arr_0`` with this network; the ``mu``/``sigma``/``mu_s``/
  ``sigma_s`` stored in ADM's reference ``.npz`` (computed by TensorFlow) are not read, so that both sides of every
  metric come from one network.

The reference features (pool3 and spatial, float32) are cached next to the reference, in
``<reference name>.adm-inception-<weights SHA-256[:12]>.safetensors`` (written atomically), whose metadata holds the
SHA-256 of the reference file (or PNG folder) and of the weights; a changed reference or weights file is featurised
again and the cache rewritten. Hashing a 2 GB reference takes seconds; featurising it takes minutes to hours.

torch-fidelity 0.3.0 imports torchvision in its package ``__init__`` only for its dataset wrappers; when torchvision
is not installed, piflow imports torch-fidelity's Inception module (which needs only torch) without running that
``__init__`` (`_inception_class`), so ``pip install torch-fidelity==0.3.0 --no-deps`` is enough (Pillow reads PNG
folders; scipy is not used). None of torch-fidelity's metric functions is used: they live in modules that import
torchvision.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import math
import os
import re
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from piflow.checks import positive_int
from piflow.errors import CheckpointError, DataError, MissingExtraError, require
from piflow.eval.image_metrics import feature_statistics, frechet_distance, precision_recall_density_coverage
from piflow.files import first_line, one_line, save_safetensors
from piflow.progress import progress_bar

__all__ = [
    "INCEPTION_WEIGHTS_FLAG",
    "INCEPTION_WEIGHTS_URL",
    "InceptionFeatures",
    "adm_metrics",
    "adm_metrics_from_features",
    "inception_score",
    "load_image_batch",
    "load_inception_weights",
    "reference_cache_path",
]

INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
"""torch-fidelity 0.3.0's download address of its Inception-v3 port (pytorch-fid serves a file named
``pt_inception-2015-12-05-6726825d.pth``; the same SHA-256 prefix in the name suggests the same bytes, and either
loads if it holds this layout)."""
INCEPTION_WEIGHTS_FLAG = "--inception-weights"
"""The command-line flag that names the weights file (quoted in the missing-file error)."""

FEATURE_DIMS = {"pool": 2048, "logits": 1008, "spatial": 7 * 17 * 17}
PR_NEIGHBOURS = 3
_CACHE_FORMAT = "piflow-adm-reference-features"
_CACHE_VERSION = "1"
_EXPECTED_IMAGES = "an .npz whose arr_0 holds uint8 (N, H, W, 3) RGB images, or a folder of 8-bit RGB .png files"
_FIDELITY_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

def _read_exactly(handle, size: int) -> bytearray:
    """`size` bytes from a (zip member) file object, or fewer at its end (a writable buffer)."""
    buffer = bytearray()
    while len(buffer) < size:
        chunk = handle.read(size - len(buffer))
        if not chunk:
            break
        buffer += chunk
    return buffer


class _Images:
    """uint8 (N, H, W, 3) images from an ``.npz`` (``arr_0``), a folder of PNGs or an array, read batch by batch.

    Everything that can be checked without decoding pixels (the npz header, every PNG's mode and size) is checked
    when this is made, so a bad input fails before minutes of featurisation; errors are one-line `DataError`s
    naming `name` (the argument).
    """

    def __init__(self, source, name: str):
        self.name = name
        self.path: Optional[Path] = None
        self._array: Optional[np.ndarray] = None
        self._files: list[Path] = []
        self._npz_offset: Optional[int] = None       # None: arr_0 is read whole by np.load (unusual npy headers)
        if isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            if self.path.is_dir():
                self._open_folder()
            elif self.path.is_file():
                self._open_npz()
            else:
                raise DataError(f"{name} {self.path} does not exist (expected {_EXPECTED_IMAGES})")
        elif isinstance(source, np.ndarray) or torch.is_tensor(source):
            array = source.detach().cpu().numpy() if torch.is_tensor(source) else source
            self._check_layout(array.dtype, array.shape, f"{name}")
            self._array = np.ascontiguousarray(array)
            self.shape = tuple(array.shape)
        else:
            raise DataError(f"{name} must be a path ({_EXPECTED_IMAGES}) or a uint8 (N, H, W, 3) array, "
                            f"got {type(source).__name__}")

    @property
    def count(self) -> int:
        return self.shape[0]

    def _check_layout(self, dtype, shape, where: str) -> None:
        if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise DataError(f"{where} must hold uint8 (N, H, W, 3) RGB images, got {np.dtype(dtype)} "
                            f"{tuple(shape)}")
        if min(shape[:3]) < 1:
            raise DataError(f"{where} holds no images (shape {tuple(shape)}); expected uint8 (N, H, W, 3) with "
                            f"N, H, W >= 1")

    def _open_npz(self) -> None:
        where = f"{self.name} {self.path}"
        if self.path.suffix.lower() != ".npz":
            raise DataError(f"{where} is neither an .npz file nor a folder (expected {_EXPECTED_IMAGES})")
        shape = dtype = None
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = archive.namelist()
                if "arr_0.npy" in names:
                    with archive.open("arr_0.npy") as member:
                        version = np.lib.format.read_magic(member)
                        if version in ((1, 0), (2, 0)):
                            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                           else np.lib.format.read_array_header_2_0)
                            shape, fortran_order, dtype = read_header(member)
                            self._npz_offset = None if fortran_order else member.tell()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as error:
            raise DataError(f"{where} is not a readable .npz file ({type(error).__name__}: {one_line(error, 160)})"
                            ) from None
        if "arr_0.npy" not in names:
            stored = ", ".join(sorted(n[:-4] for n in names if n.endswith(".npy"))[:8]) or "none"
            raise DataError(f"{where} has no arr_0 (arrays: {stored}); expected uint8 (N, H, W, 3) images in arr_0")
        if dtype is not None:
            self._check_layout(dtype, shape, f"{where}: arr_0")      # before any data is read (object arrays too)
        if shape is None or self._npz_offset is None:                # npy format 3.0 or Fortran order: read whole
            array = self._load_whole_npz()
            dtype, shape = array.dtype, array.shape
            self._check_layout(dtype, shape, f"{where}: arr_0")
        self.shape = tuple(shape)

    def _load_whole_npz(self) -> np.ndarray:
        where = f"{self.name} {self.path}"
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                return archive["arr_0"]
        except ValueError as error:      # an object array: it would need unpickling, which is refused
            raise DataError(f"{where}: arr_0 cannot be read without unpickling ({one_line(error, 120)}); expected "
                            f"uint8 (N, H, W, 3) images") from None

    def _open_folder(self) -> None:
        where = f"{self.name} {self.path}"
        self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        if not self._files:
            raise DataError(f"{where} is a folder without .png files (expected {_EXPECTED_IMAGES})")
        image_module = require("PIL.Image", "reading a folder of PNG images")
        size = None
        for file in self._files:
            try:
                with image_module.open(file) as image:
                    mode, this_size = image.mode, image.size
            except (OSError, ValueError, image_module.DecompressionBombError) as error:
                raise DataError(f"{self.name} {file} is not a readable PNG image ({one_line(error, 120)})") from None
            if mode != "RGB":
                raise DataError(f"{self.name} {file} has mode {mode!r}; expected 8-bit RGB images (uint8 "
                                f"(N, H, W, 3)), as ADM's evaluator reads")
            size = size or this_size
            if this_size != size:
                raise DataError(f"{self.name} {file} is {this_size[0]}x{this_size[1]} but {self._files[0].name} is "
                                f"{size[0]}x{size[1]}; all images of one batch must have one size")
        self.shape = (len(self._files), size[1], size[0], 3)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive uint8 (B, H, W, 3) batches of at most `batch_size` images."""
        if self._array is not None:
            for start in range(0, self.count, batch_size):
                yield self._array[start:start + batch_size]
        elif self._files:
            from PIL import Image

            for start in range(0, self.count, batch_size):
                images = []
                for file in self._files[start:start + batch_size]:
                    with Image.open(file) as image:
                        images.append(np.asarray(image))
                    if images[-1].shape != self.shape[1:] or images[-1].dtype != np.uint8:
                        raise DataError(f"{self.name} {file} changed while being read: now {images[-1].dtype} "
                                        f"{images[-1].shape}, expected uint8 {self.shape[1:]}")
                yield np.stack(images)
        elif self._npz_offset is None:
            array = self._load_whole_npz()
            for start in range(0, self.count, batch_size):
                yield array[start:start + batch_size]
        else:
            yield from self._npz_batches(batch_size)

    def _npz_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Stream arr_0 from the zip member (stored or deflated) without holding the whole array in memory."""
        item_shape = self.shape[1:]
        item_bytes = int(np.prod(item_shape))
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as member:
            member.seek(self._npz_offset)
            for start in range(0, self.count, batch_size):
                count = min(batch_size, self.count - start)
                data = _read_exactly(member, count * item_bytes)
                if len(data) != count * item_bytes:
                    first_incomplete = start + len(data) // item_bytes
                    raise DataError(f"{self.name} {self.path}: arr_0 is truncated (image {first_incomplete} of "
                                    f"{self.count} is incomplete)")
                yield np.frombuffer(data, dtype=np.uint8).reshape((count, *item_shape))

    def read_all(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.uint8)
        start = 0
        for batch in self.batches(1024):
            out[start:start + len(batch)] = batch
            start += len(batch)
        return out

    def sha256(self) -> str:
        """SHA-256 of the file, or of the folder's (name, SHA-256 of content) pairs in order."""
        if self._files:
            digest = hashlib.sha256()
            for file in self._files:
                digest.update(file.name.encode() + b"\0" + bytes.fromhex(_sha256_file(file)))
            return digest.hexdigest()
        return _sha256_file(self.path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_image_batch(path: PathLike, name: str = "path") -> np.ndarray:
    """uint8 images (N, H, W, 3) from an ``.npz`` (``arr_0``, read with ``allow_pickle=False``) or a folder of 8-bit
    RGB ``.png`` files (sorted by name). Anything else — a missing path, another suffix, no ``arr_0``, a dtype other
    than uint8, not 3 channels, no images, PNGs of other modes or of differing sizes — raises a one-line
    `DataError` (a ValueError) that names `name` and the expected layout."""
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(f"{name} must be a path ({_EXPECTED_IMAGES}), got {type(path).__name__}")
    return _Images(path, name).read_all()


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------

def _inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3``.

    torch-fidelity's package ``__init__`` imports its dataset wrappers, which import torchvision; the Inception
    module itself needs only torch. Without torchvision, a stand-in package object (made from torch-fidelity's
    own import spec, so its submodules are found where they are installed) is put in ``sys.modules`` while the
    Inception module and its three torch-only dependencies are imported, then removed again.
    """
    module = sys.modules.get(_FIDELITY_MODULE)
    if module is not None:
        return module.FeatureExtractorInceptionV3
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise MissingExtraError("ADM evaluation needs torch-fidelity (its PyTorch port of the TF Inception-v3), "
                                "which is not installed: pip install torch-fidelity==0.3.0 --no-deps")
    if "torch_fidelity" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        try:
            return importlib.import_module(_FIDELITY_MODULE).FeatureExtractorInceptionV3
        except ImportError:         # a broken torchvision: fall through to the import without the package __init__
            module = sys.modules.get(_FIDELITY_MODULE)
            if module is not None:
                return module.FeatureExtractorInceptionV3
    package = importlib.util.module_from_spec(spec)
    sys.modules["torch_fidelity"] = package
    try:
        module = importlib.import_module(_FIDELITY_MODULE)
    finally:
        if sys.modules.get("torch_fidelity") is package:
            del sys.modules["torch_fidelity"]
    return module.FeatureExtractorInceptionV3


def _torch_fidelity_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("torch-fidelity")
    except metadata.PackageNotFoundError:
        return "unknown"


_NETWORK_CLASS = None


def _inception_network() -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (pool3 and unbiased logits) on the meta device: the layers, without weights.

    Its constructor loads weights itself (``torch.load`` of a path, or a download when given none). Here it is
    handed an in-memory, piflow-written empty dict instead of a path, and the subclass skips that one
    ``load_state_dict`` call, so the constructor neither downloads nor unpickles anything of the user's;
    `InceptionFeatures` then assigns the weights it read safely (``load_state_dict(assign=True)``).
    """
    global _NETWORK_CLASS
    if _NETWORK_CLASS is None:
        base = _inception_class()

        class PiflowInceptionV3(base):
            _skip_constructor_load = True

            def load_state_dict(self, state_dict, *args, **kwargs):
                if self._skip_constructor_load:
                    self._skip_constructor_load = False
                    return None
                return super().load_state_dict(state_dict, *args, **kwargs)

        _NETWORK_CLASS = PiflowInceptionV3
    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    with torch.device("meta"):
        return _NETWORK_CLASS("inception-v3-compat", ["2048", "logits_unbiased"],
                              feature_extractor_weights_path=placeholder)


def _missing_weights_message(path: Path) -> str:
    return (f"Inception weights file {path} does not exist: download {INCEPTION_WEIGHTS_URL} (torch-fidelity's "
            f"PyTorch port of the TF Inception-v3 that ADM's evaluator uses; piflow downloads nothing) and pass its "
            f"path with {INCEPTION_WEIGHTS_FLAG}")


def load_inception_weights(path: PathLike) -> dict[str, Tensor]:
    """The Inception-v3 state dict in `path` (a ``.pth`` of torch-fidelity's layout, or ``.safetensors``), read
    without running code: ``torch.load(weights_only=True)`` (torch >= 2.6) admits only tensors and plain containers,
    so a pickle holding any other object is refused with a one-line `CheckpointError` and never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(_missing_weights_message(path))
    if path.suffix.lower() == ".safetensors":
        from piflow.files import load_safetensors

        try:
            return load_safetensors(path, what="Inception weights file")
        except ValueError as error:
            raise CheckpointError(first_line(error)) from None
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 6):
        raise CheckpointError(f"reading Inception weights file {path} safely needs torch >= 2.6 (its restricted "
                              f"unpickler); this is torch {torch.__version__} — convert it to .safetensors with a "
                              f"newer torch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:        # UnpicklingError (a refused object), RuntimeError / EOFError (corrupt), ...
        raise CheckpointError(f"Inception weights file {path} was refused: it is corrupt or holds objects other "
                              f"than tensors and plain containers, and is never unpickled with code "
                              f"({type(error).__name__}: {_unpickler_reason(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"Inception weights file {path} must hold a state dict (str -> tensor), got "
                              f"{type(state).__name__}")
    return state


def _unpickler_reason(error: BaseException) -> str:
    """The informative line of torch's (multi-line, ANSI-coloured) weights_only refusal: the refused global."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:      # drop torch's how-to-bypass advice
            return one_line(line.replace("WeightsUnpickler error: ", "").split(" Please use ")[0], 200)
    return one_line(next((line for line in lines if line), type(error).__name__), 200)


def _check_weights_layout(state: dict[str, Tensor], expected: dict[str, Tensor], path: Path) -> None:
    """One-line `CheckpointError` unless `state` has exactly the network's keys (``num_batches_tracked`` optional,
    as torch-fidelity's converter writes none), shapes and finite floating-point values."""
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    missing = [key for key in expected if key not in state and key not in optional]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the network's {len(expected) - len(optional)} keys missing "
                            f"(first: {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(f"Inception weights file {path} does not hold torch-fidelity's Inception-v3 state dict: "
                              f"{', '.join(problems)}")
    for key, tensor in state.items():
        if key in optional:
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"Inception weights file {path}: {key} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[key].shape)}")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"Inception weights file {path}: {key} must hold finite floating-point values, "
                                  f"got dtype {tensor.dtype}")


@contextmanager
def _ieee_float32(device: torch.device):
    """Full float32 (no TF32) in CUDA convolutions and matmuls inside the block, as TensorFlow's Inception ran."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        previous = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = previous
    else:
        previous = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = previous


class InceptionFeatures:
    """ADM's Inception-v3 features of uint8 (N, H, W, 3) images, given a local weights file.

    ``features = InceptionFeatures(weights_path, device)(images)`` returns a dict of float32 CPU tensors:
    ``pool`` (N, 2048) pool3, ``logits`` (N, 1008) unbiased logits and ``spatial`` (N, 2023) sFID features (see
    the module docstring). `images` is a path (an ``.npz`` with ``arr_0``, or a folder of PNGs) or a uint8
    (N, H, W, 3) array; it is read and featurised in batches of `batch_size`, with a progress bar (plain lines when
    stderr is not a terminal). `weights_sha256` identifies the weights (the reference cache is keyed by it).
    A missing weights file raises a one-line `CheckpointError` naming the file, `INCEPTION_WEIGHTS_URL` and
    `INCEPTION_WEIGHTS_FLAG`.
    """

    def __init__(self, weights_path: PathLike, device: Union[str, torch.device, None] = None, batch_size: int = 64):
        self.batch_size = positive_int(batch_size, "batch_size")
        self.weights_path = Path(weights_path)
        state = load_inception_weights(self.weights_path)
        self.weights_sha256 = _sha256_file(self.weights_path)
        network = _inception_network()
        _check_weights_layout(state, network.state_dict(), self.weights_path)
        network.load_state_dict({key: value.float() if value.is_floating_point() else value
                                 for key, value in state.items()}, assign=True)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network.eval().to(self.device)
        self._spatial: Optional[Tensor] = None
        self.network.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: Tensor) -> None:
        # ADM: mixed_6/conv:0 (N, 17, 17, 192 in TF's NHWC)[..., :7], flattened per image
        self._spatial = output[:, :7].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    def _extract(self, batch: np.ndarray) -> dict[str, Tensor]:
        """Features of one uint8 (B, H, W, 3) batch (float32, CPU)."""
        if not (batch.flags.writeable and batch.flags.c_contiguous):
            batch = np.array(batch, order="C")
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
        with torch.inference_mode():
            pool, logits = self.network(x)
            spatial, self._spatial = self._spatial, None
        return {"pool": pool.float().cpu(), "logits": logits.float().cpu(), "spatial": spatial.float().cpu()}

    def __call__(self, images, name: str = "images", batch_size: Optional[int] = None,
                 progress: bool = True) -> dict[str, Tensor]:
        source = images if isinstance(images, _Images) else _Images(images, name)
        batch_size = self.batch_size if batch_size is None else positive_int(batch_size, "batch_size")
        out = {key: torch.empty(source.count, dim, dtype=torch.float32) for key, dim in FEATURE_DIMS.items()}
        bar = progress_bar(source.count, f"Inception features ({source.name})", enabled=progress)
        start = 0
        try:
            with _ieee_float32(self.device):
                for batch in source.batches(batch_size):
                    features = self._extract(batch)
                    for key, buffer in out.items():
                        buffer[start:start + len(batch)] = features[key]
                    start += len(batch)
                    bar.update(len(batch))
        finally:
            bar.close()
        return out


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------

def inception_score(logits, splits: int = 10) -> float:
    """Inception Score from unbiased logits (N, 1008): the mean over `splits` consecutive, unshuffled blocks
    [i N / S, (i + 1) N / S) of exp(mean_i KL(p_i || p̄)), p = softmax(logits), p̄ the block's mean (float64)."""
    splits = positive_int(splits, "splits")
    if not torch.is_tensor(logits):
        logits = torch.as_tensor(logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, C), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"the Inception score's {splits} splits need at least {splits} samples, got {n}")
    log_p = torch.log_softmax(logits.detach().double(), dim=1)
    if not bool(torch.isfinite(log_p).all()):
        raise ValueError("logits contains NaN or infinite values")
    scores = []
    for i in range(splits):
        block = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = torch.logsumexp(block, dim=0) - math.log(block.shape[0])
        kl = (block.exp() * (block - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """FD between Gaussian fits (mean, unbiased covariance) of features f1 (N1, D) and f2 (N2, D), float64.

    With more images than dimensions in both sets: `frechet_distance` of `feature_statistics` (a D×D eigenproblem).
    Otherwise tr sqrt(C1 C2) = ||A1 A2^T||_* (A = centred features / sqrt(N - 1); the nonzero eigenvalues of
    A1^T A1 A2^T A2 are the squared singular values of A1 A2^T), a min(N1, N2)-sized eigenproblem.
    """
    a, b = f1.double(), f2.to(f1.device).double()
    (n1, d), n2 = a.shape, b.shape[0]
    if min(n1, n2) > d:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    mu1, mu2 = a.mean(dim=0), b.mean(dim=0)
    centred1, centred2 = (a - mu1) / math.sqrt(n1 - 1), (b - mu2) / math.sqrt(n2 - 1)
    cross = centred1 @ centred2.T
    gram = cross @ cross.T if n1 <= n2 else cross.T @ cross
    trace_sqrt = torch.linalg.eigvalsh(0.5 * (gram + gram.T)).clamp_min(0.0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + centred1.square().sum() + centred2.square().sum() - 2.0 * trace_sqrt
    return max(float(value), 0.0)


def _check_features(features, name: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
    if not isinstance(features, dict):
        raise ValueError(f"{name} must be a dict of features from InceptionFeatures, got {type(features).__name__}")
    count = None
    for key in keys:
        value = features.get(key)
        dim = FEATURE_DIMS[key]
        if not torch.is_tensor(value) or value.dim() != 2 or value.shape[1] != dim:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name}[{key!r}] must be a (N, {dim}) tensor, got {shape}")
        if count is not None and value.shape[0] != count:
            raise ValueError(f"{name} features disagree on the number of images ({count} and {value.shape[0]})")
        count = value.shape[0]
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}[{key!r}] contains NaN or infinite values")
    return features


def _check_counts(num_samples: int, num_reference: int, inception_splits: int) -> None:
    needed = PR_NEIGHBOURS + 1
    if num_samples < max(needed, inception_splits):
        raise DataError(f"samples must hold at least {max(needed, inception_splits)} images (precision/recall use "
                        f"k={PR_NEIGHBOURS} neighbours, the Inception score {inception_splits} splits), got "
                        f"{num_samples}")
    if num_reference < needed:
        raise DataError(f"reference must hold at least {needed} images (precision/recall use k={PR_NEIGHBOURS} "
                        f"neighbours), got {num_reference}")


def adm_metrics_from_features(samples: dict, reference: dict, inception_splits: int = 10,
                              device: Union[str, torch.device, None] = None) -> dict:
    """ADM's metrics from `InceptionFeatures` outputs: `samples` needs ``pool``, ``logits``, ``spatial``;
    `reference` needs ``pool`` and ``spatial``. Returns ``fid``, ``sfid``, ``inception_score`` (of the samples,
    `inception_splits` splits), ``precision``, ``recall`` (k = 3), ``num_samples``, ``num_reference``; the
    distance computations run on `device` (default: where the features are)."""
    inception_splits = positive_int(inception_splits, "inception_splits")
    samples = _check_features(samples, "samples", ("pool", "logits", "spatial"))
    reference = _check_features(reference, "reference", ("pool", "spatial"))
    num_samples, num_reference = samples["pool"].shape[0], reference["pool"].shape[0]
    _check_counts(num_samples, num_reference, inception_splits)
    device = torch.device(device) if device is not None else samples["pool"].device
    sample_pool, reference_pool = samples["pool"].to(device), reference["pool"].to(device)
    pr = precision_recall_density_coverage(reference_pool, sample_pool, k=PR_NEIGHBOURS)
    return {
        "fid": _frechet_distance(sample_pool, reference_pool),
        "sfid": _frechet_distance(samples["spatial"].to(device), reference["spatial"].to(device)),
        "inception_score": inception_score(samples["logits"].to(device), inception_splits),
        "precision": pr["precision"],
        "recall": pr["recall"],
        "num_samples": int(num_samples),
        "num_reference": int(num_reference),
    }


# ----------------------------------------------------------------------------------------------------------
# Reference cache and the whole evaluation
# ----------------------------------------------------------------------------------------------------------

def reference_cache_path(reference: PathLike, weights_sha256: str) -> Path:
    """Where the reference features are cached: next to `reference` (a file or folder), named
    ``<name>.adm-inception-<weights_sha256[:12]>.safetensors``."""
    reference = Path(reference)
    return reference.parent / f"{reference.name}.adm-inception-{weights_sha256[:12]}.safetensors"


def _read_reference_cache(path: Path, expected: dict[str, str]) -> Optional[dict[str, Tensor]]:
    """The cached features if `path` exists and its metadata equals `expected`; else None (a stale cache is simply
    recomputed; an unreadable one too, with a warning)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if any(metadata.get(key) != value for key, value in expected.items()):
                return None
            features = {key: handle.get_tensor(key) for key in ("pool", "spatial")}
    except Exception as error:       # a truncated or foreign file
        warnings.warn(f"reference feature cache {path} is unreadable ({type(error).__name__}: "
                      f"{one_line(first_line(error), 120)}); recomputing it", stacklevel=3)
        return None
    count = int(expected["count"])
    if any(tuple(features[key].shape) != (count, FEATURE_DIMS[key]) for key in features):
        return None
    return features


def _reference_features(source: _Images, network: InceptionFeatures, cache: bool, batch_size: Optional[int],
                        progress: bool) -> dict[str, Tensor]:
    if not cache or source.path is None:
        return network(source, batch_size=batch_size, progress=progress)
    expected = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "reference_sha256": source.sha256(),
                "weights_sha256": network.weights_sha256, "torch_fidelity": _torch_fidelity_version(),
                "count": str(source.count)}
    path = reference_cache_path(source.path, network.weights_sha256)
    cached = _read_reference_cache(path, expected)
    if cached is not None:
        return cached
    features = network(source, batch_size=batch_size, progress=progress)
    try:
        save_safetensors(path, {key: features[key] for key in ("pool", "spatial")}, metadata=expected)
    except OSError as error:
        warnings.warn(f"cannot write the reference feature cache {path} ({one_line(error, 160)}); continuing "
                      f"without it", stacklevel=3)
    return features


def adm_metrics(samples, reference, weights_path: Union[PathLike, InceptionFeatures], batch_size: int = 64,
                device: Union[str, torch.device, None] = None, inception_splits: int = 10, cache: bool = True,
                progress: bool = True) -> dict:
    """FID, sFID, Inception Score, precision and recall of `samples` against `reference`, by the ADM protocol.

    `samples`, `reference`: paths (an ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3), or a folder of RGB PNGs) or
    uint8 (N, H, W, 3) arrays — for the paper's ImageNet-256 numbers, 50,000 samples and
    ``VIRTUAL_imagenet256_labeled.npz``. `weights_path`: the Inception weights file (see `INCEPTION_WEIGHTS_URL`), or
    an `InceptionFeatures` built from one (reused across calls; then `device` must be None or its device).
    `device` defaults to CUDA when available. With `cache`, the reference features are kept next to a reference
    path (`reference_cache_path`) and reused while the reference's and the weights' SHA-256 match.

    Returns ``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall`` (floats), ``num_samples``,
    ``num_reference`` and ``weights_sha256``. Both inputs are checked before anything is featurised.
    """
    batch_size = positive_int(batch_size, "batch_size")
    inception_splits = positive_int(inception_splits, "inception_splits")
    network = weights_path if isinstance(weights_path, InceptionFeatures) else None
    if network is not None and device is not None and torch.device(device) != network.device:
        raise ValueError(f"device {device} differs from the given InceptionFeatures' device {network.device}; pass "
                         f"device=None or build InceptionFeatures on {device}")
    sample_source = _Images(samples, "samples")
    reference_source = _Images(reference, "reference")
    _check_counts(sample_source.count, reference_source.count, inception_splits)
    if network is None:
        network = InceptionFeatures(weights_path, device=device, batch_size=batch_size)
    reference_features = _reference_features(reference_source, network, cache, batch_size, progress)
    sample_features = network(sample_source, batch_size=batch_size, progress=progress)
    result = adm_metrics_from_features(sample_features, reference_features, inception_splits, device=network.device)
    result["weights_sha256"] = network.weights_sha256
    return result
