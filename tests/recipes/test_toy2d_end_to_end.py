"""2-D end to end: a short π-ID run beats the teacher's 1-step Euler sampler; the CLI works on a learned teacher."""
import json

import pytest
import torch

import piflow
from piflow.cli import main
from piflow.data import make_toy_dataset
from piflow.eval import sliced_wasserstein2
from piflow.models import MLPVelocityModel2D
from piflow.models.students import PolicyStudent

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.slow                 # 15–20 s each: 150 training iterations
@pytest.mark.parametrize("nfe, data_free", [(1, False), (2, True)])
def test_short_distillation_beats_one_step_euler(nfe, data_free):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    mixture = make_toy_dataset("ring8").mixture
    teacher = piflow.GaussianMixtureTeacher(mixture.means, mixture.std, mixture.weights)
    student = PolicyStudent(MLPVelocityModel2D(hidden_size=128, num_layers=3), "gmflow", num_components=8,
                            init_from_teacher=False, logstd_hidden=64, generator=gen)
    pf = piflow.PiFlow(student, teacher, nfe=nfe)
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    for _ in range(150):
        optimizer.zero_grad()
        if data_free:
            pf.data_free_loss(torch.randn(128, 2, generator=gen), generator=gen)
        else:
            pf(teacher.sample(256, gen), generator=gen).backward()
        optimizer.step()
    noise = torch.randn(3000, 2, generator=gen)
    reference = teacher.sample(3000, gen)
    student_sw2 = sliced_wasserstein2(pf.sample(noise, nfe=nfe), reference, generator=gen)
    euler_sw2 = sliced_wasserstein2(piflow.euler_sample(teacher, noise, 1), reference, generator=gen)
    floor_sw2 = sliced_wasserstein2(teacher.sample(3000, gen), reference, generator=gen)
    assert euler_sw2 > 2.0                      # one Euler step collapses the ring onto its mean
    assert student_sw2 < 0.25 * euler_sw2, (student_sw2, euler_sw2, floor_sw2)


def test_cli_train_teacher_distill_sample_evaluate(tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    quick = ["train.progress=false", "eval.num_samples=300", "eval.teacher_steps=[1,2]"]
    assert main(["train-teacher", "--run-dir", str(teacher_dir), "dataset=moons", "train.iters=30",
                 "model.hidden_size=32", "model.num_layers=2", *quick]) == 0
    assert (teacher_dir / "teacher.safetensors").is_file() and (teacher_dir / "loss.png").is_file()
    assert main(["distill", "--run-dir", str(student_dir), "dataset=moons", f"teacher={teacher_dir}",
                 "train.iters=10", "student.num_components=4", "distill.batch_size=32", *quick]) == 0
    for name in ("config.yaml", "metrics.json", "student.safetensors", "samples.png", "trajectories.png", "loss.png"):
        assert (student_dir / name).is_file(), name
    metrics = json.loads((student_dir / "metrics.json").read_text())
    assert "student gmflow 2" in metrics["rows"] and "teacher Euler 1" in metrics["rows"]
    assert main(["sample", "--run-dir", str(student_dir), "--nfe", "3", "--num-samples", "50"]) == 0
    assert (student_dir / "samples_nfe3.npy").is_file()
    assert main(["evaluate", "--run-dir", str(student_dir), "eval.student_nfe=[1]"]) == 0
    out = capsys.readouterr().out
    assert "student gmflow 1 (elastic)" in out


@pytest.mark.parametrize("args, message", [
    (["distill", "distill.nfee=3"], "distill.nfee"),
    (["distill", "dataset=checkerboard", "teacher=exact"], "Gaussian-mixture"),
    (["distill", "teacher=/nonexistent/run"], "teacher run directory"),
    (["train-teacher", "flow_matching.time_sampling=beta"], "time_sampling"),
])
def test_cli_bad_config_gives_clear_error(tmp_path, capsys, args, message):
    assert main([args[0], "--run-dir", str(tmp_path / "run"), *args[1:]]) == 2
    assert message in capsys.readouterr().err


def test_bad_values_are_rejected_with_exit_code_2(tmp_path, capsys):
    assert main(["train-teacher", "--run-dir", str(tmp_path / "a"), "dataset=mnist3d"]) == 2
    assert "ring8" in capsys.readouterr().err          # lists the valid dataset names
    assert main(["distill", "--run-dir", str(tmp_path / "b"), "distill.nfe=0"]) == 2
    assert "nfe must be an integer >= 1" in capsys.readouterr().err
    assert main(["distill", "--run-dir", str(tmp_path / "c"), "student.policy=flowmap"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_students_built_from_scratch_are_reproducible():
    """Runs are reproducible: the recipe seeds weight initialisation with train.seed (an exact teacher gives the
    student no weights to copy, so every weight comes from the initialiser)."""
    from piflow.config import load_config
    from piflow.recipes import toy2d

    config = load_config(toy2d.DISTILL_DEFAULTS, None, ["dataset=ring8", "teacher=exact"])
    first, second = toy2d.build_student(config, None), toy2d.build_student(config, None)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = toy2d.build_student(load_config(toy2d.DISTILL_DEFAULTS, None,
                                            ["dataset=ring8", "teacher=exact", "train.seed=1"]), None)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
