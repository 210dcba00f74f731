"""Native CPU kernels: C sources shipped with piflow, compiled on first use with the system C compiler.

The shared library is cached per machine (``$PIFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/piflow`` or
``~/.cache/piflow``, under ``kernels/``; the file name carries a hash of the source, compiler and flags), written
atomically, and called through `ctypes` (which releases the GIL, so a small thread pool splits the work). Where no
compiler is found or compilation fails, `gm_rollout_library` warns once and returns None, and piflow runs the
plain-PyTorch path, which gives the same numbers up to float32 round-off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from piflow.files import cache_dir

GM_ROLLOUT_SOURCE = Path(__file__).with_name("gm_rollout.c")
# Tried in order: tuned for this CPU, then portable.
FLAG_SETS = (["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
             ["-O3", "-fno-math-errno", "-fno-trapping-math"])
MIN_PIXELS_PER_THREAD = 256

compile_seconds: Optional[float] = None     # time spent compiling in this process (None: loaded from the cache)


def _cpu_signature() -> bytes:
    """What `-march=native` depends on: the CPU model and feature flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted))).encode()


def _compiler() -> Optional[str]:
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return next((path for path in map(shutil.which, ("cc", "gcc", "clang")) if path), None)


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile the kernel to `target` atomically (a temporary file in the same folder, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", temporary, str(GM_ROLLOUT_SOURCE)],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@functools.lru_cache(maxsize=None)
def gm_rollout_library() -> Optional[ctypes.CDLL]:
    """The compiled fused GM rollout (`gm_rollout.c`), or None (after one warning) where it cannot be built."""
    global compile_seconds
    if sys.platform == "win32":
        warnings.warn("piflow: the fused GM rollout kernel is not built on Windows; GM rollouts use plain PyTorch",
                      RuntimeWarning, stacklevel=2)
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("piflow: no C compiler found (set CC, or install gcc/clang) for the fused GM rollout "
                      "kernel; GM rollouts use plain PyTorch (same numbers, slower)", RuntimeWarning, stacklevel=2)
        return None
    source = GM_ROLLOUT_SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         platform.machine().encode(), _cpu_signature()])).hexdigest()[:16]
        target = cache_dir() / "kernels" / f"gm_rollout-{key}.so"
        try:
            if not target.exists():
                start = time.perf_counter()
                _build(compiler, flags, target)
                compile_seconds = time.perf_counter() - start
            library = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            errors.append(" ".join(detail.split())[:200])
            continue
        library.gm_rollout.restype = None
        library.gm_rollout.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
        return library
    warnings.warn(f"piflow: could not build the fused GM rollout kernel with {compiler} ({errors[-1]}); "
                  "GM rollouts use plain PyTorch (same numbers, slower)", RuntimeWarning, stacklevel=2)
    return None


@functools.lru_cache(maxsize=4)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """Worker threads of this process (keyed by pid: a forked child never waits on its parent's threads)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="piflow-gm")


def gm_rollout_cpu(library: ctypes.CDLL, x: Tensor, coefficients: Tensor, means: Tensor, means_sq: Tensor,
                   logits: Tensor, x_src: Tensor) -> Tensor:
    """Run the fused rollout: x (B, C, *S), coefficients (N, B, 6), means (B, K, C, *S), means_sq and logits
    (B, K, 1, *S), x_src (B, C, *S), all on the CPU (any float dtype is cast to the kernel's float32). Returns the
    final state (a new tensor, x's shape)."""
    tensors = {"x": x, "coefficients": coefficients, "means": means, "means_sq": means_sq, "logits": logits,
               "x_src": x_src}
    for name, tensor in tensors.items():       # the C kernel reads raw float32 memory: cast or refuse, never guess
        if tensor.device.type != "cpu":
            raise ValueError(f"gm_rollout_cpu: {name} must be a CPU tensor, got one on {tensor.device}")
        if not tensor.is_floating_point():
            raise ValueError(f"gm_rollout_cpu: {name} must be a floating-point tensor, got {tensor.dtype}")
    batch, num_components, channels = means.shape[:3]
    pixels = means[0, 0, 0].numel()
    means, means_sq, logits, x_src, coefficients = (t.detach().float().contiguous() for t in (
        means, means_sq, logits, x_src, coefficients))
    out = x.detach().float().clone(memory_format=torch.contiguous_format)
    total = batch * pixels
    threads = max(1, min(torch.get_num_threads(), total // MIN_PIXELS_PER_THREAD))
    args = (batch, num_components, channels, pixels, means.data_ptr(), means_sq.data_ptr(), logits.data_ptr(),
            x_src.data_ptr(), out.data_ptr(), coefficients.data_ptr(), coefficients.shape[0])
    if threads == 1:
        library.gm_rollout(*args, 0, total)
        return out
    chunk = -(-total // threads)
    chunk = -(-chunk // 8) * 8                      # whole 8-pixel blocks per thread
    jobs = [_pool(threads, os.getpid()).submit(library.gm_rollout, *args, start, min(total, start + chunk))
            for start in range(0, total, chunk)]
    for job in jobs:
        job.result()
    return out
