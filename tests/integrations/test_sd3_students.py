"""GM/DX students on a tiny random SD3Transformer2DModel: teacher-exact init, LoRA tying, π-ID, adapter round trip."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from piflow import PiFlow  # noqa: E402
from piflow.integrations.diffusers.students import (ARCHITECTURES, SD3PolicyStudent, SD3Teacher,  # noqa: E402
                                                    add_student_lora, unpatchify_pqc)
from piflow.policies import GMFlowPolicy  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_sd3():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                            pos_embed_max_size=16)
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.05)
        model.proj_out.bias.normal_(0, 0.05)
    return model.eval()


def cond(batch=2):
    gen = torch.Generator().manual_seed(2)
    return {"encoder_hidden_states": torch.randn(batch, 5, 16, generator=gen),
            "pooled_projections": torch.randn(batch, 8, generator=gen)}


def test_unpatchify_matches_the_models_own_layout():
    model = tiny_sd3()
    tokens = torch.randn(2, 16, 16)
    captured = {}
    handle = model.proj_out.register_forward_hook(lambda m, a, out: captured.setdefault("tokens", out))
    with torch.no_grad():
        out = model(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10.0, 20.0]), **cond()).sample
    handle.remove()
    torch.testing.assert_close(unpatchify_pqc(captured["tokens"], 8, 8, 2), out)
    assert unpatchify_pqc(tokens, 8, 8, 2).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher(policy):
    model = tiny_sd3()
    teacher = SD3Teacher(model)
    student = SD3PolicyStudent(model, policy, num_components=3, num_nodes=4, latent_channels=4, head_noise_std=0.0,
                               logstd_hidden=16).eval()
    x, sigma, c = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.4]), cond()
    u = teacher(x, sigma, c)
    out = student(x, sigma, c)
    if policy == "dx":
        torch.testing.assert_close(out["u_grid"][:, 1], u, atol=1e-5, rtol=1e-5)
        return
    for k in range(3):
        torch.testing.assert_close(out["means"][:, k], u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GMFlowPolicy(**out, x_src=x, sigma_src=sigma).velocity(x, sigma), u, atol=1e-5,
                               rtol=1e-5)


def test_lora_student_trains_keeps_the_teacher_and_round_trips(tmp_path):
    pytest.importorskip("peft")
    from piflow.integrations.diffusers.adapter import load_piflow_adapter, save_piflow_adapter

    model = tiny_sd3()
    teacher = SD3Teacher(model)
    x, sigma, c = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 0.5]), cond()
    u_before = teacher(x, sigma, c)
    add_student_lora(model, rank=4, target_modules=ARCHITECTURES["sd3"].lora_targets(model))
    student = SD3PolicyStudent(model, "gmflow", num_components=2, latent_channels=4, logstd_hidden=16,
                               share_transformer=True)
    assert not any("attn" in n for n, p in student.named_parameters() if p.requires_grad)
    pf = PiFlow(student, teacher, nfe=2, total_substeps=16, window_substeps=3)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        pf.data_free_loss(torch.randn(2, 4, 8, 8), c)
        optimizer.step()
    torch.testing.assert_close(teacher(x, sigma, c), u_before, atol=0, rtol=0)
    student.eval()
    save_piflow_adapter(student, tmp_path / "adapter")
    fresh = load_piflow_adapter(tiny_sd3(), tmp_path / "adapter").eval()
    assert fresh.architecture.name == "sd3"
    expected, got = student(x, sigma, c), fresh(x, sigma, c)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    with torch.no_grad():
        assert pf.sample(torch.randn(2, 4, 8, 8), nfe=4, cond=c).shape == (2, 4, 8, 8)
