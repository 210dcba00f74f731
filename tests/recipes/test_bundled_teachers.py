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
