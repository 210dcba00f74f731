"""The bundled demo teachers load through the ordinary run-directory code paths and are real teachers."""
import pytest
import torch

from piflow.data import checkerboard_white_mask
from piflow.recipes import toy2d
from piflow.recipes.demo import ASSETS
from piflow.sampling import euler_sample

pytestmark = pytest.mark.usefixtures("single_thread")


def test_checkerboard_teacher_puts_mass_on_white_squares():
    teacher, model = toy2d.load_teacher(str(ASSETS / "checkerboard_mlp"), "checkerboard")
    samples = euler_sample(teacher, torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)), 64)
    assert model is not None
    assert float(checkerboard_white_mask(samples).float().mean()) > 0.85     # data: 1.0, noise: ~0.4


def test_digits_teacher_loads_and_samples():
    pytest.importorskip("sklearn")
    from piflow.recipes import images

    model, config = images.load_teacher(str(ASSETS / "digits_dit"))
    assert config["dataset"] == "digits" and model.config.num_classes == 10
    teacher = images.make_teacher(model, 10)
    x = euler_sample(teacher, torch.randn(10, 1, 8, 8), 8, torch.arange(10))
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    assert float(x.std()) > 0.3          # not collapsed onto a constant image


def test_a_bundled_teacher_is_selected_by_name(tmp_path):
    """``teacher=digits-bundled`` reads the bundled folder from any directory and is stored as the name."""
    pytest.importorskip("sklearn")
    import yaml

    from piflow.cli import main
    from piflow.recipes import images

    run = tmp_path / "student"
    assert main(["distill", "--run-dir", str(run), "dataset=digits", "teacher=digits-bundled", "train.iters=1",
                 "distill.batch_size=2", "distill.total_substeps=8", "train.progress=false",
                 "train.checkpoint_every=0"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"] == "digits-bundled"
    assert images.teacher_identity("digits-bundled") == images.teacher_identity(str(ASSETS / "digits_dit"))
    sampler, _ = images.load_student(run)
    assert sampler.sample(torch.randn(2, 1, 8, 8), cond=torch.tensor([0, 1])).shape == (2, 1, 8, 8)
