"""DMD2's distribution-matching gradient, fake-score loss and few-step chains against exact Gaussian scores."""
import pytest
import torch

from piflow.methods.dmd2 import (DMD2Settings, backward_simulation, distribution_matching_gradient, dmd_loss,
                                   fake_score_loss)
from piflow.teachers import GaussianMixtureTeacher


def gaussian(mean: float, dim: int = 3) -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(torch.full((1, dim), float(mean)), std=1.0)


def test_gradient_is_zero_when_the_generator_samples_the_teachers_distribution():
    teacher = gaussian(0.5)
    x0 = teacher.means[0] + torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0.requires_grad_(True)
    loss = dmd_loss(x0, teacher, gaussian(0.5), generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert float(loss) == 0.0 and float(x0.grad.abs().max()) == 0.0


def test_gradient_equals_the_closed_form_and_points_to_the_teacher():
    """Real N(0, I), fake N(μ, I): x̂0_fake − x̂0_real = μ·σ²/((1 − σ)² + σ²) for every state."""
    mu, n = 2.0, 32
    g = torch.Generator().manual_seed(2)
    x0 = (mu + torch.randn(n, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    sigma = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    real, fake = gaussian(0.0), gaussian(mu)
    gradient = distribution_matching_gradient(x0, real, fake, noise=noise, sigma=sigma)
    x_t = (1 - sigma[:, None]) * x0.detach() + sigma[:, None] * noise
    x0_real = x_t - sigma[:, None] * real(x_t, sigma)
    scale = (x0.detach() - x0_real).abs().mean(dim=1, keepdim=True)
    expected = mu * sigma.square() / ((1 - sigma).square() + sigma.square())
    torch.testing.assert_close(gradient * scale, expected[:, None].expand(n, 3), rtol=1e-10, atol=1e-12)
    assert bool((gradient > 0).all())                       # descent lowers x0 towards the teacher's mean 0
    dmd_loss(x0, real, fake, noise=noise, sigma=sigma).backward()
    torch.testing.assert_close(x0.grad, gradient / x0.numel())


def test_fake_score_loss_is_lowest_at_the_generators_exact_velocity():
    generated = gaussian(-1.0)
    x0 = generated.means[0] + torch.randn(4096, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = fake_score_loss(generated, x0, generator=torch.Generator().manual_seed(4))
    for wrong in (gaussian(-0.5), gaussian(0.0), lambda x, s, c=None: generated(x, s) + 0.1):
        assert exact < fake_score_loss(wrong, x0, generator=torch.Generator().manual_seed(4))


class PointVelocity(torch.nn.Module):
    """A generator network whose x̂0 = x − σ·u is a fixed point (its velocity is (x − point)/σ at t = σ·S)."""

    def __init__(self, point: torch.Tensor, num_timesteps: float = 1000.0):
        super().__init__()
        self.point, self.num_timesteps, self.times = point, num_timesteps, []

    def forward(self, x, t, cond=None):
        self.times.append(float(t[0]))
        return (x - self.point) / (t / self.num_timesteps).reshape(-1, 1)


def test_few_step_sampling_renoises_the_generators_x0_with_fresh_noise():
    """Through the one sampling loop: a generator whose x̂0 is a fixed point is evaluated at σ = 1, .75, .5, .25;
    each step lands on the point and re-noises it to the next σ with the next fresh draw of the generator,
    x_k = (1 − σ_k)·point + σ_k·ε_k (the independent truth), and the last step returns the point."""
    from piflow.methods.dmd2 import DMD2Student

    point = torch.tensor([[0.3, -1.2, 2.0]])
    network = PointVelocity(point)
    student = DMD2Student(network, network)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    states = []
    out = student.sampler(4).sample(noise, generator=torch.Generator().manual_seed(9),
                                    on_step=lambda i, x: states.append(x.clone()))
    torch.testing.assert_close(out, point.expand(5, 3), rtol=0, atol=1e-5)
    assert network.times == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    fresh = torch.Generator().manual_seed(9)
    for k, sigma in enumerate((0.75, 0.5, 0.25)):
        expected = (1 - sigma) * point + sigma * torch.randn(5, 3, generator=fresh)
        torch.testing.assert_close(states[k], expected, rtol=0, atol=1e-5)


def test_backward_simulation():
    point = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)

    def point_generator(x, sigma, cond=None):
        return point.expand_as(x)

    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    state, sigma = backward_simulation(point_generator, noise, nfe=1)
    assert torch.equal(state, noise) and torch.equal(sigma, torch.ones(5, dtype=torch.float64))
    steps = set()
    for seed in range(20):
        state, sigma = backward_simulation(point_generator, noise, nfe=4, generator=torch.Generator().manual_seed(seed))
        steps.add(float(sigma[0]))
        if float(sigma[0]) < 1.0:      # re-noised generator output: x = (1 − σ)·point + σ·ε
            residual = (state - (1 - sigma[:, None]) * point) / sigma[:, None]
            assert float(residual.std()) > 0.3
    assert steps == {1.0, 0.75, 0.5, 0.25}


def test_settings_are_checked():
    from piflow.methods.dmd2 import DMD2Student

    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        DMD2Settings(sigma_min=0.5, sigma_max=0.4)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        DMD2Student(PointVelocity(torch.zeros(1, 3))).sampler(4).sample(torch.zeros(2, 3), nfe=0)


def test_training_loss_routes_gradients_by_iteration(tiny_dit):
    """Fake-score iterations touch only the fake score; every 5th also the generator, whose DM gradient is zero
    while the fake score still equals the teacher (both copies of it) — the known answer at initialisation."""
    import copy

    from piflow.methods.dmd2 import DMD2Student, training_loss
    from piflow.teachers import NetworkTeacher

    teacher_model = tiny_dit()
    teacher = NetworkTeacher(copy.deepcopy(teacher_model).requires_grad_(False), 1000.0)
    student = DMD2Student(copy.deepcopy(teacher_model))
    noise, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    for iteration, updates_generator in ((0, False), (4, True)):
        student.zero_grad(set_to_none=True)
        training_loss(student, teacher, noise, labels, iteration, nfe=1,
                      generator=torch.Generator().manual_seed(1)).backward()
        fake_grads = [p.grad for p in student.fake_score.parameters()]
        generator_grads = [p.grad for p in student.generator.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in fake_grads)
        if updates_generator:
            assert all(g is not None for g in generator_grads)
            assert max(float(g.abs().max()) for g in generator_grads) < 1e-6
        else:
            assert all(g is None for g in generator_grads)
    # once the fake score differs from the teacher, the generator does receive a gradient
    with torch.no_grad():
        for parameter in student.fake_score.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    student.zero_grad(set_to_none=True)
    training_loss(student, teacher, noise, labels, 4, nfe=4, generator=torch.Generator().manual_seed(2)).backward()
    assert max(float(p.grad.abs().max()) for p in student.generator.parameters()) > 1e-6
    samples = student.sampler(4).sample(noise, cond=labels, generator=torch.Generator().manual_seed(0))
    assert samples.shape == noise.shape and bool(torch.isfinite(samples).all())
