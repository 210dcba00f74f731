"""PiFlux/PiSD3/PiQwenImage pipelines on tiny from-scratch pipelines (real tokenizers → text encoders → transformer
→ VAE): the pipeline loop equals the core sampler, adapters round-trip through `from_pretrained`, LoRAs combine."""
import pytest
import torch

from piflow.settings import PiIDSettings

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow import PiFlow  # noqa: E402
from piflow.integrations.diffusers.adapter import WEIGHTS, save_piflow_adapter  # noqa: E402
from piflow.integrations.diffusers.families import FAMILIES, get_family  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts  # noqa: E402
from piflow.integrations.diffusers.scheduler import FlowMapSDEScheduler  # noqa: E402
from piflow.integrations.diffusers.students import (ARCHITECTURES, DiffusersPolicyStudent,  # noqa: E402
                                                    DiffusersTeacher, add_student_lora)
from piflow.integrations.diffusers.tiny import small_reference_area, tiny_pipeline  # noqa: E402

from family_cases import (REFERENCE_AREA, encode_arguments, image_size, latent_shape, pipe_arguments,  # noqa: E402
                          size_arguments)

pytestmark = pytest.mark.usefixtures("single_thread")
ARCHS = sorted(name for name in FAMILIES if name != "dit")   # DiT-XL/2 takes class labels: test_dit_family.py
# the diffusion families (ε-prediction): a random tiny ε model has velocities of ~600 near σ = 1 (1/α ≈ 150), so
# their samples are compared relative to their largest value; PixArt's transformer and LongCat-Image's pipeline have
# no diffusers LoRA loader (set_adapters), so the LoRA-combination test runs on the others
DIFFUSION_FAMILIES = ("pixart", "sd15", "sdxl")
SET_ADAPTER_ARCHS = [name for name in ARCHS if name not in ("pixart", "longcat")]
SIZE = 32            # pixels; latents 16×16
PROMPTS = ["a red cat", "two blue birds on a wire"]


@pytest.fixture(autouse=True)
def small_references():
    with small_reference_area(REFERENCE_AREA):
        yield


def denoiser(pipe, family):
    """The pipeline's network: ``pipe.unet`` (SD 1.5, SDXL) or ``pipe.transformer``."""
    return getattr(pipe, get_family(family).denoiser)


def assert_close_to_scale(actual, expected, rel=1e-5):
    """|actual − expected| ≤ rel·max|expected| everywhere (float round-off relative to the largest value)."""
    assert float((actual - expected).abs().max()) <= rel * float(expected.abs().max())


def lora_student(pipe, family, policy, seed=0):
    architecture = get_family(family).architecture
    network = denoiser(pipe, family)
    targets = ARCHITECTURES[architecture].lora_targets(network)
    add_student_lora(network, rank=4, target_modules=targets)
    with torch.no_grad():   # PEFT starts B at 0: give the LoRA a visible effect
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    settings = PiIDSettings(policy=policy, nfe=4, shift=3.2, final_step_size_scale=0.5)
    kwargs = {"mode": "grid", "segment_size": 1 / 3.5, "shift": 3.2} if policy == "dx" else {}
    return DiffusersPolicyStudent(network, policy, num_components=2, num_nodes=3,
                                  latent_channels=latent_shape(family, 1)[1],
                                  logstd_hidden=16, share_transformer=True, architecture=architecture,
                                  policy_kwargs=kwargs, settings=settings,
                                  generator=torch.Generator().manual_seed(seed),
                                  scheduler_config=pipe.scheduler.config if family in DIFFUSION_FAMILIES else None
                                  ).eval()


def run(pipe, steps, seed=0, family="flux", **kwargs):
    """The pipeline's images (video families: frames) for PROMPTS at the family's test size."""
    arguments = dict(size_arguments(family), **pipe_arguments(family))
    arguments.update(kwargs)
    out = pipe(prompt=PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **arguments)
    return out.frames if get_family(family).video else out.images


