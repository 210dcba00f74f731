"""Policy students on real backbones: teacher initialisation must reproduce the teacher's output exactly."""
import pytest
import torch

from piflow.models import DiT, MLPVelocityModel2D
from piflow.models.students import PolicyStudent
from piflow.model import PiFlow
from piflow.policies import DXPolicy, GMFlowPolicy

pytestmark = pytest.mark.usefixtures("single_thread")


def _random_dit(in_channels=3, input_size=8, video=False):
    torch.manual_seed(0)
    size = (2, input_size, input_size) if video else input_size
    model = DiT.from_preset("DiT-T", in_channels=in_channels, input_size=size, patch_size=2, num_classes=5)
    with torch.no_grad():                      # adaLN-Zero starts at 0: randomise so outputs are informative
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("video", [False, True])
def test_gm_dit_student_starts_at_the_teacher(video):
    teacher = _random_dit(video=video)
    student = PolicyStudent(teacher, "gmflow", num_components=4, head_noise_std=0.0, num_timesteps=1000).eval()
    x = torch.randn(2, *((3, 2, 8, 8) if video else (3, 8, 8)))
    sigma = torch.tensor([0.9, 0.4])
    y = torch.tensor([1, 3])
    out = student(x, sigma, y)
    with torch.no_grad():
        u_teacher = teacher(x, sigma * 1000, y)
    assert out["means"].shape == (2, 4, *x.shape[1:])
    assert out["logweights"].shape == (2, 4, 1, *x.shape[2:])
    for k in range(4):   # every component reproduces the teacher's velocity field pixel for pixel
        torch.testing.assert_close(out["means"][:, k], u_teacher, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["logweights"].exp().sum(1), torch.ones(2, 1, *x.shape[2:]))
    torch.testing.assert_close(out["logstds"], torch.full((2,), torch.log(torch.tensor(0.05)).item()))
    policy = GMFlowPolicy(**out, x_src=x, sigma_src=sigma)
    torch.testing.assert_close(policy.velocity(x, sigma), u_teacher, atol=1e-5, rtol=1e-5)


def test_gm_student_bias_noise_is_shared_within_a_patch():
    teacher = _random_dit()
    student = PolicyStudent(teacher, "gmflow", num_components=3, head_noise_std=0.5,
                            generator=torch.Generator().manual_seed(0)).eval()
    x, sigma, y = torch.randn(1, 3, 8, 8), torch.tensor([0.7]), torch.tensor([2])
    with torch.no_grad():
        offset = student(x, sigma, y)["means"] - teacher(x, sigma * 1000, y).unsqueeze(1)   # (1, K, C, H, W)
    # the noise is constant per (component, channel) over all pixels, and differs between components
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-5)
    assert not torch.allclose(offset[:, 0], offset[:, 1])


@pytest.mark.parametrize("mode", ["grid", "polynomial"])
def test_dx_dit_student_starts_at_the_teacher(mode):
    teacher = _random_dit()
    student = PolicyStudent(teacher, "dx", num_nodes=5, dx_mode=mode).eval()
    x, sigma, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 0.5]), torch.tensor([0, 4])
    out = student(x, sigma, y)
    with torch.no_grad():
        u_teacher = teacher(x, sigma * 1000, y)
    assert out["u_grid"].shape == (2, 5, 3, 8, 8)
    torch.testing.assert_close(out["u_grid"][:, 0], u_teacher, atol=1e-5, rtol=1e-5)
    if mode == "grid":
        torch.testing.assert_close(out["u_grid"][:, -1], u_teacher, atol=1e-5, rtol=1e-5)
        policy = DXPolicy(**out, x_src=x, sigma_src=sigma, segment_size=0.5)
        torch.testing.assert_close(policy.velocity(x, sigma), u_teacher, atol=1e-5, rtol=1e-5)
    else:
        assert float(out["u_grid"][:, 1:].detach().abs().max()) == 0.0


