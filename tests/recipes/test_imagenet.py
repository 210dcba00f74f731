"""The ImageNet recipe at tiny scale, through the README's commands: a REPA-layout teacher checkpoint, a tiny
AutoencoderKL and a random-weight Inception file stand in for the published files. Fast: the guided teacher the
recipe builds equals the reference CFG; labels-only runs refuse what needs data. Slow: encode → distil (data-free
1 NFE and data-dependent 2 NFE, from configs/imagenet) → class-balanced sets of 50 per class → ADM evaluation."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_layouts import TINY, sit_reference, write_files
from piflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "imagenet"
TINY_OVERRIDES = ["train.iters=2", "train.warmup_iters=0", "train.grad_clip_from=0", "train.ema_start=0",
                  "train.optimizer=adamw", "train.mixed_precision=no", "distill.batch_size=4",
                  "student.num_components=4", "student.logstd_hidden=16", "train.progress=false",
                  "train.checkpoint_every=0", f"teacher_input_size={TINY['side']}"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    return write_files(tmp_path_factory.mktemp("imagenet_files"))["repa_train"]


@pytest.fixture(autouse=True)
def tiny_heads(monkeypatch):
    """The tiny width (48) is no DiT preset: its head count comes from the checkpoint table's spec."""
    from piflow.models import imported

    monkeypatch.setitem(imported._HEADS_BY_WIDTH, TINY["hidden"], TINY["heads"])


def _distill(config: str, run_dir: Path, teacher: Path, *extra: str) -> int:
    return main(["distill", "-c", str(CONFIGS / config), "--run-dir", str(run_dir), f"teacher={teacher}",
                 "teacher_layout=auto", *TINY_OVERRIDES, *extra])


def test_guided_teacher_matches_the_reference_cfg(teacher_file):
    """The teacher the recipe builds: REPA's interval CFG on all channels, null class = num_classes, in σ."""
    from piflow.config import load_config
    from piflow.recipes.images import IMAGE_DISTILL_DEFAULTS, distill_setup

    config = load_config(IMAGE_DISTILL_DEFAULTS, {
        "dataset": "classes", "teacher": str(teacher_file), "guidance": {"scale": 3.2, "interval": [0, 0.7]},
        "distill": {"data_free": True}})
    setup = distill_setup(config)
    assert setup.shape == (TINY["channels"], TINY["side"], TINY["side"])
    state = torch.load(teacher_file, weights_only=False)["ema"]          # our own test file
    x = torch.randn(2, TINY["channels"], TINY["side"], TINY["side"], generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, 5])
    null = torch.full_like(y, TINY["classes"])
    for sigma, guided in ((0.5, True), (0.7, True), (0.9, False)):
        s = torch.full((2,), sigma)
        cond, uncond = sit_reference(state, x, s, y, TINY), sit_reference(state, x, s, null, TINY)
        expected = cond + (3.2 - 1) * (cond - uncond) if guided else cond
        got = setup.teacher(x, s, y).double()
        assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())


def test_labels_only_runs_refuse_what_needs_data(teacher_file, tmp_path, capsys):
    assert _distill("gmrepa_k32_1nfe.yaml", tmp_path / "r", teacher_file, "distill.data_free=false") == 2
    assert "distill.data_free=true" in capsys.readouterr().err
    assert _distill("gmrepa_k32_1nfe.yaml", tmp_path / "m", teacher_file, "method=meanflow") == 2
    assert "dataset=classes has none" in capsys.readouterr().err
    assert main(["train-teacher", "dataset=classes", "--run-dir", str(tmp_path / "t")]) == 2
    assert "labels only" in capsys.readouterr().err
    assert not (tmp_path / "r" / "student.safetensors").exists()


def test_every_imagenet_config_resolves_with_the_papers_settings():
    from piflow.config import load_config
    from piflow.files import read_yaml
    from piflow.recipes.images import IMAGE_DISTILL_DEFAULTS

    names = sorted(path.name for path in CONFIGS.glob("*.yaml"))
    assert names == ["dxrepa_n10_1nfe.yaml", "dxrepa_n20_1nfe.yaml", "dxrepa_n40_1nfe.yaml", "gmfm_k32_1nfe.yaml",
                     "gmrepa_k32_1nfe.yaml", "gmrepa_k32_2nfe.yaml", "gmrepa_k8_1nfe.yaml"]
    for name in names:
        config = load_config(IMAGE_DISTILL_DEFAULTS, read_yaml(CONFIGS / name))
        train, distill = config["train"], config["distill"]
        assert (train["lr"], tuple(train["betas"]), train["weight_decay"], train["warmup_iters"]) == \
            (5e-5, (0.9, 0.95), 0.0, 400)
        assert (train["grad_clip"], train["grad_clip_from"], train["ema_gamma"], train["ema_start"]) == \
            (50.0, 400, 7.0, 400)
        assert (train["optimizer"], train["mixed_precision"], distill["batch_size"]) == ("adamw8bit", "bf16", 512)
        assert (distill["num_intermediate_states"], distill["policy_dropout"], distill["total_substeps"],
                distill["loss_scale"]) == (2, 0.05, 128, 3.0)
        fm = name.startswith("gmfm")
        assert config["teacher_layout"] == ("authors-fm" if fm else "authors-repa")
        expected_guidance = (2.7, [0.0, 0.6]) if fm else (2.8 if "2nfe" in name else 3.2, [0.0, 0.7])
        assert (config["guidance"]["scale"], config["guidance"]["interval"]) == expected_guidance
        assert train["iters"] == (24000 if "2nfe" in name else 140000 if "k32" in name else 40000)


