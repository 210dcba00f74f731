"""Tests for piflow.model.PiFlow with an MLP policy student on an exact Gaussian-mixture teacher."""
import pytest
import torch

from piflow.models import MLPVelocityModel2D
from piflow.models.students import PolicyStudent
from piflow.model import PiFlow
from piflow.policies import DXPolicy, GMFlowPolicy
from piflow.teachers import GaussianMixtureTeacher

pytestmark = pytest.mark.usefixtures("single_thread")


def make_teacher():
    means = torch.tensor([[-1.2, 0.6], [1.0, 1.0], [0.4, -1.3]], dtype=torch.float64)
    return GaussianMixtureTeacher(means, 0.35)


def make_student(policy, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = MLPVelocityModel2D(hidden_size=64, num_layers=2)
    extra = dict(num_components=4) if policy == "gmflow" else dict(num_nodes=3)
    extra.update(kwargs)
    return net, PolicyStudent(net, policy=policy, logstd_hidden=32, generator=torch.Generator().manual_seed(seed),
                              **extra)


@pytest.mark.parametrize("policy,kwargs", [("gmflow", dict(gm_dropout=0.05)), ("dx", dict()),
                                           ("gmflow", dict(nfe=4, final_step_size_scale=0.5, shift=3.2,
                                                           window_substeps=3, num_decay_iters=10))])
def test_loss_is_finite_scalar_with_grad(policy, kwargs):
    teacher = make_teacher()
    _, student = make_student(policy)
    pf = PiFlow(student, teacher, policy=policy, **{"nfe": 2, **kwargs})
    x0 = teacher.sample(16, generator=torch.Generator().manual_seed(1))
    loss = pf(x0, generator=torch.Generator().manual_seed(2))
    assert loss.dim() == 0 and loss.requires_grad and bool(torch.isfinite(loss))
    assert float(loss.detach()) > 0
    loss.backward()
    grads = [p.grad for p in student.head.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # data-free loss back-propagates per step and returns a detached total
    student.zero_grad(set_to_none=True)
    total = pf.data_free_loss(torch.randn(8, 2, generator=torch.Generator().manual_seed(3)),
                              backward=torch.Tensor.backward, generator=torch.Generator().manual_seed(4))
    assert not total.requires_grad and bool(torch.isfinite(total)) and float(total) > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.head.parameters())


@pytest.mark.parametrize("policy,cls", [("gmflow", GMFlowPolicy), ("gm", GMFlowPolicy), ("dx", DXPolicy)])
def test_student_policy_starts_at_the_teacher_network(policy, cls):
    # init_from_teacher without bias noise: every component/node equals the copied network's velocity, so the
    # policy velocity at the source state is the network's u(x, σ·S_t)
    kind = "gmflow" if policy == "gm" else policy
    net, student = make_student(kind, head_noise_std=0.0)
    pf = PiFlow(student, make_teacher(), policy=policy, gm_dropout=0.0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1])
    p = pf.policy(x, sigma)
    assert isinstance(p, cls)
    with torch.no_grad():
        torch.testing.assert_close(p.velocity(x, sigma), net(x, sigma * 1000), rtol=1e-4, atol=1e-4)


