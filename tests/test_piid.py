"""Tests for piflow.piid: segment sampling, the π-ID segment loss, trajectory mixing and the data-free variant."""
import pytest
import torch

import piflow.piid as piid_module
from piflow.models import MLPVelocityModel2D
from piflow.models.students import PolicyStudent
from piflow.piid import piid_data_free_loss, piid_loss, piid_segment_loss, sample_segments
from piflow.schedule import segment_grid
from piflow.policies.dx import DXPolicy
from piflow.policies.gmflow import GMFlowPolicy
from piflow.settings import PiIDSettings
from piflow.teachers import GaussianMixtureTeacher

pytestmark = pytest.mark.usefixtures("single_thread")


def S(**fields) -> PiIDSettings:
    """Settings for these tests: no policy dropout unless asked for (the segment-level default)."""
    fields.setdefault("policy_dropout", fields.pop("gm_dropout", 0.0))
    return PiIDSettings(**fields)


def _warp(tau, m):
    return m * tau / (1 + (m - 1) * tau)


def make_teacher():
    means = torch.tensor([[-1.2, 0.6], [1.0, 1.0], [0.4, -1.3]], dtype=torch.float64)
    return GaussianMixtureTeacher(means, 0.35, torch.tensor([0.4, 0.35, 0.25]))


class RecordingTeacher:
    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def __call__(self, x, sigma, cond=None):
        self.calls.append((x.clone(), sigma.clone(), x.requires_grad, x.grad_fn, torch.is_grad_enabled()))
        return self.teacher(x, sigma, cond)


@pytest.mark.parametrize("nfe,f", [(4, 0.5), (2, 1.0), (3, 0.25)])
def test_sample_segments_distribution(nfe, f):
    base = 1.0 / (nfe - 1 + f)
    starts = torch.tensor([(i + f) * base for i in range(nfe)], dtype=torch.float64)   # f·base, (1+f)·base, …, 1
    sizes = torch.tensor([f * base] + [base] * (nfe - 1), dtype=torch.float64)
    n = 200_000
    tau_src, seg = sample_segments(n, nfe, f, generator=torch.Generator().manual_seed(0))
    assert tau_src.shape == (n,) and seg.shape == (n,) and tau_src.dtype == torch.float32
    idx = (tau_src.double()[:, None] - starts[None]).abs().argmin(1)
    # τ_src are exactly the segment starts
    torch.testing.assert_close(tau_src.double(), starts[idx].float().double(), rtol=0, atol=1e-6)
    assert float(starts[-1]) == pytest.approx(1.0)
    # segment sizes belong to the segment
    torch.testing.assert_close(seg.double(), sizes[idx].float().double(), rtol=0, atol=1e-6)
    # frequencies ∝ segment lengths (chi-square, nfe − 1 d.o.f., threshold ≈ p < 1e-4)
    counts = torch.bincount(idx, minlength=nfe).double()
    expected = n * sizes / sizes.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (counts, expected)
    assert float(sizes.sum()) == pytest.approx(1.0)


def test_sample_segments_single_step_and_errors():
    tau_src, seg = sample_segments(1000, 1, generator=torch.Generator().manual_seed(1))
    assert bool((tau_src == 1).all()) and bool((seg == 1).all())
    tau_src, seg = sample_segments(1000, 1, 0.5, generator=torch.Generator().manual_seed(1))
    assert bool((tau_src == 1).all()) and bool((seg == 1).all())   # a single segment always spans [0, 1]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="nfe"):
            sample_segments(10, bad)
    with pytest.raises(ValueError):
        sample_segments(10, 2, final_step_size_scale=0.0)
    assert segment_grid(4, 0.5) == pytest.approx([1.0, 1 - 1 / 3.5, 1 - 2 / 3.5, 0.5 / 3.5])


def exact_student(teacher):
    return lambda x, s, c: teacher.policy(x, s)


def wrong_student(teacher):
    def student(x, s, c):
        p = teacher.policy(x, s)
        return GMFlowPolicy.from_x0(p.means + 0.7, p.logits, p.var, p.x_src, p.sigma_src)
    return student


