"""Stable Diffusion 1.5, the first UNet family, on a tiny from-scratch StableDiffusionPipeline: the wrapped
ε-prediction teacher integrated with Euler on DDIM's σ grid is the stock pipeline with a DDIMScheduler (η = 0) —
exactly, with and without CFG (docs/algorithm.md §15.5); the convolutional GM / DX student starts at the teacher
(every component mean, every DX node); bad settings are one-line errors; the command line distils, exports,
reloads into `PiStableDiffusionPipeline` and samples."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow.heads import DXHead, GMHead  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersPolicyStudent, DiffusersTeacher  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402
from piflow.teachers import ClassifierFreeGuidance  # noqa: E402

from diffusion_family_checks import (assert_matches_stock, assert_student_starts_at_teacher,  # noqa: E402
                                     cli_distil_export_reload, euler_on_ddim_grid, fresh_student)

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a red cat", "two blue birds on a wire"]


def text(pipe, prompts, family="sd15"):
    return collate_text(encode_prompts(pipe, family, prompts), family)


def ddim(pipe):
    """SD's scheduler config as a DDIMScheduler, η = 0, no clipping, ending at α = 1 (σ = 0)."""
    return diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=True)


# a v-prediction fine-tune on the zero-terminal-SNR schedule with trailing timesteps (the convention of SD 2.x-v
# style fine-tunes that reach pure noise): its first DDIM timestep is 999, where α = 0 and σ = 1 exactly
V_ZTSNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize("guidance, fine_tune", [(1.0, None), (7.5, None), (1.0, V_ZTSNR), (7.5, V_ZTSNR)])
def test_teacher_euler_on_ddim_grid_is_the_stock_ddim_pipeline(guidance, fine_tune):
    pipe = tiny_pipeline("sd15")
    if fine_tune is not None:             # the checkpoint's own scheduler config says what its UNet predicts
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **fine_tune)
    scheduler = ddim(pipe)
    stock = diffusers.StableDiffusionPipeline(**dict(pipe.components, scheduler=scheduler))
    stock.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = 20
    expected = stock(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                     latents=noise, output_type="latent").images
    base = DiffusersTeacher(pipe.unet, "sd15", scheduler_config=pipe.scheduler.config)
    if fine_tune is not None:
        assert base.diffusion.prediction_type == "v_prediction" and base.diffusion.schedule.sigma_max == 1.0
        assert int(scheduler.timesteps[0]) == 999
    teacher = base if guidance == 1 else ClassifierFreeGuidance(base, guidance, text(pipe, [""]), batched=False)
    x = euler_on_ddim_grid(teacher, base.diffusion.schedule, scheduler, noise, text(pipe, PROMPTS), steps)
    assert_matches_stock(x, expected)


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher(policy):
    pipe = tiny_pipeline("sd15")
    student = fresh_student(pipe.unet, "sd15", policy)
    head = student.head.proj_means if policy == "gmflow" else student.head.proj
    assert isinstance(head, torch.nn.Conv2d) and head.kernel_size == (3, 3) and student.spatial_features
    assert isinstance(student.head, GMHead if policy == "gmflow" else DXHead)
    out = assert_student_starts_at_teacher(pipe.unet, "sd15", policy, text(pipe, PROMPTS), 16)
    if policy == "gmflow":
        assert out["logweights"].shape == (2, 3, 1, 16, 16)
        torch.testing.assert_close(out["logweights"],
                                   torch.full_like(out["logweights"], -torch.log(torch.tensor(3.0))))


def test_head_noise_breaks_symmetry_in_output_units_and_lora_targets():
    """Component k's output is the teacher's ε plus a per-(component, channel) constant; LoRA wraps the
    feed-forwards and the time-embedding MLP only."""
    from piflow.integrations.diffusers.families import ARCHITECTURES
    from piflow.integrations.diffusers.students import add_student_lora

    pipe = tiny_pipeline("sd15")
    student = DiffusersPolicyStudent(pipe.unet, "gmflow", num_components=3, latent_channels=4, head_noise_std=0.1,
                                     logstd_hidden=16, architecture="sd15",
                                     generator=torch.Generator().manual_seed(0))
    bias = student.head.proj_means.bias.reshape(3, 4) - pipe.unet.conv_out.bias.reshape(1, 4)
    assert bias.abs().max() > 0.01 and (bias[0] - bias[1]).abs().max() > 0.01
    add_student_lora(student.transformer, rank=2, target_modules=ARCHITECTURES["sd15"].lora_targets(pipe.unet))
    wrapped = sorted({name.rsplit(".", 1)[0] for name, _ in student.transformer.named_parameters() if "lora_A" in name})
    assert wrapped and all(n.endswith(("ff.net.0.proj", "ff.net.2", "time_embedding.linear_1",
                                       "time_embedding.linear_2")) for n in (w.rsplit(".lora_A", 1)[0]
                                                                             for w in wrapped)), wrapped
    assert not any("attn" in n for n in wrapped)


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    from piflow.cli import main

    pipe = tiny_pipeline("sd15")
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'") as error:
        DiffusersTeacher(pipe.unet, "sd15", scheduler_config=dict(pipe.scheduler.config,
                                                                  prediction_type="flow_prediction"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="latent_channels") as error:
        DiffusersPolicyStudent(pipe.unet, latent_channels=16, architecture="sd15")
    assert "\n" not in str(error.value)
    pipe.scheduler.register_to_config(prediction_type="flow_prediction")
    pipe.save_pretrained(tmp_path / "bad")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    args = ["distill", "--run-dir", str(tmp_path / "run"), "train.iters=1", "resolution=[32,32]", "eval.prompts=[]",
            f"prompts={tmp_path / 'prompts.txt'}"]
    assert main([*args, f"pipeline={tmp_path / 'bad'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("piflow distill:")]
    assert len(errors) == 1 and "prediction_type 'flow_prediction'" in errors[0], errors
    tiny_pipeline("sd15").save_pretrained(tmp_path / "good")
    assert main([*args, f"pipeline={tmp_path / 'good'}", "quantize=int8"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("piflow distill:")]
    assert len(errors) == 1 and "transformers only" in errors[0], errors


@pytest.mark.parametrize("policy, fine_tune", [("gmflow", None), pytest.param("dx", None, marks=pytest.mark.slow),
                                               ("gmflow", V_ZTSNR)])                  # DX CLI: make test-slow
def test_sd15_distills_exports_loads_and_samples(policy, fine_tune, tmp_path, capsys):
    tiny = tiny_pipeline("sd15")
    if fine_tune is not None:      # a v-prediction zero-terminal-SNR fine-tune: read from its scheduler config
        tiny.scheduler = diffusers.DDIMScheduler.from_config(tiny.scheduler.config, **fine_tune)
    pipe, student, saved, _ = cli_distil_export_reload("sd15", policy, tmp_path, "a red cat\na blue bird on a wire\n", base_pipeline=tiny)
    expected = fine_tune or {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    assert saved["scheduler_config"]["prediction_type"] == expected["prediction_type"]
    assert bool(saved["scheduler_config"].get("rescale_betas_zero_snr", False)) == expected["rescale_betas_zero_snr"]
    assert saved["scheduler_config"]["beta_schedule"] == "scaled_linear"
    assert type(pipe).__name__ == "PiStableDiffusionPipeline"
    assert student.transformer is pipe.unet and student.spatial_features
    assert student.diffusion.prediction_type == expected["prediction_type"]
    capsys.readouterr()
