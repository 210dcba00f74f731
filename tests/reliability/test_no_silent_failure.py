"""No silent failure: NaN/Inf data is refused with the file and the first bad index, training that keeps skipping
steps stops with a clear error (the checkpoint before it kept), and every JSON piflow writes is strict JSON."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from piflow.errors import TrainingDivergedError
from piflow.files import json_line, write_json
from piflow.train import TrainConfig, load_checkpoint, train

from .conftest import TINY_2D, assert_one_line_error, cli_env, run_cli, strict_json_load


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_latents_with_nan_are_refused_with_file_and_index(tmp_path, suffix, cli):
    from safetensors.torch import save_file

    latents = np.random.default_rng(0).standard_normal((12, 4, 4, 4)).astype(np.float32)
    latents[7, 2, 1, 3] = np.nan
    latents[9, 0, 0, 0] = np.inf
    path = tmp_path / f"latents{suffix}"
    if suffix == ".npy":
        np.save(path, latents)
    else:
        save_file({"latents": torch.from_numpy(latents)}, str(path))
    result = cli("train-teacher", "--run-dir", str(tmp_path / "run"), "dataset=latents", f"data.root={path}",
                     "train.iters=3")
    assert_one_line_error(result, "train-teacher", str(path), "NaN or Inf", "index 7")
    assert not (tmp_path / "run").exists()


def test_image_arrays_with_inf_are_refused():
    from piflow.data import ImageDataset
    from piflow.errors import DataError

    images = np.zeros((5, 1, 2, 2), dtype=np.float64)
    images[3, 0, 1, 1] = -np.inf
    with pytest.raises(DataError, match="index 3"):
        ImageDataset(images)
    ImageDataset(np.zeros((5, 1, 2, 2), dtype=np.uint8))          # integer images cannot hold NaN: no check


def _linear_problem(nan_from: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)

    def loss_fn(iteration, generator, backward):
        x = torch.randn(8, 3, generator=generator)
        loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
        return loss * float("nan") if iteration >= nan_from else loss

    return model, loss_fn


def test_training_stops_after_consecutive_skipped_steps_and_keeps_the_checkpoint(tmp_path):
    model, loss_fn = _linear_problem(nan_from=12)
    config = TrainConfig(iters=40, lr=0.01, warmup_iters=2, progress=False, checkpoint_every=5, max_skipped_steps=4)
    with pytest.raises(TrainingDivergedError, match=r"4 consecutive steps \(iterations 12–15\).*step 10"):
        train(model, loss_fn, config, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert state["step"] == 10                           # no checkpoint was written during the skipped steps
    assert all(math.isfinite(h["loss"]) for h in state["history"])
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == list(range(16)) and log[-1]["loss"] is None   # strict JSON: NaN → null


def test_isolated_skipped_steps_do_not_stop_training():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)

    def loss_fn(iteration, generator, backward):
        loss = model(torch.randn(8, 3, generator=generator)).square().mean()
        return loss * float("nan") if iteration % 3 == 0 else loss          # never 2 in a row

    result = train(model, loss_fn, TrainConfig(iters=20, progress=False, checkpoint_every=0, max_skipped_steps=2))
    assert sum(h["skipped"] for h in result.history) == 7
    with pytest.raises(ValueError, match="max_skipped_steps"):
        TrainConfig(max_skipped_steps=-1)


def test_diverging_cli_run_exits_3_with_one_line(tmp_path):
    """An absurd learning rate makes every step non-finite: the run stops (exit 3) instead of writing results."""
    run_dir = tmp_path / "run"
    result = run_cli("train-teacher", "--run-dir", str(run_dir), "dataset=ring8", "model.hidden_size=16",
                     "model.num_layers=2", "flow_matching.batch_size=32", "train.iters=50", "train.lr=1e30",
                     "train.warmup_iters=0", "train.grad_clip=0", "train.progress=false", "train.checkpoint_every=0")
    assert_one_line_error(result, "train-teacher", "consecutive steps", "NaN/Inf", code=3)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "teacher.safetensors").exists()


@pytest.mark.slow                 # ~10 s: two piflow processes
def test_sigterm_stops_a_cli_run_with_a_checkpoint_and_exit_143(tmp_path):
    """`kill` (SIGTERM, as a job scheduler preempts) during `piflow distill`: one line, exit 143, a checkpoint of
    the step it was in, no results; the same command then finishes the run from there."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = ["distill", "--run-dir", str(run_dir), *TINY_2D, "train.iters=100000", "train.checkpoint_every=0"]
    process = subprocess.Popen([sys.executable, "-m", "piflow.cli", *args], env=cli_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "train_log.jsonl").is_file() or (run_dir / "train_log.jsonl").stat().st_size == 0:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(args, process.returncode, "", stderr)
    line = assert_one_line_error(result, "distill", "terminated by SIGTERM", "run the same command", code=143)
    step = load_checkpoint(run_dir / "checkpoint.safetensors")["step"]
    assert 0 < step < 100000 and f"after step {step} (checkpoint at step {step})" in line
    assert not (run_dir / "metrics.json").exists()
    finished = run_cli("distill", "--run-dir", str(run_dir), "--allow-config-change", *TINY_2D,
                       f"train.iters={step + 2}", "train.checkpoint_every=0")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (run_dir / "metrics.json").is_file()


