"""Tests for piflow.sampling: the FlowMapSDE scheduler, the policy sampling loop and the teacher ODE samplers."""
import math

import pytest
import torch

from piflow.policies.gmflow import GMFlowPolicy
from piflow.sampling import FlowMapSDESchedule, euler_sample, rk4_sample, sample
from piflow.schedule import auto_temperature
from piflow.teachers import GaussianMixtureTeacher

pytestmark = pytest.mark.usefixtures("single_thread")


def make_teacher():
    means = torch.tensor([[-1.2, 0.6], [1.0, 1.0], [0.4, -1.3]], dtype=torch.float64)
    return GaussianMixtureTeacher(means, 0.35, torch.tensor([0.4, 0.35, 0.25]))


def test_scheduler_grid_flux_4_nfe():
    sched = FlowMapSDESchedule(shift=3.2, final_step_size_scale=0.5, num_train_timesteps=1.0)
    sched.set_timesteps(4)
    expected = torch.tensor([1.0, 0.8889, 0.7059, 0.3478, 0.0])
    torch.testing.assert_close(sched.sigmas, expected, rtol=0, atol=5e-5)
    # h = 0: rollouts end at the next grid point, timesteps = σ·S_t
    torch.testing.assert_close(sched.sigmas_dst, sched.sigmas[1:])
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1])
    # raw grid 1, 0.7143, 0.4286, 0.1429 (by hand)
    raw = torch.tensor([1.0, 1 - 1 / 3.5, 1 - 2 / 3.5, 0.5 / 3.5], dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas[:-1].double(), 3.2 * raw / (1 + 2.2 * raw), rtol=0, atol=1e-6)