def text_cond(pipe, architecture):
    length = 256 if architecture == "sd3" else 512       # the pipelines' default max_sequence_length
    cond = collate_text(encode_prompts(pipe, architecture, PROMPTS, max_sequence_length=length,
                                       **encode_arguments(architecture, len(PROMPTS))), architecture)
    if get_family(architecture).guidance == "embedded":
        cond["guidance"] = torch.full((len(PROMPTS),), get_family(architecture).guidance_scale)
    if architecture == "sdxl":                             # the stock size micro-conditions of the test images
        size = float(image_size(architecture))
        cond["time_ids"] = torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(len(PROMPTS), 6)
    return cond


# DX: one family in the fast tier (make test), every family in make test-slow
@pytest.mark.parametrize("architecture, policy", [(x, "gmflow") for x in ARCHS] + [
    pytest.param(x, "dx", marks=() if x == "flux" else pytest.mark.slow) for x in ARCHS])
def test_pipeline_equals_the_core_sampler_and_gives_images(architecture, policy):
    pipe = tiny_pipeline(architecture, pipeline_class(architecture))
    pipe.set_progress_bar_config(disable=True)
    student = lora_student(pipe, architecture, policy)
    pipe.set_piflow_student(student)
    assert isinstance(pipe.scheduler, FlowMapSDEScheduler) and pipe.scheduler.config.shift == 3.2
    shape = latent_shape(architecture, len(PROMPTS))
    latents = run(pipe, 4, family=architecture, output_type="latent")
    assert latents.shape == shape
    # the same noise and text condition through the core sampling loop (independent of the pipeline code)
    noise = diffusers.utils.torch_utils.randn_tensor(shape, generator=torch.Generator().manual_seed(0))
    pf = PiFlow(student, None, policy=policy, nfe=4, final_step_size_scale=0.5, shift=3.2,
                policy_kwargs=student.policy_kwargs)
    cond = text_cond(pipe, architecture)
    expected = pf.sample(noise, nfe=4, cond=cond, temperature="auto")
    # diffusion families: the rollouts carry the ε model's 1/α-amplified round-off (measured up to 8e-5 of the
    # largest value for PixArt's GM student, whose linear β table reaches α ≈ 0.006)
    rel = 2e-4 if architecture in DIFFUSION_FAMILIES else 1e-5
    assert_close_to_scale(latents, expected, rel)
    # an explicit step list (raw times, warped by the shift) runs through the same loop
    sigmas = [1.0, 0.6, 0.25]
    seen = []

    def callback(pipeline, i, timestep, outputs):
        seen.append((i, pipeline.scheduler.step_index))      # step_index is up to date inside callbacks
        return outputs

    listed = run(pipe, None, family=architecture, output_type="latent", sigmas=sigmas,
                 callback_on_step_end=callback)
    assert pipe.scheduler.num_inference_steps == 3 and seen == [(0, 1), (1, 2), (2, 3)]
    expected = pf.sample(noise, sigmas=sigmas, cond=cond, temperature="auto")
    assert_close_to_scale(listed, expected, rel)
    size = image_size(architecture)
    frames = size_arguments(architecture).get("num_frames")
    for steps in (1, 4):
        images = run(pipe, steps, family=architecture, output_type="np")
        assert images.shape == ((2, frames, size, size, 3) if frames else (2, size, size, 3))
        assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("architecture", SET_ADAPTER_ARCHS)
