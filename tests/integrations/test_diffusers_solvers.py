"""diffusers' flow-matching solvers driven by a piflow teacher converge to the exact teacher ODE."""
import pytest
import torch

pytest.importorskip("diffusers")

import piflow  # noqa: E402
from piflow.integrations.diffusers.solvers import diffusers_sample, make_flow_scheduler  # noqa: E402
from piflow.sampling import rk4_sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("solver, tol", [("flow-euler", 0.1), ("dpm-solver++", 0.01), ("unipc", 0.01)])
def test_solvers_converge_to_exact_ode(solver, tol):
    gen = torch.Generator().manual_seed(0)
    teacher = piflow.GaussianMixtureTeacher(torch.randn(4, 2, generator=gen) * 2, 0.3)
    noise = torch.randn(500, 2, generator=gen)
    reference = rk4_sample(teacher, noise.double(), 64).float()
    error_coarse = (diffusers_sample(teacher, noise, 4, solver=solver) - reference).norm(dim=1).mean()
    error_fine = (diffusers_sample(teacher, noise, 32, solver=solver) - reference).norm(dim=1).mean()
    assert error_fine < tol and error_fine < error_coarse


def test_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver"):
        make_flow_scheduler("heun3")
