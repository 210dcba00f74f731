"""Tests for the offline image datasets: IDX reader, sklearn digits, Fashion-MNIST, image folders and latents."""
from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from piflow.data import (
    IMAGE_DATASET_NAMES,
    ImageDataset,
    ImageFolderDataset,
    LatentDataset,
    load_digits_dataset,
    load_idx_dataset,
    make_image_dataset,
    read_idx,
    write_idx,
)
from piflow.data.images import DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES

_HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
_HAVE_PILLOW = importlib.util.find_spec("PIL") is not None
needs_sklearn = pytest.mark.skipif(not _HAVE_SKLEARN, reason="scikit-learn missing: pip install 'piflow[images]'")
needs_pillow = pytest.mark.skipif(not _HAVE_PILLOW, reason="Pillow missing: pip install 'piflow[images]'")
if _HAVE_PILLOW:
    from PIL import Image


def _idx_bytes(array: np.ndarray, type_code: int, big_endian_dtype: str) -> bytes:
    """IDX file contents built by hand from the format spec (independent of `write_idx`)."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(big_endian_dtype).tobytes()


# ----------------------------------------------------------------------------------------------------------------
# IDX reader
# ----------------------------------------------------------------------------------------------------------------

class TestIdx:
    def test_ubyte_round_trip_hand_written(self, tmp_path: Path) -> None:
        images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
        path = tmp_path / "images-idx3-ubyte"
        path.write_bytes(_idx_bytes(images, 0x08, "u1"))
        out = read_idx(path)
        assert out.dtype == np.uint8 and out.shape == (5, 3, 4)
        np.testing.assert_array_equal(out, images)

    def test_int32_big_endian_hand_written(self, tmp_path: Path) -> None:
        values = np.array([[1, -2, 70000], [2**31 - 1, -(2**31), 0]], dtype=np.int32)
        path = tmp_path / "values-idx2-int"
        path.write_bytes(_idx_bytes(values, 0x0C, ">i4"))
        out = read_idx(path)
        assert out.dtype == np.int32 and out.dtype.isnative
        np.testing.assert_array_equal(out, values)

    def test_gzip_is_read_transparently(self, tmp_path: Path) -> None:
        labels = np.arange(10, dtype=np.uint8)
        path = tmp_path / "labels-idx1-ubyte.gz"
        path.write_bytes(gzip.compress(_idx_bytes(labels, 0x08, "u1")))
        np.testing.assert_array_equal(read_idx(path), labels)

    @pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
    @pytest.mark.parametrize("suffix", ["", ".gz"])
    def test_write_read_round_trip(self, tmp_path: Path, dtype: type, suffix: str) -> None:
        array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype == np.uint8:
            array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
        path = tmp_path / f"a-idx3{suffix}"
        write_idx(path, array)
        out = read_idx(path)
        assert out.dtype == np.dtype(dtype) and out.shape == array.shape
        np.testing.assert_array_equal(out, array)

    def test_bad_magic(self, tmp_path: Path) -> None:
        path = tmp_path / "bad"
        path.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
        with pytest.raises(ValueError, match="bad IDX magic"):
            read_idx(path)
        path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")  # unknown type code
        with pytest.raises(ValueError, match="bad IDX magic"):
            read_idx(path)

    def test_truncated(self, tmp_path: Path) -> None:
        full = _idx_bytes(np.zeros((4, 2, 2), dtype=np.uint8), 0x08, "u1")
        path = tmp_path / "trunc"
        path.write_bytes(full[:-3])
        with pytest.raises(ValueError, match="truncated IDX file"):
            read_idx(path)
        path.write_bytes(full[:9])  # cut inside the dimension sizes
        with pytest.raises(ValueError, match="truncated IDX header"):
            read_idx(path)
        path.write_bytes(full[:2])
        with pytest.raises(ValueError, match="truncated"):
            read_idx(path)
        path.write_bytes(full + b"\x00")
        with pytest.raises(ValueError, match="over-long"):
            read_idx(path)
        gz = tmp_path / "trunc.gz"
        gz.write_bytes(gzip.compress(full)[:-6])
        with pytest.raises(ValueError, match="gzip"):
            read_idx(gz)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="nope"):
            read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_all() -> ImageDataset:
    return load_digits_dataset("all")


@needs_sklearn
class TestDigits:
    def test_all(self, digits_all: ImageDataset) -> None:
        assert len(digits_all) == 1797
        assert digits_all.num_classes == 10 and digits_all.image_shape == (1, 8, 8)
        assert digits_all.class_names == tuple(str(d) for d in range(10))
        images, labels = digits_all.tensors()
        assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (1797,) and labels.dtype == torch.long
        assert images.min().item() == -1.0 and images.max().item() == 1.0
        assert set(labels.tolist()) == set(range(10))
        image, label = digits_all[5]
        assert image.shape == (1, 8, 8) and image.dtype == torch.float32
        assert label.dtype == torch.long and label.ndim == 0
        torch.testing.assert_close(image, images[5])

    def test_values_map_from_0_16(self, digits_all: ImageDataset) -> None:
        from sklearn.datasets import load_digits

        raw = torch.from_numpy(load_digits().images).float()
        torch.testing.assert_close(digits_all.tensors()[0][:, 0], raw / 8.0 - 1.0)

    def test_split_sizes_disjoint_and_stratified(self, digits_all: ImageDataset) -> None:
        train, test = load_digits_dataset("train", seed=3), load_digits_dataset("test", seed=3)
        assert len(train) + len(test) == 1797
        assert abs(len(test) - 0.2 * 1797) <= 5  # per-class rounding
        all_images = digits_all.tensors()[0].flatten(1)
        # Recover each split's row indices in the full set; rows must be disjoint and cover everything.
        # (Some digits images are exact duplicates, so compare multisets of rows.)
        joined = torch.cat([train.tensors()[0].flatten(1), test.tensors()[0].flatten(1)])
        assert sorted(map(tuple, joined.tolist())) == sorted(map(tuple, all_images.tolist()))
        train_counts = train.labels.bincount(minlength=10).float()
        test_counts = test.labels.bincount(minlength=10).float()
        ratio = test_counts / (train_counts + test_counts)
        assert torch.all((ratio - 0.2).abs() < 0.01)

    def test_deterministic_by_seed(self) -> None:
        a, b = load_digits_dataset("test", seed=1), load_digits_dataset("test", seed=1)
        c = load_digits_dataset("test", seed=2)
        torch.testing.assert_close(a.tensors()[0], b.tensors()[0])
        assert not torch.equal(a.tensors()[0], c.tensors()[0])

    def test_image_size(self) -> None:
        ds = load_digits_dataset("test", image_size=16)
        images, _ = ds.tensors()
        assert ds.image_shape == (1, 16, 16) and images.shape[1:] == (1, 16, 16)
        assert images.min() >= -1.0 and images.max() <= 1.0

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="split"):
            load_digits_dataset("val")
        with pytest.raises(ValueError, match="test_fraction"):
            load_digits_dataset(test_fraction=1.5)
        with pytest.raises(ValueError, match="image_size"):
            load_digits_dataset(image_size=0)

    def test_dataloader_collates(self, digits_all: ImageDataset) -> None:
        images, labels = next(iter(DataLoader(digits_all, batch_size=7)))
        assert images.shape == (7, 1, 8, 8) and labels.shape == (7,) and labels.dtype == torch.long


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST / MNIST (IDX datasets)
# ----------------------------------------------------------------------------------------------------------------

_HAVE_FASHION = Path(DEFAULT_FASHION_MNIST_ROOT).is_dir()
_NO_FASHION = f"{DEFAULT_FASHION_MNIST_ROOT} missing (apt-get install dataset-fashion-mnist)"


@pytest.fixture(scope="module")
def fashion_train() -> ImageDataset:
    return load_idx_dataset(split="train")


@pytest.fixture(scope="module")
def fashion_test() -> ImageDataset:
    return load_idx_dataset(split="test")


@pytest.mark.skipif(not _HAVE_FASHION, reason=_NO_FASHION)
class TestFashionMnist:
    def test_sizes_and_shapes(self, fashion_train: ImageDataset, fashion_test: ImageDataset) -> None:
        assert len(fashion_train) == 60000 and len(fashion_test) == 10000
        for ds in (fashion_train, fashion_test):
            assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10
            assert ds.class_names == FASHION_MNIST_CLASSES
        assert fashion_train.labels.bincount().tolist() == [6000] * 10
        image, label = fashion_test[0]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= int(label) < 10

    def test_tensors_range(self, fashion_test: ImageDataset) -> None:
        images, labels = fashion_test.tensors()
        assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
        assert images.min().item() == -1.0 and images.max().item() == 1.0

    def test_pad_and_resize(self, fashion_test: ImageDataset) -> None:
        padded = load_idx_dataset(split="test", pad_to=32)
        assert padded.image_shape == (1, 32, 32)
        image, _ = padded[3]
        torch.testing.assert_close(image[:, 2:30, 2:30], fashion_test[3][0])
        assert torch.all(image[:, :2] == -1.0) and torch.all(image[:, :, 30:] == -1.0)
        resized = make_image_dataset("fashion_mnist", split="test", image_size=14)
        assert resized.image_shape == (1, 14, 14) and len(resized) == 10000
        with pytest.raises(ValueError, match="pad_to"):
            load_idx_dataset(split="test", pad_to=20)


def _write_fake_mnist(root: Path, num: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", labels)
    return images, labels


class TestIdxDataset:
    @pytest.mark.parametrize("gz", [False, True])
    def test_mnist_from_root(self, tmp_path: Path, gz: bool) -> None:
        images, labels = _write_fake_mnist(tmp_path, 6, gz)
        ds = make_image_dataset("mnist", split="test", root=tmp_path)
        assert len(ds) == 6 and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
        x, y = ds.tensors()
        torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 127.5 - 1.0)
        assert y.tolist() == labels.tolist()

    def test_missing_root_mentions_apt_get(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_idx_dataset(root=tmp_path / "nowhere", kind="fashion-mnist")

    def test_missing_mnist_says_where_to_put_files(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="put the standard MNIST IDX files in"):
            load_idx_dataset(root=tmp_path, kind="mnist", split="train")

    def test_mismatched_labels(self, tmp_path: Path) -> None:
        _write_fake_mnist(tmp_path, 6, False)
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
        with pytest.raises(ValueError, match="labels"):
            load_idx_dataset(root=tmp_path, kind="mnist", split="test")

    def test_bad_kind_and_split(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="kind"):
            load_idx_dataset(root=tmp_path, kind="cifar")
        with pytest.raises(ValueError, match="split"):
            load_idx_dataset(root=tmp_path, split="all")


# ----------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------

def _save_png(path: Path, width: int, height: int, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)


@needs_pillow
class TestImageFolder:
    def test_class_subfolders(self, tmp_path: Path) -> None:
        _save_png(tmp_path / "dogs" / "a.png", 12, 12, (255, 0, 0))
        _save_png(tmp_path / "dogs" / "nested" / "b.png", 12, 12, (255, 0, 0))
        _save_png(tmp_path / "cats" / "c.png", 12, 12, (0, 0, 255))
        Image.new("RGB", (9, 9), (0, 255, 0)).save(tmp_path / "cats" / "d.jpg", quality=95)
        (tmp_path / "cats" / "notes.txt").write_text("ignored")
        (tmp_path / ".hidden").mkdir()
        ds = make_image_dataset("image-folder", root=tmp_path, image_size=8)
        assert ds.class_names == ("cats", "dogs") and ds.num_classes == 2
        assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1]
        images, labels = ds.tensors()
        assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        torch.testing.assert_close(images[0, :, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))  # cats/c.png: blue
        torch.testing.assert_close(images[2, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))  # dogs/a.png: red

    def test_flat_folder_resize_and_center_crop(self, tmp_path: Path) -> None:
        # 20x10 image: left half black, right half white; after resize to 8 (shorter side) -> 16x8, crop 8x8.
        pixels = np.zeros((10, 20, 3), dtype=np.uint8)
        pixels[:, 10:] = 255
        Image.fromarray(pixels).save(tmp_path / "wide.png")
        _save_png(tmp_path / "square.png", 8, 8, (0, 0, 0))
        ds = ImageFolderDataset(tmp_path, image_size=8, channels=1)
        assert ds.num_classes == 1 and ds.class_names is None and ds.labels.tolist() == [0, 0]
        image, label = ds[1]  # sorted: square.png, wide.png
        assert image.shape == (1, 8, 8) and int(label) == 0
        assert image[0, :, 0].max() < -0.9 and image[0, :, -1].min() > 0.9  # crop keeps the black/white edge
        assert torch.all(ds[0][0] == -1.0)

    def test_center_crop_false_requires_square(self, tmp_path: Path) -> None:
        _save_png(tmp_path / "a.png", 10, 6, (10, 20, 30))
        ds = ImageFolderDataset(tmp_path, image_size=4, center_crop=False)
        with pytest.raises(ValueError, match="10x6"):
            ds[0]
        _save_png(tmp_path / "a.png", 6, 6, (10, 20, 30))
        assert ds[0][0].shape == (3, 4, 4)

    def test_errors(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            ImageFolderDataset(tmp_path / "missing", image_size=8)
        with pytest.raises(ValueError, match="no images"):
            ImageFolderDataset(tmp_path, image_size=8)
        _save_png(tmp_path / "a" / "x.png", 4, 4, (0, 0, 0))
        (tmp_path / "b").mkdir()
        with pytest.raises(ValueError, match="without"):
            ImageFolderDataset(tmp_path, image_size=8)
        (tmp_path / "b").rmdir()
        _save_png(tmp_path / "loose.png", 4, 4, (0, 0, 0))
        with pytest.raises(ValueError, match="mixes"):
            ImageFolderDataset(tmp_path, image_size=8)
        with pytest.raises(ValueError, match="channels"):
            ImageFolderDataset(tmp_path, image_size=8, channels=2)
        with pytest.raises(ValueError, match="image_size"):
            ImageFolderDataset(tmp_path, image_size=0)
        (tmp_path / "loose.png").write_bytes(b"not a png")
        (tmp_path / "a" / "x.png").unlink()
        (tmp_path / "a").rmdir()
        with pytest.raises(ValueError, match="cannot read image"):
            ImageFolderDataset(tmp_path, image_size=8)[0]


# ----------------------------------------------------------------------------------------------------------------
# Latents
# ----------------------------------------------------------------------------------------------------------------

class TestLatents:
    def test_npy_with_labels(self, tmp_path: Path) -> None:
        latents = np.random.default_rng(0).normal(size=(5, 4, 3, 3)).astype(np.float32) * 3.0
        labels = np.array([0, 2, 1, 2, 0])
        np.save(tmp_path / "lat.npy", latents)
        np.save(tmp_path / "lat_labels.npy", labels)
        ds = make_image_dataset("latents", path=tmp_path / "lat.npy")
        assert len(ds) == 5 and ds.image_shape == (4, 3, 3) and ds.num_classes == 3
        x, y = ds.tensors()
        np.testing.assert_array_equal(x.numpy(), latents)  # no scaling
        assert y.tolist() == labels.tolist()
        image, label = ds[-1]
        torch.testing.assert_close(image, torch.from_numpy(latents[4]))
        assert int(label) == 0

    def test_npy_without_labels(self, tmp_path: Path) -> None:
        np.save(tmp_path / "z.npy", np.ones((3, 2, 2, 2), dtype=np.float16))
        ds = LatentDataset(tmp_path / "z.npy", num_classes=4)
        assert ds.num_classes == 4 and ds.labels.tolist() == [0, 0, 0]
        assert ds[0][0].dtype == torch.float32

    def test_safetensors(self, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        latents = torch.randn(4, 2, 2, 2)
        labels = torch.tensor([3, 1, 0, 3])
        save_file({"latents": latents, "labels": labels}, str(tmp_path / "l.safetensors"))
        ds = LatentDataset(tmp_path / "l.safetensors")
        x, y = ds.tensors()
        torch.testing.assert_close(x, latents)
        assert y.tolist() == labels.tolist() and ds.num_classes == 4
        save_file({"latents": latents.bfloat16()}, str(tmp_path / "nolabels.safetensors"))
        ds = LatentDataset(tmp_path / "nolabels.safetensors")
        torch.testing.assert_close(ds.tensors()[0], latents.bfloat16().float())
        assert ds.num_classes == 1

    def test_errors(self, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        with pytest.raises(FileNotFoundError):
            LatentDataset(tmp_path / "missing.npy")
        np.save(tmp_path / "flat.npy", np.zeros((3, 4), dtype=np.float32))
        with pytest.raises(ValueError, match="N, C, H, W"):
            LatentDataset(tmp_path / "flat.npy")
        np.save(tmp_path / "a.npy", np.zeros((3, 1, 2, 2), dtype=np.float32))
        np.save(tmp_path / "a_labels.npy", np.zeros(2, dtype=np.int64))
        with pytest.raises(ValueError, match="labels"):
            LatentDataset(tmp_path / "a.npy")
        save_file({"x": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
        with pytest.raises(ValueError, match="'latents'"):
            LatentDataset(tmp_path / "b.safetensors")
        (tmp_path / "c.pt").write_bytes(b"")
        with pytest.raises(ValueError, match=".npy or .safetensors"):
            LatentDataset(tmp_path / "c.pt")


# ----------------------------------------------------------------------------------------------------------------
# ImageDataset container and factory
# ----------------------------------------------------------------------------------------------------------------

def test_image_dataset_container() -> None:
    raw = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2) * 30
    ds = ImageDataset(raw, [1, 0], class_names=["a", "b"], value_range=(0, 255))
    assert ds.num_classes == 2 and ds.image_shape == (1, 2, 2)
    torch.testing.assert_close(ds[0][0], torch.from_numpy(raw[0]).float() / 127.5 - 1.0)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError, match="max_bytes"):
        ds.tensors(max_bytes=10)
    with pytest.raises(ValueError, match="images must have shape"):
        ImageDataset(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="num_classes"):
        ImageDataset(raw, [0, 3], num_classes=2)
    with pytest.raises(ValueError, match="class_names"):
        ImageDataset(raw, [0, 1], class_names=["a"])


def test_unknown_name_lists_names() -> None:
    with pytest.raises(ValueError) as info:
        make_image_dataset("cifar10")
    for name in IMAGE_DATASET_NAMES:
        assert name in str(info.value)


def test_missing_optional_dependencies_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'piflow\[images\]'"):
        load_digits_dataset()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install 'piflow\[images\]'"):
        ImageFolderDataset(tmp_path, image_size=8)


@needs_pillow
def test_image_folder_pickles(tmp_path: Path) -> None:
    """DataLoader workers started with 'spawn' pickle the dataset."""
    _save_png(tmp_path / "a.png", 5, 5, (1, 2, 3))
    ds = pickle.loads(pickle.dumps(ImageFolderDataset(tmp_path, image_size=4)))
    assert ds[0][0].shape == (3, 4, 4)


@needs_sklearn
def test_factory_split_checks(tmp_path: Path) -> None:
    assert len(make_image_dataset("digits", split="test")) < 400
    with pytest.raises(ValueError, match="no built-in splits"):
        make_image_dataset("image-folder", split="test", root=tmp_path, image_size=8)