def test_adapter_round_trip_through_from_pretrained_and_lora_combination(architecture, tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline(architecture, pipeline_class(architecture))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "base")          # a local checkpoint of the base model (before LoRA)
    scheduler_config = pipe.scheduler.config if architecture in DIFFUSION_FAMILIES else None
    base_u = DiffusersTeacher(denoiser(pipe, architecture), get_family(architecture).architecture,
                              scheduler_config=scheduler_config)
    x = torch.randn(latent_shape(architecture, 2), generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.9, 0.3])
    cond = text_cond(pipe, architecture)
    teacher_before = base_u(x, sigma, cond)
    student = lora_student(pipe, architecture, "gmflow")
    pipe.set_piflow_student(student)
    expected = run(pipe, 2, family=architecture, output_type="latent")
    save_piflow_adapter(student, tmp_path / "adapter")

    fresh = pipeline_class(architecture).from_pretrained(tmp_path / "base")
    fresh.set_progress_bar_config(disable=True)
    fresh.load_piflow_adapter(tmp_path / "adapter")
    assert torch.equal(run(fresh, 2, family=architecture, output_type="latent"), expected)            # bit-for-bit
    # the teacher (adapters disabled) is the untouched base
    torch.testing.assert_close(DiffusersTeacher(denoiser(fresh, architecture), get_family(architecture).architecture,
                                                scheduler_config=scheduler_config)(x, sigma, cond),
                               teacher_before, atol=0, rtol=0)
    # a second LoRA through the pipeline's set_adapters, with per-adapter strengths
    denoiser(fresh, architecture).add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                             target_modules=["to_q", "to_v"]), "style")   # attention, like styles
    with torch.no_grad():
        for name, param in denoiser(fresh, architecture).named_parameters():
            if "lora_B.style" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(9))
    fresh.set_adapters(["piflow", "style"], adapter_weights=[1.0, 0.0])
    assert torch.equal(run(fresh, 2, family=architecture, output_type="latent"), expected)
    fresh.set_adapters(["piflow", "style"], adapter_weights=[1.0, 0.8])
    styled = run(fresh, 2, family=architecture, output_type="latent")
    assert torch.isfinite(styled).all() and not torch.allclose(styled, expected)


def test_pipeline_errors_are_clear(tmp_path):
    pipe = tiny_pipeline("flux", pipeline_class("flux"))
    with pytest.raises(RuntimeError, match="load_piflow_adapter"):
        run(pipe, 1)
    student = lora_student(pipe, "flux", "gmflow")
    pipe.set_piflow_student(student)
    with pytest.raises(ValueError, match="temperature"):
        run(pipe, 2, temperature="hot")
    with pytest.raises(ValueError, match="latents must have shape"):
        run(pipe, 1, latents=torch.randn(2, 4, 8, 8))
    sd3 = tiny_pipeline("sd3", pipeline_class("sd3"))
    with pytest.raises(ValueError, match="cannot drive"):
        sd3.set_piflow_student(student)
    save_piflow_adapter(student, tmp_path / "adapter")
    weights = tmp_path / "adapter" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        tiny_pipeline("flux", pipeline_class("flux")).load_piflow_adapter(tmp_path / "adapter")


