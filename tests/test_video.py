"""Video files: GIF through Pillow and MP4 through imageio-ffmpeg, read back frame by frame."""
import numpy as np
import pytest

from piflow.video import as_uint8_frames, write_video


def frames(count=5, size=16):
    t = np.linspace(0, 1, count)[:, None, None, None]
    ramp = np.linspace(0, 1, size)[None, None, :, None]
    return np.broadcast_to(t * ramp * np.array([1.0, 0.5, 0.0]), (count, size, size, 3)).astype(np.float32)


def test_gif_round_trip(tmp_path):
    from PIL import Image, ImageSequence

    video = frames()
    path = write_video(video, tmp_path / "clip.gif", fps=8)
    with Image.open(path) as gif:
        read = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
        assert gif.info["duration"] in (120, 125)          # GIF stores centiseconds
    assert len(read) == 5
    # GIF quantises to a 256-colour palette: frames agree to a few grey levels
    assert np.abs(np.stack(read).astype(int) - as_uint8_frames(video).astype(int)).max() <= 8


def test_mp4_round_trip(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    video = frames(count=6, size=32)
    path = write_video(video, tmp_path / "clip.mp4", fps=8)
    read = iio.imread(path)
    assert read.shape == (6, 32, 32, 3)
    assert np.abs(read.astype(int) - as_uint8_frames(video).astype(int)).mean() < 6     # lossy H.264


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="must end in"):
        write_video(frames(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(np.zeros((4, 8, 8)), tmp_path / "clip.gif")
    with pytest.raises(ValueError, match="fps"):
        write_video(frames(), tmp_path / "clip.gif", fps=0)
    assert not any(tmp_path.iterdir())
