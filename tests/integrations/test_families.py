"""Every base-model family on a tiny from-scratch pipeline, checked against the stock diffusers pipeline itself:
the teacher wrapper is the velocity the stock pipeline integrates (same σ convention, sign and packing), the
student starts at the teacher, π-ID on a fixed batch lowers the loss, and training never touches the teacher."""
import pytest
import torch

from piflow.settings import PiIDSettings

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow import PiFlow  # noqa: E402
from piflow.integrations.diffusers.families import FAMILIES, get_family  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts  # noqa: E402
from piflow.integrations.diffusers.students import (ARCHITECTURES, DiffusersPolicyStudent,  # noqa: E402
                                                    DiffusersTeacher, add_student_lora, pack_latents, unpack_tokens)
from piflow.integrations.diffusers.tiny import small_reference_area, tiny_pipeline  # noqa: E402

from family_cases import (REFERENCE_AREA, encode_arguments, latent_shape, stock_arguments,  # noqa: E402
                          stock_pipe_arguments, stock_prompts)

pytestmark = pytest.mark.usefixtures("single_thread")
NAMES = sorted(FAMILIES)
# flow-matching families: their stock schedulers step in σ = timestep/1000 and their students' GM bias noise is in
# velocity units; the diffusion families (PixArt-α, SD 1.5, SDXL, DiT-XL/2) have their own tests (test_pixart.py,
# test_sd15.py, test_sdxl.py, test_dit_family.py: DDIM = Euler, exact init; DiT takes class labels, not text)
DIFFUSION_FAMILIES = ("pixart", "sd15", "sdxl", "dit")
FLOW_NAMES = [name for name in NAMES if name not in DIFFUSION_FAMILIES]
PROMPTS = ["a red cat", "two blue birds on a wire"]


def condition(pipe, family, prompts=PROMPTS):
    """The model `cond` of the tiny pipeline of `family` for `prompts`."""
    items = encode_prompts(pipe, family, prompts, max_sequence_length=64, **encode_arguments(family, len(prompts)))
    cond = collate_text(items, family)
    if get_family(family).guidance == "embedded":
        cond["guidance"] = torch.full((len(prompts),), get_family(family).guidance_scale)
    return cond


@pytest.fixture(autouse=True)
def small_references():
    with small_reference_area(REFERENCE_AREA):
        yield


