"""Tests for piflow.rollout: substep schedule, exactness on a constant-x0 policy, per-sample masking,
the micro-window average velocity, gradients, and input validation."""
import pytest
import torch

from piflow.policies.base import Policy
from piflow.policies.dx import DXPolicy
from piflow.policies.gmflow import GMFlowPolicy
from piflow.rollout import average_velocity, num_substeps, rollout
from piflow.teachers import GaussianMixtureTeacher

pytestmark = pytest.mark.usefixtures("single_thread")


def _warp(tau, m):
    return m * tau / (1 + (m - 1) * tau)


def _unwarp(sigma, m):
    return sigma / (m + (1 - m) * sigma)


class CountingPolicy(Policy):
    """x̂0 = 0 (so u = x/σ); records every σ it is evaluated at."""

    def __init__(self, x_src, sigma_src):
        self.x_src = x_src.float()
        self.sigma_src = torch.as_tensor(sigma_src, dtype=torch.float32).reshape(-1, *([1] * (x_src.dim() - 1)))
        self.eps = 1e-6
        self.sigmas = []

    def _x0(self, x_t, sigma_t):
        self.sigmas.append(sigma_t.reshape(-1).clone())
        return torch.zeros_like(x_t)


def _segments(nfe, f):
    base = 1.0 / (nfe - 1 + f)
    starts = [1.0 - i * base for i in range(nfe)]
    ends = starts[1:] + [0.0]
    return list(zip(starts, ends))


# n = ceil(Δτ·128) (the authors' current rounding): 4 NFE, f = 0.5 → Δτ = 1/3.5 (36.57 → 37) and 0.5/3.5
# (18.29 → 19); 8 NFE → 1/7.5 (17.07 → 18) and 0.5/7.5 (8.53 → 9); whole numbers stay as they are
@pytest.mark.parametrize("nfe,f,shift,expected", [
    (4, 0.5, 3.2, [37, 37, 37, 19]),
    (8, 0.5, 3.2, [18] * 7 + [9]),
    (1, 1.0, 1.0, [128]),
    (2, 1.0, 1.0, [64, 64]),
])
def test_substep_counts_examples(nfe, f, shift, expected):
    counts = []
    for tau_start, tau_end in _segments(nfe, f):
        x = torch.ones(2, 3)
        policy = CountingPolicy(x, _warp(tau_start, shift))
        rollout(policy, x, _warp(tau_start, shift), _warp(tau_end, shift), total_substeps=128, shift=shift)
        counts.append(len(policy.sigmas))
        # substeps are uniform in *raw* time: the evaluated σ's unwarp to τ_start − j·Δτ/n
        taus = _unwarp(torch.stack(policy.sigmas)[:, 0].double(), shift)
        n = len(policy.sigmas)
        ref = tau_start - torch.arange(n, dtype=torch.float64) * (tau_start - tau_end) / n
        torch.testing.assert_close(taus, ref, rtol=0, atol=2e-6)
    assert counts == expected
    # the helper agrees
    t0 = torch.tensor([s for s, _ in _segments(nfe, f)])
    t1 = torch.tensor([e for _, e in _segments(nfe, f)])
    assert num_substeps(t0, t1, 128).tolist() == expected


def test_zero_length_interval_takes_one_null_substep():
    x = torch.randn(3, 2)
    policy = CountingPolicy(x, 0.5)
    out = rollout(policy, x, 0.5, 0.5, total_substeps=128)
    assert len(policy.sigmas) == 1
    torch.testing.assert_close(out, x)


