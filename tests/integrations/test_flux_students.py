"""GM/DX students on a tiny random FluxTransformer2DModel: packing, teacher-exact init, π-ID step, sampling."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from piflow import PiFlow  # noqa: E402
from piflow.integrations.diffusers.students import (FluxPolicyStudent, FluxTeacher, pack_latents,  # noqa: E402
                                                unpack_tokens)
from piflow.policies import GMFlowPolicy  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():   # the final projection starts at 0 in diffusers: randomise to make outputs informative
        model.proj_out.weight.normal_(0, 0.05)
        model.proj_out.bias.normal_(0, 0.05)
    return model.eval()


def cond(batch=2):
    gen = torch.Generator().manual_seed(1)
    return {"encoder_hidden_states": torch.randn(batch, 5, 32, generator=gen),
            "pooled_projections": torch.randn(batch, 16, generator=gen), "txt_ids": torch.zeros(5, 3),
            "guidance": torch.full((batch,), 3.5)}


def test_pack_unpack_round_trip_and_layout():
    x = torch.randn(2, 16, 6, 8)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(unpack_tokens(tokens, 6, 8), x)
    # channel index c·4 + row·2 + col: token 0 holds pixels (0..1, 0..1)
    assert tokens[0, 0, 3 * 4 + 1 * 2 + 0] == x[0, 3, 1, 0]
    with pytest.raises(ValueError, match="divisible"):
        pack_latents(torch.randn(1, 16, 5, 8))


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher(policy):
    model = tiny_flux()
    teacher = FluxTeacher(model)
    student = FluxPolicyStudent(model, policy, num_components=3, num_nodes=4, head_noise_std=0.0,
                                logstd_hidden=32).eval()
    x, sigma, c = torch.randn(2, 16, 8, 8), torch.tensor([0.9, 0.4]), cond()
    u = teacher(x, sigma, c)
    out = student(x, sigma, c)
    if policy == "dx":
        assert out["u_grid"].shape == (2, 4, 16, 8, 8)
        torch.testing.assert_close(out["u_grid"][:, 2], u, atol=1e-5, rtol=1e-5)
        return
    assert out["means"].shape == (2, 3, 16, 8, 8) and out["logweights"].shape == (2, 3, 1, 8, 8)
    for k in range(3):
        torch.testing.assert_close(out["means"][:, k], u, atol=1e-5, rtol=1e-5)
    policy_obj = GMFlowPolicy(**out, x_src=x, sigma_src=sigma)
    torch.testing.assert_close(policy_obj.velocity(x, sigma), u, atol=1e-5, rtol=1e-5)


def test_pi_id_step_trains_the_head_and_leaves_the_teacher_unchanged():
    model = tiny_flux()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    student = FluxPolicyStudent(model, "gmflow", num_components=2, logstd_hidden=32)
    pf = PiFlow(student, FluxTeacher(model), nfe=4, final_step_size_scale=0.5, shift=3.2, window_substeps=3,
                gm_dropout=0.1, loss_scale=30.0, total_substeps=32)
    loss = pf.data_free_loss(torch.randn(2, 16, 8, 8), cond())
    assert torch.isfinite(loss) and float(loss) > 0
    assert student.head.proj_means.weight.grad is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items())   # teacher untouched
    with torch.no_grad():
        samples = pf.sample(torch.randn(2, 16, 8, 8), nfe=1, cond=cond(), temperature="auto")
    assert samples.shape == (2, 16, 8, 8) and torch.isfinite(samples).all()


def test_lora_student_shares_the_base_and_never_leaks_into_the_teacher():
    pytest.importorskip("peft")
    from piflow.integrations.diffusers.students import add_student_lora

    model = tiny_flux()
    teacher = FluxTeacher(model)
    x, sigma, c = torch.randn(2, 16, 8, 8), torch.tensor([0.8, 0.3]), cond()
    u_before = teacher(x, sigma, c)
    add_student_lora(model, rank=4)
    student = FluxPolicyStudent(model, "gmflow", num_components=2, logstd_hidden=32, share_transformer=True)
    names = {name for name, p in student.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any(n.startswith("head.") for n in names)
    assert any(n.startswith("norm_out.") for n in names)
    assert not any("attn" in n for n in names)                        # attention is never adapted
    assert not any(n.startswith("transformer.proj_out") for n in names)  # nor the teacher's output layer
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    shared = {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in student.parameters() if id(p) not in shared) < base   # no second base copy
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    pf = PiFlow(student, teacher, nfe=2, total_substeps=16)
    for _ in range(3):
        optimizer.zero_grad()
        pf(torch.randn(2, 16, 8, 8), c).backward()
        optimizer.step()
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)   # LoRA trained
    torch.testing.assert_close(teacher(x, sigma, c), u_before, atol=0, rtol=0)   # teacher bit-for-bit unchanged
    student_means = student(x, sigma, c)["means"]
    assert not torch.allclose(student_means[:, 0], u_before, atol=1e-4)         # the student did change


def test_adapter_round_trip_is_bit_exact_and_bad_files_fail_clearly(tmp_path):
    pytest.importorskip("peft")
    import json

    from piflow.integrations.diffusers.adapter import load_piflow_adapter, save_piflow_adapter
    from piflow.integrations.diffusers.students import add_student_lora

    model = tiny_flux()
    add_student_lora(model, rank=4)
    student = FluxPolicyStudent(model, "gmflow", num_components=2, logstd_hidden=32, share_transformer=True)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    pf = PiFlow(student, FluxTeacher(model), nfe=2, total_substeps=16)
    for _ in range(2):
        optimizer.zero_grad()
        pf(torch.randn(2, 16, 8, 8), cond()).backward()
        optimizer.step()
    student.eval()
    save_piflow_adapter(student, tmp_path / "adapter")
    x, sigma, c = torch.randn(2, 16, 8, 8), torch.tensor([1.0, 0.6]), cond()
    expected = student(x, sigma, c)

    fresh = load_piflow_adapter(tiny_flux(), tmp_path / "adapter").eval()   # same base weights, new objects
    got = fresh(x, sigma, c)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert config["_class_name"] == "GMFluxTransformer2DModel" and config["policy_config"]["type"] == "GMFlow"

    weights = tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_piflow_adapter(tiny_flux(), tmp_path / "adapter")
    weights.write_bytes(data)

    import safetensors.torch as st

    tensors = st.load_file(str(weights))
    st.save_file(tensors, str(weights), metadata={"policy_config": json.dumps({"type": "GMFlow"})})
    with pytest.raises(ValueError, match="num_components"):
        load_piflow_adapter(tiny_flux(), tmp_path / "adapter")
    st.save_file(tensors, str(weights), metadata={"policy_config": json.dumps({"type": "Flow"})})
    with pytest.raises(ValueError, match="policy_config.type"):
        load_piflow_adapter(tiny_flux(), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_piflow_adapter(tiny_flux(), tmp_path / "nowhere")


def parameter_bytes(*modules):
    """Bytes of the distinct parameter tensors of `modules` (shared tensors counted once)."""
    seen = {}
    for module in modules:
        for param in module.parameters():
            seen[id(param)] = param.numel() * param.element_size()
    return sum(seen.values())


def test_teacher_student_and_ema_share_one_base():
    pytest.importorskip("peft")
    from piflow.integrations.diffusers.students import add_student_lora
    from piflow.train import PowerEMA

    model = tiny_flux()
    base = parameter_bytes(model)
    add_student_lora(model, rank=4)
    student = FluxPolicyStudent(model, "gmflow", num_components=2, logstd_hidden=32, share_transformer=True)
    ema = PowerEMA(student)
    trainable = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    total = parameter_bytes(model, student, ema.model)
    # one frozen base for all three; only the trainable tensors (head, norm_out, LoRA) exist twice (student + EMA)
    assert total == base + 2 * trainable
    student_params = dict(student.named_parameters())
    for name, param in ema.model.named_parameters():
        tied = not student_params[name].requires_grad
        assert (param is student_params[name]) == tied, name     # frozen base tied, trainable tensors copied


def test_combining_with_a_second_lora_via_set_adapters():
    peft = pytest.importorskip("peft")
    from piflow.integrations.diffusers.students import add_student_lora

    model = tiny_flux()
    teacher = FluxTeacher(model)
    x, sigma, c = torch.randn(2, 16, 8, 8), torch.tensor([0.9, 0.5]), cond()
    u_teacher = teacher(x, sigma, c)
    add_student_lora(model, rank=4)
    student = FluxPolicyStudent(model, "gmflow", num_components=2, logstd_hidden=32, share_transformer=True).eval()
    with torch.no_grad():        # give the π-Flow LoRA some weight so its strength matters
        for name, param in model.named_parameters():
            if "lora_B.piflow" in name:
                param.normal_(0, 0.02)
    alone = student(x, sigma, c)["means"]
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                      target_modules=["ff.net.2"]), adapter_name="style")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.style" in name:
                param.normal_(0, 0.05)
    model.set_adapters(["piflow", "style"], weights=[1.0, 0.7])
    combined = student(x, sigma, c)["means"]
    assert not torch.allclose(combined, alone)                      # the style LoRA is active
    model.set_adapters(["piflow", "style"], weights=[1.0, 0.0])
    torch.testing.assert_close(student(x, sigma, c)["means"], alone)  # strength 0 removes it exactly
    model.set_adapters(["piflow"])
    torch.testing.assert_close(student(x, sigma, c)["means"], alone)
    torch.testing.assert_close(teacher(x, sigma, c), u_teacher, atol=0, rtol=0)   # teacher: all adapters off