def test_scheduler_grid_imagenet_2_nfe():
    sched = FlowMapSDESchedule(shift=1.0, final_step_size_scale=1.0, num_train_timesteps=1000.0)
    sched.set_timesteps(2)
    torch.testing.assert_close(sched.sigmas, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(sched.timesteps, torch.tensor([1000.0, 500.0]))
    torch.testing.assert_close(sched.timesteps_dst, torch.tensor([500.0, 0.0]))


def test_h_zero_step_is_identity():
    sched = FlowMapSDESchedule(shift=3.2, final_step_size_scale=0.5, h=0.0)
    sched.set_timesteps(4)
    x = torch.randn(5, 3)
    for i in range(4):
        out = sched.step(x, i, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, x)
    with pytest.raises(ValueError):
        sched.step(x, 4)
    with pytest.raises(RuntimeError):
        FlowMapSDESchedule().step(x, 0)


def test_h_inf_renoises_from_zero():
    sched = FlowMapSDESchedule(shift=3.2, final_step_size_scale=0.5, h="inf")
    sched.set_timesteps(4)
    assert bool((sched.sigmas_dst == 0).all())
    n = 200_000
    x0 = 1.3
    for i in range(3):
        sigma_to = float(sched.sigmas[i + 1])
        out = sched.step(torch.full((n,), x0), i, generator=torch.Generator().manual_seed(i))
        # x_next = α_to·x0 + σ_to·z
        assert float(out.mean()) == pytest.approx((1 - sigma_to) * x0, abs=4 * sigma_to / math.sqrt(n))
        assert float(out.std()) == pytest.approx(sigma_to, rel=0.01)
        zero = sched.step(torch.zeros(n), i, generator=torch.Generator().manual_seed(10 + i))
        assert float(zero.std()) == pytest.approx(sigma_to, rel=0.01)
    # the last step lands on σ = 0: no noise
    last = torch.randn(7)
    torch.testing.assert_close(sched.step(last, 3), last)


@pytest.mark.parametrize("h", [0.3, 0.7, 1.0, 2.0])
def test_intermediate_h_preserves_marginals(h):
    sched = FlowMapSDESchedule(shift=3.2, final_step_size_scale=0.5, h=h)
    sched.set_timesteps(4)
    n = 200_000
    x0 = 1.3
    for i in range(4):
        s_src, s_to, s_dst = float(sched.sigmas[i]), float(sched.sigmas[i + 1]), float(sched.sigmas_dst[i])
        a_src, a_to = 1 - s_src, 1 - s_to
        # σ_dst by hand: m = (σ_to α_src / (σ_src α_to))^(h²), σ_dst = σ_to m / (α_to + σ_to m)
        m = (s_to * a_src / (s_src * a_to)) ** (h * h)
        assert s_dst == pytest.approx(s_to * m / (a_to + s_to * m), abs=1e-6)
        assert s_dst <= s_to + 1e-7
        g = torch.Generator().manual_seed(100 + i)
        x_dst = (1 - s_dst) * x0 + s_dst * torch.randn(n, generator=g)
        out = sched.step(x_dst, i, generator=g)
        assert float(out.mean()) == pytest.approx((1 - s_to) * x0, abs=4 * max(s_to, 1e-3) / math.sqrt(n))
        if s_to > 0:
            assert float(out.std()) == pytest.approx(s_to, rel=0.01)
        else:
            assert float(out.std()) == pytest.approx(0.0, abs=1e-6)


def test_scheduler_validation():
    with pytest.raises(ValueError):
        FlowMapSDESchedule(h=-1.0)
    with pytest.raises(ValueError):
        FlowMapSDESchedule(h="infinity")
    with pytest.raises(ValueError):
        FlowMapSDESchedule(shift=0.0)
    with pytest.raises(ValueError):
        FlowMapSDESchedule().set_timesteps(0)


def exact_student(teacher):
    return lambda x, s, c: teacher.policy(x, s)


@pytest.mark.parametrize("nfe,shift,f", [(1, 1.0, 1.0), (2, 1.0, 1.0), (4, 1.0, 1.0), (4, 3.2, 0.5)])
def test_sample_with_exact_policy_matches_teacher_ode(nfe, shift, f):
    teacher = make_teacher()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(nfe))
    reference = rk4_sample(teacher, noise.double(), 100, shift=shift)
    x = sample(exact_student(teacher), noise, nfe, shift=shift, final_step_size_scale=f)
    assert x.shape == noise.shape and x.dtype == noise.dtype
    err = (x.double() - reference).abs()
    # 128 substeps per unit raw time: first-order rollout error (a few samples near mode boundaries are worse)
    assert float(err.mean()) < 0.015 and float(err.max()) < 0.2, (float(err.mean()), float(err.max()))
    # compare: the teacher's own Euler sampler with the same NFE is far worse
    euler_err = (euler_sample(teacher, noise.double(), nfe, shift=shift) - reference).abs()
    assert float(err.mean()) < float(euler_err.mean()) / 5, (float(err.mean()), float(euler_err.mean()))
    # more substeps → closer (first-order rollout error)
    x_fine = sample(exact_student(teacher), noise, nfe, shift=shift, final_step_size_scale=f, total_substeps=512)
    assert float((x_fine.double() - reference).abs().mean()) < float(err.mean()) / 2.5
    # the exact policy is the teacher's flow at every state: re-evaluating it at each step changes nothing, so
    # sampling equals one rollout of the first step's policy when the step boundaries fall on substep boundaries
    if f == 1.0 and shift == 1.0:
        from piflow.rollout import rollout
        single = rollout(teacher.policy(noise, 1.0), noise, 1.0, 0.0, total_substeps=128)
        torch.testing.assert_close(x, single, rtol=0, atol=1e-4)
    # trajectory: states at every grid point, starting from the noise
    x2, traj = sample(exact_student(teacher), noise, nfe, shift=shift, final_step_size_scale=f,
                      return_trajectory=True)
    assert len(traj) == nfe + 1 and torch.equal(traj[0], noise) and torch.equal(traj[-1], x2)


