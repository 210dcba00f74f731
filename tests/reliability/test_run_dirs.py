"""Runs are never damaged by a failed or different command, and one process at a time writes a run directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from piflow.train.run_dir import LOCK_NAME, config_differences

from .conftest import TINY_2D, assert_one_line_error, cli_env, run_cli


def _snapshot(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture
def run_copy(tmp_path, finished_run) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def test_failed_command_leaves_a_finished_run_intact(run_copy, cli):
    """A mistyped teacher path on a finished run: refused before anything is written; `sample` still works."""
    before = _snapshot(run_copy)
    result = cli("distill", "--run-dir", str(run_copy), *[o for o in TINY_2D if not o.startswith("dataset")],
                     "dataset=checkerboard", "teacher=/no/such/teacher")
    assert_one_line_error(result, "distill", "teacher")
    assert _snapshot(run_copy) == before
    assert cli("sample", "--run-dir", str(run_copy), "--num-samples", "20").returncode == 0


def test_failed_validation_creates_no_directory(tmp_path, cli):
    for args in (["teacher=/no/such/teacher"], ["dataset=nosuch"], ["train.lr=-1"], ["train.iters=abc"],
                 ["distill.nfe=0"]):
        result = cli("distill", "--run-dir", str(tmp_path / "new"), *TINY_2D, *args)
        assert result.returncode == 2, result.stderr
        assert not (tmp_path / "new").exists(), args


def test_unknown_dataset_names_the_key_and_every_dataset(tmp_path, cli):
    line = assert_one_line_error(cli("distill", "--run-dir", str(tmp_path / "r"), "dataset=nosuch"), "distill",
                                 "dataset must be one of")
    for name in ("ring8", "checkerboard", "digits", "fashion-mnist", "image-folder", "latents"):
        assert name in line


def test_resuming_with_a_different_config_is_refused_and_listed(run_copy, cli):
    before = _snapshot(run_copy)
    args = [o for o in TINY_2D if not o.startswith(("train.iters", "student.num_components"))]
    result = cli("distill", "--run-dir", str(run_copy), *args, "train.iters=40", "student.num_components=6")
    line = assert_one_line_error(result, "distill", "different config", "train.iters: 30 -> 40",
                                 "student.num_components: 4 -> 6", "--allow-config-change")
    assert "train.progress" not in line
    assert _snapshot(run_copy) == before


def test_result_neutral_settings_may_differ(run_copy, cli):
    """Logging, progress and checkpoint cadence cannot change results: a finished run reruns without complaint."""
    args = [o for o in TINY_2D if not o.startswith(("train.progress", "train.checkpoint_every"))]
    result = cli("distill", "--run-dir", str(run_copy), *args, "train.progress=true", "train.checkpoint_every=7",
                     "train.log_every=3")
    assert result.returncode == 0, result.stderr


def test_allowed_config_change_is_recorded(run_copy, cli):
    args = [o for o in TINY_2D if not o.startswith("train.iters")]
    result = cli("distill", "--run-dir", str(run_copy), "--allow-config-change", *args, "train.iters=35")
    assert result.returncode == 0, result.stderr
    record = json.loads((run_copy / "run.json").read_text())
    assert record["config_changes"][-1]["changes"] == {"train.iters": {"old": 30, "new": 35}}
    log = [json.loads(line)["iter"] for line in (run_copy / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(35))                        # continued from step 30, every iteration once


def test_run_dir_that_is_a_file_or_another_command(tmp_path, finished_run, cli):
    path = tmp_path / "file"
    path.write_text("not a directory")
    assert_one_line_error(cli("distill", "--run-dir", str(path), *TINY_2D), "distill", "is not a directory")
    assert_one_line_error(cli("sample", "--run-dir", str(path)), "sample", "is not a directory")
    assert path.read_text() == "not a directory"
    result = cli("train-teacher", "--run-dir", str(finished_run), "dataset=ring8", "train.iters=2")
    assert_one_line_error(result, "train-teacher", "piflow distill` run")


def test_run_dir_that_cannot_be_created(tmp_path, cli):
    """Under a file (any user) or in a read-only folder (non-root users): one line, nothing written."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert_one_line_error(cli("distill", "--run-dir", str(blocker / "run"), *TINY_2D), "distill",
                          "cannot create run directory")
    if os.geteuid() != 0:                               # root ignores directory permissions
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o500)
        assert_one_line_error(cli("distill", "--run-dir", str(parent / "run"), *TINY_2D), "distill",
                              "cannot create run directory")


def test_config_difference_ignores_int_float_spelling():
    assert config_differences({"train": {"lr": 1, "progress": True}}, {"train": {"lr": 1.0, "progress": False}}) == {}
    assert config_differences({"a": [1, 2]}, {"a": [1, 3]}) == {"a": ([1, 2], [1, 3])}