@pytest.mark.parametrize("nfe", [1, 2, 4])
@pytest.mark.parametrize("shift,f", [(1.0, 1.0), (3.2, 0.5)])
def test_loss_vanishes_for_exact_policy(nfe, shift, f):
    teacher = make_teacher()
    g = torch.Generator().manual_seed(nfe)
    x0 = teacher.sample(64, generator=g)
    out = piid_loss(exact_student(teacher), teacher, x0, None,
                    S(nfe=nfe, final_step_size_scale=f, shift=shift, window_substeps=0, num_intermediate_states=3),
                    generator=g)
    assert float(out.loss) < 1e-6
    assert out.sigma_teacher.shape == (3 * 64,)
    bad = piid_loss(wrong_student(teacher), teacher, x0, None,
                    S(nfe=nfe, final_step_size_scale=f, shift=shift, num_intermediate_states=3),
                    generator=torch.Generator().manual_seed(nfe))
    assert float(bad.loss) > 0.1
    # DX constant-x0 policy at the network output: wrong everywhere except the source state
    dx = piid_loss(lambda x, s, c: DXPolicy(teacher.velocity(x, s).unsqueeze(1), x, s), teacher, x0, None,
                   S(nfe=nfe, final_step_size_scale=f, shift=shift), generator=torch.Generator().manual_seed(nfe))
    assert float(dx.loss) > 1e-4


def test_loss_formula_and_gradients_reach_only_the_grad_policy():
    teacher = make_teacher()
    g = torch.Generator().manual_seed(3)
    B, K = 16, 4
    sigma_src = torch.rand(B, generator=g) * 0.7 + 0.3
    tau_src = sigma_src.clone()                                  # shift 1
    seg = torch.full((B,), 0.25)
    x_src = (1 - sigma_src[:, None]) * teacher.sample(B, generator=g) + sigma_src[:, None] * torch.randn(B, 2,
                                                                                                  generator=g)
    means = torch.randn(B, K, 2, generator=g).requires_grad_(True)
    logits = torch.randn(B, K, 1, generator=g).requires_grad_(True)
    logstds = torch.full((B,), -1.0).requires_grad_(True)
    policy = GMFlowPolicy(means, logstds, torch.log_softmax(logits, 1), x_src, sigma_src)
    rec = RecordingTeacher(teacher)
    out = piid_segment_loss(policy, rec, None, tau_src, seg, S(num_intermediate_states=3, loss_scale=3.0),
                            generator=torch.Generator().manual_seed(4))
    assert len(rec.calls) == 3
    for x, sigma, req, fn, grad_enabled in rec.calls:
        assert not req and fn is None and not grad_enabled         # teacher sees states computed without grad
        assert bool((sigma <= sigma_src + 1e-6).all()) and bool((sigma >= sigma_src - seg - 1e-6).all())
    out.loss.backward()
    grads = [t.grad.clone() for t in (means, logits, logstds)]
    for grad in grads:
        assert grad is not None and float(grad.abs().sum()) > 0
    # independent re-computation: ½·scale·mean ‖π(x_a, σ_a) − u_teacher(x_a, σ_a)‖² over the recorded states,
    # with x_a treated as constants — identical loss and identical gradients
    for t in (means, logits, logstds):
        t.grad = None
    policy = GMFlowPolicy(means, logstds, torch.log_softmax(logits, 1), x_src, sigma_src)
    terms = [((policy.velocity(x, s) - teacher.velocity(x, s)) ** 2).mean(1) for x, s, *_ in rec.calls]
    manual = 3.0 * 0.5 * torch.cat(terms).mean()
    torch.testing.assert_close(out.loss.detach(), manual.detach(), rtol=1e-5, atol=1e-7)
    manual.backward()
    for t, grad in zip((means, logits, logstds), grads):
        torch.testing.assert_close(t.grad, grad, rtol=1e-4, atol=1e-6)


