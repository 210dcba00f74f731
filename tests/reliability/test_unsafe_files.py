"""Nothing a file contains is executed: a crafted pickle (which runs `touch MARKER` when unpickled) put where each of
piflow's loaders reads is refused with a clear error, and the marker file never appears."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from piflow.errors import CheckpointError
from piflow.train import TrainConfig, load_checkpoint, train
from piflow.train.checkpoint import convert_legacy_checkpoint

from .conftest import TINY_2D, assert_one_line_error, crafted_pickle, run_cli


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a crafted pickle was executed"


@pytest.mark.parametrize("torch_format", [False, True])
@pytest.mark.parametrize("name", ["checkpoint.safetensors", "checkpoint.pt"])
def test_crafted_checkpoint_is_refused_on_resume(tmp_path, marker, name, torch_format, cli):
    """A crafted file in the checkpoint's place (new name, or the legacy checkpoint.pt) stops `piflow distill`
    (in a real process for the legacy name, in this one otherwise)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).write_bytes(crafted_pickle(marker, torch_format))
    result = (run_cli if name == "checkpoint.pt" else cli)("distill", "--run-dir", str(run_dir), *TINY_2D)
    assert_one_line_error(result, "distill", "old pickle format", "piflow convert-checkpoint")


def test_crafted_checkpoint_is_refused_by_the_library(tmp_path, marker):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(crafted_pickle(marker, torch_format=True))
    with pytest.raises(CheckpointError, match="old pickle format"):
        load_checkpoint(path)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(CheckpointError):
        train(model, lambda it, g, backward: model(torch.ones(1, 2)).sum(), TrainConfig(iters=2, progress=False), tmp_path)


@pytest.mark.parametrize("torch_format", [False, True])
def test_converting_a_crafted_legacy_checkpoint_is_refused(tmp_path, marker, torch_format):
    """`piflow convert-checkpoint` unpickles with torch's restricted unpickler, which refuses the payload."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(crafted_pickle(marker, torch_format))
    with pytest.raises(CheckpointError, match="cannot be converted"):
        convert_legacy_checkpoint(path)
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_legacy_checkpoint_converts_and_resumes_exactly(tmp_path):
    """A genuine checkpoint.pt of the old format (torch.save of the same state) converts and resumes the run with
    the losses of an uninterrupted run."""
    def problem():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        def loss_fn(iteration, generator, backward):
            x = torch.randn(8, 3, generator=generator)
            return (model(x) - x.sum(1, keepdim=True)).square().mean()

        return model, loss_fn

    config = dict(iters=20, lr=0.01, warmup_iters=2, progress=False)
    clean = train(*problem(), TrainConfig(**config, checkpoint_every=0))
    run_dir = tmp_path / "run"
    train(*problem(), TrainConfig(**dict(config, iters=10), checkpoint_every=0), run_dir)
    state = load_checkpoint(run_dir / "checkpoint.safetensors")
    torch.save(state, run_dir / "checkpoint.pt")                  # what piflow 0.1 wrote
    (run_dir / "checkpoint.safetensors").unlink()
    with pytest.raises(CheckpointError, match="convert-checkpoint"):
        train(*problem(), TrainConfig(**config), run_dir)
    assert run_cli("convert-checkpoint", str(run_dir / "checkpoint.pt")).returncode == 0
    resumed = train(*problem(), TrainConfig(**config), run_dir)
    assert resumed.resumed_from == 10
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in clean.history]


def test_crafted_checkpoint_is_refused_by_export(tmp_path, marker, cli):
    run_dir = tmp_path / "t2i"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"pipeline: {tmp_path / 'no-pipeline'}\n")
    (run_dir / "checkpoint.safetensors").write_bytes(crafted_pickle(marker, torch_format=True))
    result = cli("export", "--run-dir", str(run_dir))
    assert_one_line_error(result, "export", "old pickle format")


def _teacher_2d(tmp_path: Path) -> Path:
    from piflow.recipes.demo import ASSETS

    teacher = tmp_path / "teacher"
    shutil.copytree(ASSETS / "checkerboard_mlp", teacher)
    return teacher


def test_crafted_teacher_weights_are_refused(tmp_path, marker, cli):
    teacher = _teacher_2d(tmp_path)
    (teacher / "teacher.safetensors").write_bytes(crafted_pickle(marker))
    result = cli("distill", "--run-dir", str(tmp_path / "student"), "dataset=checkerboard",
                     f"teacher={teacher}", *TINY_2D[2:])
    assert_one_line_error(result, "distill", "teacher.safetensors", "not a readable safetensors file")
    assert not (tmp_path / "student").exists()           # validated before anything was written


def test_crafted_dit_weights_are_refused(tmp_path, marker, cli):
    from piflow.models import DiT
    from piflow.recipes.demo import ASSETS

    teacher = tmp_path / "digits_dit"
    shutil.copytree(ASSETS / "digits_dit", teacher)
    (teacher / "teacher" / "model.safetensors").write_bytes(crafted_pickle(marker, torch_format=True))
    with pytest.raises(ValueError, match="model.safetensors"):
        DiT.from_pretrained(teacher / "teacher")
    result = cli("distill", "--run-dir", str(tmp_path / "student"), "dataset=digits", f"teacher={teacher}")
    assert_one_line_error(result, "distill", "model.safetensors")


def test_crafted_student_weights_are_refused_by_sample(tmp_path, marker, finished_run, cli):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "student.safetensors").write_bytes(crafted_pickle(marker))
    result = cli("sample", "--run-dir", str(run_dir), "--num-samples", "10")
    assert_one_line_error(result, "sample", "student.safetensors")


def test_crafted_latents_are_refused(tmp_path, marker, cli):
    """Latents as a pickled object array in a .npy file, or a pickle named .safetensors."""
    from piflow.data import LatentDataset

    npy = tmp_path / "latents.npy"
    array = np.empty(2, dtype=object)
    array[0] = array[1] = crafted_pickle(marker)
    np.save(npy, array, allow_pickle=True)
    fake = tmp_path / "latents.safetensors"
    fake.write_bytes(crafted_pickle(marker, torch_format=True))
    for path in (npy, fake):
        with pytest.raises(ValueError, match=str(path.name)):
            LatentDataset(path)
        result = cli("train-teacher", "--run-dir", str(tmp_path / "run"), "dataset=latents", f"data.root={path}")
        assert_one_line_error(result, "train-teacher", path.name)
    assert not (tmp_path / "run").exists()


def test_crafted_yaml_is_refused(tmp_path, marker, finished_run, cli):
    """YAML is read with the safe loader: a python/object tag is an error, not a call."""
    evil = f"!!python/object/apply:os.system ['touch {marker}']\n"
    config = tmp_path / "config.yaml"
    config.write_text(f"dataset: ring8\nteacher: {evil}")
    result = cli("distill", "-c", str(config), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "distill", "not valid YAML")
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "config.yaml").write_text(f"dataset: ring8\nteacher: {evil}")
    result = cli("sample", "--run-dir", str(run_dir))
    assert_one_line_error(result, "sample", "not valid YAML")
