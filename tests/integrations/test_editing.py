"""Editing with reference images — FLUX.2 [dev]/[klein] multi-reference and Qwen-Image-Edit(-Plus) — and the
errors of bad conditions: the teacher with references is the stock pipeline's velocity, the π-Flow pipelines
follow their reference images, and a missing reference, a wrong channel count or a wrong frame count is a one-line
error naming the argument."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow.errors import DataError  # noqa: E402
from piflow.integrations.diffusers.families import get_family  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts, read_conditions_file  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersTeacher, pack_latents, unpack_tokens  # noqa: E402
from piflow.integrations.diffusers.tiny import small_reference_area, tiny_pipeline  # noqa: E402

from family_cases import REFERENCE_AREA, latent_shape, reference_images, size_arguments  # noqa: E402
from test_diffusers_pipelines import lora_student  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["make it red", "add a bird"]


@pytest.fixture(autouse=True)
def small_references():
    with small_reference_area(REFERENCE_AREA):
        yield


@pytest.mark.parametrize("family", ["flux2", "flux2-klein"])
def test_flux2_teacher_with_two_references_is_the_stock_velocity(family):
    """Reference tokens (clean, after the generated ones, ids t = 10, 20) condition the teacher exactly as in the
    stock pipeline's multi-reference editing; without them the velocity differs."""
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    images = reference_images(count=2, scale=2)
    seen = {}
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        seen.setdefault("first", (sample.clone(), float(timestep) / 1000, model_output.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    pipe(image=images, prompt=PROMPTS, num_inference_steps=2, output_type="latent", max_sequence_length=64,
         generator=torch.Generator().manual_seed(0), guidance_scale=4.0 if family == "flux2" else 1.0,
         **size_arguments(family))
    sample, sigma, model_output = seen["first"]
    shape = latent_shape(family, 2)
    x = unpack_tokens(sample.float(), *shape[-2:])
    items = encode_prompts(pipe, family, PROMPTS, max_sequence_length=64, images=[images] * 2)
    assert items[0]["reference_latents.1"].shape == (4, 8, 12)       # the 96×64 reference, 8× VAE
    cond = collate_text(items, family)
    if get_family(family).guidance == "embedded":
        cond["guidance"] = torch.full((2,), 4.0)
    teacher = DiffusersTeacher(pipe.transformer, "flux2")
    u = teacher(x, torch.full((2,), sigma), cond)
    torch.testing.assert_close(pack_latents(u), model_output.float(), atol=2e-5, rtol=2e-5)
    text_only = {k: v for k, v in cond.items() if not k.startswith("reference_latents.")}
    assert (teacher(x, torch.full((2,), sigma), text_only) - u).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flux2", "qwen-edit", "qwen-edit-plus"])
def test_pi_pipelines_follow_their_reference_images(family):
    pipe = tiny_pipeline(family, pipeline_class(family))
    pipe.set_progress_bar_config(disable=True)
    pipe.set_piflow_student(lora_student(pipe, family, "gmflow"))
    count = 1 if family == "qwen-edit" else 2

    def edit(seed):
        images = reference_images(seed, count, 2 if family == "flux2" else 1)
        return pipe(image=images, prompt=PROMPTS, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0), **size_arguments(family)).images

    first, again, other = edit(0), edit(0), edit(1)
    assert first.shape == latent_shape(family, 2)
    assert torch.equal(first, again)                                  # deterministic given noise and references
    assert (first - other).abs().max() > 1e-3                         # a different reference, a different edit


def test_bad_conditions_name_the_argument(tmp_path):
    edit = tiny_pipeline("qwen-edit", pipeline_class("qwen-edit"))
    edit.set_piflow_student(lora_student(edit, "qwen-edit", "gmflow"))
    with pytest.raises(ValueError, match="^image: .* edits a reference image"):
        edit(prompt=PROMPTS, num_inference_steps=1, **size_arguments("qwen-edit"))
    with pytest.raises(ValueError, match="^images: qwen-edit is an editing family"):
        encode_prompts(edit, "qwen-edit", PROMPTS)
    with pytest.raises(ValueError, match="^images: Qwen-Image-Edit takes one reference image"):
        encode_prompts(edit, "qwen-edit", PROMPTS[:1], images=[reference_images(count=2)])
    # a conditions file naming an image that is not there
    (tmp_path / "conditions.jsonl").write_text('{"prompt": "make it red", "images": ["missing.png"]}\n')
    with pytest.raises(DataError, match="line 1: reference image .*missing.png does not exist"):
        read_conditions_file(tmp_path / "conditions.jsonl")
    # reference latents with the wrong channel count (e.g. cached from another VAE)
    items = encode_prompts(edit, "qwen-edit", PROMPTS, images=[reference_images()] * 2)
    cond = collate_text(items, "qwen-edit")
    cond["reference_latents.0"] = cond["reference_latents.0"][:, :3]
    with pytest.raises(ValueError, match="^reference image 0: latents .* must have the batch and channels"):
        DiffusersTeacher(edit.transformer, "qwen")(torch.randn(latent_shape("qwen-edit", 2)), torch.ones(2), cond)
    # references of different sizes in one batch
    mixed = [items[0], dict(items[1], **{"reference_latents.0": items[1]["reference_latents.0"][:, :2]})]
    with pytest.raises(ValueError, match="^images: reference image 0 has latent shapes"):
        collate_text(mixed, "qwen-edit")
    # noise of the wrong channel count
    with pytest.raises(ValueError, match="latents must have shape"):
        edit(image=reference_images(), prompt=PROMPTS, num_inference_steps=1, latents=torch.randn(2, 3, 8, 8),
             **size_arguments("qwen-edit"))
    # a text-to-image family given references
    flux = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="^images: flux takes no reference images"):
        encode_prompts(flux, "flux", PROMPTS, images=[reference_images()] * 2)


