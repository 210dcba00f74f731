"""The command line: help text for every option, batched sampling, evaluate updating metrics.json, one-line errors."""
import argparse
import json
import shutil

import numpy as np
import pytest

from piflow.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_2D = ["dataset=ring8", "teacher=exact", "student.hidden_size=32", "student.num_layers=2",
           "student.num_components=4", "distill.batch_size=32", "distill.total_substeps=16", "train.iters=20",
           "train.warmup_iters=5", "train.ema_start=5", "eval.num_samples=100", "eval.teacher_steps=[]",
           "train.progress=false"]


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_and_option_has_help(capsys):
    parser = build_parser()
    commands = _subparsers(parser)
    helps = {a.dest: a.help for a in parser._actions if isinstance(a, argparse._SubParsersAction)
             for a in a._choices_actions}
    assert set(helps) == set(commands) and all(helps.values())
    for name, sub in commands.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"piflow {name} {action.option_strings or action.dest} has no help text"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: piflow " + name in capsys.readouterr().out


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    import torch

    torch.set_num_threads(1)
    assert main(["distill", "--run-dir", str(run_dir), *TINY_2D]) == 0
    return run_dir


def test_sample_in_batches_equals_one_batch(run_2d, tmp_path, capsys):
    one = tmp_path / "one.npy"
    assert main(["sample", "--run-dir", str(run_2d), "--num-samples", "50", "--output", str(one)]) == 0
    message = capsys.readouterr().out
    assert "not clipped" in message and "data coordinates" in message    # the value range is stated
    many = tmp_path / "many.npy"
    assert main(["sample", "--run-dir", str(run_2d), "--num-samples", "50", "--batch-size", "7",
                 "--output", str(many)]) == 0
    a, b = np.load(one), np.load(many)
    assert a.shape == (50, 2) and a.dtype == np.float32
    # the same noise in other chunks: equal up to float round-off (the MLP's matmuls sum in a batch-size dependent
    # order, ~1e-6 relative; a misaligned chunk or noise draw would differ by O(1))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "many.png").is_file()


@pytest.mark.parametrize("args,fragment", [(["--temperature", "-1"], "--temperature"),
                                           (["--temperature", "warm"], "--temperature"),
                                           (["--nfe", "0"], "--nfe"), (["--batch-size", "0"], "--batch-size"),
                                           (["--output", "x.txt"], ".npy")])
