"""Writing generated videos: animated GIF with Pillow (no other dependency) or MP4 through imageio + imageio-ffmpeg
(a PyPI wheel that ships its own ffmpeg binary; ``pip install piflow[video]``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from piflow.files import atomic_write

VIDEO_SUFFIXES = (".gif", ".mp4")


def as_uint8_frames(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 from float frames in [0, 1] (T, H, W, 3), uint8 frames, or a list of PIL images."""
    if isinstance(frames, (list, tuple)) and frames and hasattr(frames[0], "convert"):
        frames = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


def write_video(frames: Union[np.ndarray, Sequence], path: Union[str, Path], fps: int = 16) -> Path:
    """Write `frames` to `path` (.gif or .mp4, chosen by the suffix; written atomically)."""
    import io

    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"video path must end in one of {VIDEO_SUFFIXES}, got {path.name!r}")
    if not (isinstance(fps, int) and fps >= 1):
        raise ValueError(f"fps must be an integer >= 1, got {fps!r}")
    array = as_uint8_frames(frames)
    buffer = io.BytesIO()
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in array]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                       loop=0)
    else:
        try:
            import imageio.v3 as iio
        except ImportError as error:
            raise ImportError("writing .mp4 needs `pip install imageio imageio-ffmpeg` (piflow[video]); "
                              "or write a .gif") from error
        try:
            data = iio.imwrite("<bytes>", array, extension=".mp4", fps=fps, codec="libx264",
                               macro_block_size=1, pixelformat="yuv420p")
        except Exception as error:     # no ffmpeg plugin / binary
            raise ImportError(f"writing .mp4 failed ({type(error).__name__}: {error}); install imageio-ffmpeg "
                              "or write a .gif") from error
        buffer.write(data)
    atomic_write(path, buffer.getvalue())
    return path