def test_single_gaussian_flow_map_closed_form():
    # For data N(m, std²I) the probability-flow ODE maps noise z linearly: x(σ=0) = m + std·z.
    m = torch.tensor([[0.8, -0.5]], dtype=torch.float64)
    teacher = GaussianMixtureTeacher(m, 0.3)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = m + 0.3 * noise
    torch.testing.assert_close(rk4_sample(teacher, noise, 100), exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(rk4_sample(teacher, noise, 100, shift=3.0), exact, rtol=0, atol=1e-6)
    # the exact GM policy of a single Gaussian integrates this ODE: sampling error → 0 with substeps
    errors = [float((sample(exact_student(teacher), noise.float(), 2, total_substeps=t).double() - exact).abs().max())
              for t in (32, 256)]
    assert errors[1] < errors[0] / 4 and errors[1] < 1e-2, errors


def test_auto_temperature_rule_and_application():
    assert auto_temperature(1) == 0.0
    assert auto_temperature(4) == pytest.approx(0.3)
    assert auto_temperature(8) == pytest.approx(0.7)
    assert auto_temperature(11) == pytest.approx(1.0)
    assert auto_temperature(30) == 1.0

    applied = []

    class RecordingPolicy(GMFlowPolicy):
        def temperature(self, temperature):
            applied.append(temperature)
            return super().temperature(temperature)

    teacher = make_teacher()

    def student(x, s, c):
        p = teacher.policy(x, s)
        return RecordingPolicy.from_x0(p.means, p.logits, p.var, p.x_src, p.sigma_src)

    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    sample(student, noise, 4, temperature="auto", total_substeps=16)
    assert applied == pytest.approx([0.3, 0.3, 0.3])            # never on the final step
    applied.clear()
    sample(student, noise, 3, temperature=0.5, total_substeps=16)
    assert applied == pytest.approx([0.5, 0.5])
    # temperature changes the result, T = 1 does not
    base = sample(exact_student(teacher), noise, 3, total_substeps=16)
    torch.testing.assert_close(sample(exact_student(teacher), noise, 3, temperature=1.0, total_substeps=16), base)
    assert float((sample(exact_student(teacher), noise, 3, temperature=0.3, total_substeps=16) - base).abs().max()) > 1e-3
    with pytest.raises(ValueError):
        sample(student, noise, 2, temperature="hot")


def test_student_is_evaluated_on_the_current_state():
    # (the exact GM policy does not depend on its x_src, so check the loop with a recording student)
    teacher = make_teacher()
    inputs = []

    def student(x, s, c):
        inputs.append((x.clone(), s.clone(), c))
        return teacher.policy(x, s)

    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(7))
    out, traj = sample(student, noise, 4, cond="label", shift=3.2, final_step_size_scale=0.5, total_substeps=16,
                       return_trajectory=True)
    sigmas = [1.0, 0.8889, 0.7059, 0.3478]
    assert len(inputs) == 4
    for (x, s, c), state, sigma in zip(inputs, traj[:-1], sigmas):
        assert torch.equal(x, state) and c == "label"
        torch.testing.assert_close(s, torch.full((8,), sigma), rtol=0, atol=5e-5)
    assert not torch.equal(traj[1], traj[0])


def test_sample_errors_and_stochastic_variant():
    teacher = make_teacher()
    noise = torch.randn(8, 2)
    with pytest.raises(ValueError):
        sample(exact_student(teacher), noise, 0)
    with pytest.raises(ValueError):
        sample(exact_student(teacher), noise * float("nan"), 2)
    out = sample(exact_student(teacher), noise, 3, h="inf", generator=torch.Generator().manual_seed(0),
                 total_substeps=16)
    assert out.shape == noise.shape and bool(torch.isfinite(out).all())


def test_euler_sample_one_step():
    teacher = make_teacher()
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(euler_sample(teacher, x, 1), x - teacher(x, torch.ones(10)), rtol=0, atol=1e-12)
    # two steps with shift 3: σ grid 1 → warp(0.5) = 0.75 → 0
    s1 = 0.75
    x1 = x + teacher(x, torch.ones(10)) * (s1 - 1)
    x2 = x1 + teacher(x1, torch.full((10,), s1)) * (0 - s1)
    torch.testing.assert_close(euler_sample(teacher, x, 2, shift=3.0), x2, rtol=0, atol=1e-12)


