"""Tests for piflow.teachers: the exact Gaussian-mixture teacher, its exact GMFlow policy, CFG, NetworkTeacher."""
import math

import pytest
import torch

from piflow.rollout import rollout
from piflow.sampling import rk4_sample
from piflow.teachers import ClassifierFreeGuidance, GaussianMixtureTeacher, NetworkTeacher

pytestmark = pytest.mark.usefixtures("single_thread")

MEANS_2D = torch.tensor([[-1.5, 0.5], [1.0, 1.2], [0.3, -1.4]], dtype=torch.float64)
WEIGHTS_2D = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
STD = 0.4


def teacher_2d():
    return GaussianMixtureTeacher(MEANS_2D, STD, WEIGHTS_2D)


def _grid(lim=7.0, n=561):
    axis = torch.linspace(-lim, lim, n, dtype=torch.float64)
    g1, g2 = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([g1.reshape(-1), g2.reshape(-1)], 1)


GRID = _grid()


def brute_velocity(x, sigma):
    """u = (x − E[x0|x])/σ with E[x0|x] = ∫ x0 p(x0) N(x; α x0, σ²I) dx0 / ∫ p(x0) N(x; α x0, σ²I) dx0 (grid)."""
    alpha = 1 - sigma
    log_prior = torch.logsumexp(torch.log(WEIGHTS_2D)[None]
                                - 0.5 * ((GRID[:, None] - MEANS_2D[None]) ** 2).sum(-1) / STD ** 2, dim=1)
    log_lik = -0.5 * ((x[None] - alpha * GRID) ** 2).sum(-1) / sigma ** 2
    log_int = log_prior + log_lik
    border = (GRID.abs() >= 7.0 - 1e-9).any(1)
    assert float(log_int[border].max() - log_int.max()) < -40
    w = torch.exp(log_int - log_int.max())
    x0 = (w[:, None] * GRID).sum(0) / w.sum()
    return (x - x0) / sigma


def test_velocity_matches_grid_integration():
    teacher = teacher_2d()
    g = torch.Generator().manual_seed(0)
    # σ values exact in float32 (the teacher takes σ through a float32 tensor, see as_batch_sigma)
    for sigma in (0.96875, 0.6875, 0.375, 0.15625):
        x0 = teacher.sample(4, generator=g).double()
        x = (1 - sigma) * x0 + sigma * torch.randn(4, 2, generator=g, dtype=torch.float64)
        u = teacher.velocity(x, sigma)
        assert u.dtype == torch.float64
        for b in range(4):
            torch.testing.assert_close(u[b], brute_velocity(x[b], sigma), rtol=0, atol=1e-8)


def _log_marginal(x, sigma, means, weights, std):
    """log p_σ(x) = log Σ_k w_k N(x; (1−σ)m_k, ((1−σ)²std² + σ²) I), x (B, *shape), float64."""
    alpha = 1 - sigma
    var = alpha ** 2 * std ** 2 + sigma ** 2
    d = math.prod(means.shape[1:])
    diff = (x[:, None] - alpha * means[None]).flatten(2)
    return torch.logsumexp(torch.log(weights)[None] - 0.5 * diff.square().sum(-1) / var, dim=1) \
        - 0.5 * d * math.log(2 * math.pi * var)