def test_teacher_states_follow_detached_student_rollout():
    # ρ = 0: the M query states are points of the detached policy's own rollout from x_src (sorted in time)
    teacher = make_teacher()
    g = torch.Generator().manual_seed(5)
    B = 8
    sigma_src = torch.full((B,), 0.9)
    x_src = torch.randn(B, 2, generator=g) * 0.9
    policy = teacher.policy(x_src, sigma_src)
    rec = RecordingTeacher(teacher)
    piid_segment_loss(policy, rec, None, sigma_src.clone(), torch.full((B,), 0.6), S(num_intermediate_states=4),
                      generator=torch.Generator().manual_seed(6))
    sigmas = torch.stack([c[1] for c in rec.calls])                  # (M, B)
    assert bool((sigmas.diff(dim=0) <= 0).all())                     # sorted order statistics
    assert bool((sigmas <= 0.9).all()) and bool((sigmas >= 0.3 - 1e-6).all())
    # the recorded states lie on the exact policy's trajectory = the teacher ODE (up to Euler error)
    from piflow.rollout import rollout
    for x, s, *_ in rec.calls:
        ref = rollout(policy, x_src, sigma_src, s, total_substeps=4096)
        torch.testing.assert_close(x, ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_teacher_ratio_one_walks_the_teacher_euler_path(shift):
    teacher = make_teacher()
    g = torch.Generator().manual_seed(7)
    B, M = 6, 4
    tau_src = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    seg = torch.tensor([0.5, 0.3, 0.2, 0.6, 0.1, 0.4])
    sigma_src = _warp(tau_src, shift)
    x_src = torch.randn(B, 2, generator=g)
    results = []
    for policy in (teacher.policy(x_src, sigma_src), wrong_student(teacher)(x_src, sigma_src, None)):
        rec = RecordingTeacher(teacher)
        piid_segment_loss(policy, rec, None, tau_src, seg, S(num_intermediate_states=M, shift=shift), teacher_ratio=1.0,
                          generator=torch.Generator().manual_seed(8))
        xs = [c[0] for c in rec.calls]
        ss = [c[1] for c in rec.calls]
        torch.testing.assert_close(xs[0], x_src)                                 # first query at the source
        torch.testing.assert_close(ss[0], sigma_src)
        for j in range(1, M):
            u_prev = teacher(xs[j - 1], ss[j - 1])
            expected = xs[j - 1] + u_prev * (ss[j] - ss[j - 1])[:, None]
            torch.testing.assert_close(xs[j], expected, rtol=0, atol=1e-6)
            assert bool((ss[j] <= ss[j - 1]).all())
        # the teacher intervals stay inside the segment
        assert bool((ss[-1] >= _warp(tau_src - seg, shift) - 1e-6).all())
        results.append(torch.stack(xs))
    # states do not depend on the student at all with ρ = 1 (behaviour cloning)
    torch.testing.assert_close(results[0], results[1])


def _mlp_student(seed=0):
    torch.manual_seed(seed)
    return PolicyStudent(MLPVelocityModel2D(hidden_size=32, num_layers=2), policy="gmflow", num_components=3,
                         logstd_hidden=16, generator=torch.Generator().manual_seed(seed))


def _as_policy(module):
    def student(x, s, c):
        out = module(x, s, c)
        return GMFlowPolicy(out["means"], out["logstds"], out["logweights"], x, s)
    return student


@pytest.mark.parametrize("nfe,f,shift", [(2, 1.0, 1.0), (4, 0.5, 3.2)])
def test_data_free_loss_exact_policy_and_segment_weighting(nfe, f, shift, monkeypatch):
    teacher = make_teacher()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(9))
    total = piid_data_free_loss(exact_student(teacher), teacher, noise, None,
                                S(nfe=nfe, final_step_size_scale=f, shift=shift), backward=None,
                                generator=torch.Generator().manual_seed(10))
    assert float(total) < 1e-6
    # segment-length weighting: total = Σ_k S_k·L_k, student evaluated at σ = warp(τ_k) on the segment grid
    seen, losses = [], []
    original = piid_module.piid_segment_loss

    def spy(policy, *args, **kwargs):
        out = original(policy, *args, **kwargs)
        losses.append(float(out.loss))
        return out

    def student(x, s, c):
        seen.append(s.clone())
        return wrong_student(teacher)(x, s, c)

    monkeypatch.setattr(piid_module, "piid_segment_loss", spy)
    total = piid_data_free_loss(student, teacher, noise, None, S(nfe=nfe, final_step_size_scale=f, shift=shift),
                                backward=None, generator=torch.Generator().manual_seed(11))
    base = 1.0 / (nfe - 1 + f)
    sizes = [base] * (nfe - 1) + [f * base]
    starts = [1.0 - k * base for k in range(nfe)]
    assert len(losses) == nfe
    assert float(total) == pytest.approx(sum(s * l for s, l in zip(sizes, losses)), rel=1e-5)
    for s, tau in zip(seen, starts):
        torch.testing.assert_close(s, torch.full_like(s, _warp(tau, shift)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("nfe,f,shift", [(2, 1.0, 1.0), (4, 0.5, 3.2)])
def test_data_free_walks_the_students_own_trajectory(nfe, f, shift):
    # each segment starts where the previous segment's detached rollout ended: with the exact policy that is the
    # teacher ODE solution at the segment start
    from piflow.rollout import rollout
    teacher = make_teacher()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(60))
    inputs = []

    def student(x, s, c):
        inputs.append((x.clone(), s.clone()))
        return teacher.policy(x, s)

    piid_data_free_loss(student, teacher, noise, None, S(nfe=nfe, final_step_size_scale=f, shift=shift), backward=None,
                        generator=torch.Generator().manual_seed(61))
    assert len(inputs) == nfe and torch.equal(inputs[0][0], noise)
    flow = teacher.policy(noise, 1.0)
    for x, s in inputs[1:]:
        ref = rollout(flow, noise, 1.0, s, total_substeps=2048, shift=shift)
        err = (x - ref).abs()
        moved = float((x - noise).abs().mean())
        assert float(err.mean()) < 0.01 and float(err.max()) < 0.1 and float(err.mean()) < 0.2 * moved


def test_data_free_per_step_backward_equals_single_backward():
    teacher = make_teacher()
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(12))
    module = _mlp_student()
    kwargs = dict(nfe=3, final_step_size_scale=0.5, shift=2.0, gm_dropout=0.2, window_substeps=2,
                  num_intermediate_states=2, loss_scale=3.0)
    total_a = piid_data_free_loss(_as_policy(module), teacher, noise, None, S(**kwargs), backward=torch.Tensor.backward,
                                  generator=torch.Generator().manual_seed(13))
    assert not total_a.requires_grad
    grads_a = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert grads_a and any(float(g.abs().sum()) > 0 for g in grads_a.values())
    module.zero_grad(set_to_none=True)
    total_b = piid_data_free_loss(_as_policy(module), teacher, noise, None, S(**kwargs), backward=None,
                                  generator=torch.Generator().manual_seed(13))
    assert total_b.requires_grad
    total_b.backward()
    torch.testing.assert_close(total_a, total_b.detach(), rtol=1e-5, atol=1e-8)
    grads_b = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7)
    # a callable backward receives every step loss
    module.zero_grad(set_to_none=True)
    calls = []
    piid_data_free_loss(_as_policy(module), teacher, noise, None, S(**kwargs),
                        backward=lambda l: (calls.append(float(l.detach())), l.backward()),
                        generator=torch.Generator().manual_seed(13))
    assert len(calls) == 3 and sum(calls) == pytest.approx(float(total_a), rel=1e-5)


