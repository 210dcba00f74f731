"""Teachers trained as diffusion models (``objective.prediction_type``: epsilon / v_prediction / sample) through the
2-D and image recipes: trained, distilled by π-ID into students that convert the network's outputs, sampled from
the CLI; methods that need a velocity network refuse them in one line; older teacher runs still resume."""
import pytest
import torch

from piflow.cli import main
from piflow.config import OBJECTIVE_DEFAULTS, load_config
from piflow.diffusion import DiffusionTeacher
from piflow.recipes import toy2d
from piflow.train.run_dir import config_differences
from tiny_runs import TINY_DIT_RUN

pytestmark = pytest.mark.usefixtures("single_thread")

QUICK_2D = ["train.progress=false", "eval.num_samples=200", "eval.teacher_steps=[1,2]"]


@pytest.fixture(scope="module")
def eps_teacher_2d(tmp_path_factory):
    run = tmp_path_factory.mktemp("eps_teacher")
    assert main(["train-teacher", "--run-dir", str(run), "dataset=moons", "train.iters=30", "model.hidden_size=32",
                 "model.num_layers=2", "objective.prediction_type=epsilon", *QUICK_2D]) == 0
    return run


def test_2d_diffusion_teacher_distils_and_samples(tmp_path, eps_teacher_2d):
    teacher, model = toy2d.load_teacher(str(eps_teacher_2d), "moons")
    assert isinstance(teacher, DiffusionTeacher) and teacher.prediction_type == "epsilon" and teacher.model is model
    run = tmp_path / "student"
    assert main(["distill", "--run-dir", str(run), "dataset=moons", f"teacher={eps_teacher_2d}", "train.iters=10",
                 "student.num_components=4", "distill.batch_size=32", *QUICK_2D]) == 0
    sampler, _ = toy2d.load_student(run)
    assert sampler.student.diffusion is not None and sampler.student.diffusion.prediction_type == "epsilon"
    assert isinstance(sampler.teacher, DiffusionTeacher)
    samples = sampler.sample(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    assert samples.shape == (64, 2) and torch.isfinite(samples).all()
    assert main(["sample", "--run-dir", str(run), "--nfe", "2", "--num-samples", "20"]) == 0


@pytest.mark.parametrize("args, message", [
    (["method=dmd2"], "method=dmd2 starts from a copy of the teacher's network as a velocity network"),
    (["method=meanflow", "meanflow.init=teacher"], "meanflow.init=teacher starts from a copy"),
])
def test_2d_methods_that_need_a_velocity_network_refuse_diffusion_teachers(tmp_path, eps_teacher_2d, capsys, args,
                                                                          message):
    run = tmp_path / "student"
    assert main(["distill", "--run-dir", str(run), "dataset=moons", f"teacher={eps_teacher_2d}", "train.iters=2",
                 *args, *QUICK_2D]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "prediction_type 'epsilon'" in err[0]
    assert not (run / "config.yaml").exists()


def test_2d_meanflow_auto_starts_from_scratch_for_diffusion_teachers(eps_teacher_2d):
    from piflow.methods import make_method

    config = load_config(toy2d.DISTILL_DEFAULTS, None, ["dataset=moons", f"teacher={eps_teacher_2d}",
                                                          "method=meanflow", "student.hidden_size=32",
                                                          "student.num_layers=2"])
    setup = toy2d.distill_setup(config)
    assert setup.teacher_conversion is not None
    student = make_method(setup).student()
    teacher_weight = setup.teacher_model.proj_out.weight
    weights = [p for p in student.parameters() if p.shape == teacher_weight.shape]
    assert weights and all(not torch.equal(p, teacher_weight) for p in weights)


def test_image_diffusion_teacher_distils_and_samples(tmp_path):
    pytest.importorskip("sklearn")
    from piflow.recipes import images

    teacher_run, run = tmp_path / "teacher", tmp_path / "student"
    assert main(["train-teacher", "--run-dir", str(teacher_run), "dataset=digits", "train.iters=10",
                 "flow_matching.batch_size=16", "objective.prediction_type=v_prediction",
                 "objective.beta_schedule=scaled_linear", "objective.beta_start=0.00085", "objective.beta_end=0.012",
                 "eval.data_check_samples=16", *TINY_DIT_RUN]) == 0
    model, config = images.load_teacher(str(teacher_run))
    conversion = images.teacher_conversion(config)
    assert conversion.prediction_type == "v_prediction" and conversion.schedule.sigma_max < 0.94
    assert main(["distill", "--run-dir", str(run), "dataset=digits", f"teacher={teacher_run}", "train.iters=2",
                 "distill.batch_size=4", "distill.total_substeps=16", "distill.data_free=true", "distill.nfe=2",
                 "student.num_components=2", "guidance.scale=2.0", "train.progress=false",
                 "train.checkpoint_every=0"]) == 0
    sampler, _ = images.load_student(run)
    assert sampler.student.diffusion.prediction_type == "v_prediction"
    x = sampler.sample(torch.randn(3, 1, 8, 8), cond=torch.tensor([0, 1, 2]))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_teacher_runs_from_before_objectives_resume_as_flow_matching():
    """A teacher run's config.yaml written before the ``objective`` section existed was a flow-matching run: it
    compares equal to the same config with the default (flow) objective, and unequal to a diffusion one."""
    saved = load_config(toy2d.TEACHER_DEFAULTS, None, ["dataset=moons"])
    del saved["objective"]
    assert config_differences(saved, load_config(toy2d.TEACHER_DEFAULTS, None, ["dataset=moons"])) == {}
    changed = config_differences(saved, load_config(toy2d.TEACHER_DEFAULTS, None, ["dataset=moons",
                                                                                   "objective.prediction_type=epsilon"]))
    assert changed == {"objective.prediction_type": ("flow", "epsilon")}
    assert OBJECTIVE_DEFAULTS["prediction_type"] == "flow"


def test_bad_objective_is_a_one_line_error(tmp_path, capsys):
    assert main(["train-teacher", "--run-dir", str(tmp_path / "t"), "dataset=moons", "train.iters=2",
                 "objective.prediction_type=eps", *QUICK_2D]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective.prediction_type must be one of" in err[0]
    assert not (tmp_path / "t" / "config.yaml").exists()