def test_guidance_input_reaches_the_flux_student():
    pipe = tiny_pipeline("flux", pipeline_class("flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.set_piflow_student(lora_student(pipe, "flux", "gmflow"))
    low, high = run(pipe, 1, guidance_scale=1.0, output_type="latent"), run(pipe, 1, guidance_scale=5.0,
                                                                            output_type="latent")
    assert not torch.allclose(low, high)


def write_in_authors_layout(student, directory, class_name):
    """Re-write our adapter in the layout of the authors' GMFlux/GMQwen/DX classes (algorithm.md §5.4, §6.3–6.6)."""
    import json

    from safetensors.torch import load_file, save_file

    ours = directory.parent / "ours"
    save_piflow_adapter(student, ours)
    renames = {"head.proj_means.": "proj_out_means.", "head.proj_logweights.": "proj_out_logweights.",
               "head.logstd_mlp.": "proj_out_logstds.", "head.proj.": "proj_out.", "norm_out.": "norm_out.",
               "lora.": ""}
    tensors = {}
    for key, value in load_file(ours / WEIGHTS).items():
        prefix = next(p for p in renames if key.startswith(p))
        tensors[renames[prefix] + key[len(prefix):]] = value
    directory.mkdir()
    kind = "GMFlow" if class_name.startswith("GM") else "DX"
    save_file(tensors, directory / "diffusion_pytorch_model.safetensors",
              metadata={"policy_config": json.dumps({"type": kind})})
    (directory / "config.json").write_text(json.dumps({"_class_name": class_name, "num_gaussians": 2}))


@pytest.mark.parametrize("architecture,policy,class_name", [("flux", "gmflow", "GMFluxTransformer2DModel"),
                                                             ("qwen", "dx", "DXQwenImageTransformer2DModel")])
def test_adapters_in_the_authors_layout_load(architecture, policy, class_name, tmp_path):
    pipe = tiny_pipeline(architecture, pipeline_class(architecture))
    pipe.set_progress_bar_config(disable=True)
    student = lora_student(pipe, architecture, policy)
    student.policy_kwargs = {}      # the authors' DX policy_config carries only its type here: defaults apply
    pipe.set_piflow_student(student)
    expected = run(pipe, 4, family=architecture, output_type="latent")
    write_in_authors_layout(student, tmp_path / "authors", class_name)
    fresh = tiny_pipeline(architecture, pipeline_class(architecture))
    fresh.set_progress_bar_config(disable=True)
    loaded = fresh.load_piflow_adapter(tmp_path / "authors")
    assert loaded.policy_kind == policy and loaded.transformer.peft_config["piflow"].r == 4
    assert torch.equal(run(fresh, 4, family=architecture, output_type="latent"), expected)


def test_adapter_from_a_hub_id_or_subfolder(tmp_path, monkeypatch):
    import huggingface_hub

    pipe = tiny_pipeline("flux", pipeline_class("flux"))
    student = lora_student(pipe, "flux", "gmflow")
    save_piflow_adapter(student, tmp_path / "repo" / "gmflux_k8")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None):      # what the Hub (or its cache) would return
        calls.append((repo_id, allow_patterns))
        if repo_id != "someone/pi-flux":
            raise huggingface_hub.errors.RepositoryNotFoundError("404")
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    fresh = tiny_pipeline("flux", pipeline_class("flux"))
    fresh.load_piflow_adapter("someone/pi-flux", subfolder="gmflux_k8")
    assert calls == [("someone/pi-flux", ["gmflux_k8/*"])]
    fresh.load_piflow_adapter(tmp_path / "repo", subfolder="gmflux_k8")       # local folder: no Hub call
    assert len(calls) == 1
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        fresh.load_piflow_adapter("nobody/missing")


@pytest.mark.parametrize("family", ["zimage", "flux2", "flux2-klein", "wan", "qwen-edit", "qwen-edit-plus"])
def test_every_stock_argument_is_accepted(family):
    """The π-Flow pipelines of this release take every argument of their stock pipeline (CFG ones with a warning,
    attention kwargs and non-latent callback tensors with a one-line error)."""
    import inspect

    stock = getattr(diffusers, get_family(family).stock_pipeline)
    ours = pipeline_class(family)
    assert set(inspect.signature(stock.__call__).parameters) <= set(inspect.signature(ours.__call__).parameters)


def test_cfg_arguments_warn_and_attention_kwargs_are_refused():
    pipe = tiny_pipeline("wan", pipeline_class("wan"))
    pipe.set_progress_bar_config(disable=True)
    pipe.set_piflow_student(lora_student(pipe, "wan", "gmflow"))
    kwargs = dict(prompt=PROMPTS, height=64, width=64, num_frames=5, num_inference_steps=1, output_type="latent")
    plain = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    with pytest.warns(UserWarning, match="guidance_scale, negative_prompt unused: the π-Flow student has"):
        guided = pipe(negative_prompt="blurry", guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                      **kwargs).frames
    assert torch.equal(plain, guided)
    with pytest.raises(ValueError, match="^attention_kwargs: "):
        pipe(attention_kwargs={"scale": 0.5}, **kwargs)
    with pytest.raises(ValueError, match="^callback_on_step_end_tensor_inputs: .* not \\['prompt_embeds'\\]"):
        pipe(callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kwargs)