# ------------------------------------------------------------------------------------------------- end to end

def _image_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for k in range(per_class):
            width, height = rng.integers(18, 40, size=2)
            base = np.full((height, width, 3), (label * 23) % 256, dtype=np.int64)
            pixels = np.clip(base + rng.integers(-60, 60, size=base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{k}.JPEG", format="JPEG")
    return root


@pytest.mark.slow
def test_end_to_end_encode_distil_sample_evaluate(teacher_file, tmp_path, capsys):
    """The README's ImageNet commands at tiny scale: every command runs and its outputs have the promised form."""
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("needs torch-fidelity (pip install torch-fidelity==0.3.0 --no-deps)")
    from piflow.integrations.diffusers.tiny import autoencoder_kl
    from random_inception import random_inception_state

    vae = tmp_path / "vae"
    autoencoder_kl(latent_channels=TINY["channels"], seed=0).save_pretrained(vae)   # upsamples latents by 2
    side = TINY["side"] * 2
    images = _image_folder(tmp_path / "train", TINY["classes"], 3)
    # 1. latents of the training images (ADM centre crop, flipped copies)
    assert main(["encode-images", "--images", str(images), "--out", str(tmp_path / "latents"), "--resolution",
                 str(side), "--vae", str(vae), "--flip", "--shard-size", "8"]) == 0
    # 2. data-free 1 NFE (the default: labels only) and data-dependent 2 NFE on the latents
    free, dependent = tmp_path / "gm1", tmp_path / "gm2"
    assert _distill("gmrepa_k32_1nfe.yaml", free, teacher_file, f"vae={vae}") == 0
    assert _distill("gmrepa_k32_2nfe.yaml", dependent, teacher_file, f"vae={vae}", "dataset=latents",
                    f"data.root={tmp_path / 'latents'}", "distill.data_free=false") == 0
    for run in (free, dependent):
        assert (run / "student.safetensors").is_file() and (run / "samples.png").is_file()
    # sampling a finished data-dependent run does not read its training latents
    (tmp_path / "latents").rename(tmp_path / "latents_moved")
    assert main(["sample", "--run-dir", str(dependent), "--per-class", "1", "--num-classes", "2", "--output",
                 str(tmp_path / "gm2_fid")]) == 0
    (tmp_path / "latents_moved").rename(tmp_path / "latents")
    # 3. 50 samples per class of the student, and of the guided teacher (fewer: the same command)
    assert main(["sample", "--run-dir", str(free), "--per-class", "50", "--output", str(tmp_path / "gm1_fid"),
                 "--batch-size", "100"]) == 0
    assert main(["sample", "--run-dir", str(free), "--per-class", "5", "--teacher-steps", "8", "--output",
                 str(tmp_path / "teacher_fid")]) == 0
    with np.load(tmp_path / "gm1_fid.npz", allow_pickle=False) as data:
        assert data["arr_0"].shape == (50 * TINY["classes"], side, side, 3) and data["arr_0"].dtype == np.uint8
        assert np.array_equal(data["arr_1"], np.repeat(np.arange(TINY["classes"]), 50))
    # 4. the ADM protocol against a reference batch (here: the training images, centre-cropped)
    from piflow.data.encode_images import preprocess_image

    reference = np.stack([preprocess_image(path.read_bytes(), side, str(path))
                          for path in sorted(images.rglob("*.JPEG"))])
    np.savez(tmp_path / "reference.npz", arr_0=reference)
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state(0), weights)
    capsys.readouterr()
    for samples in ("gm1_fid.npz", "teacher_fid.npz"):
        assert main(["evaluate", "--protocol", "adm", "--samples", str(tmp_path / samples), "--reference",
                     str(tmp_path / "reference.npz"), "--inception-weights", str(weights), "--run-dir",
                     str(free)]) == 0
    result = json.loads((tmp_path / "gm1_fid.adm.json").read_text())
    assert result["num_samples"] == 500 and result["num_reference"] == len(reference)
    assert all(np.isfinite(result[key]) for key in ("fid", "sfid", "inception_score", "precision", "recall"))
    stored = json.loads((free / "metrics.json").read_text())["adm"]
    assert set(stored) == {"gm1_fid.npz", "teacher_fid.npz"}