def test_counting_policy_euler_product():
    # u = x/σ with x̂0 = 0: each Euler step multiplies x by σ'/σ, so the product telescopes to σ_dst/σ_src
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    out = rollout(CountingPolicy(x, 0.9), x, 0.9, 0.3, total_substeps=50, shift=2.5)
    torch.testing.assert_close(out, x * (0.3 / 0.9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift,total", [(1.0, 128), (3.2, 128), (0.5, 7), (3.2, 1)])
def test_constant_x0_policy_is_integrated_exactly(shift, total):
    # dx/dσ = (x − x̂0)/σ has the solution x(σ) = x̂0 + (σ/σ_src)(x_src − x̂0); Euler is exact for it on any grid.
    g = torch.Generator().manual_seed(1)
    B = 4
    x_src = torch.randn(B, 3, 2, 2, generator=g)
    u = torch.randn(B, 1, 3, 2, 2, generator=g)
    sigma_src = torch.tensor([1.0, 0.8, 0.55, 0.3])
    sigma_dst = torch.tensor([0.0, 0.41, 0.05, 0.3])
    policy = DXPolicy(u, x_src, sigma_src)
    x0 = x_src - sigma_src.reshape(B, 1, 1, 1) * u[:, 0]
    out = rollout(policy, x_src, sigma_src, sigma_dst, total_substeps=total, shift=shift)
    ref = x0 + (sigma_dst / sigma_src).reshape(B, 1, 1, 1) * (x_src - x0)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert out.dtype == x_src.dtype and out.shape == x_src.shape
    out64 = rollout(policy, x_src.double(), sigma_src, sigma_dst, total_substeps=total, shift=shift)
    assert out64.dtype == torch.float64


def _gm_case(seed=2, B=5):
    g = torch.Generator().manual_seed(seed)
    teacher = GaussianMixtureTeacher(torch.randn(3, 2, generator=g, dtype=torch.float64) * 1.5, 0.3)
    sigma_src = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.35])[:B]
    x_src = (1 - sigma_src[:, None]) * teacher.sample(B, generator=g) + sigma_src[:, None] * torch.randn(
        B, 2, generator=g)
    return teacher, x_src, sigma_src


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_per_sample_destinations_match_single_rollouts(shift):
    teacher, x_src, sigma_src = _gm_case()
    sigma_dst = torch.tensor([0.0, 0.6, 0.69, 0.5, 0.1])       # incl. zero length and very different lengths
    policy = teacher.policy(x_src, sigma_src)
    batched = rollout(policy, x_src, sigma_src, sigma_dst, total_substeps=64, shift=shift)
    for b in range(5):
        single = teacher.policy(x_src[b:b + 1], sigma_src[b:b + 1])
        ref = rollout(single, x_src[b:b + 1], float(sigma_src[b]), float(sigma_dst[b]), total_substeps=64,
                      shift=shift)
        torch.testing.assert_close(batched[b:b + 1], ref, rtol=0, atol=1e-6)
    # and each rollout follows the teacher ODE (exact policy) up to the Euler error
    fine = rollout(policy, x_src, sigma_src, sigma_dst, total_substeps=2048, shift=shift)
    assert float((fine - batched).abs().max()) < 0.1


def _explicit_euler(policy, x, tau_a, tau_b, total, shift):
    """Hand-written reference: n = round((τ_a − τ_b)·total) substeps uniform in raw time, Euler in σ."""
    n = max(int(round((tau_a - tau_b) * total)), 1)
    for j in range(n):
        t0 = tau_a - j * (tau_a - tau_b) / n
        t1 = tau_a - (j + 1) * (tau_a - tau_b) / n
        s0, s1 = _warp(t0, shift), _warp(t1, shift)
        x = x + policy.velocity(x.float(), s0).double() * (s1 - s0)
    return x


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_average_velocity(shift):
    teacher, x_src, sigma_src = _gm_case()
    policy = teacher.policy(x_src, sigma_src)
    B = 5
    total = 128
    tau_src = _unwarp(sigma_src.double(), shift)
    # x_a: a state slightly below the source
    tau_a = tau_src - 0.02
    sigma_a = _warp(tau_a, shift)
    x_a = rollout(policy, x_src, sigma_src, sigma_a.float(), total_substeps=total, shift=shift)
    widths = torch.tensor([20.0, 6.0, 3.0, 1.4, 0.5], dtype=torch.float64) / total   # < 2 substeps for the last two
    tau_b = tau_a - widths
    view = (B, 1)
    out = average_velocity(policy, x_a, tau_a.float().reshape(view), tau_b.float().reshape(view), total, shift)
    local = policy.velocity(x_a, sigma_a.float())
    for b in range(B):
        if widths[b] * total < 1.5:
            torch.testing.assert_close(out[b], local[b], rtol=0, atol=1e-6)
        else:
            single = teacher.policy(x_src[b:b + 1], sigma_src[b:b + 1])
            x_b = _explicit_euler(single, x_a[b:b + 1].double(), float(tau_a[b]), float(tau_b[b]), total, shift)
            ref = (x_a[b].double() - x_b[0]) / (_warp(tau_a[b], shift) - _warp(tau_b[b], shift))
            torch.testing.assert_close(out[b].double(), ref, rtol=0, atol=2e-4 * float(ref.abs().max()) + 1e-5)
            # a genuinely different quantity from the local velocity (the policy field is non-linear in σ)
            assert float((out[b] - local[b]).abs().max()) > 1e-4
    # all-small batch returns exactly the local velocity
    out_small = average_velocity(policy, x_a, tau_a.float().reshape(view), tau_a.float().reshape(view), total, shift)
    torch.testing.assert_close(out_small, local)