def test_video_frame_counts_are_checked():
    pipe = tiny_pipeline("wan", pipeline_class("wan"))
    pipe.set_piflow_student(lora_student(pipe, "wan", "gmflow"))
    with pytest.raises(ValueError, match="^num_frames must be 1 \\+ a multiple of 4"):
        pipe(prompt=PROMPTS, height=64, width=64, num_frames=6, num_inference_steps=1)
    with pytest.raises(ValueError, match="latents must have shape \\(2, 4, 2, 8, 8\\)"):
        pipe(prompt=PROMPTS, height=64, width=64, num_frames=5, num_inference_steps=1,
             latents=torch.randn(2, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="^latents must be 5-D"):
        DiffusersTeacher(pipe.transformer, "wan")(torch.randn(2, 4, 8, 8), torch.ones(2),
                                                  {"encoder_hidden_states": torch.randn(2, 8, 32)})


def test_condition_sources_name_the_argument(tmp_path):
    """A run's (or cache's) source of conditions fits its family: editing families need a conditions file,
    text-to-image ones a prompt file; the errors name the option as the caller spells it."""
    from piflow.errors import ConfigError
    from piflow.integrations.diffusers.prompts import read_condition_source

    reference_images()[0].save(tmp_path / "a.png")
    (tmp_path / "c.jsonl").write_text('{"prompt": "make it red", "image": "a.png"}\n')
    (tmp_path / "p.txt").write_text("a cat\n")
    prompts, images = read_condition_source("qwen-edit", None, tmp_path / "c.jsonl")
    assert prompts == ["make it red"] and images == [[tmp_path / "a.png"]]
    assert read_condition_source("flux2", tmp_path / "p.txt", None) == (["a cat"], None)
    with pytest.raises(ConfigError, match="^qwen-edit is an editing family: give --conditions <JSON Lines"):
        read_condition_source("qwen-edit", tmp_path / "p.txt", None, options=("--prompts ", "--conditions "))
    with pytest.raises(ConfigError, match="^conditions= \\(reference images\\) applies to editing families; flux is"):
        read_condition_source("flux", None, tmp_path / "c.jsonl")
    with pytest.raises(ConfigError, match="^give prompts=<prompt file> or prompt_cache="):
        read_condition_source("flux", None, None, alternative=" or prompt_cache=<folder>")
