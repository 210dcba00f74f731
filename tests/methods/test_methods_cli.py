"""Every method of `piflow.methods.METHODS` through the CLI and the one run skeleton: `piflow distill
method=NAME -c CONFIG` on ring8 (exact teacher) and on digits (the bundled DiT teacher), then `piflow sample` and
`piflow evaluate` of the result; a config change is refused; a SIGKILLed run resumes to the uninterrupted result."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from piflow.cli import main
from piflow.config import parse_overrides
from piflow.methods import METHODS

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_RING8 = {"dataset": "ring8", "teacher": "exact",
              "student": {"hidden_size": 32, "num_layers": 2, "num_components": 4},
              "distill": {"batch_size": 32, "total_substeps": 16, "x0_bank_size": 64, "nfe": 2},
              "train": {"iters": 6, "warmup_iters": 2, "ema_start": 2, "checkpoint_every": 3, "progress": False},
              "eval": {"num_samples": 200, "teacher_steps": [2]}}


def _config_file(tmp_path, config: dict, method: str):
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(dict(config, method=method)))
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_distils_samples_and_evaluates_on_ring8(tmp_path, method, capsys):
    run = tmp_path / "run"
    assert main(["distill", "-c", str(_config_file(tmp_path, TINY_RING8, method)), "--run-dir", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == method and (run / "run.json").is_file() and (run / "student.safetensors").is_file()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    loop_iters = 6 * (5 if method == "dmd2" else 1)          # DMD2: train.iters counts generator updates
    assert [entry["iter"] for entry in log] == list(range(loop_iters))
    name = "gmflow" if method == "piid" else method
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"student {name} 2" in metrics["rows"] and np.isfinite(metrics["rows"][f"student {name} 2"]["sliced_w2"])

    out = tmp_path / "s.npy"
    assert main(["sample", "--run-dir", str(run), "--num-samples", "50", "--nfe", "1", "--output", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    assert main(["evaluate", "--run-dir", str(run), "eval.num_samples=100", "eval.student_nfe=[1]"]) == 0
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert f"student {name} 1 (elastic)" in rows

    # the same run directory with another method is a config change: refused, nothing touched
    other = "dmd2" if method != "dmd2" else "piid"
    before = (run / "student.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["distill", "-c", str(_config_file(tmp_path, TINY_RING8, method)), "--run-dir", str(run),
                 f"method={other}"]) == 2
    assert "method" in capsys.readouterr().err
    assert (run / "student.safetensors").read_bytes() == before


def test_method_settings_are_checked_before_the_run_directory_exists(tmp_path, capsys):
    for override, fragment in (("method=gan", "method must be one of"), ("dmd2.sigma_min=2", "dmd2 settings"),
                               ("meanflow.init=noise", "meanflow settings"), ("meanflow.ratio_r_not_t=3", "meanflow"),
                               ("dmd2.fake_updates_per_generator_update=0", "dmd2 settings")):
        method = override.split(".")[0].split("=")[0]
        args = ["distill", "--run-dir", str(tmp_path / "r"), "dataset=ring8", override]
        if method in ("dmd2", "meanflow"):
            args.append(f"method={method}")
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0]
        assert not (tmp_path / "r").exists()
    capsys.readouterr()
    assert main(["distill", "--run-dir", str(tmp_path / "r"), "dataset=ring8", "method=meanflow",
                 "meanflow.init=teacher"]) == 2                     # the exact teacher has no network to copy
    assert "meanflow.init=teacher" in capsys.readouterr().err and not (tmp_path / "r").exists()


TINY_DIGITS = ["dataset=digits", "train.iters=2", "train.warmup_iters=1", "train.ema_start=1", "train.progress=false",
               "train.checkpoint_every=0", "distill.batch_size=4", "distill.total_substeps=16", "distill.nfe=2",
               "distill.x0_bank_size=32", "eval.num_samples=60", "eval.teacher_steps=[2]"]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_distils_samples_and_evaluates_on_digits(tmp_path, method, digits_teacher, feature_nets,
                                                             capsys):
    run = tmp_path / "run"
    config = tmp_path / "digits.yaml"                  # the settings as a config file, the teacher as an override
    config.write_text(yaml.safe_dump(dict(parse_overrides(TINY_DIGITS), method=method)))
    assert main(["distill", "-c", str(config), "--run-dir", str(run), f"teacher={digits_teacher}"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == method
    assert (run / "samples.png").is_file() and (run / "student.safetensors").is_file()
    out = tmp_path / "s.npy"
    assert main(["sample", "--run-dir", str(run), "--num-samples", "12", "--label", "3", "--output", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (12, 1, 8, 8) and np.isfinite(samples).all()
    for name in ("feature_net", "feature_net_b"):          # the evaluation's classifiers, trained once per module
        shutil.copytree(feature_nets / name, run / name)
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run), "eval.num_samples=60"]) == 0
    assert "evaluating: 3/3 (100%)" in capsys.readouterr().err         # progress: teacher 2, 32 steps, the student
    name = "gmflow" if method == "piid" else method
    assert f"student {name} 2" in json.loads((run / "metrics.json").read_text())["rows"]


@pytest.fixture(scope="module")
def feature_nets(tmp_path_factory, digits_teacher):
    """A folder with the two digits feature classifiers `piflow evaluate` caches in a run directory."""
    from piflow.recipes import image_benchmark, images

    folder = tmp_path_factory.mktemp("features")
    _, config = images.load_teacher(str(digits_teacher))
    train_x, train_y = images.load_dataset(config, "train").tensors()
    test_x, test_y = images.load_dataset(config, "test").tensors()
    image_benchmark.feature_classifiers_for(folder, train_x, train_y, test_x, test_y, 10, epochs=3)
    return folder


@pytest.fixture(scope="module")
def digits_teacher():
    from pathlib import Path

    import piflow

    return Path(piflow.__file__).parent / "assets" / "teachers" / "digits_dit"


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["ring8", "digits"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_resumes_after_sigkill_to_the_uninterrupted_result(tmp_path, method, dataset, digits_teacher):
    """SIGKILL while the second checkpoint is being written, run the same command again: the student, the
    training log and the metrics equal an uninterrupted run's."""
    from reliability.conftest import TINY_2D, run_cli
    from reliability.test_faults import assert_same_run

    tiny = TINY_2D if dataset == "ring8" else [*TINY_DIGITS, f"teacher={digits_teacher}", "train.iters=6",
                                               "train.checkpoint_every=2"]
    args = [*tiny, f"method={method}", "distill.x0_bank_size=64"]
    clean = tmp_path / "clean"
    assert run_cli("distill", "--run-dir", str(clean), *args).returncode == 0
    run = tmp_path / "run"
    killed = run_cli("distill", "--run-dir", str(run), *args,
                     kill_at="write-before-rename:checkpoint.safetensors:2")
    assert killed.returncode == -9
    resumed = run_cli("distill", "--run-dir", str(run), *args)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, clean)


def test_a_run_saved_before_methods_existed_resumes_as_pi_id(tmp_path, capsys):
    """config.yaml without the method keys (as written before piflow.methods): the same command finds no config
    change (the run was π-ID and never read the new keys); another method is still a change."""
    run = tmp_path / "run"
    config = _config_file(tmp_path, TINY_RING8, "piid")
    assert main(["distill", "-c", str(config), "--run-dir", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("method", "dmd2", "meanflow"):
        del saved[key]
    del saved["distill"]["x0_bank_size"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert main(["distill", "-c", str(config), "--run-dir", str(run)]) == 0
    assert main(["distill", "-c", str(config), "--run-dir", str(run), "method=meanflow"]) == 2
    assert "method: 'piid' -> 'meanflow'" in capsys.readouterr().err


def test_the_readme_methods_table_names_every_method_and_its_settings():
    """The README's methods table is written from `METHODS`: one row per method, naming its settings fields."""
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line for line in section.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(METHODS)
    for name, cls in METHODS.items():
        if cls.settings_class is not None:
            assert f"`{cls.section}:`" in rows[name]
            for field in dataclasses.fields(cls.settings_class):
                assert f"`{field.name}`" in rows[name], (name, field.name)
