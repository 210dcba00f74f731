"""PixArt-α, the first diffusion family, on a tiny from-scratch PixArtAlphaPipeline: the wrapped ε-prediction teacher
integrated with Euler on DDIM's σ grid is the stock pipeline with a DDIMScheduler (η = 0) — exactly, with and
without CFG (docs/algorithm.md §15.5); the student starts at the teacher (every GM component mean, every DX node);
an unknown prediction_type is a one-line error; the command line distils, exports, reloads and samples."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow.integrations.diffusers.families import ARCHITECTURES  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersTeacher  # noqa: E402

from diffusion_family_checks import (assert_matches_stock, assert_student_starts_at_teacher,  # noqa: E402
                                     cli_distil_export_reload, euler_on_ddim_grid)
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402
from piflow.teachers import ClassifierFreeGuidance  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a red cat", "two blue birds on a wire"]


def text(pipe, prompts):
    return collate_text(encode_prompts(pipe, "pixart", prompts, max_sequence_length=64), "pixart")


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_teacher_euler_on_ddim_grid_is_the_stock_ddim_pipeline(guidance):
    pipe = tiny_pipeline("pixart")
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    stock = diffusers.PixArtAlphaPipeline(**dict(pipe.components, scheduler=scheduler))
    stock.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = 20
    expected = stock(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                     latents=noise, output_type="latent", use_resolution_binning=False, max_sequence_length=64,
                     clean_caption=False).images
    base = DiffusersTeacher(pipe.transformer, "pixart", scheduler_config=pipe.scheduler.config)
    teacher = base if guidance == 1 else ClassifierFreeGuidance(base, guidance, text(pipe, [""]), batched=False)
    x = euler_on_ddim_grid(teacher, base.diffusion.schedule, scheduler, noise, text(pipe, PROMPTS), steps)
    assert_matches_stock(x, expected)


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher(policy):
    pipe = tiny_pipeline("pixart")
    assert_student_starts_at_teacher(pipe.transformer, "pixart", policy, text(pipe, PROMPTS), 16)


def test_unknown_prediction_type_is_a_one_line_error(tmp_path, capsys):
    from piflow.cli import main

    pipe = tiny_pipeline("pixart")
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'") as error:
        DiffusersTeacher(pipe.transformer, "pixart", scheduler_config=dict(pipe.scheduler.config,
                                                                            prediction_type="flow_prediction"))
    assert "\n" not in str(error.value)
    pipe.scheduler.register_to_config(prediction_type="flow_prediction")
    pipe.save_pretrained(tmp_path / "bad")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    assert main(["distill", "--run-dir", str(tmp_path / "run"), f"pipeline={tmp_path / 'bad'}", "train.iters=1",
                 "resolution=[32,32]", "eval.prompts=[]", f"prompts={tmp_path / 'prompts.txt'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("piflow distill:")]
    assert len(errors) == 1 and "prediction_type 'flow_prediction'" in errors[0], errors


def test_micro_conditions_reach_the_1024_model():
    """sample_size 128 models take resolution/aspect ratio: from the cond when given, else from the latent size."""
    arch = ARCHITECTURES["pixart"]
    cond = {"encoder_hidden_states": torch.zeros(2, 3, 16), "encoder_attention_mask": torch.ones(2, 3)}
    inputs = arch.model_inputs(torch.zeros(2, 4, 16, 12), torch.tensor([10.0, 20.0]), cond)
    torch.testing.assert_close(inputs["added_cond_kwargs"]["resolution"], torch.tensor([[128.0, 96.0]] * 2))
    torch.testing.assert_close(inputs["added_cond_kwargs"]["aspect_ratio"], torch.tensor([[128 / 96]] * 2))
    given = dict(cond, resolution=torch.tensor([[1024.0, 768.0]] * 2), aspect_ratio=torch.tensor([[0.75]] * 2))
    inputs = arch.model_inputs(torch.zeros(2, 4, 16, 12), torch.tensor([10.0, 20.0]), given)
    assert inputs["added_cond_kwargs"]["resolution"][0].tolist() == [1024.0, 768.0]
    assert "resolution" not in inputs and "resolution" in given


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_pixart_distills_exports_loads_and_samples(policy, tmp_path, capsys):
    _, student, saved, _ = cli_distil_export_reload("pixart", policy, tmp_path, "a red cat\na blue bird on a wire\n",
                                                    extra=["max_sequence_length=32"])
    assert saved["scheduler_config"]["prediction_type"] == "epsilon"
    assert student.scheduler_config == saved["scheduler_config"]
    capsys.readouterr()
