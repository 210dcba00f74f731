"""Image-to-image (``image=`` / ``init_image=`` and ``strength=``) on the π-Flow pipelines of FLUX.1, Qwen-Image,
FLUX.2, SD3, Z-Image, SD 1.5, SDXL and LongCat-Image (tiny random pipelines): strength 1 is text-to-image on the same noise; a strength that leaves no step returns
the input image's latents, computed here with the stock VAE calls; an intermediate strength runs exactly the last
⌊nfe·strength⌋ points of the text-to-image grid (computed here from the schedule's formula); bad arguments are
errors naming them."""
import numpy as np
import pytest
import torch

from piflow.settings import PiIDSettings

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow.integrations.diffusers.families import get_family  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.students import ARCHITECTURES, DiffusersPolicyStudent, add_student_lora  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
FAMILIES = ["flux", "qwen", "flux2", "sd3", "zimage", "sd15", "sdxl", "longcat"]
SIZE = {"flux": 32, "qwen": 64, "flux2": 64, "sd3": 32, "zimage": 32, "sd15": 32, "sdxl": 32,
        "longcat": 32}                                    # pixels (8× VAEs: 64)
DIFFUSION = ("sd15", "sdxl")
SHIFT, FINAL = 3.2, 0.5


def pipe_with_student(family):
    pipe = tiny_pipeline(family, pipeline_class(family))
    pipe.set_progress_bar_config(disable=True)
    architecture = get_family(family).architecture
    network = getattr(pipe, get_family(family).denoiser)
    add_student_lora(network, rank=4, target_modules=ARCHITECTURES[architecture].lora_targets(network))
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    settings = PiIDSettings(policy="gmflow", nfe=4, shift=SHIFT, final_step_size_scale=FINAL)
    student = DiffusersPolicyStudent(network, "gmflow", num_components=2,
                                     latent_channels=16 if family == "longcat" else 4,    # LongCat's tiny: 16
                                     logstd_hidden=16, share_transformer=True, architecture=architecture,
                                     settings=settings, generator=torch.Generator().manual_seed(0),
                                     scheduler_config=pipe.scheduler.config if family in DIFFUSION else None).eval()
    pipe.set_piflow_student(student)
    return pipe


def init_image(family, seed=3):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE[family], SIZE[family], 3), dtype=np.uint8))


def call(pipe, family, **kwargs):
    argument = "init_image" if family == "flux2" else "image"
    if "init" in kwargs:
        kwargs[argument] = kwargs.pop("init")
    return pipe(prompt=["a red cat", "fog"], height=SIZE[family], width=SIZE[family], num_inference_steps=4,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


def stock_latents(pipe, family, image):
    """The init image's latents through the stock VAE calls (posterior mean; piflow's layout)."""
    pixels = pipe.image_processor.preprocess(image, height=SIZE[family], width=SIZE[family])
    with torch.no_grad():
        if family == "sdxl":                  # the SDXL pipelines scale only (they ignore a VAE's shift_factor)
            return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        if family in ("flux", "sd3", "zimage", "sd15", "longcat"):        # AutoencoderKL: (mean − shift)·scale
            mean = pipe.vae.encode(pixels).latent_dist.mean
            return (mean - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
        if family == "qwen":
            mean = pipe.vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
            mu = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1)
            return (mean - mu) / std
        return pipe._unpatchify_latents(pipe._encode_vae_image(image=pixels, generator=None))


def expected_timesteps(nfe, strength):
    """σ·1000 of the steps image-to-image runs: raw starts 1 − i/(nfe − 1 + f), the last ⌊nfe·strength⌋ of them,
    warped by σ = m·t/(1 + (m − 1)·t)."""
    base = 1 / (nfe - 1 + FINAL)
    raw = [1 - i * base for i in range(nfe)][nfe - int(nfe * strength):]
    return [1000 * SHIFT * t / (1 + (SHIFT - 1) * t) for t in raw]


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_one_is_text_to_image_and_no_step_returns_the_image(family):
    pipe = pipe_with_student(family)
    text_to_image = call(pipe, family)
    torch.testing.assert_close(call(pipe, family, init=init_image(family), strength=1.0), text_to_image,
                               atol=0, rtol=0)
    untouched = call(pipe, family, init=init_image(family), strength=0.2)        # ⌊4·0.2⌋ = 0 steps
    expected = stock_latents(pipe, family, init_image(family)).float()
    assert untouched.shape == text_to_image.shape
    torch.testing.assert_close(untouched, expected.expand_as(untouched), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, strength", [(family, 0.5) for family in FAMILIES] + [("flux", 0.75)])
def test_intermediate_strength_runs_the_tail_of_the_grid_from_the_noised_image(family, strength):
    pipe = pipe_with_student(family)
    seen = []

    def callback(pipeline, i, timestep, outputs):
        seen.append(float(timestep))
        return outputs

    student = pipe.piflow_student
    states, policy = [], student.policy

    def spy(x, sigma, cond=None):
        states.append((x.clone(), sigma.clone()))
        return policy(x, sigma, cond)

    student.policy = spy
    image = init_image(family)
    x0 = stock_latents(pipe, family, image).float()
    noise = torch.randn(2, *x0.shape[1:], generator=torch.Generator().manual_seed(5))
    out = call(pipe, family, init=image, strength=strength, callback_on_step_end=callback, latents=noise)
    timesteps = expected_timesteps(4, strength)
    assert seen == pytest.approx(timesteps, rel=1e-6)
    assert [float(sigma[0]) for _, sigma in states] == pytest.approx([t / 1000 for t in timesteps], rel=1e-6)
    # the first student evaluation sees the image forward-diffused to the first σ with the call's noise
    sigma0 = timesteps[0] / 1000
    torch.testing.assert_close(states[0][0], (1 - sigma0) * x0.expand_as(noise) + sigma0 * noise, atol=1e-5,
                               rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_bad_img2img_arguments_are_errors_naming_them(family):
    pipe = pipe_with_student(family)
    with pytest.raises(ValueError, match="strength must be a number in \\[0, 1\\]"):
        call(pipe, family, init=init_image(family), strength=1.5)
    with pytest.raises(ValueError, match="strength < 1 needs an init image"):
        call(pipe, family, strength=0.5)
