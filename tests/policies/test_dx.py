"""Tests for piflow.policies.dx.DXPolicy: grid nodes, interpolation, clamping and the polynomial mode."""
import pytest
import torch

from piflow.policies.dx import DXPolicy

pytestmark = pytest.mark.usefixtures("single_thread")


def _warp(tau, m):      # independent re-implementation of the shift warp (float64)
    return m * tau / (1 + (m - 1) * tau)


def make(batch=3, N=5, C=2, spatial=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    u_grid = torch.randn(batch, N, C, *spatial, generator=g, dtype=torch.float64)
    x_src = torch.randn(batch, C, *spatial, generator=g, dtype=torch.float64)
    return u_grid, x_src, g


def x0_nodes(u_grid, x_src, sigma_src):
    view = (-1, 1) + (1,) * (x_src.dim() - 1)
    return x_src.unsqueeze(1) - torch.as_tensor(sigma_src, dtype=torch.float64).reshape(view) * u_grid


@pytest.mark.parametrize("segment_size,shift", [(0.3, 3.2), (1 / 3.5, 3.2), (0.5, 1.0), (0.25, 0.5)])
def test_grid_nodes_midpoints_and_clamping(segment_size, shift):
    B, N = 3, 5
    u_grid, x_src, g = make(B, N)
    tau_src = torch.tensor([0.95, 0.7, 0.2], dtype=torch.float64)        # last one: segment truncated at τ = 0
    sigma_src = _warp(tau_src, shift)
    policy = DXPolicy(u_grid.float(), x_src.float(), sigma_src.float(), segment_size=segment_size, shift=shift)
    nodes = x0_nodes(u_grid.float().double(), x_src.float().double(), sigma_src.float().double())  # (B, N, C, H, W)
    tau_end = (tau_src - segment_size).clamp(min=0)
    node_tau = tau_end[:, None] + (tau_src - tau_end)[:, None] * torch.arange(N, dtype=torch.float64) / (N - 1)
    x_t = torch.randn(x_src.shape, generator=g).float()            # x̂0 does not depend on x_t
    scale = float(nodes.abs().max())
    for i in range(N):
        got = policy.x0(x_t, _warp(node_tau[:, i], shift).float()).double()
        torch.testing.assert_close(got, nodes[:, i], rtol=0, atol=2e-5 * scale)
    for i in range(N - 1):
        for frac in (0.5, 0.25):
            tau = node_tau[:, i] * (1 - frac) + node_tau[:, i + 1] * frac
            got = policy.x0(x_t, _warp(tau, shift).float()).double()
            ref = (1 - frac) * nodes[:, i] + frac * nodes[:, i + 1]
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * scale)
    # outside the segment: clamp to the end nodes (σ = 0 and anything below τ_end → node 0; above τ_src → N−1)
    for tau in (torch.zeros(B, dtype=torch.float64), (tau_end - 0.05).clamp(min=0)):
        torch.testing.assert_close(policy.x0(x_t, _warp(tau, shift).float()).double(), nodes[:, 0],
                                   rtol=0, atol=2e-5 * scale)
    above = (tau_src + 0.03).clamp(max=1.0)
    torch.testing.assert_close(policy.x0(x_t, _warp(above, shift).float()).double(), nodes[:, N - 1],
                               rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(policy.x0(x_t, sigma_src.float()).double(), nodes[:, N - 1], rtol=0, atol=2e-5 * scale)


def test_single_node_is_constant():
    u_grid, x_src, g = make(N=1)
    policy = DXPolicy(u_grid.float(), x_src.float(), 0.8, segment_size=0.4, shift=3.2)
    node = x0_nodes(u_grid, x_src, 0.8)[:, 0]
    x_t = torch.randn(x_src.shape, generator=g).float()
    for sigma in (0.8, 0.5, 0.1, 0.0, 1.0):
        torch.testing.assert_close(policy.x0(x_t, sigma).double(), node, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_polynomial_mode(shift):
    B = 3
    u_grid, x_src, g = make(B, N=3)
    sigma_src = torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64)
    policy = DXPolicy(u_grid.float(), x_src.float(), sigma_src.float(), segment_size=0.1, shift=shift,
                      mode="polynomial")
    coeffs = x0_nodes(u_grid.float().double(), x_src.float().double(), sigma_src)
    tau_src = sigma_src / (shift + (1 - shift) * sigma_src)          # unwarp by hand
    x_t = torch.randn(x_src.shape, generator=g).float()
    view = (B,) + (1,) * (x_src.dim() - 1)
    for sigma_t in (sigma_src, sigma_src * 0.6, sigma_src * 0.1, torch.zeros(B, dtype=torch.float64)):
        tau = sigma_t / (shift + (1 - shift) * sigma_t)
        d = (tau_src - tau).reshape(view)
        ref = coeffs[:, 0] + d * coeffs[:, 1] + d ** 2 * coeffs[:, 2]       # segment_size is unused
        torch.testing.assert_close(policy.x0(x_t, sigma_t.float()).double(), ref, rtol=0, atol=3e-5)
    # order 0 (N = 1): the constant x̂0
    u1 = u_grid[:, :1]
    p0 = DXPolicy(u1.float(), x_src.float(), sigma_src.float(), mode="polynomial", shift=shift)
    torch.testing.assert_close(p0.x0(x_t, (sigma_src * 0.3).float()).double(),
                               x0_nodes(u1.float().double(), x_src.float().double(), sigma_src)[:, 0],
                               rtol=0, atol=1e-6)


def test_velocity_formula():
    u_grid, x_src, g = make(N=4)
    policy = DXPolicy(u_grid.float(), x_src.float(), 0.9, segment_size=0.5, shift=2.0)
    x_t = torch.randn(x_src.shape, generator=g).float()
    for sigma in (0.9, 0.6, 0.33, 0.02):
        ref = (x_t - policy.x0(x_t, sigma)) / sigma
        torch.testing.assert_close(policy.velocity(x_t, sigma), ref, rtol=1e-5, atol=1e-5)
    # at σ_src the DX velocity is the network output of the last node: u = (x_src − x̂0_{N−1})/σ_src = d_{N−1}
    torch.testing.assert_close(policy.velocity(x_src.float(), 0.9), u_grid[:, -1].float(), rtol=1e-5, atol=1e-5)
    # σ = 0 is clamped to eps (1e-4)
    torch.testing.assert_close(policy.velocity(x_t, 0.0), (x_t - policy.x0(x_t, 0.0)) / 1e-4, rtol=1e-5, atol=1e-3)
    assert policy.velocity(x_t.double(), 0.5).dtype == torch.float64


def test_detach_and_grad():
    u_grid, x_src, g = make(N=3)
    u = u_grid.float().requires_grad_(True)
    policy = DXPolicy(u, x_src.float(), 0.7, segment_size=0.4)
    out = policy.velocity(x_src.float() * 0.5, 0.3)
    assert out.requires_grad
    d = policy.detach()
    assert not d.x0_grid.requires_grad and not d.velocity(x_src.float() * 0.5, 0.3).requires_grad
    torch.testing.assert_close(d.velocity(x_src.float() * 0.5, 0.3), out.detach())
    out.sum().backward()
    assert u.grad is not None and float(u.grad.abs().sum()) > 0


def test_errors():
    u_grid, x_src, _ = make(N=3)
    u_grid, x_src = u_grid.float(), x_src.float()
    with pytest.raises(ValueError, match="mode"):
        DXPolicy(u_grid, x_src, 0.5, mode="spline")
    with pytest.raises(ValueError, match="u_grid"):
        DXPolicy(u_grid[:, 0, 0, 0], x_src, 0.5)
    with pytest.raises(ValueError, match="x_src"):
        DXPolicy(u_grid, x_src[:, :1], 0.5)
    with pytest.raises(ValueError, match="x_src"):
        DXPolicy(u_grid, x_src[:2], 0.5)
    with pytest.raises(ValueError, match="segment_size"):
        DXPolicy(u_grid, x_src, 0.5, segment_size=0.0)
    with pytest.raises(ValueError, match="u_grid"):
        DXPolicy(u_grid * float("nan"), x_src, 0.5)
    with pytest.raises(ValueError, match="sigma_src"):
        DXPolicy(u_grid, x_src, 1.5)
    with pytest.raises(ValueError, match="sigma_src"):
        DXPolicy(u_grid, x_src, torch.tensor([0.5, 0.4]))
    policy = DXPolicy(u_grid, x_src, 0.5)
    with pytest.raises(ValueError, match="x_t"):
        policy.velocity(x_src[:, :, :1], 0.3)
    with pytest.raises(ValueError, match="sigma_t"):
        policy.velocity(x_src, -0.2)


def test_dropout_reinterpolates_dropped_grid_nodes():
    # every kept node stays; a dropped node lies on the straight line between its nearest kept neighbours (the
    # nearest kept node at the ends); the whole grid is never dropped
    torch.manual_seed(0)
    B, N = 64, 6
    policy = DXPolicy(torch.randn(B, N, 3), torch.randn(B, 3), 0.8)
    dropped = policy.dropout(0.5, generator=torch.Generator().manual_seed(1))
    grid, new = policy.x0_grid, dropped.x0_grid
    changed = 0
    for b in range(B):
        same = [n for n in range(N) if torch.equal(grid[b, n], new[b, n])]
        assert same, "at least one node is kept"
        for n in range(N):
            left = max([k for k in same if k <= n], default=None)
            right = min([k for k in same if k >= n], default=None)
            if left is None or right is None:
                expected = grid[b, right if left is None else left]
            elif left == right:
                expected = grid[b, n]
            else:
                w = (n - left) / (right - left)
                expected = (1 - w) * grid[b, left] + w * grid[b, right]
            torch.testing.assert_close(new[b, n], expected)
        changed += len(same) < N
    assert changed > B // 2                                   # p = 0.5 drops something in most samples
    assert policy.dropout(0.0) is policy and policy.dropout(1.0) is policy
    assert DXPolicy(torch.randn(2, 1, 3), torch.randn(2, 3), 0.5).dropout(0.5).num_nodes == 1


def test_dropout_of_a_polynomial_policy_keeps_the_source_prediction():
    policy = DXPolicy(torch.randn(16, 4, 2), torch.randn(16, 2), 0.7, mode="polynomial")
    dropped = policy.dropout(0.6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(dropped.x0_grid[:, 0], policy.x0_grid[:, 0])
    zeroed = (dropped.x0_grid[:, 1:] == 0).all(dim=-1)
    kept = (dropped.x0_grid[:, 1:] == policy.x0_grid[:, 1:]).all(dim=-1)
    assert bool((zeroed | kept).all()) and bool(zeroed.any())