def test_loss_scale_is_linear():
    teacher = make_teacher()
    x0 = teacher.sample(32, generator=torch.Generator().manual_seed(14))
    losses = [float(piid_loss(wrong_student(teacher), teacher, x0, None, S(nfe=2, loss_scale=scale),
                              generator=torch.Generator().manual_seed(15)).loss) for scale in (1.0, 7.5)]
    assert losses[1] == pytest.approx(7.5 * losses[0], rel=1e-6)


def test_window_loss_small_but_finite_for_exact_policy():
    teacher = make_teacher()
    x0 = teacher.sample(64, generator=torch.Generator().manual_seed(16))
    out = piid_loss(exact_student(teacher), teacher, x0, None,
                    S(nfe=4, final_step_size_scale=0.5, shift=3.2, window_substeps=3),
                    generator=torch.Generator().manual_seed(17))
    # the window-mean policy velocity differs from the instantaneous teacher velocity by O(window):
    # far above the ~1e-12 of local matching, far below a wrong policy
    assert 1e-5 < float(out.loss) < 1e-2
    assert bool(torch.isfinite(out.loss))


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_window_prediction_is_the_mean_velocity_over_the_window(shift):
    from piflow.rollout import average_velocity
    teacher = make_teacher()
    g = torch.Generator().manual_seed(40)
    B, T, w = 6, 128, 3
    tau_src = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.5, 0.4])
    seg = torch.tensor([0.4, 0.3, 0.5, 0.25, 0.2, 0.4])
    sigma_src = _warp(tau_src, shift)
    x_src = torch.randn(B, 2, generator=g)
    policy = teacher.policy(x_src, sigma_src)
    rec = RecordingTeacher(teacher)
    out = piid_segment_loss(policy, rec, None, tau_src, seg,
                            S(num_intermediate_states=2, window_substeps=w, total_substeps=T, shift=shift),
                            generator=torch.Generator().manual_seed(41))
    delta = (w * seg / torch.round(seg * T)).reshape(B, 1)
    terms = []
    for x_a, s_a, *_ in rec.calls:
        tau_a = (s_a.double() / (shift + (1 - shift) * s_a.double())).float().reshape(B, 1)   # unwarp by hand
        u_pred = average_velocity(policy, x_a, tau_a, (tau_a - delta).clamp(min=0), T, shift,
                                  sigma_a=s_a.reshape(B, 1))
        terms.append(((u_pred - teacher(x_a, s_a)) ** 2).mean(1))
    manual = 3.0 * 0.5 * torch.cat(terms).mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-4, atol=1e-9)


