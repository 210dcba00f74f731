"""FLUX.1 Kontext (reference-image editing on the FLUX.1 transformer) on a tiny random `FluxKontextPipeline`: the
wrapped teacher is what the stock pipeline's scheduler integrates with the reference image in place (same tokens,
RoPE ids and output slice), the FLUX.1 student starts at it and π-ID lowers its loss with the reference in the
condition, and the command line distils from a conditions file, exports, reloads and samples with an image."""
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow import PiFlow  # noqa: E402
from piflow.cli import main  # noqa: E402
from piflow.integrations.diffusers.families.flux_kontext import reference_latent  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts  # noqa: E402
from piflow.integrations.diffusers.students import (ARCHITECTURES, DiffusersPolicyStudent,  # noqa: E402
                                                    DiffusersTeacher, add_student_lora, unpack_tokens)
from piflow.integrations.diffusers.tiny import small_reference_area, tiny_pipeline  # noqa: E402
from piflow.settings import PiIDSettings  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def references_at_their_own_size():
    with small_reference_area():
        yield


PROMPTS = ["make it red", "add a bird"]
SIZE = 32


def picture(seed=0, size=(48, 32)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def condition(pipe, image):
    items = encode_prompts(pipe, "flux-kontext", PROMPTS, max_sequence_length=32, images=[[image]] * len(PROMPTS))
    cond = collate_text(items, "flux-kontext")
    cond["guidance"] = torch.full((len(PROMPTS),), 3.5)
    return cond


def test_teacher_is_what_the_stock_kontext_pipeline_integrates():
    pipe = tiny_pipeline("flux-kontext")
    pipe.set_progress_bar_config(disable=True)
    seen, step = {}, pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        seen.setdefault("first", (sample.clone(), float(timestep) / 1000, model_output.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    image = picture()
    pipe(image=image, prompt=PROMPTS, height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False,
         num_inference_steps=2, guidance_scale=3.5, output_type="latent", max_sequence_length=32,
         generator=torch.Generator().manual_seed(0))
    del pipe.scheduler.step
    sample, sigma, model_output = seen["first"]
    x = unpack_tokens(sample, SIZE // 8 * 4, SIZE // 8 * 4).float()
    cond = condition(pipe, image)
    # the reference is the image as the stock pipeline prepared it: 48×32 px stays 48×32 (a multiple of 16)
    assert cond["reference_latents.0"].shape == (2, 4, 16, 24)
    u = DiffusersTeacher(pipe.transformer, "flux")(x, torch.full((2,), sigma), cond)
    from piflow.integrations.diffusers.students import pack_latents

    torch.testing.assert_close(pack_latents(u), model_output.float(), atol=2e-5, rtol=2e-5)


def test_student_starts_at_the_teacher_and_piid_lowers_the_loss_with_the_reference():
    pipe = tiny_pipeline("flux-kontext")
    cond = condition(pipe, picture())
    teacher = DiffusersTeacher(pipe.transformer, "flux")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.4])
    before = teacher(x, sigma, cond)
    add_student_lora(pipe.transformer, rank=4, target_modules=ARCHITECTURES["flux"].lora_targets(pipe.transformer))
    settings = PiIDSettings(policy="gmflow", nfe=2, shift=3.2, final_step_size_scale=0.5, total_substeps=32,
                            num_intermediate_states=2, window_substeps=2, policy_dropout=0.0)
    student = DiffusersPolicyStudent(pipe.transformer, "gmflow", num_components=2, latent_channels=4,
                                     logstd_hidden=16, share_transformer=True, architecture="flux",
                                     settings=settings, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student.eval()
        u0 = student.policy(x, sigma, cond).velocity(x, sigma)
    assert (u0 - before).abs().mean() < 0.06
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    student.train()
    pf = PiFlow(student, teacher, settings)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    noise, losses = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)), []
    for _ in range(8):
        optimizer.zero_grad()
        losses.append(float(pf.data_free_loss(noise, cond, generator=torch.Generator().manual_seed(3))))
        optimizer.step()
    assert losses[-1] < 0.9 * losses[0], losses
    assert torch.equal(teacher(x, sigma, cond), before)


def test_kontext_distills_exports_loads_and_edits_from_the_cli(tmp_path, capsys):
    base = tmp_path / "tiny-kontext"
    tiny_pipeline("flux-kontext").save_pretrained(base)
    picture(0).save(tmp_path / "a.png")
    picture(1).save(tmp_path / "b.png")
    lines = [{"prompt": "make it red", "image": "a.png"}, {"prompt": "add a bird", "image": "b.png"}]
    (tmp_path / "edit.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run_dir = tmp_path / "run"
    assert main(["distill", "--run-dir", str(run_dir), f"pipeline={base}", f"resolution=[{SIZE},{SIZE}]",
                 f"conditions={tmp_path / 'edit.jsonl'}", "max_sequence_length=32", "student.lora_rank=4",
                 "student.logstd_hidden=16", "student.num_components=2", "distill.total_substeps=16",
                 "train.warmup_iters=0", "train.progress=false", "eval.nfe=[1]", "eval.prompts=[a cat]",
                 "train.iters=2"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["architecture"] == "flux-kontext"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    pipe = pipeline_class("flux-kontext").from_pretrained(base)
    assert type(pipe).__name__ == "PiFluxKontextPipeline"
    pipe.set_progress_bar_config(disable=True)
    pipe.load_piflow_adapter(tmp_path / "exported")
    outputs = [pipe(image=picture(0), prompt=["make it red", "fog"], height=SIZE, width=SIZE, num_inference_steps=4,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    assert outputs[0].shape == (2, SIZE, SIZE, 3) and (outputs[0] == outputs[1]).all()
    edited = pipe(image=picture(5), prompt=["make it red", "fog"], height=SIZE, width=SIZE, num_inference_steps=4,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert not np.array_equal(edited, outputs[0])            # the reference image reaches the student
    assert reference_latent(pipe, picture(0), "cpu").shape == (1, 4, 16, 24)
    assert main(["sample", "--run-dir", str(run_dir), "--prompt", "make it red", "--image", str(tmp_path / "a.png"),
                 "--nfe", "1", "--output", str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["000_00.png"]
    capsys.readouterr()


def test_kontext_image_to_image_from_init_image():
    """``image`` stays the reference; ``init_image`` + ``strength`` start from another picture: strength 1 is the
    edit from noise, a strength that leaves no step returns init_image's latents (the stock VAE calls)."""
    from piflow.settings import PiIDSettings

    pipe = tiny_pipeline("flux-kontext", pipeline_class("flux-kontext"))
    pipe.set_progress_bar_config(disable=True)
    add_student_lora(pipe.transformer, rank=4, target_modules=ARCHITECTURES["flux"].lora_targets(pipe.transformer))
    settings = PiIDSettings(policy="gmflow", nfe=4, shift=3.2, final_step_size_scale=0.5)
    student = DiffusersPolicyStudent(pipe.transformer, "gmflow", num_components=2, latent_channels=4,
                                     logstd_hidden=16, share_transformer=True, architecture="flux", settings=settings,
                                     generator=torch.Generator().manual_seed(0)).eval()
    pipe.set_piflow_student(student)

    def edit(**kwargs):
        return pipe(image=picture(0), prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=4,
                    output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images

    start = picture(7, (SIZE, SIZE))
    torch.testing.assert_close(edit(init_image=start, strength=1.0), edit(), atol=0, rtol=0)
    pixels = pipe.image_processor.preprocess(start, height=SIZE, width=SIZE)
    with torch.no_grad():
        expected = (pipe.vae.encode(pixels).latent_dist.mean - pipe.vae.config.shift_factor) * \
            pipe.vae.config.scaling_factor
    torch.testing.assert_close(edit(init_image=start, strength=0.2), expected.expand(2, -1, -1, -1), atol=1e-5,
                               rtol=1e-5)
