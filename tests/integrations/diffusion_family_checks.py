"""The checks every diffusion family's tests share: Euler in x_σ on DDIM's σ grid (which equals the stock DDIM
pipeline exactly, docs/algorithm.md §15), and a fresh student that starts at its teacher."""
import torch

from piflow.integrations.diffusers.students import DiffusersPolicyStudent, DiffusersTeacher
from piflow.policies import GMFlowPolicy

NUM_COMPONENTS, NUM_NODES = 3, 4


def euler_on_ddim_grid(teacher, schedule, scheduler, noise, cond, steps):
    """Euler in x_σ on the σ grid of DDIM's timesteps (then σ = 0), from the stock start x_t0 = noise."""
    scheduler.set_timesteps(steps)
    grid = [*schedule.sigma_of(scheduler.timesteps.double()), torch.tensor(0.0, dtype=torch.float64)]
    alpha, s = schedule.alpha_s(scheduler.timesteps[0].double())
    x = (noise.double() / (alpha + s)).float()          # the stock start x_t0 = ε as a flow state
    for i in range(steps):
        x = x + float(grid[i + 1] - grid[i]) * teacher(x, grid[i].expand(noise.shape[0]), cond)
    return x


def assert_matches_stock(x, expected, rel: float = 2e-6) -> None:
    scale = expected.abs().max()
    assert (x - expected).abs().max() < rel * scale, float((x - expected).abs().max() / scale)


def fresh_student(network, family: str, policy: str) -> DiffusersPolicyStudent:
    """A student without head noise (K = 3 components or N = 4 nodes) on `network`."""
    return DiffusersPolicyStudent(network, policy, num_components=NUM_COMPONENTS, num_nodes=NUM_NODES,
                                  latent_channels=4, head_noise_std=0.0, logstd_hidden=16,
                                  architecture=family).eval()


def assert_student_starts_at_teacher(network, family: str, policy: str, cond, side: int) -> dict:
    """Every GM component mean (and the policy's velocity) or every DX node equals the teacher's u at init, at two
    noise levels; returns the student's output."""
    teacher = DiffusersTeacher(network, family)
    student = fresh_student(network, family, policy)
    x, sigma = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.3])
    u = teacher(x, sigma, cond)
    with torch.no_grad():
        out = student(x, sigma, cond)
    if policy == "dx":
        for k in range(NUM_NODES):
            torch.testing.assert_close(out["u_grid"][:, k], u, atol=1e-5, rtol=1e-5)
        return out
    for k in range(NUM_COMPONENTS):          # every component mean, in velocity space, is the teacher's u
        torch.testing.assert_close(out["means"][:, k], u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GMFlowPolicy(**out, x_src=x, sigma_src=sigma).velocity(x, sigma), u, atol=1e-4,
                               rtol=1e-5)
    return out