def test_forward_diffusion_of_the_data():
    # x_src = (1 − σ_src)·x0 + σ_src·ε with σ_src = warp(τ_src): check the standardised residual per segment
    teacher = make_teacher()
    B, shift, c = 6000, 3.2, 3.0
    seen = []

    def student(x, s, cond):
        seen.append((x.clone(), s.clone()))
        return teacher.policy(x, s)

    x0 = torch.full((B, 2), c)
    piid_loss(student, teacher, x0, None,
              S(nfe=4, final_step_size_scale=0.5, shift=shift, num_intermediate_states=1, total_substeps=16),
              generator=torch.Generator().manual_seed(50))
    x, s = seen[0]
    base = 1 / 3.5
    for tau in (0.5 * base, 1.5 * base, 2.5 * base, 1.0):
        sigma = _warp(tau, shift)
        sel = (s - sigma).abs() < 1e-5
        assert int(sel.sum()) > 300
        z = (x[sel] - (1 - sigma) * c) / sigma
        assert abs(float(z.mean())) < 0.1 and float(z.std()) == pytest.approx(1.0, abs=0.08)


def test_teacher_ratio_schedule():
    from piflow.schedule import teacher_ratio
    assert teacher_ratio(0, 10) == 1.0
    assert teacher_ratio(5, 10) == pytest.approx(0.5)
    assert teacher_ratio(10, 10) == 0.0 and teacher_ratio(50, 10) == 0.0
    assert teacher_ratio(-3, 10) == 1.0
    assert teacher_ratio(0, 0) == 0.0 and teacher_ratio(100, 0) == 0.0


