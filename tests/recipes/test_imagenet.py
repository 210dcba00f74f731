"""The ImageNet recipe at tiny scale, through the README's commands: a REPA-layout teacher checkpoint and a tiny
AutoencoderKL stand in for the published files; distil data-free from configs/imagenet, sample class-balanced sets
of the student and the teacher as ADM .npz files."""
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_layouts import TINY, write_files
from piflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_OVERRIDES = ["train.iters=2", "train.warmup_iters=0", "train.grad_clip_from=0", "train.ema_start=0",
                  "train.optimizer=adamw", "train.mixed_precision=no", "distill.batch_size=4",
                  "student.logstd_hidden=16", "train.progress=false", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from piflow.integrations.diffusers.tiny import autoencoder_kl

    folder = tmp_path_factory.mktemp("imagenet_files")
    files = write_files(folder)
    autoencoder_kl(latent_channels=TINY["channels"], seed=0).save_pretrained(folder / "vae")
    return {"teacher": files["repa_train"], "vae": folder / "vae", "authors": files["authors"]}


def _distill(tiny_files, run_dir: Path, *extra: str) -> None:
    assert main(["distill", "-c", str(ROOT / "configs/imagenet/gmrepa_k32_1nfe.yaml"), "--run-dir", str(run_dir),
                 f"teacher={tiny_files['teacher']}", "teacher_layout=auto", f"teacher_input_size={TINY['side']}", f"vae={tiny_files['vae']}",
                 "student.num_components=4", *TINY_OVERRIDES, *extra]) == 0


def _heads_override(monkeypatch):
    """The tiny width (48) is no DiT preset: its head count comes from the checkpoint table's spec."""
    from piflow.models import imported

    monkeypatch.setitem(imported._HEADS_BY_WIDTH, TINY["hidden"], TINY["heads"])


def test_data_free_distillation_and_class_balanced_sets(tiny_files, tmp_path, monkeypatch):
    _heads_override(monkeypatch)
    run = tmp_path / "run"
    _distill(tiny_files, run)
    assert (run / "student.safetensors").is_file() and (run / "samples.png").is_file()
    for extra, folder in (([], "student"), (["--teacher-steps", "4"], "teacher")):
        out = tmp_path / folder
        assert main(["sample", "--run-dir", str(run), "--per-class", "2", "--num-classes", "3", "--output", str(out),
                     "--batch-size", "4", *extra]) == 0
        with np.load(out.with_suffix(".npz"), allow_pickle=False) as data:
            images, labels = data["arr_0"], data["arr_1"]
        side = TINY["side"] * 2                                    # the tiny VAE upsamples by 2
        assert images.shape == (6, side, side, 3) and images.dtype == np.uint8
        assert labels.tolist() == [0, 0, 1, 1, 2, 2]
        assert len(list(out.glob("*.png"))) == 6
    # resumable and independent of the batch size: delete two PNGs, sample again with another batch size
    first = np.load(tmp_path / "student.npz")["arr_0"]
    for index in (1, 4):
        (tmp_path / "student" / f"{index:06d}.png").unlink()
    assert main(["sample", "--run-dir", str(run), "--per-class", "2", "--num-classes", "3", "--output",
                 str(tmp_path / "student"), "--batch-size", "1"]) == 0
    assert np.array_equal(np.load(tmp_path / "student.npz")["arr_0"], first)


def test_labels_only_runs_refuse_what_needs_data(tiny_files, tmp_path, monkeypatch, capsys):
    _heads_override(monkeypatch)
    code = main(["distill", "-c", str(ROOT / "configs/imagenet/gmrepa_k32_1nfe.yaml"), "--run-dir",
                 str(tmp_path / "r"), f"teacher={tiny_files['teacher']}", "teacher_layout=auto", f"teacher_input_size={TINY['side']}",
                 "distill.data_free=false", *TINY_OVERRIDES])
    assert code == 2
    assert "distill.data_free=true" in capsys.readouterr().err
    code = main(["train-teacher", "dataset=classes", "--run-dir", str(tmp_path / "t")])
    assert code == 2
    assert "labels only" in capsys.readouterr().err


def test_guided_teacher_matches_the_reference_cfg(tiny_files, monkeypatch):
    """The teacher the recipe builds: REPA's interval CFG on all channels, null class = num_classes, in σ."""
    from checkpoint_layouts import sit_reference
    from piflow.config import load_config
    from piflow.recipes.images import IMAGE_DISTILL_DEFAULTS, distill_setup

    _heads_override(monkeypatch)
    config = load_config(IMAGE_DISTILL_DEFAULTS, {
        "dataset": "classes", "teacher": str(tiny_files["teacher"]), "guidance": {"scale": 3.2, "interval": [0, 0.7]},
        "distill": {"data_free": True}})
    setup = distill_setup(config)
    state = torch.load(tiny_files["teacher"], weights_only=False)["ema"]
    x = torch.randn(2, TINY["channels"], TINY["side"], TINY["side"], generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, 5])
    null = torch.full_like(y, TINY["classes"])
    for sigma, guided in ((0.5, True), (0.9, False)):
        s = torch.full((2,), sigma)
        cond, uncond = sit_reference(state, x, s, y, TINY), sit_reference(state, x, s, null, TINY)
        expected = cond + (3.2 - 1) * (cond - uncond) if guided else cond
        got = setup.teacher(x, s, y).double()
        assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
