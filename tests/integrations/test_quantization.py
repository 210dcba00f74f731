"""Students on quantized frozen bases (TorchAO int8 weight-only, the backend that runs on CPU): the base loads
quantized through diffusers, the LoRA student trains on it with the same quantized module as its teacher (loss falls,
the teacher never changes), its adapter has the float-base format and loads onto the float base, a float-trained
adapter loads onto the quantized base, and outputs agree within the base's own quantization error."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("torchao")

from piflow import PiFlow  # noqa: E402
from piflow.integrations.diffusers.adapter import load_piflow_adapter, save_piflow_adapter  # noqa: E402
from piflow.integrations.diffusers.quantization import (base_parameter, dequantized_weight, float_copy,  # noqa: E402
                                                        is_quantized, load_quantized_transformer,
                                                        quantization_config)
from piflow.integrations.diffusers.students import DiffusersTeacher  # noqa: E402

from test_authors_layout import base_transformer, inputs, student_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
# measured 2026-12-02 on the tiny bases: quantized vs float outputs differ by ≤ 0.011 (means), ≤ 0.013 (log-stds)
# at output scales 1.2–3; the quantized teacher itself differs from the float one by 0.008–0.009
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("float_bases")
    for architecture in ("flux", "qwen"):
        base_transformer(architecture).save_pretrained(root / architecture)
    return root


def quantized(saved_bases, architecture):
    return load_quantized_transformer(saved_bases / architecture, "torchao-int8", subfolder=None,
                                      dtype=torch.bfloat16)


def bf16(module, *args):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return module(*args)


def test_int8_weights_dequantize_within_one_step(saved_bases):
    q, ref = quantized(saved_bases, "flux"), base_transformer("flux")
    layer = q.transformer_blocks[0].ff.net[2]
    assert is_quantized(layer.weight) and not is_quantized(ref.transformer_blocks[0].ff.net[2].weight)
    weight = ref.transformer_blocks[0].ff.net[2].weight.detach()
    step = weight.abs().amax(dim=1, keepdim=True) / 127              # symmetric per-row int8
    error = (dequantized_weight(layer).float() - weight).abs()
    assert bool((error <= step + weight.abs() * 2 ** -7).all())     # ≤ one step plus bf16 rounding
    norm = float_copy(q.norm_out)                                    # the student's own final norm
    assert not is_quantized(norm.linear.weight) and is_quantized(q.norm_out.linear.weight)
    torch.testing.assert_close(norm.linear.weight, dequantized_weight(q.norm_out.linear))


@pytest.mark.parametrize("architecture", ["flux", "qwen"])
def test_quantized_student_trains_and_its_adapter_loads_on_the_float_base(saved_bases, architecture, tmp_path):
    q = quantized(saved_bases, architecture)
    student = student_on(q, architecture, "gmflow")
    for module in (student.head, student.norm_out):                 # trainable parts in float32, as the recipe
        module.float()
    for param in q.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    assert all(not is_quantized(p) for p in student.parameters() if p.requires_grad)
    teacher = DiffusersTeacher(q, architecture)                       # the same quantized module, adapters off
    latents, sigma, cond = inputs(architecture)
    before = bf16(teacher, latents, sigma, cond)
    pf = PiFlow(student, teacher, policy="gmflow", nfe=4, final_step_size_scale=0.5, shift=3.2,
                num_intermediate_states=2, window_substeps=3, gm_dropout=0.1, loss_scale=30.0, total_substeps=16)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    student.train()
    for _ in range(8):                    # the same batch and draws every step: the loss must go down
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(pf.data_free_loss(noise, cond, generator=torch.Generator().manual_seed(2))))
        optimizer.step()
    student.eval()
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(bf16(teacher, latents, sigma, cond), before)   # LoRA never leaks into the teacher
    # the adapter has the float-base format: same names, float32 tensors, no quantization config
    save_piflow_adapter(student, tmp_path / "q_adapter")
    save_piflow_adapter(student_on(base_transformer(architecture), architecture, "gmflow"), tmp_path / "f_adapter")
    from safetensors.torch import load_file

    from piflow.integrations.diffusers.adapter import WEIGHTS
    ours, reference = load_file(tmp_path / "q_adapter" / WEIGHTS), load_file(tmp_path / "f_adapter" / WEIGHTS)
    assert sorted(ours) == sorted(reference) and {v.dtype for v in ours.values()} == {torch.float32}
    assert "quantization" not in (tmp_path / "q_adapter" / "config.json").read_text()
    on_float = load_piflow_adapter(base_transformer(architecture), tmp_path / "q_adapter")
    quantized_out = bf16(student, latents, sigma, cond)
    with torch.no_grad():
        float_out = on_float(latents, sigma, cond)
    for key in float_out:
        torch.testing.assert_close(quantized_out[key].float(), float_out[key], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("layout", ["piflow", "authors"])
def test_float_adapter_loads_onto_the_quantized_base(saved_bases, layout, tmp_path):
    float_student = student_on(base_transformer("flux"), "flux", "dx", seed=3)
    save_piflow_adapter(float_student, tmp_path / "a", layout=layout)
    student = load_piflow_adapter(quantized(saved_bases, "flux"), tmp_path / "a", strength=1.0)
    latents, sigma, cond = inputs("flux")
    with torch.no_grad():
        expected = float_student(latents, sigma, cond)["u_grid"]
    got = bf16(student, latents, sigma, cond)["u_grid"]
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=TOLERANCE)


def test_unknown_or_unavailable_backends_are_named(saved_bases):
    with pytest.raises(ValueError, match=r"backend must be one of \('torchao-int8', 'bnb-nf4', 'bnb-int8'\)"):
        quantization_config("int4")
    with pytest.raises(ValueError, match="exactly one of backend"):
        load_quantized_transformer(saved_bases / "flux")


def write_gguf_q8_0(transformer, path):
    """A GGUF checkpoint of `transformer` with diffusers' tensor names: Q8_0 (blocks of 32, one fp16 scale each) for
    every matrix whose rows split into blocks, float32 for the rest."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, value in transformer.state_dict().items():
        array = value.detach().float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_base_takes_adapters_and_trains_lora(saved_bases, tmp_path):
    write_gguf_q8_0(base_transformer("flux"), tmp_path / "flux-Q8_0.gguf")
    base = load_quantized_transformer(saved_bases / "flux", gguf_file=tmp_path / "flux-Q8_0.gguf", subfolder=None,
                                      dtype=torch.bfloat16)
    layer, reference = base.transformer_blocks[0].ff.net[2], base_transformer("flux").transformer_blocks[0].ff.net[2]
    assert type(layer.weight).__name__ == "GGUFParameter" and is_quantized(layer.weight)
    weight = reference.weight.detach()
    blocks = weight.abs().reshape(weight.shape[0], -1, 32).amax(dim=2, keepdim=True)
    step = blocks.expand(-1, -1, 32).reshape(weight.shape) / 127
    assert bool(((dequantized_weight(layer).float() - weight).abs() <= step).all())   # within one Q8_0 step
    float_student = student_on(base_transformer("flux"), "flux", "gmflow", seed=4)
    save_piflow_adapter(float_student, tmp_path / "a", layout="authors")
    student = load_piflow_adapter(base, tmp_path / "a")
    bf16_student = load_piflow_adapter(base_transformer("flux").to(torch.bfloat16), tmp_path / "a")
    latents, sigma, cond = inputs("flux")
    got, expected = bf16(student, latents, sigma, cond), bf16(bf16_student, latents, sigma, cond)
    for key in got:         # Q8_0 vs a bf16 copy of the float base: the quantization error alone
        torch.testing.assert_close(got[key].float(), expected[key].float(), rtol=0, atol=TOLERANCE)
    assert base_parameter(base).dtype == torch.bfloat16           # not the packed uint8 GGUF weights
    policy = bf16(student.policy, latents, sigma, cond)             # as the pipelines call it
    expected_policy = bf16(bf16_student.policy, latents, sigma, cond)
    torch.testing.assert_close(policy.velocity(latents, sigma), expected_policy.velocity(latents, sigma), rtol=0,
                               atol=TOLERANCE)
    student.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student(latents, sigma, cond)["means"].float().square().mean().backward()
    lora_a = base.transformer_blocks[0].ff.net[2].lora_A["piflow"].weight
    assert lora_a.grad is not None and float(lora_a.grad.abs().sum()) > 0