def test_sample_rejects_bad_options_in_one_line(run_2d, capsys, args, fragment):
    assert main(["sample", "--run-dir", str(run_2d), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]


def test_evaluate_adds_rows_to_metrics_and_keeps_the_training_figures(run_2d, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(run_2d, run_dir)
    before = json.loads((run_dir / "metrics.json").read_text())
    figure = (run_dir / "samples.png").read_bytes()
    assert main(["evaluate", "--run-dir", str(run_dir), "eval.student_nfe=[1]", "eval.num_samples=1e2"]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert set(before["rows"]) < set(after["rows"]) and "student gmflow 1 (elastic)" in after["rows"]
    assert after["rows"]["student gmflow 1 (elastic)"]["num_samples"] == 100          # what the row is based on
    assert after["train_seconds"] == before["train_seconds"]
    assert after["evaluate"]["overrides"] == ["eval.student_nfe=[1]", "eval.num_samples=1e2"]
    assert (run_dir / "samples.png").read_bytes() == figure
    assert (run_dir / "evaluation" / "samples.png").is_file()
    assert "rows added to" in capsys.readouterr().out


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch, tmp_path):
    assert main(["distill", "--run-dir", str(tmp_path / "r"), "distill.nfe=oops"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    import piflow.recipes.toy2d as toy2d

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(toy2d, "distill", broken)
    with pytest.raises(KeyError):
        main(["distill", "--run-dir", str(tmp_path / "r"), *TINY_2D])


def test_traceback_on_request(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PIFLOW_TRACEBACK", "1")
    assert main(["distill", "--run-dir", str(tmp_path / "r"), "dataset=nosuch"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("piflow distill: config error:")


def test_missing_extra_names_the_pip_extra(monkeypatch):
    import sys

    from piflow.errors import MissingExtraError, require

    monkeypatch.setitem(sys.modules, "diffusers", None)        # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'piflow\[diffusers\]'"):
        require("diffusers", "text-to-image distillation")


def test_ui_rejects_bad_arguments_in_one_line(capsys):
    from piflow.cli import main

    assert main(["ui", "--port", "0"]) == 2
    assert "--port must lie in [1, 65535], got 0" in capsys.readouterr().err
    assert main(["ui", "--adapter", "somewhere"]) == 2
    assert "--adapter needs --pipeline" in capsys.readouterr().err


def test_version(capsys):
    import piflow

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"piflow {piflow.__version__}"


def test_overrides_may_stand_anywhere_after_the_command(tmp_path):
    """`distill dataset=ring8 --run-dir R teacher=exact …`: the overrides before and after the options all apply,
    in order (the later of two equal keys wins); an unknown option or an override where a command takes none is
    still an argparse error."""
    from piflow.cli_parser import parse_args

    args = parse_args(["distill", "dataset=ring8", "--run-dir", str(tmp_path / "r"), "teacher=exact",
                       "--allow-config-change", "train.iters=3", "train.iters=4"])
    assert args.run_dir == str(tmp_path / "r") and args.allow_config_change
    assert args.overrides == ["dataset=ring8", "teacher=exact", "train.iters=3", "train.iters=4"]
    run = tmp_path / "run"
    assert main(["distill", TINY_2D[0], "--run-dir", str(run), *TINY_2D[1:]]) == 0
    assert (run / "student.safetensors").is_file()
    for argv in (["distill", "--run-dir", str(run), "--bogus"], ["ui", "port=3"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2


@pytest.mark.parametrize("args,fragment", [
    (["evaluate", "eval.student_nfe=[0]"], "eval.student_nfe"),
    (["evaluate", "eval.num_samples=0"], "eval.num_samples"),
    (["evaluate", "eval.num_samples=1e10"], "at most 1000000"),
    (["sample", "--nfe", "1000000"], "--nfe must be at most"),
    (["sample", "--num-samples", "100000000000"], "--num-samples must be at most")])
def test_evaluate_and_sample_check_their_settings_in_one_line(run_2d, capsys, args, fragment):
    """The checks `distill` makes before training, made by `evaluate` too; absurd sizes name their limit."""
    command, *rest = args
    before = (run_2d / "metrics.json").read_bytes()
    assert main([command, "--run-dir", str(run_2d), *rest]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
    assert (run_2d / "metrics.json").read_bytes() == before


def test_distill_caps_sizes_before_the_run_directory_exists(tmp_path, capsys):
    for override, fragment in (("eval.num_samples=1e10", "eval.num_samples must be at most 1000000"),
                               ("distill.nfe=100000", "distill.nfe must be at most 1000")):
        assert main(["distill", "--run-dir", str(tmp_path / "r"), *TINY_2D, override]) == 2
        assert fragment in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_misleading_messages_now_say_what_is_wrong(run_2d, tmp_path, capsys):
    """export of a 2-D run, sample/evaluate of a teacher run, -c given a folder, ui on a busy port: one line each
    that names the real problem (not "unknown config key" or Gradio's advice)."""
    import socket

    teacher = tmp_path / "teacher"
    assert main(["train-teacher", "--run-dir", str(teacher), "dataset=checkerboard", "train.iters=2",
                 "train.progress=false", "model.hidden_size=16", "model.num_layers=2", "eval.num_samples=50",
                 "eval.teacher_steps=[1]"]) == 0
    capsys.readouterr()
    (tmp_path / "folder").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [(["export", "--run-dir", str(run_2d)], "export writes the adapter of a text-to-image run"),
                 (["evaluate", "--run-dir", str(teacher)], "is a `piflow train-teacher` run"),
                 (["sample", "--run-dir", str(teacher)], "is a `piflow train-teacher` run"),
                 (["distill", "-c", str(tmp_path / "folder"), "--run-dir", str(tmp_path / "r")],
                  "is a directory, not a YAML file"),
                 (["ui", "--port", str(port)], f"--port {port} on 127.0.0.1 is not available")]
        for argv, fragment in cases:
            assert main(argv) == 2, argv
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and fragment in lines[0], lines
