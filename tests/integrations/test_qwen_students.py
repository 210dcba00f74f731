"""GM/DX students on a tiny random QwenImageTransformer2DModel (§6.4): teacher-exact init, LoRA targets, adapters."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from piflow import PiFlow  # noqa: E402
from piflow.integrations.diffusers.students import (ARCHITECTURES, QwenImagePolicyStudent,  # noqa: E402
                                                    QwenImageTeacher, add_student_lora)

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_qwen(num_layers=2):
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers,
                                                  attention_head_dim=16, num_attention_heads=2,
                                                  joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.05)
        model.proj_out.bias.normal_(0, 0.05)
    return model.eval()


def cond(batch=2):
    gen = torch.Generator().manual_seed(3)
    return {"encoder_hidden_states": torch.randn(batch, 5, 16, generator=gen),
            "encoder_hidden_states_mask": torch.ones(batch, 5, dtype=torch.long)}


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher(policy):
    model = tiny_qwen()
    teacher = QwenImageTeacher(model)
    student = QwenImagePolicyStudent(model, policy, num_components=3, num_nodes=4, head_noise_std=0.0,
                                     logstd_hidden=16).eval()
    x, sigma, c = torch.randn(2, 16, 8, 8), torch.tensor([0.9, 0.4]), cond()
    u = teacher(x, sigma, c)
    out = student(x, sigma, c)
    first = out["u_grid"][:, 0] if policy == "dx" else out["means"][:, 2]
    torch.testing.assert_close(first, u, atol=1e-5, rtol=1e-5)


def test_lora_targets_skip_the_last_text_mlp_and_attention(tmp_path):
    pytest.importorskip("peft")
    from piflow.integrations.diffusers.adapter import load_piflow_adapter, save_piflow_adapter

    model = tiny_qwen(num_layers=3)
    targets = ARCHITECTURES["qwen"].lora_targets(model)
    assert "transformer_blocks.1.txt_mlp.net.2" in targets and "transformer_blocks.2.img_mlp.net.2" in targets
    assert not any(t.startswith("transformer_blocks.2.txt_mlp") for t in targets)
    assert not any("attn" in t for t in targets)
    teacher = QwenImageTeacher(model)
    x, sigma, c = torch.randn(2, 16, 8, 8), torch.tensor([1.0, 0.5]), cond()
    u_before = teacher(x, sigma, c)
    add_student_lora(model, rank=4, target_modules=targets)
    student = QwenImagePolicyStudent(model, "gmflow", num_components=2, logstd_hidden=16, share_transformer=True)
    pf = PiFlow(student, teacher, nfe=4, final_step_size_scale=0.5, shift=3.2, total_substeps=16)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    optimizer.zero_grad()
    pf(torch.randn(2, 16, 8, 8), c).backward()
    lora_grads = [p.grad for n, p in student.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)       # no unused LoRA parameters
    optimizer.step()
    torch.testing.assert_close(teacher(x, sigma, c), u_before, atol=0, rtol=0)
    student.eval()
    save_piflow_adapter(student, tmp_path / "adapter")
    fresh = load_piflow_adapter(tiny_qwen(num_layers=3), tmp_path / "adapter").eval()
    assert torch.equal(fresh(x, sigma, c)["means"], student(x, sigma, c)["means"])
