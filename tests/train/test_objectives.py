"""Teacher objectives (`piflow.train.flow_matching`): the denoising objective of diffusion-trained teachers against
independent truths — the pair's own flow velocity and the closed-form optimum for Gaussian data."""
import math

import pytest
import torch

from piflow.config import OBJECTIVE_DEFAULTS, ConfigError
from piflow.diffusion import DiffusionTeacher, DiscreteVPSchedule
from piflow.teachers import NetworkTeacher
from piflow.train.flow_matching import denoising_loss, diffusion_conversion, network_teacher, teacher_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def _conversion(kind, **schedule):
    return diffusion_conversion(dict(OBJECTIVE_DEFAULTS, prediction_type=kind, **schedule))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_training_targets_are_the_pairs_velocity(kind, beta_schedule):
    """x_t = α·x0 + s·ε with α² the cumulative product of (1 − β) at integer t, and the target, read back through
    the teacher's conversion at that input, is the flow velocity ε − x0 of the very pair it was made from."""
    conversion = _conversion(kind, beta_schedule=beta_schedule)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 3, 4, 4, generator=gen)
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    if kind == "epsilon":
        t[-1] = 990.0                            # x0 from ε is ill-conditioned at the very last cosine level
    x_t, t_in, target = conversion.training_example(x0, noise, t)
    alphas_cumprod = torch.cumprod(1 - conversion.schedule.betas, 0).float()
    alpha = alphas_cumprod[t.long()].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - alphas_cumprod[t.long()]).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, alpha * x0 + s * noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_in, t.float())
    u = conversion.velocity_from_output(target, x_t, t_in)
    torch.testing.assert_close(u, noise - x0, atol=2e-4, rtol=2e-4)


def test_denoising_loss_of_the_optimal_predictor_for_gaussian_data():
    """Data x0 ~ N(0, c²): the optimal ε-predictor is E[ε | x_t] = s/(α²c² + s²)·x_t with residual variance
    α²c²/(α²c² + s²) per dimension, so its loss is that averaged over uniform timesteps (quadrature over the β
    table); the optimal x0-predictor's is c²s²/(α²c² + s²). A predictor off by 10 % has a larger loss."""
    c = 0.7
    gen = torch.Generator().manual_seed(1)
    x0 = c * torch.randn(200_000, 1, generator=gen)
    for kind, optimal, residual in [
            ("epsilon", lambda x, a, s: s / (a * a * c * c + s * s) * x, lambda a, s: a * a * c * c / (a * a * c * c + s * s)),
            ("sample", lambda x, a, s: a * c * c / (a * a * c * c + s * s) * x, lambda a, s: c * c * s * s / (a * a * c * c + s * s))]:
        conversion = _conversion(kind)
        schedule = conversion.schedule

        def predictor(scale):
            def model(x_t, t_in, cond):
                alpha, s = schedule.alpha_s(t_in.double())
                return scale * optimal(x_t, alpha.float().reshape(-1, 1), s.float().reshape(-1, 1))
            return model

        # E over t uniform on [0, T−1]: trapezoid quadrature of the closed-form residual on a fine grid
        grid = torch.linspace(0, schedule.t_max, 20001, dtype=torch.float64)
        alpha, s = schedule.alpha_s(grid)
        expected = float(torch.trapezoid(residual(alpha, s), grid) / schedule.t_max)
        loss = float(denoising_loss(predictor(1.0), x0, None, conversion, "uniform", torch.Generator().manual_seed(2)))
        assert loss == pytest.approx(expected, rel=0.01), kind
        worse = float(denoising_loss(predictor(1.1), x0, None, conversion, "uniform", torch.Generator().manual_seed(2)))
        assert worse > loss * 1.005, kind


def test_objective_selection_and_one_line_errors():
    assert diffusion_conversion(OBJECTIVE_DEFAULTS) is None                 # the default: flow matching
    model = lambda x, t, cond=None: -x                                      # noqa: E731
    assert isinstance(network_teacher(model, None), NetworkTeacher)
    conversion = _conversion("v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert conversion.model is None and conversion.prediction_type == "v_prediction"
    teacher = network_teacher(model, conversion)
    assert isinstance(teacher, DiffusionTeacher) and teacher.model is model
    assert isinstance(teacher.schedule, DiscreteVPSchedule) and teacher.schedule.sigma_max < 0.94
    with pytest.raises(ConfigError, match=r"^objective.prediction_type must be one of .*got 'eps'$"):
        diffusion_conversion(dict(OBJECTIVE_DEFAULTS, prediction_type="eps"))
    with pytest.raises(ConfigError, match=r"^objective: .*beta_schedule"):
        _conversion("epsilon", beta_schedule="cosine")
    with pytest.raises(ConfigError, match=r"^objective: .*beta"):
        _conversion("epsilon", beta_schedule="linear", beta_start=0.5, beta_end=1.5)
    with pytest.raises(ValueError, match=r"^noise must have the shape of x0 \(1, 1\), got \(2, 1\)$"):
        conversion.training_example(torch.zeros(1, 1), torch.zeros(2, 1), torch.zeros(1))
    from piflow.diffusion import EDMSchedule

    with pytest.raises(ValueError, match="prediction_type 'edm' is not a training target"):
        DiffusionTeacher(None, EDMSchedule(), "edm").training_example(torch.zeros(1, 1), torch.zeros(1, 1),
                                                                      torch.ones(1))


def test_flow_objective_is_flow_matching():
    """teacher_loss without a conversion is rectified-flow matching (same draws, same value)."""
    from piflow.train.flow_matching import flow_matching_loss

    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    model = lambda x, t, cond: x * 0.3 + t[:, None] / 1000                   # noqa: E731
    a = teacher_loss(model, x0, None, "logit_normal", torch.Generator().manual_seed(4))
    b = flow_matching_loss(model, x0, None, "logit_normal", torch.Generator().manual_seed(4))
    assert float(a) == float(b) and math.isfinite(float(a))
