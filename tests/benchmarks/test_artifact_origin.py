"""benchmarks/artifact_origin.py's teacher ODE against exact truths: the solution of a teacher with a known
flow, and the library's own Euler sampler on the same grid."""
import pytest
import torch

import piflow
from artifact_origin import teacher_ode
from piflow.sampling import euler_sample

pytestmark = pytest.mark.usefixtures("single_thread")


def test_teacher_ode_from_noise_is_the_libraries_euler_sampler():
    teacher = piflow.GaussianMixtureTeacher(torch.tensor([[2.0, 0.0], [-1.0, 1.5]]), 0.3)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(teacher_ode(teacher, noise, 1.0, None, 16), euler_sample(teacher, noise, 16), atol=1e-5)


def test_teacher_ode_from_a_mid_state_lands_on_the_exact_point_mass():
    """A one-point teacher (std → 0) has the straight flow x_σ = (1 − σ)·μ + σ·ε; Euler is exact on it, from any
    state on the way."""
    mu = torch.tensor([[1.5, -0.5]])
    teacher = piflow.GaussianMixtureTeacher(mu, 1e-4)
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    sigma = 0.6
    x = (1 - sigma) * mu + sigma * eps
    assert torch.allclose(teacher_ode(teacher, x, sigma, None, 4), mu.expand(8, 2), atol=1e-3)
