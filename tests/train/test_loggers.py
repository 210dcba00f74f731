"""Experiment trackers (``train.logger``): TensorBoard and Weights & Biases (offline mode, no network) receive the
same per-iteration scalars as train_log.jsonl, the resolved config, and the run's figures at its end; a resumed run
continues the same W&B run; a bad logger name is a one-line error."""
import json

import pytest

from piflow.cli import main
from piflow.files import read_yaml

pytestmark = pytest.mark.usefixtures("single_thread")
TINY_2D = ["dataset=moons", "model.hidden_size=16", "model.num_layers=2", "train.progress=false",
           "eval.num_samples=100", "eval.teacher_steps=[1]"]


def _train_log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_wandb_offline_run_gets_scalars_config_and_figures(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    inits, logged = [], []
    real_init, real_log = wandb.init, Run.log

    def spy_init(*args, **kwargs):
        inits.append(kwargs)
        return real_init(*args, **kwargs)

    def spy_log(self, data, *args, **kwargs):
        logged.append((kwargs.get("step"), dict(data)))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy_init)
    monkeypatch.setattr(Run, "log", spy_log)
    run_dir = tmp_path / "teacher"
    assert main(["train-teacher", "--run-dir", str(run_dir), "train.iters=12", "train.logger=wandb",
                 "train.wandb_project=piflow-tests", *TINY_2D]) == 0
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert [kw["id"] for kw in inits] == [run_id, run_id] and inits[0]["project"] == "piflow-tests"
    assert inits[0]["config"] == read_yaml(run_dir / "config.yaml") and inits[0]["config"]["train"]["logger"] == "wandb"
    scalars = [(step, data) for step, data in logged if "train/loss" in data]
    records = _train_log(run_dir)
    assert [step for step, _ in scalars] == list(range(12))
    for (_, data), record in zip(scalars, records):
        assert data == {"train/loss": record["loss"], "train/lr": record["lr"], "train/grad_norm": record["grad_norm"]}
    figures = [data for step, data in logged if step == 12]
    assert figures and {"figures/samples", "figures/loss"} <= set(figures[0])
    offline_images = list((run_dir / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    assert len(offline_images) >= 2                 # W&B itself stored the figures for a later `wandb sync`
    # resuming the piflow run continues the same W&B run
    assert main(["train-teacher", "--run-dir", str(run_dir), "train.iters=14", "train.logger=wandb",
                 "--allow-config-change", *TINY_2D]) == 0
    assert [kw["id"] for kw in inits[2:]] == [run_id, run_id]
    assert [step for step, data in logged if "train/loss" in data][12:] == [12, 13]


def test_tensorboard_gets_scalars_config_and_figures(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "teacher"
    assert main(["train-teacher", "--run-dir", str(run_dir), "train.iters=10", *TINY_2D]) == 0
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert losses == pytest.approx([record["loss"] for record in _train_log(run_dir)], rel=1e-6)
    assert {"figures/samples", "figures/loss"} <= set(tags["images"])
    assert "config/text_summary" in tags["tensors"]
    assert any(tag.startswith("metrics/") for tag in tags["scalars"])


def test_no_logger_writes_no_tracker_files_and_bad_names_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "teacher"
    assert main(["train-teacher", "--run-dir", str(run_dir), "train.iters=3", "train.logger=none", *TINY_2D]) == 0
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "wandb").exists()
    assert main(["train-teacher", "--run-dir", str(tmp_path / "t2"), "train.iters=3", "train.logger=mlflow",
                 *TINY_2D]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.logger must be one of ('tensorboard', 'wandb', 'none'), got 'mlflow'" in err[0]
