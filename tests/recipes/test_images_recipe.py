"""Image recipe end to end on scikit-learn digits with a tiny DiT: teacher → GM / DX / data-free students."""
import json

import pytest
import torch

pytest.importorskip("sklearn")

from piflow.cli import main  # noqa: E402
from piflow.recipes import images  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.progress=false",
        "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--run-dir", str(run), "dataset=digits", "train.iters=20",
                 "flow_matching.batch_size=32", *TINY]) == 0
    return run


def test_teacher_run_writes_model_and_samples(teacher_run):
    assert (teacher_run / "teacher" / "model.safetensors").is_file()
    assert (teacher_run / "samples.png").is_file() and (teacher_run / "loss.png").is_file()
    model, config = images.load_teacher(str(teacher_run))
    assert config["dataset"] == "digits" and model.config.num_classes == 10


@pytest.mark.parametrize("extra", [
    ["student.policy=gmflow", "student.num_components=4"],
    ["student.policy=dx", "student.num_nodes=4", "distill.window_substeps=3"],
    ["distill.data_free=true", "distill.nfe=2", "guidance.scale=2.0", "guidance.interval=[0.0,0.6]"],
])
def test_distill_variants(tmp_path, teacher_run, extra):
    run = tmp_path / "student"
    args = ["distill", "--run-dir", str(run), "dataset=digits", f"teacher={teacher_run}", "train.iters=2",
            "distill.batch_size=4", "distill.total_substeps=16", "train.progress=false", "train.checkpoint_every=0",
            *extra]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    pf, _ = images.load_student_pipeline(run)
    x = pf.sample(torch.randn(3, 1, 8, 8), nfe=3, cond=torch.tensor([0, 1, 2]))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_image_config_errors(tmp_path, teacher_run, capsys):
    assert main(["distill", "--run-dir", str(tmp_path / "a"), "dataset=digits", "teacher=/nowhere"]) == 2
    assert "teacher" in capsys.readouterr().err
    assert main(["train-teacher", "--run-dir", str(tmp_path / "b"), "dataset=digits",
                 "flow_matching.class_dropout=1.5"]) == 2
    assert "class_dropout" in capsys.readouterr().err