class ExactGMStudent(torch.nn.Module):
    """The exact GM teacher's own policy as the student (§7.3): sampling must reproduce the teacher ODE."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, sigma, cond=None):
        return self.teacher.policy(x, sigma)


class ExactDXStudent(torch.nn.Module):
    """A DX student whose x0 grid is the exact posterior mean along the exact ODE path of each segment."""

    def __init__(self, teacher, nfe, num_nodes):
        super().__init__()
        self.teacher, self.nfe, self.num_nodes = teacher, nfe, num_nodes

    def forward(self, x, sigma, cond=None):
        from piflow.rollout import rollout
        flow = self.teacher.policy(x, sigma)
        tau_src = float(sigma[0])                                    # shift 1: raw time = σ
        tau_end = max(tau_src - 1.0 / self.nfe, 0.0)
        u_nodes = []
        for n in range(self.num_nodes):                              # node 0 = segment end, N − 1 = τ_src
            tau = tau_end + (tau_src - tau_end) * n / (self.num_nodes - 1)
            x_tau = rollout(flow, x, sigma, torch.full_like(sigma, tau), total_substeps=1024)
            x0 = flow.x0(x_tau, max(tau, 1e-4))
            u_nodes.append((x - x0) / sigma[:, None])
        return {"u_grid": torch.stack(u_nodes, dim=1)}


@pytest.mark.parametrize("nfe", [1, 3, 7])
def test_exact_gm_student_samples_the_teacher_ode_at_any_nfe(nfe):
    from piflow.sampling import rk4_sample
    teacher = make_teacher()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(6))
    reference = rk4_sample(teacher, noise, 64)
    pf = PiFlow(ExactGMStudent(teacher), teacher, nfe=2, total_substeps=256)
    out = pf.sample(noise, nfe=nfe)
    assert out.shape == noise.shape and out.dtype == noise.dtype and not out.requires_grad
    err = (out - reference).norm(dim=1)
    assert float(err.mean()) < 5e-3 and float(err.max()) < 5e-2
    # a policy that is not the teacher's is measurably off the ODE (the check above can fail)
    wrong = PiFlow(ExactGMStudent(GaussianMixtureTeacher(teacher.means * 1.1, 0.35)), teacher, nfe=2)
    assert float((wrong.sample(noise, nfe=nfe) - reference).norm(dim=1).mean()) > 0.05


def test_exact_dx_student_samples_the_teacher_ode():
    from piflow.sampling import rk4_sample
    teacher = make_teacher()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(16))
    reference = rk4_sample(teacher, noise, 64)
    pf = PiFlow(ExactDXStudent(teacher, 2, 17), teacher, policy="dx", nfe=2, total_substeps=256)
    err = (pf.sample(noise) - reference).norm(dim=1)
    assert float(err.mean()) < 2e-2


def test_explicit_sigmas_follow_the_given_raw_times():
    # sigmas = raw times; the start state is σ_0·ε (authors' sampler) and the ODE from there is the reference
    from piflow.sampling import rk4_sample
    teacher = make_teacher()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(26))
    pf = PiFlow(ExactGMStudent(teacher), teacher, nfe=2, total_substeps=256)
    out, trajectory = pf.sample(noise, sigmas=[1.0, 0.6, 0.2], return_trajectory=True)
    assert len(trajectory) == 4
    torch.testing.assert_close(out, rk4_sample(teacher, noise, 64), rtol=0, atol=5e-2)
    with pytest.raises(ValueError, match="sigmas"):
        pf.sample(noise, sigmas=[0.5, 0.7])


def test_sample_default_nfe_trajectory():
    _, student = make_student("gmflow")
    pf = PiFlow(student, make_teacher(), nfe=3, total_substeps=16)
    noise = torch.randn(4, 2)
    out, traj = pf.sample(noise, return_trajectory=True, temperature="auto")
    assert len(traj) == 4 and out.shape == noise.shape


def test_configuration_errors():
    _, student = make_student("gmflow")
    teacher = make_teacher()
    with pytest.raises(ValueError, match="policy"):
        PiFlow(student, teacher, policy="flow")
    with pytest.raises(ValueError, match="policy_dropout"):
        PiFlow(student, teacher, policy="dx", gm_dropout=1.0)
    with pytest.raises(ValueError, match="gm_dropout applies to GMFlow"):     # the old name keeps its old meaning
        PiFlow(student, teacher, policy="dx", gm_dropout=0.1)
    assert PiFlow(student, teacher, policy="dx", policy_dropout=0.1).settings.policy_dropout == 0.1   # DX: new name
    with pytest.raises(ValueError, match="nfe"):
        PiFlow(student, teacher, nfe=0)
    with pytest.raises(ValueError):
        PiFlow(student, teacher, final_step_size_scale=0.0)
    # a GM student inside a PiFlow configured for DX policies
    pf = PiFlow(student, teacher, policy="dx")
    with pytest.raises((TypeError, ValueError)):
        pf.policy(torch.randn(2, 2), torch.full((2,), 0.5))


def test_forward_passes_the_trajectory_mixing_ratio(monkeypatch):
    import piflow.model as pipeline_module
    seen = []
    original = pipeline_module.piid_loss

    def spy(*args, **kwargs):
        seen.append(args[4].teacher_ratio(kwargs["iteration"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "piid_loss", spy)
    teacher = make_teacher()
    _, student = make_student("gmflow")
    pf = PiFlow(student, teacher, nfe=2, num_decay_iters=8, total_substeps=16)
    x0 = teacher.sample(4, generator=torch.Generator().manual_seed(7))
    for it in (0, 2, 8, 100):
        pf(x0, iteration=it)
    assert seen == pytest.approx([1.0, 0.75, 0.0, 0.0])


def test_dx_defaults_follow_the_segment_grid():
    _, student = make_student("dx")
    pf = PiFlow(student, make_teacher(), policy="dx", nfe=4, final_step_size_scale=0.5, shift=3.2)
    p = pf.policy(torch.randn(3, 2), torch.full((3,), 0.9))
    assert isinstance(p, DXPolicy) and p.segment_size == pytest.approx(1 / 3.5) and p.num_nodes == 3
    assert p.shift == pytest.approx(3.2)
    pf1 = PiFlow(student, make_teacher(), policy="dx", nfe=1)
    assert pf1.policy(torch.randn(3, 2), torch.full((3,), 0.9)).segment_size == pytest.approx(1.0)
    # explicit policy_kwargs win over the defaults
    pf2 = PiFlow(student, make_teacher(), policy="dx", nfe=4, policy_kwargs={"segment_size": 0.5, "shift": 1.0})
    p2 = pf2.policy(torch.randn(3, 2), torch.full((3,), 0.9))
    assert p2.segment_size == 0.5 and p2.shift == 1.0