def test_euler_sample_from_a_mid_state_continues_the_full_run():
    """Started at state k of an n-step run (σ = warp(1 − k/n)) with n − k steps, the raw-time grid is the rest of
    the full run's grid, so the result is the full run's end, with or without a shift."""
    from piflow.sampling import euler_trajectory
    from piflow.timewarp import warp
    teacher = make_teacher()
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for shift in (1.0, 3.0):
        states = euler_trajectory(teacher, x, 8, shift=shift)
        sigma_k = float(warp(torch.tensor(1 - 3 / 8, dtype=torch.float64), shift))
        rest = euler_sample(teacher, states[3], 5, shift=shift, sigma_start=sigma_k)
        torch.testing.assert_close(rest, states[-1], rtol=0, atol=1e-10)


def test_euler_sample_from_a_mid_state_lands_on_a_point_mass():
    """A one-point teacher (std → 0) flows straight, x_σ = (1 − σ)·μ + σ·ε, so Euler is exact from any state on the
    way, on any grid."""
    mu = torch.tensor([[1.5, -0.5]])
    teacher = GaussianMixtureTeacher(mu, 1e-4)
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    sigma = 0.6
    x = (1 - sigma) * mu + sigma * eps
    for shift in (1.0, 3.0):
        out = euler_sample(teacher, x, 4, shift=shift, sigma_start=sigma)
        torch.testing.assert_close(out, mu.expand(8, 2), rtol=0, atol=1e-3)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sigma_start"):
            euler_sample(teacher, x, 4, sigma_start=bad)


def test_sample_takes_either_steps_or_a_prepared_schedule():
    teacher_policy = lambda x, s, c: GMFlowPolicy(torch.zeros(x.shape[0], 1, 2), torch.zeros(x.shape[0]),  # noqa: E731
                                                   torch.zeros(x.shape[0], 1, 1), x, s)
    schedule = FlowMapSDESchedule(shift=3.2, final_step_size_scale=0.5)
    noise = torch.randn(3, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        sample(teacher_policy, noise, schedule=schedule)
    schedule.set_timesteps(4)
    with pytest.raises(ValueError, match="not both"):
        sample(teacher_policy, noise, 2, schedule=schedule)
    out, trajectory = sample(teacher_policy, noise, schedule=schedule, return_trajectory=True)
    assert len(trajectory) == 5 and out.dtype == noise.dtype


def test_image_to_image_grid_and_start_state():
    """strength_raw_times keeps the last ⌊nfe·strength⌋ raw starts of the nfe-step grid; sample(init=x0) starts the
    first policy at (1 − σ_0)·x0 + σ_0·ε."""
    from piflow.schedule import segment_grid, strength_raw_times

    assert strength_raw_times(4, 1.0, 0.5) == segment_grid(4, 0.5)
    assert strength_raw_times(4, 0.5, 0.5) == segment_grid(4, 0.5)[2:]
    assert strength_raw_times(4, 0.25, 0.5) == segment_grid(4, 0.5)[3:]
    assert strength_raw_times(4, 0.2, 0.5) == []
    assert strength_raw_times(3, 2 / 3, 1.0) == pytest.approx([2 / 3, 1 / 3])      # ⌊3·(2/3)⌋ = 2 despite round-off
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="strength must be a number in"):
            strength_raw_times(4, bad)
    from piflow.teachers import GaussianMixtureTeacher

    teacher = GaussianMixtureTeacher(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), 0.2)
    gen = torch.Generator().manual_seed(0)
    noise, x0 = torch.randn(5, 2, generator=gen), torch.randn(5, 2, generator=gen)
    seen = []

    def policy_fn(x, sigma, cond):
        seen.append((x.clone(), float(sigma[0])))
        return teacher.policy(x, sigma)

    sample(policy_fn, noise, sigmas=[0.6, 0.3], shift=1.0, init=x0)
    assert [s for _, s in seen] == pytest.approx([0.6, 0.3])
    torch.testing.assert_close(seen[0][0], 0.4 * x0 + 0.6 * noise)
    with pytest.raises(ValueError, match="init must have the shape of noise"):
        sample(policy_fn, noise, sigmas=[0.6], init=x0[:2])