def test_segment_loss_validation():
    teacher = make_teacher()
    x = torch.randn(4, 2)
    policy = teacher.policy(x, 0.8)
    tau, seg = torch.full((4,), 0.8), torch.full((4,), 0.5)
    for kwargs, name in ((dict(num_intermediate_states=0), "num_intermediate_states"),
                         (dict(window_substeps=-1), "window_substeps"), (dict(gm_dropout=1.0), "policy_dropout")):
        with pytest.raises(ValueError, match=name):
            piid_segment_loss(policy, teacher, None, tau, seg, S(**kwargs))
    with pytest.raises(ValueError, match="teacher_ratio"):
        piid_segment_loss(policy, teacher, None, tau, seg, S(), teacher_ratio=1.5)
    with pytest.raises(ValueError):
        piid_segment_loss(policy, teacher, None, tau[:3], seg, S())
    # policy dropout applies to DX policies too (algorithm.md §14): the detached rollout copy is perturbed
    dx = DXPolicy(torch.randn(4, 3, 2), x, 0.8)
    kept = piid_segment_loss(dx, teacher, None, tau, seg, S(), return_x_dst=True,
                             generator=torch.Generator().manual_seed(0))
    dropped = piid_segment_loss(dx, teacher, None, tau, seg, S(policy_dropout=0.5), return_x_dst=True,
                                generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(kept.x_dst, dropped.x_dst)


@pytest.mark.parametrize("window", [0, 3])
def test_teacher_ratio_one_reaches_the_window_start(window):
    # ρ = 1: the M teacher Euler steps cover exactly S − Δ (Δ = w·S/round(S·T)); the remaining Δ is rolled out
    # with the detached policy. A constant-x0 (DX N=1) policy makes that last rollout analytic:
    # x_dst = x̂0 + (σ_end/σ_b)(x_b − x̂0).
    teacher = make_teacher()
    g = torch.Generator().manual_seed(30)
    B, M, T, shift = 5, 3, 128, 3.2
    tau_src = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.35])
    seg = torch.tensor([0.3, 0.5, 0.2, 0.4, 0.35])
    sigma_src = _warp(tau_src, shift)
    x_src = torch.randn(B, 2, generator=g)
    u_net = torch.randn(B, 1, 2, generator=g)
    policy = DXPolicy(u_net, x_src, sigma_src)
    x0_hat = x_src - sigma_src[:, None] * u_net[:, 0]
    rec = RecordingTeacher(teacher)
    out = piid_segment_loss(policy, rec, None, tau_src, seg,
                            S(num_intermediate_states=M, window_substeps=window, total_substeps=T, shift=shift),
                            teacher_ratio=1.0, return_x_dst=True, generator=torch.Generator().manual_seed(31))
    x_last, s_last = rec.calls[-1][0].double(), rec.calls[-1][1].double()
    delta = window * seg.double() / torch.round(seg.double() * T)
    sigma_b = _warp(tau_src.double() - seg.double() + delta, shift)
    x_b = x_last + teacher(x_last, s_last) * (sigma_b - s_last)[:, None]
    sigma_end = _warp((tau_src.double() - seg.double()).clamp(min=0), shift)
    ratio = torch.where(sigma_b > 0, sigma_end / sigma_b.clamp(min=1e-12), torch.ones_like(sigma_b))  # 0-length: x_b
    expected = x0_hat.double() + ratio[:, None] * (x_b - x0_hat.double())
    torch.testing.assert_close(out.x_dst.double(), expected, rtol=0, atol=2e-5)


def test_gm_dropout_perturbs_only_the_rollout_copy():
    # With GM dropout the teacher is queried on states of the *dropped* detached policy (each state equals the
    # rollout of the policy restricted to some non-empty component subset), while the prediction uses the
    # undropped grad policy.
    from itertools import combinations

    from piflow.rollout import rollout
    teacher = make_teacher()
    g = torch.Generator().manual_seed(20)
    B, K = 12, 3
    sigma_src = torch.full((B,), 0.9)
    x_src = torch.randn(B, 2, generator=g) * 0.9
    means = (torch.randn(B, K, 2, generator=g) * 1.5).requires_grad_(True)
    logits = torch.zeros(B, K, 1, requires_grad=True)
    logstds = torch.full((B,), -1.0, requires_grad=True)
    policy = GMFlowPolicy(means, logstds, torch.log_softmax(logits, 1), x_src, sigma_src)
    rec = RecordingTeacher(teacher)
    out = piid_segment_loss(policy, rec, None, sigma_src.clone(), torch.full((B,), 0.8),
                            S(num_intermediate_states=1, policy_dropout=0.5),
                            generator=torch.Generator().manual_seed(21))
    x_a, s_a = rec.calls[0][0], rec.calls[0][1]
    subsets = [list(c) for r in range(1, K + 1) for c in combinations(range(K), r)]
    proper = 0
    for b in range(B):
        matches = []
        for keep in subsets:
            sub = GMFlowPolicy(means[b:b + 1, keep].detach(), logstds[b:b + 1].detach(),
                               torch.log_softmax(logits[b:b + 1, keep].detach(), 1), x_src[b:b + 1], 0.9)
            xr = rollout(sub, x_src[b:b + 1], 0.9, s_a[b:b + 1], total_substeps=128)
            if float((xr - x_a[b:b + 1]).abs().max()) < 1e-5:
                matches.append(len(keep))
        assert matches, f"sample {b}: state is not a rollout of any component subset"
        proper += max(matches) < K
    assert proper >= 2                               # dropout really acted on several samples
    # prediction from the full policy
    full = GMFlowPolicy(means, logstds, torch.log_softmax(logits, 1), x_src, sigma_src)
    manual = 3.0 * 0.5 * ((full.velocity(x_a, s_a) - teacher(x_a, s_a)) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), manual.detach(), rtol=1e-5, atol=1e-7)
