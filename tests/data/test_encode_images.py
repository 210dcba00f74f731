"""`piflow encode-images`: the ADM center crop against hand-computed pixels, latents against the VAE called here,
flipped copies, labels, resuming (kept shards, a killed write), rank sharding, tar shards, `LatentDataset` on the
folder and the CLI's one-line errors."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

import piflow.files  # noqa: E402
from piflow.cli import main  # noqa: E402
from piflow.data import LatentDataset  # noqa: E402
from piflow.data import encode_images as enc  # noqa: E402
from piflow.errors import ConfigError, DataError  # noqa: E402
from piflow.integrations.diffusers.tiny import autoencoder_kl  # noqa: E402
from piflow.train.distributed import DistInfo  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
RES = 32
# class -> (width, height, format, mode) per image; created in this (unsorted) order: labels follow sorted names
IMAGES = {
    "zebra": [(70, 50, "png", "RGB"), (40, 90, "jpg", "RGB"), (140, 96, "png", "L")],
    "apple": [(32, 50, "png", "RGBA"), (160, 128, "jpeg", "RGB"), (33, 33, "png", "RGB")],
    "mango": [(90, 40, "JPEG", "RGB"), (20, 24, "png", "RGB"), (300, 64, "png", "RGB")],
}
CLASSES = ["apple", "kiwi", "mango", "zebra"]       # sorted; kiwi's folder holds no images
SCALE, SHIFT = 1.5, 0.1                             # the tiny VAE's config


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return np.clip(smooth + rng.integers(-40, 40, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet") / "train"
    seed = 0
    for name, specs in IMAGES.items():
        (root / name).mkdir(parents=True)
        for k, (width, height, fmt, mode) in enumerate(specs):
            image = Image.fromarray(_picture(width, height, seed)).convert(mode)
            image.save(root / name / f"{name}_{k}.{fmt}", format="JPEG" if fmt.lower() in ("jpg", "jpeg") else "PNG")
            seed += 1
    (root / "kiwi").mkdir()
    (root / "kiwi" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vae():
    return autoencoder_kl(4, seed=0)


@pytest.fixture(scope="module")
def vae_dir(vae, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def _files_in_label_order(root: Path) -> list[tuple[Path, int]]:
    """(file, label) in the order the encoder must use: classes by sorted name, files by sorted name."""
    return [(path, label) for label, name in enumerate(CLASSES) for path in sorted((root / name).glob("*.*"))
            if path.suffix.lower() in (".png", ".jpg", ".jpeg")]


def _reference_pixels(path: Path, size: int = RES) -> np.ndarray:
    """ADM's crop written out independently: PIL BOX halvings, one PIL bicubic resize, numpy slicing."""
    image = Image.open(path).convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    factor = size / min(image.size)
    image = image.resize(tuple(round(side * factor) for side in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def _reference_latents(vae, pixels: np.ndarray, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    return (posterior.mean[0] - SHIFT) * SCALE, posterior.std[0] * SCALE


def _shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every shard's tensors, copied (safetensors maps the file: a test that rewrites it must not read through)."""
    return {p.name: {key: value.clone() for key, value in piflow.files.load_safetensors(p).items()}
            for p in sorted(out.glob("shard-*.safetensors"))}


def _encode(source, out, vae, **kwargs):
    options = dict(resolution=RES, vae_name="tiny", batch_size=4, shard_size=4, progress=False,
                   dist_info=DistInfo(), log=lambda text: None)
    options.update(kwargs)
    return enc.encode_images(source, out, vae, **options)


class CountingVAE(torch.nn.Module):
    """The tiny VAE with its encoder calls counted."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.config, self.calls = vae, vae.config, 0

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


# ----------------------------------------------------------------------------------------------------------------
# the crop
# ----------------------------------------------------------------------------------------------------------------

def _crop(array: np.ndarray) -> np.ndarray:
    return np.asarray(enc.adm_center_crop(Image.fromarray(array), RES)).astype(np.int64)


def test_center_crop_takes_the_middle_rows_of_a_tall_image():
    """32×50: the short side already equals the resolution, so no resize; rows 9..40 ((50 - 32) // 2 = 9)."""
    value = (10 + 3 * np.arange(50))[:, None, None] + np.zeros((1, 32, 3), dtype=np.int64)
    out = _crop(value.astype(np.uint8))
    assert np.array_equal(out, value[9:41])


def test_center_crop_halves_with_box_filters_before_the_bicubic_resize():
    """160×128 → BOX halving twice (128 ≥ 64, then 64 ≥ 64) → 40×32, no resize, columns 4..35: every output pixel is
    the exact mean of a 4×4 source block (the gradients below make those means integers)."""
    y, x = np.mgrid[0:128, 0:160]
    array = np.stack([2 * (x % 128), 2 * y, 255 - 2 * (x % 128)], -1).astype(np.uint8)
    out = _crop(array)
    column = np.arange(32) + 4                                      # final columns after the crop
    red = 2 * ((4 * column) % 128 + 1.5)                            # mean of 2·(x mod 128) over x = 4c..4c+3
    green = 2 * (4 * np.arange(32) + 1.5)
    assert np.array_equal(out[:, :, 0], np.broadcast_to(red, (32, 32)))
    assert np.array_equal(out[:, :, 1], np.broadcast_to(green[:, None], (32, 32)))
    assert np.array_equal(out[:, :, 2], 255 - out[:, :, 0])


def test_center_crop_resizes_bicubic_then_takes_the_middle_columns():
    """70×50 → 45×32 (bicubic; a linear ramp stays linear) → columns 6..37: pixel j samples source x at
    (j + 6 + ½)·70/45 − ½."""
    ramp = (10 + 3 * np.arange(70)).astype(np.uint8)
    out = _crop(np.broadcast_to(ramp[None, :, None], (50, 70, 3)).copy())
    expected = 10 + 3 * ((np.arange(32) + 6 + 0.5) * 70 / 45 - 0.5)
    assert np.abs(out - expected[None, :, None]).max() <= 1.0
    assert out.shape == (32, 32, 3)


def test_preprocess_matches_the_reference_on_every_test_image(image_root):
    for path, _ in _files_in_label_order(image_root):
        assert np.array_equal(enc.preprocess_image(path.read_bytes(), RES, path.name), _reference_pixels(path)), path
    with pytest.raises(DataError, match="cannot read image broken.png"):
        enc.preprocess_image(b"not an image", RES, "broken.png")


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------

def test_folder_labels_follow_sorted_class_names_or_the_class_index(image_root, tmp_path):
    source = enc.scan_image_folder(image_root)
    assert source.class_names == tuple(CLASSES) and source.num_classes == 4 and source.empty_classes == ("kiwi",)
    assert [(Path(item.path), item.label) for item in source.items] == _files_in_label_order(image_root)
    mapping = {"zebra": 0, "apple": 1, "mango": 2, "kiwi": 3, "fig": 4}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    indexed = enc.scan_image_folder(image_root, enc.read_class_index(tmp_path / "map.json"))
    assert indexed.num_classes == 5 and indexed.class_names == ("zebra", "apple", "mango", "kiwi", "fig")
    assert [item.label for item in indexed.items] == [0] * 3 + [1] * 3 + [2] * 3
    keras = {str(label): [name, f"the {name}"] for name, label in mapping.items()}   # imagenet_class_index.json
    (tmp_path / "keras.json").write_text(json.dumps(keras))
    assert enc.read_class_index(tmp_path / "keras.json") == mapping
    (tmp_path / "gap.json").write_text(json.dumps({"apple": 0, "zebra": 2}))
    with pytest.raises(ConfigError, match="0..1, each once"):
        enc.read_class_index(tmp_path / "gap.json")
    (tmp_path / "partial.json").write_text(json.dumps({"apple": 0}))
    with pytest.raises(ConfigError, match="not in the class index"):
        enc.scan_image_folder(image_root, enc.read_class_index(tmp_path / "partial.json"))


def _write_tar(path: Path, samples: list[tuple[str, bytes, str, object]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, data, extension, label in samples:
            members = [(f"{key}.{extension}", data)] if data is not None else []
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def tar_shards(image_root, tmp_path_factory) -> list[Path]:
    """The folder's images in label order, split over two webdataset tars (extensions lower-cased)."""
    folder = tmp_path_factory.mktemp("wds")
    files = _files_in_label_order(image_root)
    paths = []
    for part, chunk in enumerate((files[:5], files[5:])):
        path = folder / f"train-{part:04d}.tar"
        _write_tar(path, [(f"sample{part}{k:03d}", file.read_bytes(), file.suffix[1:].lower(), label)
                          for k, (file, label) in enumerate(chunk)])
        paths.append(path)
    return paths


def test_tar_shards_are_read_in_order_with_their_cls_labels(tar_shards, tmp_path):
    source = enc.scan_tar_shards(tar_shards)
    assert [item.label for item in source.items] == [0, 0, 0, 2, 2, 2, 3, 3, 3]
    assert source.num_classes == 4 and source.class_names is None
    assert enc.expand_shard_list(f"{tar_shards[0].parent}/train-{{0000..0001}}.tar") == tar_shards
    assert enc.expand_shard_list(f"{tar_shards[0].parent}/train-*.tar, ") == tar_shards
    bad = tmp_path / "bad.tar"
    _write_tar(bad, [("a", b"x", "jpg", 0), ("b", b"y", "png", None)])
    with pytest.raises(DataError, match="sample 'b' has an image but no .cls label"):
        enc.scan_tar_shards([bad])
    _write_tar(bad, [("a", b"x", "jpg", "cat")])
    with pytest.raises(DataError, match="non-negative integer label"):
        enc.scan_tar_shards([bad])
    (tmp_path / "plain.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ConfigError, match="not a readable tar file"):
        enc.scan_tar_shards([tmp_path / "plain.tar"])


# ----------------------------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoded(image_root, vae, tmp_path_factory) -> Path:
    """The folder encoded with flips and stds: 9 images, 4 per shard → 3 shards of 8, 8 and 2 latents."""
    out = tmp_path_factory.mktemp("encoded") / "latents"
    result = _encode(enc.scan_image_folder(image_root), out, vae, flip=True, store_std=True, workers=2)
    assert result.written == [0, 1, 2] and result.index_written
    return out


def test_latents_equal_the_vae_posterior_mean_scaled_and_flips_are_encoded(image_root, vae, encoded):
    shards = _shards(encoded)
    assert list(shards) == [enc.shard_name(k) for k in range(3)]
    latents = torch.cat([s["latents"] for s in shards.values()])
    stds = torch.cat([s["latent_stds"] for s in shards.values()])
    labels = torch.cat([s["labels"] for s in shards.values()])
    flipped = torch.cat([s["flipped"] for s in shards.values()])
    assert latents.shape == (18, 4, RES // 2, RES // 2) and latents.dtype == torch.float32   # the tiny VAE: /2
    assert flipped.tolist() == [0, 1] * 9 and flipped.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.cat([s["indices"] for s in shards.values()]).tolist() == [k // 2 for k in range(18)]
    for k, (path, label) in enumerate(_files_in_label_order(image_root)):
        pixels = _reference_pixels(path)
        for copy in (0, 1):
            mean, std = _reference_latents(vae, pixels, flip=bool(copy))
            torch.testing.assert_close(latents[2 * k + copy], mean)
            torch.testing.assert_close(stds[2 * k + copy], std)
            assert int(labels[2 * k + copy]) == label
    assert not torch.allclose(latents[0], latents[1])          # the flip is a different encoding
    from safetensors import safe_open

    with safe_open(str(encoded / "shard-00000.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["scaling_factor"] == "1.5" and metadata["shift_factor"] == "0.1"
    assert metadata["preprocessing"] == "adm-center-crop" and metadata["resolution"] == "32"
    index = json.loads((encoded / "index.json").read_text())
    assert index["shards"] == list(shards) and index["counts"] == [8, 8, 2] and index["num_classes"] == 4
    assert index["class_names"] == CLASSES and index["empty_classes"] == ["kiwi"]
    assert (index["scaling_factor"], index["shift_factor"], index["latent_shape"]) == (1.5, 0.1, [4, 16, 16])


def test_latent_dataset_reads_the_shard_folder(encoded, tmp_path):
    dataset = LatentDataset(encoded)
    shards = _shards(encoded)
    latents, labels = dataset.tensors()
    assert torch.equal(latents, torch.cat([s["latents"] for s in shards.values()]))
    assert torch.equal(labels, torch.cat([s["labels"] for s in shards.values()]))
    assert dataset.num_classes == 4 and dataset.class_names == tuple(CLASSES) and dataset.index["flip"] is True
    # without index.json: every shard-*.safetensors, sorted; classes from the labels
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in shards:
        (bare / name).write_bytes((encoded / name).read_bytes())
    plain = LatentDataset(bare)
    assert torch.equal(plain.tensors()[0], latents) and plain.num_classes == 4 and plain.class_names is None
    # half precision shards stay readable; a shard of another shape, NaN, a wrong count are refused, naming it
    piflow.files.save_safetensors(bare / "shard-00003.safetensors", {"latents": torch.zeros(2, 4, 8, 8),
                                                                     "labels": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(DataError, match="shard-00003.safetensors holds F32 latents of shape"):
        LatentDataset(bare)
    poisoned = dict(shards["shard-00001.safetensors"])
    poisoned["latents"] = poisoned["latents"].clone()
    poisoned["latents"][3, 0, 0, 0] = float("nan")
    piflow.files.save_safetensors(bare / "shard-00003.safetensors", poisoned)
    with pytest.raises(DataError, match=r"shard-00003.safetensors hold NaN or Inf values \(first bad item: index 3"):
        LatentDataset(bare)
    (bare / "shard-00003.safetensors").unlink()
    index = json.loads((encoded / "index.json").read_text())
    (bare / "index.json").write_text(json.dumps({**index, "counts": [8, 7, 2]}))
    with pytest.raises(DataError, match="shard-00001.safetensors holds 8 latents, but index.json says 7"):
        LatentDataset(bare)
    with pytest.raises(FileNotFoundError, match="neither index.json nor"):
        LatentDataset(tmp_path)


def test_resume_keeps_complete_shards_and_rewrites_a_killed_one(image_root, vae, tmp_path, monkeypatch):
    source = enc.scan_image_folder(image_root)
    out = tmp_path / "out"
    counting = CountingVAE(vae)
    assert _encode(source, out, counting).written == [0, 1, 2] and counting.calls == 3    # 4 + 4 + 1 images
    reference = _shards(out)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in reference}
    counting.calls = 0
    result = _encode(source, out, counting)
    assert counting.calls == 0 and result.kept == [0, 1, 2] and result.written == [] and result.index_written
    # a write killed before its rename: the exception leaves no shard-00001; a SIGKILL would leave its temporary file
    (out / "shard-00001.safetensors").unlink()

    def die(stage, path):
        if stage == "write-before-rename" and path.name == "shard-00001.safetensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(piflow.files, "write_hook", die)
    with pytest.raises(KeyboardInterrupt):
        _encode(source, out, counting)
    monkeypatch.setattr(piflow.files, "write_hook", None)
    assert not (out / "shard-00001.safetensors").exists()
    leftover = out / ".shard-00001.safetensors.0123456789ab.tmp"
    leftover.write_bytes(b"half a shard")
    (out / "shard-00002.safetensors").write_bytes(b"truncated")          # unreadable: rewritten with a note
    counting.calls = 0
    result = _encode(source, out, counting)
    assert result.written == [1, 2] and result.kept == [0] and counting.calls == 2 and not leftover.exists()
    assert any("shard-00002.safetensors was unreadable" in note for note in result.notes)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtimes["shard-00000.safetensors"]
    for name, tensors in _shards(out).items():
        assert all(torch.equal(tensors[key], reference[name][key]) for key in reference[name]), name
    # other settings or other images in the same folder: refused, nothing overwritten
    with pytest.raises(ConfigError, match="resolution='32', not '40'"):
        _encode(source, out, vae, resolution=40)
    with pytest.raises(ConfigError, match="other images"):
        _encode(enc.ImageSource(source.kind, source.items[::-1], 4, source.class_names, source.locations), out, vae)
    with pytest.raises(ConfigError, match="beyond the 1 shards"):
        _encode(source, out, vae, shard_size=9)


def test_non_finite_latents_name_the_image_and_write_no_shard(image_root, vae, tmp_path):
    from types import SimpleNamespace

    class BrokenVAE(CountingVAE):
        def encode(self, x):                     # the 3rd batch of 2 (shard 1: mango_1, mango_2): NaN in mango_2
            self.calls += 1
            posterior = self.vae.encode(x).latent_dist
            mean = posterior.mean.clone()
            if self.calls == 3:
                mean[-1, 0, 0, 0] = float("nan")
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=posterior.std))

    with pytest.raises(DataError, match=r"latents of mango/mango_2.png .* hold NaN or Inf in float32; "
                                        r"shard-00001.safetensors was not written"):
        _encode(enc.scan_image_folder(image_root), tmp_path / "out", BrokenVAE(vae), batch_size=2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["shard-00000.safetensors"]


def test_two_ranks_write_the_same_shards_as_one_process(image_root, vae, tmp_path, monkeypatch):
    source = enc.scan_image_folder(image_root)
    _encode(source, tmp_path / "one", vae, store_std=True, dtype="fp16")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = _encode(source, tmp_path / "two", vae, store_std=True, dtype="fp16", dist_info=None)
    assert first.written == [0, 2] and not first.index_written and "not written yet" in first.notes[0]
    assert not (tmp_path / "two" / "index.json").exists()
    monkeypatch.setenv("RANK", "1")
    second = _encode(source, tmp_path / "two", vae, store_std=True, dtype="fp16", dist_info=None)
    assert second.written == [1] and second.index_written
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert list(one) == list(two) and one["shard-00000.safetensors"]["latents"].dtype == torch.float16
    for name in one:
        assert all(torch.equal(one[name][key], two[name][key]) for key in one[name]), name
    assert json.loads((tmp_path / "one" / "index.json").read_text()) == \
        json.loads((tmp_path / "two" / "index.json").read_text())


def test_tar_shards_encode_like_the_folder(tar_shards, vae, encoded, tmp_path):
    out = tmp_path / "wds"
    result = _encode(enc.scan_tar_shards(tar_shards), out, vae, flip=True, store_std=True)
    assert result.index_written
    folder, tars = _shards(encoded), _shards(out)
    for name in folder:
        for key in ("latents", "latent_stds", "labels", "flipped"):
            torch.testing.assert_close(tars[name][key], folder[name][key])
    assert json.loads((out / "index.json").read_text())["source"]["kind"] == "webdataset"


def test_load_vae_reads_a_vae_folder_or_a_pipeline_folder(vae, vae_dir, tmp_path):
    pipeline = tmp_path / "pipe"
    vae.save_pretrained(pipeline / "vae")
    for path in (vae_dir, pipeline):
        loaded = enc.load_vae(str(path))
        assert loaded.config.scaling_factor == SCALE
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values(), strict=True))
    with pytest.raises(ConfigError, match="--vae folder ./nowhere/vae does not exist"):
        enc.load_vae("./nowhere/vae")


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------

def test_cli_encodes_a_folder(image_root, vae_dir, encoded, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["encode-images", "--images", str(image_root), "--out", str(out), "--resolution", str(RES),
                 "--vae", str(vae_dir), "--batch-size", "3", "--shard-size", "4", "--flip", "--store-std",
                 "--device", "cpu", "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 class folders hold no images" in captured.err and "kiwi" in captured.err
    assert "18 latents of shape (4, 16, 16) (9 images, each with a flipped copy; 4 classes) in 3 shards" \
        in captured.out
    for name, tensors in _shards(encoded).items():
        torch.testing.assert_close(_shards(out)[name]["latents"], tensors["latents"])
    assert json.loads((out / "index.json").read_text())["vae"] == str(vae_dir.resolve())


@pytest.mark.parametrize("args, fragment", [
    (["--images", "{tmp}/missing"], "--images {tmp}/missing does not exist"),
    (["--images", "{tmp}/empty"], "--images {tmp}/empty: none of its 1 class folders holds"),
    (["--images", "{root}", "--resolution", "30"], "--resolution must be a multiple of 8"),
    (["--images", "{root}", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["--shards", "{tmp}/a.tar,{tmp}/b.tar"], "--shards: {tmp}/a.tar does not exist"),
    (["--images", "{root}", "--vae", "{tmp}/no-vae"], "--vae folder {tmp}/no-vae does not exist"),
    (["--images", "{root}", "--class-index", "{tmp}/map.json"], "class index"),
    (["--images", "{root}", "--out", "{tmp}/file"], "--out {tmp}/file is a file"),
])
def test_cli_errors_are_one_line(args, fragment, image_root, vae_dir, tmp_path, capsys):
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    (tmp_path / "map.json").write_text(json.dumps({"apple": 0}))
    (tmp_path / "file").write_text("")
    fill = {"tmp": str(tmp_path), "root": str(image_root)}
    argv = ["encode-images", "--out", str(tmp_path / "out"), "--vae", str(vae_dir), "--device", "cpu"]
    argv += [a.format(**fill) for a in args]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("piflow encode-images: "), lines
    assert fragment.format(**fill) in lines[0], lines[0]


def test_shards_with_stds_train_on_posterior_samples(encoded):
    """`--store-std` shards: `batch` without a generator gives the means; with one, mean + std·ε with ε from that
    generator (checked against the same draw made here), so every epoch sees fresh posterior samples."""
    dataset = LatentDataset(encoded)
    shards = _shards(encoded)
    means = torch.cat([s["latents"] for s in shards.values()])
    stds = torch.cat([s["latent_stds"] for s in shards.values()])
    assert dataset.latent_stds is not None and dataset.latent_stds.shape == tuple(means.shape)
    index = torch.tensor([3, 0, 17, 3])
    plain, labels = dataset.batch(index)
    torch.testing.assert_close(plain, means[index])
    drawn, labels_again = dataset.batch(index, torch.Generator().manual_seed(5))
    noise = torch.randn(plain.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, means[index] + stds[index] * noise)
    assert torch.equal(labels, labels_again)
    assert not torch.allclose(drawn[0], drawn[3])               # the same item, two posterior draws