HOLDER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from piflow.train import TrainConfig, train
    run_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    def loss_fn(iteration, generator, backward):
        if iteration == 3:
            (run_dir / "holding").write_text("1")
            while not go.exists():       # hold the lock until the test has tried a second writer
                time.sleep(0.05)
        return model(torch.randn(4, 2, generator=generator)).square().mean()
    train(model, loss_fn, TrainConfig(iters=8, progress=False, checkpoint_every=2), run_dir)
""")


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first process never reached its holding point"
        time.sleep(0.05)


def test_second_writer_exits_at_once_naming_the_first(tmp_path):
    """Two real processes on one run directory: the second (the CLI) exits with status 2 while the first holds the
    lock, naming its PID; the first finishes normally and logs every iteration once."""
    run_dir, go = tmp_path / "run", tmp_path / "go"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(run_dir), str(go)], env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run_dir / "holding", holder)
        start = time.monotonic()
        second = run_cli("train-teacher", "--run-dir", str(run_dir), "dataset=ring8", "train.iters=4",
                         "train.progress=false")
        assert time.monotonic() - start < 60
        assert_one_line_error(second, "train-teacher", "is in use by", f"PID {holder.pid}")
        lock_info = json.loads((run_dir / LOCK_NAME).read_text())
        assert lock_info["pid"] == holder.pid and lock_info["host"]
    finally:
        go.write_text("1")
        out, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    iters = [json.loads(line)["iter"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert iters == list(range(8))
    assert (run_dir / LOCK_NAME).read_text() == ""          # released
    assert not (run_dir / "config.yaml").exists()           # the second process wrote nothing


def test_stale_lock_is_taken_over(tmp_path, cli):
    """A lock file left by a killed process (content, but no kernel lock behind it) is taken over with a warning."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "then",
                                                 "command": "piflow distill"}))
    result = cli("distill", "--run-dir", str(run_dir), *TINY_2D)
    assert result.returncode == 0, result.stderr
    assert "stale lock" in result.stderr and "PID 999999" in result.stderr


@pytest.mark.slow
def test_killed_holder_leaves_a_stale_lock(tmp_path):
    """SIGKILL the lock holder: the next run proceeds (the kernel released the lock with the process)."""
    run_dir, go = tmp_path / "run", tmp_path / "never"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(run_dir), str(go)], env=cli_env())
    _wait_for(run_dir / "holding", holder)
    holder.kill()
    holder.wait(timeout=60)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    (run_dir / "holding").unlink()
    go.write_text("1")
    finished = subprocess.run([sys.executable, str(script), str(run_dir), str(go)], env=cli_env(),
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "stale lock" in finished.stderr


@pytest.mark.slow
def test_torchrun_ranks_fail_together_on_a_bad_run_dir(tmp_path, free_port):
    """Under torchrun only rank 0 touches the run directory; when it refuses it, every rank exits with the same
    one-line error instead of waiting for rank 0 forever."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                             "127.0.0.1", "--master_port", str(free_port), "-m", "piflow.cli", "distill",
                             "--run-dir", str(blocker), *TINY_2D], capture_output=True, text=True, timeout=300,
                            env=cli_env())
    assert result.returncode != 0 and time.monotonic() - start < 200
    errors = [line for line in result.stderr.splitlines() if line.startswith("piflow distill: error:")]
    assert len(errors) == 2 and all("is not a directory" in line for line in errors), result.stderr[-3000:]
    assert blocker.read_text() == "x"


def test_lock_file_symlink_is_refused_and_its_target_untouched(tmp_path, cli):
    """A `.piflow.lock` planted as a link to another file must not truncate (or print) that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT DATA")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).symlink_to(victim)
    line = assert_one_line_error(cli("distill", "--run-dir", str(run_dir), *TINY_2D), "distill", "symbolic link")
    assert "IMPORTANT" not in line and victim.read_text() == "IMPORTANT DATA"
    (run_dir / LOCK_NAME).unlink()
    (run_dir / LOCK_NAME).write_text("IMPORTANT DATA that is not lock information")
    result = cli("distill", "--run-dir", str(run_dir), *TINY_2D)
    assert result.returncode == 0 and "unreadable lock information" in result.stderr
    assert "IMPORTANT" not in result.stderr


def test_allowed_config_change_that_does_not_fit_the_checkpoint_changes_nothing(run_copy, cli):
    """The saved config is rewritten only once the checkpoint has loaded into the new model: an allowed change of
    the student's width fails on the checkpoint and leaves the run as it was."""
    before = _snapshot(run_copy)
    args = [o for o in TINY_2D if not o.startswith("student.hidden_size")]
    result = cli("distill", "--run-dir", str(run_copy), "--allow-config-change", *args, "student.hidden_size=64")
    assert_one_line_error(result, "distill", "does not match this model")
    assert _snapshot(run_copy) == before
    assert cli("sample", "--run-dir", str(run_copy), "--num-samples", "8").returncode == 0


def test_convert_checkpoint_never_overwrites_a_newer_checkpoint(run_copy, cli):
    import torch

    from piflow.train import load_checkpoint

    state = load_checkpoint(run_copy / "checkpoint.safetensors")
    torch.save(dict(state, step=5, history=state["history"][:5]), run_copy / "checkpoint.pt")
    before = (run_copy / "checkpoint.safetensors").read_bytes()
    assert_one_line_error(cli("convert-checkpoint", str(run_copy / "checkpoint.pt")), "convert-checkpoint",
                          "already exists")
    assert (run_copy / "checkpoint.safetensors").read_bytes() == before


@pytest.mark.parametrize("args,fragment", [(["--label", "3"], "--label applies"), (["--prompt", "a cat"], "--prompt"),
                                           (["--output", "DIR.npy"], "not a folder")])
def test_sample_options_that_do_not_apply_are_errors(run_copy, cli, tmp_path, args, fragment):
    if "DIR.npy" in args:
        (tmp_path / "DIR.npy").mkdir()
        args = ["--output", str(tmp_path / "DIR.npy")]
    assert_one_line_error(cli("sample", "--run-dir", str(run_copy), *args), "sample", fragment)
    assert not (tmp_path / "DIR.png").exists()


def test_unfinished_run_is_named_as_such(tmp_path, cli):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("dataset: ring8\n")
    line = assert_one_line_error(cli("sample", "--run-dir", str(run_dir)), "sample", "not a finished distillation run")
    assert "config error" not in line


def test_export_refuses_to_write_an_adapter_over_a_run_directory(tmp_path, cli):
    run_dir = tmp_path / "t2i"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("pipeline: /nowhere\n")
    (run_dir / "checkpoint.safetensors").write_bytes(b"not read")
    for out in (run_dir, tmp_path):
        (tmp_path / "config.yaml").write_text("x: 1\n")
        assert_one_line_error(cli("export", "--run-dir", str(run_dir), "--out", str(out)), "export",
                              "not a run directory")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.safetensors", "config.yaml"]


def test_lock_file_hard_link_is_refused(tmp_path, cli):
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT DATA")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(victim, run_dir / LOCK_NAME)
    assert_one_line_error(cli("distill", "--run-dir", str(run_dir), *TINY_2D), "distill", "a link?")
    assert victim.read_text() == "IMPORTANT DATA"


def test_export_never_writes_into_a_foreign_folder(tmp_path, cli):
    """An existing folder with other contents (e.g. a pipeline's transformer/) is refused; a new or empty folder
    or a previous piflow adapter is fine (checked before anything is loaded)."""
    run_dir = tmp_path / "t2i"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("pipeline: /nowhere\n")
    (run_dir / "checkpoint.safetensors").write_bytes(b"not read")
    foreign = tmp_path / "transformer"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    assert_one_line_error(cli("export", "--run-dir", str(run_dir), "--out", str(foreign)), "export",
                          "must be a new or empty folder")
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]


