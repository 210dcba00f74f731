"""Stable Diffusion XL on a tiny from-scratch StableDiffusionXLPipeline (two CLIP encoders, pooled text embeddings
and size micro-conditioning in added_cond_kwargs): the wrapped ε-prediction teacher integrated with Euler on DDIM's
σ grid is the stock pipeline with a DDIMScheduler (η = 0), with and without CFG (the empty negative prompt is all
zeros, as force_zeros_for_empty_prompt); the convolutional student starts at the teacher; bad settings are one-line
errors; the command line distils, exports, reloads into `PiStableDiffusionXLPipeline` and samples."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow.integrations.diffusers.families import ARCHITECTURES, get_family  # noqa: E402
from piflow.integrations.diffusers.prompts import _null_of, collate_text  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersTeacher  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402
from piflow.teachers import ClassifierFreeGuidance  # noqa: E402

from diffusion_family_checks import (assert_matches_stock, assert_student_starts_at_teacher,  # noqa: E402
                                     cli_distil_export_reload, euler_on_ddim_grid)
from test_sd15 import PROMPTS, ddim, text  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
TIME_IDS = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])       # the stock defaults for 32×32 images


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_teacher_euler_on_ddim_grid_is_the_stock_ddim_pipeline(guidance):
    pipe = tiny_pipeline("sdxl")
    scheduler = ddim(pipe)
    stock = diffusers.StableDiffusionXLPipeline(**dict(pipe.components, scheduler=scheduler))
    stock.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = 20
    expected = stock(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                     latents=noise, output_type="latent").images
    base = DiffusersTeacher(pipe.unet, "sdxl", scheduler_config=pipe.scheduler.config)
    null = _null_of(pipe, get_family("sdxl"), "", 77)
    assert all(not value.any() for value in null.values())          # force_zeros_for_empty_prompt
    teacher = base if guidance == 1 else ClassifierFreeGuidance(base, guidance, collate_text([null], "sdxl"),
                                                                batched=False)
    cond = dict(text(pipe, PROMPTS, "sdxl"), time_ids=TIME_IDS.expand(2, 6))
    x = euler_on_ddim_grid(teacher, base.diffusion.schedule, scheduler, noise, cond, steps)
    assert_matches_stock(x, expected)


def test_micro_conditions_default_to_the_latent_size():
    arch = ARCHITECTURES["sdxl"]
    cond = {"encoder_hidden_states": torch.zeros(2, 77, 64), "text_embeds": torch.zeros(2, 32)}
    inputs = arch.model_inputs(torch.zeros(2, 4, 16, 12), torch.tensor([10.0, 20.0]), cond)
    torch.testing.assert_close(inputs["added_cond_kwargs"]["time_ids"],
                               torch.tensor([[128.0, 96.0, 0.0, 0.0, 128.0, 96.0]] * 2))
    inputs = arch.model_inputs(torch.zeros(2, 4, 16, 12), torch.tensor([10.0, 20.0]), dict(cond, time_ids=TIME_IDS))
    assert inputs["added_cond_kwargs"]["time_ids"].shape == (2, 6)


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher(policy):
    pipe = tiny_pipeline("sdxl")
    assert_student_starts_at_teacher(pipe.unet, "sdxl", policy, text(pipe, PROMPTS, "sdxl"), 16)


def test_bad_settings_are_one_line_errors():
    pipe = tiny_pipeline("sdxl")
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'") as error:
        DiffusersTeacher(pipe.unet, "sdxl", scheduler_config=dict(pipe.scheduler.config,
                                                                  prediction_type="flow_prediction"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="text_embeds") as error:
        DiffusersTeacher(pipe.unet, "sdxl")(torch.zeros(1, 4, 16, 16), torch.tensor([0.5]),
                                            {"encoder_hidden_states": torch.zeros(1, 77, 64)})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("policy", ["gmflow", pytest.param("dx", marks=pytest.mark.slow)])   # DX CLI: make test-slow
def test_sdxl_distills_exports_loads_and_samples(policy, tmp_path, capsys):
    pipe, student, saved, _ = cli_distil_export_reload("sdxl", policy, tmp_path, "a red cat\na blue bird on a wire\n")
    assert saved["scheduler_config"]["prediction_type"] == "epsilon"
    assert type(pipe).__name__ == "PiStableDiffusionXLPipeline" and student.transformer is pipe.unet
    capsys.readouterr()


def test_float16_vae_with_force_upcast_decodes_in_float32():
    """SDXL base's VAE overflows in float16 and says so (force_upcast): a float16 VAE decodes in float32 — exactly
    what a float32 copy of the same (float16-rounded) weights decodes — and stays float16 afterwards."""
    import copy

    from piflow.integrations.diffusers.families.sdxl import decode

    pipe = tiny_pipeline("sdxl")
    pipe.vae.register_to_config(force_upcast=True)
    pipe.vae.to(torch.float16)
    reference = copy.deepcopy(pipe)
    reference.vae.to(torch.float32)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = decode(pipe, latents, "pt")
        expected = decode(reference, latents, "pt")
    assert pipe.vae.dtype == torch.float16 and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, atol=0, rtol=0)