def test_average_velocity_constant_x0_equals_local():
    # for a constant-x0 policy the chord slope over any window equals the local velocity (x_a − x̂0)/σ_a
    g = torch.Generator().manual_seed(3)
    x_src, u = torch.randn(3, 4, generator=g), torch.randn(3, 1, 4, generator=g)
    policy = DXPolicy(u, x_src, 0.9)
    tau_a = torch.full((3, 1), 0.8)
    tau_b = torch.tensor([[0.7], [0.5], [0.0]])
    out = average_velocity(policy, x_src, tau_a, tau_b, 128)
    torch.testing.assert_close(out, policy.velocity(x_src, 0.8), rtol=1e-4, atol=1e-4)


def _leaf_gm(seed=4, B=3, K=3, C=2):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(B, K, C, generator=g).requires_grad_(True)
    logits = torch.randn(B, K, 1, generator=g).requires_grad_(True)
    logstds = torch.full((B,), -0.7).requires_grad_(True)
    x_src = torch.randn(B, C, generator=g)
    return means, logits, logstds, x_src


def test_gradients_flow_through_rollout_and_match_finite_differences():
    means, logits, logstds, x_src = _leaf_gm()
    sigma_src = torch.tensor([1.0, 0.8, 0.6])

    def loss_fn(m, lw, ls):
        policy = GMFlowPolicy(m, ls, torch.log_softmax(lw, 1), x_src, sigma_src)
        x = rollout(policy, x_src, sigma_src, torch.tensor([0.2, 0.1, 0.3]), total_substeps=32, shift=2.0)
        return (x ** 2).sum()

    loss = loss_fn(means, logits, logstds)
    loss.backward()
    grads = [means.grad, logits.grad, logstds.grad]
    for grad in grads:
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    # directional derivative vs central finite differences
    g = torch.Generator().manual_seed(5)
    dirs = [torch.randn(t.shape, generator=g) for t in (means, logits, logstds)]
    h = 1e-2
    with torch.no_grad():
        plus = loss_fn(*(t + h * d for t, d in zip((means, logits, logstds), dirs)))
        minus = loss_fn(*(t - h * d for t, d in zip((means, logits, logstds), dirs)))
    fd = float(plus - minus) / (2 * h)
    analytic = float(sum((gr * d).sum() for gr, d in zip(grads, dirs)))
    assert analytic == pytest.approx(fd, rel=2e-2, abs=1e-3)


def test_gradients_flow_through_dx_rollout():
    g = torch.Generator().manual_seed(6)
    u = torch.randn(2, 4, 3, generator=g).requires_grad_(True)
    x_src = torch.randn(2, 3, generator=g)
    policy = DXPolicy(u, x_src, 0.9, segment_size=0.5, shift=3.2)
    out = rollout(policy, x_src, 0.9, 0.2, total_substeps=32, shift=3.2)
    out.sum().backward()
    assert u.grad is not None and float(u.grad.abs().sum()) > 0


def test_rollout_errors():
    x = torch.randn(2, 3)
    policy = DXPolicy(torch.randn(2, 1, 3), x, 0.8)
    with pytest.raises(ValueError, match="sigma_dst"):
        rollout(policy, x, 0.5, 0.6)
    with pytest.raises(ValueError, match="sigma_dst"):
        rollout(policy, x, torch.tensor([0.8, 0.5]), torch.tensor([0.1, 0.7]))
    with pytest.raises(ValueError, match="x_src"):
        rollout(policy, torch.randn(2, 4), 0.8, 0.1)
    with pytest.raises(ValueError, match="x_src"):
        rollout(policy, torch.randn(3, 3), 0.8, 0.1)
    with pytest.raises(ValueError, match="x_src"):
        rollout(policy, torch.full((2, 3), float("nan")), 0.8, 0.1)
    with pytest.raises(ValueError, match="total_substeps"):
        rollout(policy, x, 0.8, 0.1, total_substeps=0)
    with pytest.raises(ValueError, match="sigma_src"):
        rollout(policy, x, 1.2, 0.1)
    with pytest.raises(ValueError, match="sigma_dst"):
        rollout(policy, x, 0.8, -0.1)


