"""MeanFlow's target, loss and sampler against cases with known answers."""
import pytest
import torch
from torch import nn

from piflow.methods.meanflow import MeanFlowSettings, meanflow_loss, meanflow_sample, meanflow_target, sample_times


class TinyAverageVelocity(nn.Module):
    """A smooth random u_θ(z, r, t) on (B, 2) states."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).double()

    def forward(self, z, r, t, cond=None):
        return self.net(torch.cat([z, r[:, None], t[:, None]], dim=1))


def exact_point_model(point):
    """Data = one point a: the flow is straight and u(z, r, t) = (z − a)/t for every r."""
    return lambda z, r, t, cond=None: (z - point) / t.reshape(-1, *([1] * (z.dim() - 1)))


def _batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    v = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    return z, r, t, v


def test_target_is_the_instantaneous_velocity_when_r_equals_t():
    model = TinyAverageVelocity()
    z, _, t, v = _batch()
    assert torch.equal(meanflow_target(model, z, t, t, v), v)


def test_total_derivative_matches_central_differences():
    model = TinyAverageVelocity(seed=2)
    z, r, t, v = _batch(seed=3)
    target = meanflow_target(model, z, r, t, v)
    h = 1e-5
    with torch.no_grad():
        derivative = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(target, v - (t - r)[:, None] * derivative, rtol=1e-7, atol=1e-9)


def test_exact_average_velocity_has_zero_loss_and_samples_the_point_in_one_step():
    point = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    model = exact_point_model(point)
    z, r, t, v = _batch(seed=4)
    torch.testing.assert_close(meanflow_target(model, z, r, t, (z - point) / t[:, None]), model(z, r, t))
    x0 = point.repeat(32, 1)
    loss = meanflow_loss(model, x0, settings=MeanFlowSettings(ratio_r_not_t=1.0),
                         generator=torch.Generator().manual_seed(5))
    assert float(loss) < 1e-20
    noise = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    # sampled through the one few-step loop, whose policy rollouts compute in float32
    torch.testing.assert_close(meanflow_sample(model, noise, nfe=1), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(meanflow_sample(model, noise, nfe=2), x0, rtol=0, atol=1e-5)


def test_adaptive_weighting_and_gradients():
    """Loss = mean of ‖Δ‖²/(‖Δ‖² + c)^p with a detached weight: p = 0 is the plain squared error."""
    model = TinyAverageVelocity(seed=7)
    x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    noise = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    times = sample_times(8, MeanFlowSettings(ratio_r_not_t=0.5), torch.Generator().manual_seed(10))
    times = tuple(x.double() for x in times)
    plain = meanflow_loss(model, x0, settings=MeanFlowSettings(adaptive_power=0.0), noise=noise, times=times)
    r, t = times
    z = (1 - t[:, None]) * x0 + t[:, None] * noise
    error = (model(z, r, t) - meanflow_target(model, z, r, t, noise - x0)).square().sum(1)
    torch.testing.assert_close(plain, error.mean())
    weighted = meanflow_loss(model, x0, noise=noise, times=times)
    torch.testing.assert_close(weighted, (error / (error.detach() + 1e-3)).mean())
    weighted.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_time_sampling():
    settings = MeanFlowSettings(ratio_r_not_t=0.25)
    r, t = sample_times(20000, settings, torch.Generator().manual_seed(11))
    assert bool((r <= t).all()) and bool((r > 0).all()) and bool((t < 1).all())
    assert float((r < t).float().mean()) == pytest.approx(0.25, abs=0.015)
    with pytest.raises(ValueError, match="ratio_r_not_t must be in \\[0, 1\\]"):
        MeanFlowSettings(ratio_r_not_t=1.5)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        meanflow_sample(exact_point_model(torch.zeros(1, 2)), torch.zeros(2, 2), nfe=0)


def test_target_through_a_dit_with_attention():
    """The Jacobian-vector product runs through piflow's DiT (attention included) and matches differences."""
    from piflow.models import DiT

    torch.manual_seed(12)
    dit = DiT.from_preset("DiT-S/2", in_channels=1, input_size=8, num_classes=10).double()
    with torch.no_grad():
        dit.proj_out.weight.normal_(0, 0.05)                  # DiT zero-initialises its output layer
    labels = torch.tensor([3, 7])

    def model(z, r, t, cond):
        return dit(z, 1000 * t, cond) + r.reshape(-1, 1, 1, 1) * z

    g = torch.Generator().manual_seed(13)
    z, v = (torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, r = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64)
    target = meanflow_target(model, z, r, t, v, labels)
    h = 1e-6
    with torch.no_grad():
        derivative = (model(z + h * v, r, t + h, labels) - model(z - h * v, r, t - h, labels)) / (2 * h)
    assert float(derivative.abs().max()) > 1e-3                  # the check is not trivially zero
    torch.testing.assert_close(target, v - (t - r).reshape(-1, 1, 1, 1) * derivative, rtol=1e-6, atol=1e-7)


def test_average_velocity_net_starts_as_its_backbone_and_sees_the_interval(tiny_dit):
    from piflow.methods.meanflow import AverageVelocityNet, meanflow_target
    from piflow.models import MLPVelocityModel2D

    dit = tiny_dit()
    cases = [(dit, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])),
             (MLPVelocityModel2D(hidden_size=32, num_layers=2), torch.randn(4, 2), None)]
    t, r = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.1, 0.7, 0.2, 0.0])
    for backbone, z, cond in cases:
        net = AverageVelocityNet(backbone)
        # zero-initialised interval embedding: u(z, r, t) = v(z, t) for every r
        torch.testing.assert_close(net(z, r, t, cond), backbone(z, t * 1000.0, cond))
        with torch.no_grad():
            net.interval_embedder[2].weight.normal_(0.0, 0.1)
        assert not torch.allclose(net(z, r, t, cond), net(z, t, t, cond))
        # MeanFlow's identity at r = t: the target is the instantaneous velocity itself
        v = torch.randn_like(z)
        torch.testing.assert_close(meanflow_target(net, z, t, t, v, cond), v)
    with pytest.raises(TypeError, match="extra_condition"):
        AverageVelocityNet(torch.nn.Linear(2, 2))