@pytest.mark.parametrize("override", ["student.num_components=0", "student.hidden_size=0", "eval.num_samples=0",
                                      "eval.student_nfe=[0]", "eval.temperature=-1", "distill.total_substeps=0",
                                      "distill.loss_scale=.inf", "train.betas=[0.9]", "train.grad_clip=.nan"])
def test_every_setting_is_checked_before_the_run_directory_exists(tmp_path, cli, override):
    line = assert_one_line_error(cli("distill", "--run-dir", str(tmp_path / "run"), *TINY_2D, override), "distill",
                                 override.split("=")[0].split(".")[-1])
    assert "config error" in line
    assert not (tmp_path / "run").exists()


def test_renamed_and_added_keys_are_not_config_changes():
    from piflow.train.run_dir import config_differences

    old = {"distill": {"nfe": 2, "gm_dropout": 0.1}, "train": {"iters": 5}}
    new = {"distill": {"nfe": 2, "policy_dropout": 0.1}, "train": {"iters": 5, "max_skipped_steps": None}}
    assert config_differences(old, new) == {}
    changed = dict(new, distill={"nfe": 2, "policy_dropout": 0.2})
    assert config_differences(old, changed) == {"distill.policy_dropout": (0.1, 0.2)}


def test_runs_started_before_policy_dropout_resume_unchanged():
    # configs written by the earlier code hold gm_dropout (always explicit; the recipes ignored it for DX); the
    # recipes now record the resolved policy_dropout, so the same command resumes without a config change
    from piflow.config import load_config
    from piflow.recipes import toy2d
    from piflow.methods.piid import as_run, piid_settings
    from piflow.train.run_dir import config_differences

    for policy, effective in (("gmflow", 0.05), ("dx", 0.0)):
        new = load_config(toy2d.DISTILL_DEFAULTS, None, [f"student.policy={policy}"])
        new = as_run(new, piid_settings(new))
        assert new["distill"]["policy_dropout"] == effective
        old = {**new, "distill": {**{k: v for k, v in new["distill"].items() if k != "policy_dropout"},
                                  "gm_dropout": 0.05}}
        assert config_differences(old, new) == {}