def test_substep_count_ignores_float_round_off():
    # Δτ·T a hair above a whole number (float32 round-off) must not add a nearly empty substep; a real excess does
    tau = torch.tensor([0.75 + 0.25, 0.5 + 1e-7, 0.3])
    counts = num_substeps(tau, tau - torch.tensor([0.25, 0.25, 0.25]) - torch.tensor([0.0, 0.0, 0.01]), 128)
    assert counts.tolist() == [32, 32, 34]


def _batch_max_rollout(policy, x, tau_start, tau_end, total, shift):
    """The reference schedule: every sample runs the batch's largest substep count, finished samples taking
    zero-length substeps (what piflow did before per-sample counts)."""
    from piflow.rollout import num_substeps as counts_of
    from piflow.timewarp import warp

    counts = counts_of(tau_start, tau_end, total)
    step = (tau_start - tau_end) / counts
    index = torch.arange(int(counts.max()) + 1, dtype=torch.float32).reshape(-1, *([1] * x.dim()))
    sigmas = warp(torch.where(index >= counts, tau_end, tau_start - index * step).clamp(min=0), shift)
    sigmas[0] = warp(tau_start, shift)
    for j in range(int(counts.max())):
        x = x + policy.velocity_unchecked(x, sigmas[j]) * (sigmas[j + 1] - sigmas[j])
    return x


def test_each_sample_runs_only_its_own_substeps():
    """Samples with different substep counts cost the sum of their counts, not batch × the largest count."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sigma_src = torch.tensor([1.0, 1.0, 0.9, 0.8])
    sigma_dst = torch.tensor([0.0, 0.5, 0.8, 0.7])
    policy = CountingPolicy(x, sigma_src)
    out = rollout(policy, x, sigma_src, sigma_dst, total_substeps=64, shift=1.0)
    counts = num_substeps(sigma_src, sigma_dst, 64)
    assert counts.tolist() == [64, 32, 7, 7]
    assert sum(s.numel() for s in policy.sigmas) == int(counts.sum()) == 110      # not 4 × 64 = 256
    # u = x/σ with x̂0 = 0: each sample is scaled by Π(σ_{j+1}/σ_j) = σ_dst/σ_src (exact for this policy) — in
    # its own order, whatever order the samples ran in
    expected = x * (sigma_dst / sigma_src)[:, None]
    torch.testing.assert_close(out[1:], expected[1:], rtol=1e-5, atol=1e-6)
    assert bool((out[0].abs() < 1e-6).all())                                     # σ_dst = 0 row: x → 0


@pytest.mark.parametrize("kind", ["gmflow", "dx"])
def test_per_sample_schedule_equals_the_batch_max_loop_values_and_gradients(kind):
    """Dropping the zero-length substeps changes neither the states nor the gradients."""
    from piflow.timewarp import unwarp

    g = torch.Generator().manual_seed(3)
    batch, shift = 5, 3.2
    x_src = torch.randn(batch, 2, 4, generator=g)
    sigma_src = torch.tensor([1.0, 0.95, 0.7, 0.7, 0.4])
    sigma_dst = torch.tensor([0.2, 0.9, 0.0, 0.69, 0.39])
    if kind == "gmflow":
        leaves = [torch.randn(batch, 3, 2, 4, generator=g).requires_grad_(True),
                  torch.randn(batch, 3, 1, 4, generator=g).requires_grad_(True)]

        def build(means, logits):
            return GMFlowPolicy(means, torch.full((batch,), -1.0), torch.log_softmax(logits, 1), x_src, sigma_src)
    else:
        leaves = [torch.randn(batch, 4, 2, 4, generator=g).requires_grad_(True)]

        def build(u):
            return DXPolicy(u, x_src, sigma_src, segment_size=0.6, shift=shift)
    tau_src = unwarp(sigma_src, shift).reshape(-1, 1, 1)
    tau_dst = unwarp(sigma_dst, shift).reshape(-1, 1, 1)
    ours = rollout(build(*leaves), x_src, sigma_src, sigma_dst, total_substeps=64, shift=shift)
    grads = torch.autograd.grad((ours ** 2).sum(), leaves)
    reference = _batch_max_rollout(build(*leaves), x_src, tau_src, tau_dst, 64, shift)
    reference_grads = torch.autograd.grad((reference ** 2).sum(), leaves)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_fixed_shape_policies_keep_the_whole_batch():
    """A policy whose substep is compiled for one batch shape runs the batch-maximum schedule (same result)."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    sigma_src, sigma_dst = torch.tensor([1.0, 0.9, 0.6]), torch.tensor([0.5, 0.8, 0.55])

    class FixedShape(CountingPolicy):
        fixed_batch = True

    fixed, free = FixedShape(x, sigma_src), CountingPolicy(x, sigma_src)
    out_fixed = rollout(fixed, x, sigma_src, sigma_dst, total_substeps=32, shift=1.0)
    out_free = rollout(free, x, sigma_src, sigma_dst, total_substeps=32, shift=1.0)
    counts = num_substeps(sigma_src, sigma_dst, 32)
    assert sum(s.numel() for s in fixed.sigmas) == 3 * int(counts.max())
    assert sum(s.numel() for s in free.sigmas) == int(counts.sum())
    torch.testing.assert_close(out_fixed, out_free, rtol=0, atol=1e-6)