@pytest.mark.parametrize("sigma", [0.03125, 0.3125, 0.625, 0.9375])
def test_velocity_matches_finite_difference_score(sigma):
    # Tweedie: E[x0|x] = (x + σ²∇log p_σ(x))/(1−σ); u = (x − E[x0|x])/σ. ∇log p_σ by central differences.
    g = torch.Generator().manual_seed(1)
    shape = (3, 2)
    means = torch.randn(4, *shape, generator=g, dtype=torch.float64) * 1.5
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    std = 0.5
    teacher = GaussianMixtureTeacher(means, std, weights * 7)        # unnormalised weights are normalised
    x = (1 - sigma) * means[torch.tensor([0, 1, 2, 3, 1])] + sigma * torch.randn(5, *shape, generator=g,
                                                                                  dtype=torch.float64)
    h = 1e-5
    grad = torch.zeros_like(x)
    flat = grad.view(5, -1)
    for i in range(flat.shape[1]):
        e = torch.zeros(flat.shape[1], dtype=torch.float64)
        e[i] = h
        e = e.view(1, *shape)
        flat[:, i] = (_log_marginal(x + e, sigma, means, weights, std)
                      - _log_marginal(x - e, sigma, means, weights, std)) / (2 * h)
    x0_ref = (x + sigma ** 2 * grad) / (1 - sigma)
    u_ref = (x - x0_ref) / sigma
    torch.testing.assert_close(teacher.velocity(x, sigma), u_ref, rtol=0, atol=1e-6 / sigma)
    torch.testing.assert_close(teacher.x0(x, sigma), x0_ref, rtol=0, atol=1e-6)
    # float32 input: float32 output, same numbers
    u32 = teacher.velocity(x.float(), sigma)
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u_ref, rtol=1e-5, atol=1e-5 / sigma)


def test_single_gaussian_closed_form():
    # K = 1: x_σ ~ N(α m, s² I), E[x0|x] = m + α std²/s² (x − α m)
    m = torch.tensor([[0.7, -0.2, 1.1]], dtype=torch.float64)
    teacher = GaussianMixtureTeacher(m, 0.6)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.0625, 0.25, 0.5, 0.75, 0.875, 1.0], dtype=torch.float64)   # exact in float32
    alpha, var = 1 - sigma[:, None], (1 - sigma[:, None]) ** 2 * 0.36 + sigma[:, None] ** 2
    x0 = m + alpha * 0.36 / var * (x - alpha * m)
    torch.testing.assert_close(teacher.x0(x, sigma), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(teacher.velocity(x, sigma), (x - x0) / sigma[:, None], rtol=1e-12, atol=1e-12)


def test_exact_policy_velocity_equals_teacher():
    teacher = teacher_2d()
    g = torch.Generator().manual_seed(3)
    B = 64
    sigma_src = torch.rand(B, generator=g) * 0.8 + 0.2
    sigma_src[:8] = 1.0
    x_src = (1 - sigma_src[:, None]) * teacher.sample(B, generator=g) + sigma_src[:, None] * torch.randn(B, 2,
                                                                                                  generator=g)
    policy = teacher.policy(x_src, sigma_src)
    # at the source state
    torch.testing.assert_close(policy.velocity(x_src, sigma_src), teacher.velocity(x_src, sigma_src),
                               rtol=1e-4, atol=1e-4)
    for frac in (0.999, 0.8, 0.5, 0.2, 0.05):
        sigma_t = sigma_src * frac
        # arbitrary states (on and off the typical set)
        x_t = (1 - sigma_t[:, None]) * teacher.sample(B, generator=g) + sigma_t[:, None] * torch.randn(
            B, 2, generator=g)
        x_t[::3] += 0.3 * torch.randn(x_t[::3].shape, generator=g)
        ref = teacher.velocity(x_t.double(), sigma_t.double())
        got = policy.velocity(x_t, sigma_t).double()
        torch.testing.assert_close(got, ref, rtol=0, atol=3e-5 / float(sigma_t.min()))
        torch.testing.assert_close(policy.x0(x_t, sigma_t).double(), teacher.x0(x_t.double(), sigma_t.double()),
                                   rtol=0, atol=3e-5)


def test_exact_policy_needs_vector_data():
    teacher = GaussianMixtureTeacher(torch.zeros(2, 1, 2, 2), 0.5)
    with pytest.raises(ValueError):
        teacher.policy(torch.zeros(3, 1, 2, 2), 0.5)


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_exact_policy_rollout_converges_to_ode_solution(shift):
    teacher = teacher_2d()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(32, 2, generator=g, dtype=torch.float64)
    reference = rk4_sample(teacher, noise, 200, shift=shift)
    # the RK4 reference itself is converged (4th order: its own error is ~1/16 of this difference)
    torch.testing.assert_close(rk4_sample(teacher, noise, 100, shift=shift), reference, rtol=0, atol=2e-5)
    policy = teacher.policy(noise.float(), 1.0)
    errors = []
    for total in (32, 128, 512):
        x = rollout(policy, noise.float(), 1.0, 0.0, total_substeps=total, shift=shift)
        errors.append(float((x.double() - reference).abs().max()))
    # first-order convergence: error /4 per 4× substeps (allow 2.5×)
    assert errors[1] < errors[0] / 2.5 and errors[2] < errors[1] / 2.5, errors
    assert errors[2] < 1e-2, errors


def test_sample_moments():
    teacher = teacher_2d()
    n = 200_000
    x = teacher.sample(n, generator=torch.Generator().manual_seed(5)).double()
    assert x.shape == (n, 2)
    mean = (WEIGHTS_2D[:, None] * MEANS_2D).sum(0)
    centered = MEANS_2D - mean
    cov = STD ** 2 * torch.eye(2, dtype=torch.float64) + (WEIGHTS_2D[:, None, None]
                                                         * centered[:, :, None] * centered[:, None, :]).sum(0)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.02)
    # component frequencies: fraction of points nearest to each mean ≈ weights (components are well separated)
    nearest = ((x[:, None] - MEANS_2D[None]) ** 2).sum(-1).argmin(1)
    freq = torch.bincount(nearest, minlength=3).double() / n
    torch.testing.assert_close(freq, WEIGHTS_2D, rtol=0, atol=0.02)
    with pytest.raises(ValueError):
        teacher.sample(0)