@pytest.mark.parametrize("storage", ["torchao-int8", "gguf-Q8_0"])
def test_pipeline_samples_on_a_quantized_base(storage, tmp_path):
    """PiFluxPipeline with a quantized transformer: the adapter loads and 4-step samples stay close to the float
    pipeline's (same noise, same prompts)."""
    from piflow.integrations.diffusers.pipelines import pipeline_class
    from piflow.integrations.diffusers.tiny import tiny_pipeline

    tiny_pipeline("flux").save_pretrained(tmp_path / "pipe")
    save_piflow_adapter(student_on(base_transformer("flux"), "flux", "gmflow", seed=5), tmp_path / "a")
    if storage == "torchao-int8":
        transformer = load_quantized_transformer(tmp_path / "pipe", "torchao-int8", dtype=torch.bfloat16)
    else:
        write_gguf_q8_0(base_transformer("flux"), tmp_path / "flux.gguf")
        transformer = load_quantized_transformer(tmp_path / "pipe", gguf_file=tmp_path / "flux.gguf",
                                                 dtype=torch.bfloat16)
    images = []
    for extra in ({"transformer": transformer}, {}):
        pipe = pipeline_class("flux").from_pretrained(tmp_path / "pipe", torch_dtype=torch.bfloat16, **extra)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_piflow_adapter(tmp_path / "a")
        images.append(pipe(["a red cat", "a blue bird"], height=32, width=32, num_inference_steps=4,
                           output_type="latent", generator=torch.Generator().manual_seed(0)).images.float())
    assert torch.isfinite(images[0]).all()
    # measured 2026-12-02: max |Δ| 0.043 (int8) and 0.089 (Q8_0) at a latent scale of 4.06, i.e. 1.1 % and 2.2 %
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0.05 * float(images[1].abs().max()))