def test_float64_times_reach_the_fused_kernel_as_float32():
    """rollout_tau with float64 times on a GM policy (the fused CPU kernel): finite, and equal to the float32
    call and to the plain-PyTorch substeps (the kernel casts what it is handed instead of misreading it)."""
    from piflow.kernels import gm_rollout_library
    from piflow.policies.gmflow import fused_rollout
    from piflow.rollout import rollout_tau

    if gm_rollout_library() is None:
        pytest.skip("no C compiler: the fused kernel is not built")
    g = torch.Generator().manual_seed(5)
    batch = 3
    x_src = torch.randn(batch, 2, 8, generator=g)
    policy = GMFlowPolicy(torch.randn(batch, 4, 2, 8, generator=g), torch.full((batch,), -0.5),
                          torch.log_softmax(torch.randn(batch, 4, 1, 8, generator=g), 1), x_src, 1.0)
    tau_start = torch.ones(batch, 1, 1, dtype=torch.float64)
    tau_end = torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64).reshape(-1, 1, 1)
    with fused_rollout(True):
        assert policy.fixed_batch                     # the kernel path is the one under test
        out64 = rollout_tau(policy, x_src, tau_start, tau_end, 64)
        out32 = rollout_tau(policy, x_src, tau_start.float(), tau_end.float(), 64)
    with fused_rollout(False):
        plain = rollout_tau(policy, x_src, tau_start, tau_end, 64)
    assert out64.dtype == torch.float32 and bool(torch.isfinite(out64).all())
    torch.testing.assert_close(out64, out32, rtol=0, atol=0)
    torch.testing.assert_close(out64, plain, rtol=1e-5, atol=1e-5)


def test_the_kernel_casts_float64_inputs():
    """gm_rollout_cpu itself: float64 tensors are cast, not read as float32 memory."""
    from piflow.kernels import gm_rollout_cpu, gm_rollout_library
    from piflow.policies.gmflow import gm_substep_coefficients

    library = gm_rollout_library()
    if library is None:
        pytest.skip("no C compiler: the fused kernel is not built")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 8, generator=g)
    means = torch.randn(2, 3, 1, 8, generator=g)
    logits = torch.log_softmax(torch.randn(2, 3, 1, 8, generator=g), 1)
    var = torch.full((2, 1, 1, 1), 0.3)
    sigma_src = torch.ones(2, 1, 1)
    sigmas = torch.linspace(1.0, 0.2, 9).reshape(-1, 1, 1, 1).expand(9, 2, 1, 1).contiguous()
    coefficients = gm_substep_coefficients(sigmas, var, sigma_src, 1e-6)
    args = (x, coefficients, means, means.square().sum(2, keepdim=True), logits, x)
    out32 = gm_rollout_cpu(library, *args)
    out64 = gm_rollout_cpu(library, *(t.double() for t in args))
    assert bool(torch.isfinite(out64).all())
    torch.testing.assert_close(out64, out32, rtol=0, atol=0)
