"""Truncated or corrupt files of every kind piflow reads: a one-line error naming the file (exit status 2 from the
CLI, a `ValueError`/`UserError` from the library) — never a traceback, never a silently wrong result."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from piflow.cli import main
from piflow.train.checkpoint import save_checkpoint

from .conftest import TINY_2D

pytestmark = pytest.mark.usefixtures("single_thread")


def cli_error(capsys, *args: str) -> str:
    """Run the CLI in this process; it must fail with status 2 and one stderr line, which is returned."""
    code = main(list(args))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, lines)
    assert lines[0].startswith(f"piflow {args[0]}: ")
    return lines[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\x00\xff garbage \x13\x37" * 7)


@pytest.fixture
def run_copy(tmp_path, finished_run) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


@pytest.mark.parametrize("damage", [truncate, garble])
def test_damaged_checkpoint(capsys, run_copy, damage):
    damage(run_copy / "checkpoint.safetensors")
    line = cli_error(capsys, "distill", "--run-dir", str(run_copy), *TINY_2D)
    assert "checkpoint.safetensors" in line and ("corrupt or truncated" in line or "not a piflow" in line)


def test_foreign_safetensors_as_checkpoint(capsys, run_copy):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(run_copy / "checkpoint.safetensors"))
    assert "not a piflow training checkpoint" in cli_error(capsys, "distill", "--run-dir", str(run_copy), *TINY_2D)


def test_checkpoint_of_another_model(capsys, run_copy):
    from piflow.train import load_checkpoint

    state = load_checkpoint(run_copy / "checkpoint.safetensors")
    save_checkpoint(run_copy / "checkpoint.safetensors", dict(state, model={"w": torch.zeros(2)}))
    line = cli_error(capsys, "distill", "--run-dir", str(run_copy), *TINY_2D)
    assert "does not match this model" in line and "missing keys" in line


@pytest.mark.parametrize("change,fragment", [({"step": "abc"}, "invalid step"), ({"step": -5}, "invalid step"),
                                             ({"step": 99}, "beyond train.iters"), ({"history": 5}, "history"),
                                             ({"history": [{"loss": 1.0}]}, "history")])
def test_checkpoint_with_a_tampered_state(capsys, run_copy, change, fragment):
    from piflow.train import load_checkpoint

    state = load_checkpoint(run_copy / "checkpoint.safetensors")
    save_checkpoint(run_copy / "checkpoint.safetensors", dict(state, **change))
    before = (run_copy / "checkpoint.safetensors").read_bytes()
    assert fragment in cli_error(capsys, "distill", "--run-dir", str(run_copy), *TINY_2D)
    assert (run_copy / "checkpoint.safetensors").read_bytes() == before


@pytest.mark.parametrize("name", ["student.safetensors"])
@pytest.mark.parametrize("damage", [truncate, garble])
def test_damaged_student_weights(capsys, run_copy, name, damage):
    damage(run_copy / name)
    assert name in cli_error(capsys, "sample", "--run-dir", str(run_copy), "--num-samples", "4")


@pytest.mark.parametrize("text,fragment", [("dataset: [unclosed\n", "not valid YAML"), ("- a list\n", "mapping"),
                                           ("dataset: ring8\nstudent: {bogus_key: 1}\n", "bogus_key")])
def test_damaged_run_config(capsys, run_copy, text, fragment):
    (run_copy / "config.yaml").write_text(text)
    assert fragment in cli_error(capsys, "sample", "--run-dir", str(run_copy), "--num-samples", "4")


def test_damaged_run_record_and_metrics(capsys, run_copy):
    garble(run_copy / "metrics.json")
    assert "metrics.json" in cli_error(capsys, "evaluate", "--run-dir", str(run_copy), "eval.num_samples=50")
    garble(run_copy / "run.json")
    assert "run.json" in cli_error(capsys, "distill", "--run-dir", str(run_copy), *TINY_2D)


def test_torn_log_line_and_garbage_lock_file_are_recovered(capsys, run_copy):
    """A kill mid-line leaves a torn last log line, and a lock file may hold garbage: both are recovered from."""
    with open(run_copy / "train_log.jsonl", "a") as handle:
        handle.write('{"iter": 30, "lo')
    (run_copy / ".piflow.lock").write_bytes(b"\x00garbage")
    assert main(["distill", "--run-dir", str(run_copy), *TINY_2D]) == 0
    assert "stale lock" in capsys.readouterr().err
    iters = [json.loads(line)["iter"] for line in (run_copy / "train_log.jsonl").read_text().splitlines()]
    assert iters == list(range(30))


TEACHER_CASES = [("checkerboard_mlp", "teacher.safetensors", truncate),
                 ("checkerboard_mlp", "teacher.safetensors", garble), ("checkerboard_mlp", "config.yaml", garble),
                 ("digits_dit", "teacher/model.safetensors", truncate),
                 ("digits_dit", "teacher/config.json", garble), ("digits_dit", "teacher/config.json", truncate)]


@pytest.mark.parametrize("asset,name,damage", TEACHER_CASES)
def test_damaged_teacher(capsys, tmp_path, asset, name, damage):
    """A bundled teacher (2-D MLP or digits DiT) copied and damaged: distilling from it fails before the student's
    run directory exists."""
    from piflow.recipes.demo import ASSETS

    teacher = tmp_path / asset
    shutil.copytree(ASSETS / asset, teacher)
    damage(teacher / name)
    dataset = ["dataset=checkerboard", *TINY_2D[2:]] if asset == "checkerboard_mlp" else ["dataset=digits"]
    line = cli_error(capsys, "distill", "--run-dir", str(tmp_path / "student"), f"teacher={teacher}", *dataset)
    assert Path(name).name in line
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
@pytest.mark.parametrize("damage", [truncate, garble])
def test_damaged_latents(capsys, tmp_path, suffix, damage):
    from safetensors.torch import save_file

    path = tmp_path / f"latents{suffix}"
    latents = np.zeros((64, 4, 4, 4), dtype=np.float32)
    np.save(path, latents) if suffix == ".npy" else save_file({"latents": torch.from_numpy(latents)}, str(path))
    damage(path)
    line = cli_error(capsys, "train-teacher", "--run-dir", str(tmp_path / "run"), "dataset=latents",
                     f"data.root={path}")
    assert path.name in line
    assert not (tmp_path / "run").exists()


def test_damaged_idx_and_image_files(capsys, tmp_path):
    from piflow.data import write_idx

    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", np.zeros((10, 28, 28), dtype=np.uint8))
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(10, dtype=np.uint8))
    truncate(root / "train-images-idx3-ubyte")
    line = cli_error(capsys, "train-teacher", "--run-dir", str(tmp_path / "a"), "dataset=mnist", f"data.root={root}")
    assert "train-images-idx3-ubyte" in line and "truncated" in line
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    line = cli_error(capsys, "train-teacher", "--run-dir", str(tmp_path / "b"), "dataset=image-folder",
                     f"data.root={folder}", "data.image_size=8")
    assert "broken.png" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_or_empty_inputs(capsys, tmp_path):
    assert "does not exist" in cli_error(capsys, "distill", "-c", str(tmp_path / "none.yaml"),
                                         "--run-dir", str(tmp_path / "r"))
    assert "no config.yaml" in cli_error(capsys, "sample", "--run-dir", str(tmp_path))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    (tmp_path / "prompts.txt").write_text("# only a comment\n")
    from piflow.errors import DataError
    from piflow.integrations.diffusers.prompts import read_prompt_file

    with pytest.raises(DataError, match="holds no prompts"):
        read_prompt_file(tmp_path / "prompts.txt")


def test_damaged_feature_classifier(tmp_path):
    from piflow.eval.features import FeatureClassifier, load_feature_classifier, save_feature_classifier

    directory = save_feature_classifier(FeatureClassifier(in_channels=1, num_classes=3, feature_dim=8, widths=(4, 8),
                                                          groups=2), tmp_path / "fc", {"val_accuracy": 0.5})
    for name in ("model.safetensors", "config.json"):
        copy = tmp_path / f"copy_{name}"
        shutil.copytree(directory, copy)
        truncate(copy / name)
        with pytest.raises(ValueError, match=name.split(".")[0]):
            load_feature_classifier(copy)


@pytest.mark.parametrize("change,fragment", [({"optimizer": 5}, "optimizer"), ({"scheduler": 5}, "scheduler"),
                                             ({"generator": 5}, "generator")])
def test_checkpoint_with_wrong_state_types(capsys, run_copy, change, fragment):
    from piflow.train import load_checkpoint

    state = load_checkpoint(run_copy / "checkpoint.safetensors")
    save_checkpoint(run_copy / "checkpoint.safetensors", dict(state, **change))
    assert fragment in cli_error(capsys, "distill", "--run-dir", str(run_copy), *TINY_2D)


def test_checkpoint_history_without_iterations(capsys, run_copy):
    from piflow.train import load_checkpoint

    state = load_checkpoint(run_copy / "checkpoint.safetensors")
    save_checkpoint(run_copy / "checkpoint.safetensors", dict(state, history=[{"loss": 1.0}] * state["step"]))
    before = (run_copy / "student.safetensors").read_bytes()
    assert "history" in cli_error(capsys, "distill", "--run-dir", str(run_copy), *TINY_2D)
    assert (run_copy / "student.safetensors").read_bytes() == before
