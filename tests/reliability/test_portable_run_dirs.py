"""Run directories survive a change of directory (issue 25, item 2): paths given relative (``teacher=``,
``data.root=``, …) are saved absolute, so ``sample`` / ``evaluate`` / a resume work from anywhere; a resume with the
same relative path from the same directory, or of an older run saved with relative paths, is no config change; a
moved teacher run is a one-line error naming where it was expected and ``teacher=NEW_PATH``."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from piflow.train.run_dir import config_differences
from tiny_runs import TINY_DIT_RUN

from .conftest import TINY_2D, assert_one_line_error

TEACHER_2D = ["dataset=checkerboard", "model.hidden_size=16", "model.num_layers=2", "flow_matching.batch_size=64",
              "train.iters=6", "train.warmup_iters=1", "train.ema_start=1", "train.checkpoint_every=3",
              "eval.num_samples=50", "eval.teacher_steps=[1]", "train.progress=false"]
# the TINY_2D student on the checkerboard teacher run (whose MLP it copies)
STUDENT_2D = ["dataset=checkerboard", *[a for a in TINY_2D if a.split("=")[0] not in
                                        ("dataset", "teacher", "student.hidden_size", "student.num_layers")]]


def saved(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_a_2d_run_with_a_relative_teacher_works_from_anywhere(tmp_path, monkeypatch, cli):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert cli("train-teacher", "--run-dir", "runs/teacher", *TEACHER_2D).returncode == 0
    distill = ["distill", "--run-dir", "runs/student", "teacher=runs/teacher", *STUDENT_2D]
    assert cli(*distill).returncode == 0
    teacher, student = work / "runs" / "teacher", work / "runs" / "student"
    assert saved(student)["teacher"] == str(teacher)                 # stored absolute
    assert cli(*distill).returncode == 0                             # same relative path, same directory: no change

    monkeypatch.chdir(elsewhere)
    result = cli("sample", "--run-dir", str(student), "--num-samples", "20")
    assert result.returncode == 0, result.stderr
    assert (student / "samples_nfe2.npy").is_file()
    result = cli("evaluate", "--run-dir", str(student), "eval.num_samples=50")
    assert result.returncode == 0, result.stderr
    resume = ["distill", "--run-dir", str(student), f"teacher={teacher}", *STUDENT_2D]
    assert cli(*resume).returncode == 0                              # resumed from elsewhere, absolute teacher
    result = cli("distill", "--run-dir", str(student), "teacher=runs/teacher", *STUDENT_2D)
    assert_one_line_error(result, "distill", f"teacher run directory {elsewhere / 'runs' / 'teacher'} does not exist")

    # an older run directory saved with the relative path keeps working from its original directory
    old = saved(student)
    old["teacher"] = "runs/teacher"
    (student / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    monkeypatch.chdir(work)
    assert cli(*distill).returncode == 0
    assert saved(student)["teacher"] == str(teacher)
    assert cli("sample", "--run-dir", "runs/student", "--num-samples", "20").returncode == 0

    # the teacher run moves: one line names where it was expected and how to point to its new place
    moved = work / "moved_teacher"
    shutil.move(str(teacher), str(moved))
    monkeypatch.chdir(elsewhere)
    for command in ("sample", "evaluate"):
        result = cli(command, "--run-dir", str(student))
        assert_one_line_error(result, command, f"teacher run directory {teacher} does not exist", "teacher=NEW_PATH")
    assert cli("sample", "--run-dir", str(student), "--num-samples", "20", f"teacher={moved}").returncode == 0
    assert cli("evaluate", "--run-dir", str(student), "eval.num_samples=50",
               f"teacher={Path('..') / 'work' / 'moved_teacher'}").returncode == 0      # relative to here


def test_an_image_student_samples_from_anywhere_and_names_a_moved_teacher(tmp_path, monkeypatch, cli):
    pytest.importorskip("sklearn")
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert cli("train-teacher", "--run-dir", "teacher", "dataset=digits", "train.iters=2",
               "flow_matching.batch_size=8", "eval.data_check_samples=8", *TINY_DIT_RUN).returncode == 0
    assert cli("distill", "--run-dir", "student", "dataset=digits", "teacher=teacher", "train.iters=1",
               "distill.batch_size=2", "distill.total_substeps=8", "student.num_components=2",
               "train.progress=false", "train.checkpoint_every=0").returncode == 0
    monkeypatch.chdir(elsewhere)
    sample = ["sample", "--run-dir", str(work / "student"), "--nfe", "1", "--num-samples", "4"]
    assert cli(*sample).returncode == 0
    shutil.move(str(work / "teacher"), str(work / "teacher_moved"))
    assert_one_line_error(cli(*sample), "sample", f"teacher run directory {work / 'teacher'} does not exist",
                          "teacher=NEW_PATH")
    assert cli(*sample, f"teacher={work / 'teacher_moved'}").returncode == 0


def test_paths_resolve_against_the_current_directory_and_hub_ids_stay(tmp_path, monkeypatch):
    from piflow.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    config = {"teacher": "exact", "pipeline": "base", "prompts": "p.txt", "conditions": None,
              "prompt_cache": "./cache/../cache", "latents": str(tmp_path / "z.safetensors"),
              "data": {"root": "data", "image_size": 8}, "eval": {"prompts": ["a cat"]}}
    resolved = absolute_paths(config)
    assert resolved == dict(config, pipeline=str(tmp_path / "base"), prompts=str(tmp_path / "p.txt"),
                            prompt_cache=str(tmp_path / "cache"), data={"root": str(tmp_path / "data"),
                                                                      "image_size": 8})
    hub = {"pipeline": "black-forest-labs/FLUX.1-dev", "teacher": "runs/t"}
    assert absolute_paths(hub) == {"pipeline": "black-forest-labs/FLUX.1-dev", "teacher": str(tmp_path / "runs/t")}
    assert config_differences({"teacher": "runs/t", "pipeline": "base"},
                              {"teacher": str(tmp_path / "runs" / "t"), "pipeline": str(tmp_path / "base")}) == {}
    assert config_differences({"teacher": "runs/t"}, {"teacher": "runs/u"}) == {
        "teacher": (str(tmp_path / "runs/t"), str(tmp_path / "runs/u"))}


def test_a_text_to_image_run_with_a_relative_pipeline_and_prompts_works_from_anywhere(tmp_path, monkeypatch, cli):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from piflow.integrations.diffusers.tiny import tiny_pipeline

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny_pipeline("flux").save_pretrained(work / "base")
    (work / "prompts.txt").write_text("a red cat\na blue bird\n")
    monkeypatch.chdir(work)
    args = ["pipeline=base", "prompts=prompts.txt", "resolution=[32,32]", "max_sequence_length=32",
            "student.lora_rank=2", "student.logstd_hidden=8", "student.num_components=2", "distill.total_substeps=8",
            "distill.batch_size=1", "train.warmup_iters=0", "train.iters=1", "train.progress=false", "eval.nfe=[1]",
            "eval.prompts=[]"]
    assert cli("distill", "--run-dir", "run", *args).returncode == 0
    run = work / "run"
    assert (saved(run)["pipeline"], saved(run)["prompts"]) == (str(work / "base"), str(work / "prompts.txt"))
    assert cli("distill", "--run-dir", "run", *args).returncode == 0        # resumed here: no config change
    monkeypatch.chdir(elsewhere)
    sample = ["sample", "--run-dir", str(run), "--prompt", "a cat", "--nfe", "1", "--output", "images", "--overwrite"]
    assert cli(*sample).returncode == 0
    assert (elsewhere / "images" / "000_00.png").is_file()
    absolute = [a.replace("=base", f"={work / 'base'}").replace("=prompts.txt", f"={work / 'prompts.txt'}")
                for a in args]
    assert cli("distill", "--run-dir", str(run), *absolute).returncode == 0     # resumed from elsewhere
    shutil.move(str(work / "base"), str(work / "base_moved"))
    assert_one_line_error(cli(*sample), "sample", f"pipeline folder {work / 'base'} does not exist",
                          "pipeline=NEW_PATH", only_line=False)
    assert cli(*sample, f"pipeline={work / 'base_moved'}").returncode == 0