def test_teacher_validation():
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(torch.zeros(3), 0.5)
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(MEANS_2D, 0.0)
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(MEANS_2D, 0.5, torch.ones(2))
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(MEANS_2D, 0.5, torch.tensor([1.0, -1.0, 1.0]))
    teacher = teacher_2d()
    with pytest.raises(ValueError, match="x_t"):
        teacher.velocity(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match="sigma_t"):
        teacher.velocity(torch.zeros(4, 2), 1.5)


class ToyConditional:
    """u(x, σ, c) = c·x + σ (per sample); records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append((x.clone(), sigma.clone(), cond.clone()))
        return cond.reshape(-1, 1) * x + sigma.reshape(-1, 1)


def test_classifier_free_guidance():
    toy = ToyConditional()
    interval = (0.2, 0.6)
    cfg = ClassifierFreeGuidance(toy, guidance_scale=3.0, null_cond=-1.0, interval=interval)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.1, 0.2, 0.4, 0.6, 0.61, 0.9])               # bounds are inclusive
    cond = torch.tensor([0.5, 2.0, 3.0, 1.5, -0.5, 1.0])
    u = cfg(x, sigma, cond)
    assert len(toy.calls) == 1
    xs, ss, cs = toy.calls[0]
    # batch order [uncond; cond]
    torch.testing.assert_close(xs, torch.cat([x, x]))
    torch.testing.assert_close(ss, torch.cat([sigma, sigma]))
    torch.testing.assert_close(cs, torch.cat([torch.full((6,), -1.0), cond]))
    u_c = cond[:, None] * x + sigma[:, None]
    u_u = -1.0 * x + sigma[:, None]
    inside = torch.tensor([False, True, True, True, False, False])
    ref = torch.where(inside[:, None], u_c + 2.0 * (u_c - u_u), u_c)
    torch.testing.assert_close(u, ref)
    # scale 1 is the plain conditional teacher
    plain = ClassifierFreeGuidance(toy, 1.0, null_cond=-1.0)
    torch.testing.assert_close(plain(x, sigma, cond), u_c)
    # tensor null condition and dict conditions
    cfg_t = ClassifierFreeGuidance(toy, 2.0, null_cond=torch.tensor([-1.0]))
    torch.testing.assert_close(cfg_t(x, sigma, cond), u_c + (u_c - u_u))

    def dict_teacher(x, sigma, cond):
        return cond["scale"].reshape(-1, 1) * x

    cfg_d = ClassifierFreeGuidance(dict_teacher, 4.0, null_cond={"scale": 0.0})
    torch.testing.assert_close(cfg_d(x, sigma, {"scale": cond}), cond[:, None] * x * 4.0)
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(toy, 2.0, -1.0, interval=(0.7, 0.2))
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(toy, 2.0, -1.0, interval=(0.0, 1.5))


def test_network_teacher_converts_sigma_to_timesteps():
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, x, t, cond):
            seen["t"], seen["training"] = t.clone(), self.training
            return x * 2 + t[:, None]

    net = Net().train()
    teacher = NetworkTeacher(net, num_timesteps=1000)
    x = torch.ones(3, 2)
    sigma = torch.tensor([0.1, 0.5, 1.0])
    u = teacher(x, sigma)
    torch.testing.assert_close(seen["t"], sigma * 1000)
    assert seen["training"] is False
    assert not u.requires_grad
    torch.testing.assert_close(u, 2 + sigma[:, None] * 1000 * torch.ones(3, 2))


def test_unbatched_guidance_makes_two_calls_and_equals_the_batched_one():
    toy = ToyConditional()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    sigma, cond = torch.tensor([0.3, 0.5, 0.9]), torch.tensor([0.5, 2.0, 3.0])
    batched = ClassifierFreeGuidance(toy, 2.5, null_cond=torch.tensor([-1.0]), interval=(0.0, 0.6))(x, sigma, cond)
    toy.calls.clear()
    two_calls = ClassifierFreeGuidance(toy, 2.5, null_cond=torch.tensor([-1.0]), interval=(0.0, 0.6),
                                       batched=False)(x, sigma, cond)
    assert len(toy.calls) == 2 and toy.calls[1][2].tolist() == [-1.0] * 3   # batch-1 null expanded
    torch.testing.assert_close(two_calls, batched)

    def masked_teacher(x, sigma, cond):   # conditions of different lengths and an optional mask
        assert cond["mask"] is None or cond["mask"].shape == cond["embeds"].shape
        return cond["embeds"].sum(dim=1, keepdim=True) * x

    null = {"embeds": torch.zeros(1, 2), "mask": None}
    text = {"embeds": torch.ones(3, 5), "mask": torch.ones(3, 5)}
    u = ClassifierFreeGuidance(masked_teacher, 3.0, null, batched=False)(x, sigma, text)
    torch.testing.assert_close(u, 5 * x * 3.0)


def test_cfg_shares_condition_keys_the_null_lacks_and_takes_a_per_sample_null():
    """An editing model's negative branch keeps the sample's reference image (a key the null condition lacks), and a
    callable null condition may depend on the sample."""
    from piflow.teachers import ClassifierFreeGuidance

    def teacher(x, sigma, cond):                   # u = a·x + ref, per sample
        return cond["a"].reshape(-1, 1) * x + cond["ref"]

    x = torch.ones(2, 3)
    cond = {"a": torch.tensor([2.0, 3.0]), "ref": torch.tensor([[1.0], [5.0]])}
    for batched in (True, False):
        cfg = ClassifierFreeGuidance(teacher, 2.0, {"a": torch.zeros(1)}, batched=batched)
        # u_c = a + ref, u_u = ref (same reference): u = u_c + (u_c − u_u) = 2a + ref
        torch.testing.assert_close(cfg(x, torch.full((2,), 0.5), cond),
                                   (2 * cond["a"]).reshape(-1, 1) + cond["ref"] + 0 * x)
    per_sample = ClassifierFreeGuidance(teacher, 2.0, lambda c: {"a": c["a"] - 1}, batched=False)
    # u_u = (a − 1) + ref: u = 2(a + ref) − (a − 1 + ref) = a + 1 + ref
    torch.testing.assert_close(per_sample(x, torch.full((2,), 0.5), cond),
                               (cond["a"] + 1).reshape(-1, 1) + cond["ref"] + 0 * x)