def test_every_json_a_run_writes_is_strict(finished_run):
    files = [finished_run / name for name in ("metrics.json", "run.json")]
    for path in files:
        strict_json_load(path)
    for line in (finished_run / "train_log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-standard token {token}"))


def test_json_writers_replace_non_finite_numbers(tmp_path):
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (2.5, "x")}
    write_json(tmp_path / "x.json", data)
    assert strict_json_load(tmp_path / "x.json") == {"a": None, "b": [1.0, None, {"c": None}], "d": [2.5, "x"]}
    assert json.loads(json_line({"loss": float("nan")})) == {"loss": None}


def test_nan_inputs_to_the_public_api_raise(tmp_path):
    """The README's promise: NaN/Inf inputs at the public entry points raise ValueError naming the argument."""
    import piflow
    from piflow.data import make_toy_dataset
    from piflow.models import MLPVelocityModel2D
    from piflow.models.students import PolicyStudent

    mix = make_toy_dataset("ring8").mixture
    teacher = piflow.GaussianMixtureTeacher(mix.means, mix.std, mix.weights)
    policy = teacher.policy(torch.randn(4, 2), 0.5)
    bad = torch.randn(4, 2)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="x_t"):
        policy.velocity(bad, 0.3)
    with pytest.raises(ValueError, match="x_t"):
        policy.x0(bad, 0.3)
    student = PolicyStudent(MLPVelocityModel2D(hidden_size=16, num_layers=2), "gmflow", num_components=2,
                            init_from_teacher=False, logstd_hidden=8)
    pf = piflow.PiFlow(student, teacher, policy="gmflow", nfe=2)
    for call in (lambda: pf.sample(bad), lambda: pf(bad), lambda: pf.data_free_loss(bad)):
        with pytest.raises(ValueError, match="non-finite"):
            call()
    with pytest.raises(ValueError, match="temperature"):
        pf.sample(torch.randn(4, 2), temperature=-1)
    with pytest.raises(ValueError, match="temperature"):
        pf.sample(torch.randn(4, 2), temperature=float("nan"))
    with pytest.raises(ValueError, match="policy='gmflow'"):
        piflow.PiFlow(student, teacher, policy="dx", nfe=2, gm_dropout=0).sample(torch.randn(4, 2))


def test_non_finite_teacher_outputs_fail_loudly():
    """A teacher that returns NaN makes the π-ID loss non-finite, which the training loop counts as skipped."""
    import piflow
    from piflow.models import MLPVelocityModel2D
    from piflow.models.students import PolicyStudent

    torch.manual_seed(0)
    student = PolicyStudent(MLPVelocityModel2D(hidden_size=16, num_layers=2), "gmflow", num_components=2,
                            init_from_teacher=False, logstd_hidden=8)
    pf = piflow.PiFlow(student, lambda x, s, c: torch.full_like(x, float("nan")), policy="gmflow", nfe=2)
    with pytest.raises(TrainingDivergedError):
        train(student, lambda it, g, backward: pf(torch.randn(16, 2, generator=g), generator=g),
              TrainConfig(iters=10, progress=False, checkpoint_every=0, max_skipped_steps=3))


def test_diverged_weights_stop_with_the_reason(tmp_path, cli):
    """A learning rate that blows the weights up makes the student's policy parameters NaN (a `NonFiniteError`
    inside the loss): counted as skipped steps, so the run stops with exit status 3 and the reason."""
    result = cli("distill", "--run-dir", str(tmp_path / "run"), *TINY_2D, "train.lr=1e6", "train.warmup_iters=0",
                 "train.grad_clip=0")
    line = assert_one_line_error(result, "distill", "consecutive steps", "non-finite", code=3)
    assert "train.lr" in line


def test_teacher_weights_with_nan_are_refused(tmp_path, cli):
    import shutil

    from safetensors.torch import load_file, save_file

    from piflow.recipes.demo import ASSETS

    teacher = tmp_path / "teacher"
    shutil.copytree(ASSETS / "checkerboard_mlp", teacher)
    state = load_file(str(teacher / "teacher.safetensors"))
    name = sorted(state)[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(teacher / "teacher.safetensors"))
    result = cli("distill", "--run-dir", str(tmp_path / "run"), "dataset=checkerboard", f"teacher={teacher}",
                 *TINY_2D[2:])
    assert_one_line_error(result, "distill", "teacher.safetensors", name, "NaN or Inf")
    assert not (tmp_path / "run").exists()


def test_skipped_steps_do_not_advance_the_learning_rate_schedule():
    model, loss_fn = _linear_problem(nan_from=1000)
    skip = {3, 4}

    def sometimes_nan(iteration, generator, backward):
        loss = loss_fn(iteration, generator, backward)
        return loss * float("nan") if iteration in skip else loss

    result = train(model, sometimes_nan, TrainConfig(iters=8, lr=1.0, warmup_iters=10, progress=False,
                                                     checkpoint_every=0))
    lrs = [h["lr"] for h in result.history]
    assert lrs[2] == lrs[3] == lrs[4] < lrs[5]          # frozen while skipping, then the warm-up goes on