def test_student_owns_its_weights_and_drops_proj_out():
    teacher = MLPVelocityModel2D(hidden_size=32, num_layers=2)
    student = PolicyStudent(teacher, "gmflow", num_components=2)
    assert not hasattr(student.backbone, "proj_out")
    with torch.no_grad():
        next(student.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(student.backbone.parameters()), next(teacher.backbone.parameters()))
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyStudent(teacher, "flowmap")
    with pytest.raises(TypeError, match="proj_out"):
        PolicyStudent(torch.nn.Linear(2, 2))


def test_dit_student_trains_with_pi_id():
    teacher = _random_dit()
    student = PolicyStudent(teacher, "gmflow", num_components=2)
    teacher_fn = lambda x, s, c: teacher(x, s * 1000, c)  # noqa: E731
    pf = PiFlow(student, teacher_fn, nfe=2, total_substeps=16)
    loss = pf(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    loss.backward()
    grads = [p.grad for p in student.head.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_student_of_a_frozen_teacher_trains_its_whole_network():
    """Recipes freeze the teacher before building the student from it: the copy must still be trainable (the paper
    fine-tunes the full network; a frozen backbone would leave only the head to learn)."""
    teacher = _random_dit().eval().requires_grad_(False)
    student = PolicyStudent(teacher, "gmflow", num_components=2)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------ students of diffusion-trained networks (§15)

@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("backbone", ["mlp", "dit"])
def test_students_of_diffusion_networks_start_at_the_converted_teacher(kind, backbone):
    """A network trained as an ε/v/x0 diffusion model, wrapped by `DiffusionTeacher`, and the policy student built
    on a copy of it with the same conversion: at initialisation (no head noise) every GM component and every DX
    node equals the wrapped teacher's velocity at (x_σ, σ), and the GM stds are the head's times |∂u/∂out|
    (for ε-prediction (α + s)/α, computed here from the β table)."""
    from piflow.diffusion import DiffusionTeacher, DiscreteVPSchedule

    schedule = DiscreteVPSchedule.from_betas(1000, beta_schedule="squaredcos_cap_v2")
    if backbone == "mlp":
        torch.manual_seed(0)
        net, x, cond = MLPVelocityModel2D(hidden_size=32, num_layers=2).eval(), torch.randn(3, 2), None
    else:
        net, x, cond = _random_dit(), torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 4])
    teacher = DiffusionTeacher(net, schedule, kind)
    sigma = torch.tensor([0.95, 0.5, 0.1])
    u_teacher = teacher(x, sigma, cond)
    student = PolicyStudent(net, "gmflow", num_components=3, head_noise_std=0.0, diffusion=teacher).eval()
    assert student.diffusion.model is None            # the student keeps no reference to the teacher's network
    with torch.no_grad():
        out = student(x, sigma, cond)
    for k in range(3):
        torch.testing.assert_close(out["means"][:, k], u_teacher, atol=2e-5, rtol=2e-5)
    policy = GMFlowPolicy(**out, x_src=x, sigma_src=sigma)
    torch.testing.assert_close(policy.velocity(x, sigma), u_teacher, atol=2e-5, rtol=2e-5)
    if kind == "epsilon":
        alphas_cumprod = torch.cumprod(1 - schedule.betas, 0)
        lower = schedule.timestep_of(sigma.double()).floor().long()     # bracket σ's timestep on the integer grid

        def b_at(step):
            return (alphas_cumprod[step].sqrt() + (1 - alphas_cumprod[step]).sqrt()) / alphas_cumprod[step].sqrt()

        b_lo, b_hi = b_at(lower), b_at(lower + 1)                       # b = (α + s)/α grows with t
        b = (out["logstds"] - torch.log(torch.tensor(0.05))).exp().double()
        assert bool(((b >= b_lo - 1e-5) & (b <= b_hi + 1e-5)).all()), (b, b_lo, b_hi)
    dx = PolicyStudent(net, "dx", num_nodes=4, diffusion=teacher).eval()
    with torch.no_grad():
        nodes = dx(x, sigma, cond)["u_grid"]
    torch.testing.assert_close(nodes[:, 0], u_teacher, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(nodes[:, -1], u_teacher, atol=2e-5, rtol=2e-5)
