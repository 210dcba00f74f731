"""Helpers shared by the image loaders: split checks and resizing / padding of raw (N, C, H, W) arrays."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Install hint for the optional dependencies (scikit-learn, Pillow).
IMAGES_EXTRA_HINT = "install it with: pip install 'piflow[images]'"


def check_split(split: object, allowed: Sequence[str]) -> str:
    """`split` as a str if it is one of `allowed`, else a ValueError listing them."""
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}")
    return str(split)


def resize_raw(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
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


def pad_raw(images: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad raw (N, C, H, W) images symmetrically to (N, C, pad_to, pad_to) (extra row/col at bottom/right)."""
    height, width = images.shape[-2:]
    if pad_to < max(height, width):
        raise ValueError(f"pad_to must be >= the image size {max(height, width)}, got {pad_to}")
    top, left = (pad_to - height) // 2, (pad_to - width) // 2
    out = np.zeros(images.shape[:2] + (pad_to, pad_to), dtype=images.dtype)
    out[:, :, top:top + height, left:left + width] = images
    return out