def stock_first_step(pipe, family):
    """(sample, σ, model_output) of the stock pipeline's first scheduler step, guidance off."""
    seen = {}
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        # the σ the model saw: timestep / 1000 (FLUX-style schedulers: = sigmas[i]; UniPC rounds t to an integer)
        sigma = torch.as_tensor(timestep, dtype=torch.float64) / pipe.scheduler.config.num_train_timesteps
        seen.setdefault("first", (sample.clone(), sigma.float(), model_output.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    try:
        prompts = stock_prompts(family, PROMPTS)
        pipe(prompt=prompts, num_inference_steps=2, output_type="latent", max_sequence_length=64,
             generator=torch.Generator().manual_seed(0), **stock_arguments(family),
             **stock_pipe_arguments(family, prompts))
    finally:
        del pipe.scheduler.step
    return seen["first"]


@pytest.mark.parametrize("family", FLOW_NAMES)
def test_teacher_is_the_velocity_the_stock_pipeline_integrates(family):
    """The stock scheduler's Euler step integrates its `model_output` as dx/dσ: the wrapper must return exactly it
    (Z-Image's pipeline negates the model output before the step; FLUX/Qwen pack 2×2 tokens)."""
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    sample, sigma, model_output = stock_first_step(pipe, family)
    prompts = stock_prompts(family, PROMPTS)
    packed = ARCHITECTURES[get_family(family).architecture].packs_outside
    shape = latent_shape(family, len(prompts))
    x = (unpack_tokens(sample, *shape[-2:]) if packed and sample.dim() == 3 else sample).float()
    assert x.shape == shape
    u = DiffusersTeacher(pipe.transformer, get_family(family).architecture)(x, sigma.expand(len(prompts)).float(),
                                                                            condition(pipe, family, prompts))
    torch.testing.assert_close(pack_latents(u) if packed else u, model_output.float(), atol=2e-5, rtol=2e-5)


def lora_student(pipe, family, policy):
    architecture = get_family(family).architecture
    targets = ARCHITECTURES[architecture].lora_targets(pipe.transformer)
    add_student_lora(pipe.transformer, rank=4, target_modules=targets)
    settings = PiIDSettings(policy=policy, nfe=2, shift=3.2, final_step_size_scale=0.5, total_substeps=32,
                            num_intermediate_states=2, window_substeps=2, policy_dropout=0.0)
    kwargs = {"mode": "grid"} if policy == "dx" else {}
    return DiffusersPolicyStudent(pipe.transformer, policy, num_components=2, num_nodes=3,
                                  latent_channels=latent_shape(family, 1)[1], logstd_hidden=16,
                                  share_transformer=True, architecture=architecture, policy_kwargs=kwargs,
                                  settings=settings, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FLOW_NAMES)
@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher_and_piid_lowers_the_loss(family, policy):
    pipe = tiny_pipeline(family)
    cond = condition(pipe, family)
    shape = latent_shape(family, len(PROMPTS))
    teacher = DiffusersTeacher(pipe.transformer, get_family(family).architecture)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.4])
    teacher_before = teacher(x, sigma, cond)
    frozen = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}      # before LoRA wraps layers
    student = lora_student(pipe, family, policy)
    # at initialisation the policy's velocity at its own (x, σ) is the teacher's (GM: up to the bias noise)
    with torch.no_grad():
        student.eval()
        u0 = student.policy(x, sigma, cond).velocity(x, sigma)
    # GM: the K copies differ by bias noise of std 0.05 per (component, channel), DX nodes are exact copies
    assert (u0 - teacher_before).abs().mean() < (0.06 if policy == "gmflow" else 1e-5)
    with torch.no_grad():   # start away from the teacher (PEFT's B = 0 would leave almost nothing to learn)
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    student.train()
    pf = PiFlow(student, teacher, student.settings, policy_kwargs=student.policy_kwargs)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = pf.data_free_loss(noise, cond, generator=torch.Generator().manual_seed(3))
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses
    # the teacher (adapters disabled, its own final norm) is bit-for-bit the base it was
    assert torch.equal(teacher(x, sigma, cond), teacher_before)
    after = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def fine_tune(family, **config_changes):
    """A tiny pipeline of `family` whose transformer has another config — a fine-tune such as Qwen-Image-2512 (the
    Qwen-Image config) or Qwen-Image-Edit-2511 (Edit-Plus with zero_cond_t: reference tokens modulated at t = 0)."""
    import diffusers as d

    pipe = tiny_pipeline(family)
    config = {k: v for k, v in dict(pipe.transformer.config, **config_changes).items() if not k.startswith("_")}
    torch.manual_seed(7)
    transformer = type(pipe.transformer)(**config)
    with torch.no_grad():
        transformer.proj_out.weight.normal_(0, 0.05)
    return getattr(d, type(pipe).__name__)(**dict(pipe.components, transformer=transformer.eval()))


@pytest.mark.parametrize("family,changes", [("qwen", {"num_layers": 3, "attention_head_dim": 8,
                                                      "axes_dims_rope": (2, 2, 4)}),
                                            ("qwen-edit-plus", {"zero_cond_t": True})])
def test_fine_tunes_of_a_family_need_no_code(family, changes, tmp_path):
    """Saved and reloaded, a changed-config checkpoint is recognised as its family, its teacher is the stock
    pipeline's velocity and its student starts at it and trains, through the same architecture."""
    from piflow.integrations.diffusers.loading import pipeline_family

    fine_tune(family, **changes).save_pretrained(tmp_path / "fine-tune")
    assert pipeline_family(str(tmp_path / "fine-tune")).name == family
    pipe = getattr(diffusers, get_family(family).stock_pipeline).from_pretrained(tmp_path / "fine-tune")
    pipe.set_progress_bar_config(disable=True)
    assert all(tuple(getattr(pipe.transformer.config, k)) == v if isinstance(v, tuple)
               else getattr(pipe.transformer.config, k) == v for k, v in changes.items())
    sample, sigma, model_output = stock_first_step(pipe, family)
    prompts = stock_prompts(family, PROMPTS)
    x = unpack_tokens(sample, *latent_shape(family, 1)[-2:]).float()
    cond = condition(pipe, family, prompts)
    teacher = DiffusersTeacher(pipe.transformer, "qwen")
    u = teacher(x, sigma.expand(len(prompts)).float(), cond)
    torch.testing.assert_close(pack_latents(u), model_output.float(), atol=2e-5, rtol=2e-5)
    student = lora_student(pipe, family, "gmflow")
    with torch.no_grad():
        student.eval()
        u0 = student.policy(x, sigma.expand(len(prompts)).float(), cond).velocity(x, sigma.expand(len(prompts)))
    assert (u0 - u).abs().mean() < 0.06
