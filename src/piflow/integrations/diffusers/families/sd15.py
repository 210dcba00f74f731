"""Stable Diffusion 1.5 (`StableDiffusionPipeline`, `UNet2DConditionModel`): the first UNet family — an ε-prediction
diffusion network on SD's scaled-linear schedule (β 0.00085–0.012, 1000 steps), converted into a flow teacher by
the shared `Parametrisation` (docs/algorithm.md §15; the schedule and prediction type are read from the pipeline
folder's scheduler config at run time, SD's published one is the default). CLIP text embeddings (77 tokens); true
CFG 7.5 against the empty prompt for the teacher.

The UNet's last layers are conv_out(SiLU(conv_norm_out(h))), a 3×3 convolution to the C latent channels. The
student reads the features entering ``conv_out`` and replaces it by a convolutional GM / DX head built from it
(K / N copies of conv_out; `piflow.heads`); it trains its own copy of ``conv_norm_out``. The GM log-std MLP reads the
embedding the resnets receive (the time embedding; SDXL adds its text/size embedding to it), from the first
resnet's ``temb`` argument. The student's positions are latent pixels (patch 1): `pixels_to_latents` lays them out.

LoRA: the authors publish no UNet recipe; piflow's choice, as for the transformers (§6.6), is the feed-forward
layers of the UNet's transformer blocks (``ff.net.0.proj``, ``ff.net.2``) and the time-embedding MLP
(``time_embedding.linear_1/2``), never attention nor the convolutions. Adapters are written in piflow's layout (the
authors have none for UNets).
"""
from __future__ import annotations

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, Family, Parametrisation

UNET_LORA_TARGETS = r".*(ff\.net\.0\.proj|ff\.net\.2|time_embedding\.linear_1|time_embedding\.linear_2)$"
# the scheduler config of the published SD 1.5 checkpoint (PNDM on the scaled-linear schedule, ε-prediction); only
# the schedule keys and prediction_type matter for the teacher. Schedule keys checked against diffusers' own default
# for Stable Diffusion single-file checkpoints (`SCHEDULER_DEFAULT_CONFIG` in diffusers/loaders/single_file_utils.py:
# scaled_linear 0.00085–0.012, 1000 steps, epsilon); a real pipeline's scheduler config replaces this one
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading"}
TEMB_MODULE = "down_blocks.0.resnets.0"        # its forward gets the embedding every resnet sees


def pixels_to_latents(tokens: Tensor, height: int, width: int, patch=1) -> Tensor:
    """Per-pixel outputs (B, H·W, c) (row-major pixels, the UNet heads' positions) → (B, c, H, W)."""
    batch, length, channels = tokens.shape
    if length != height * width:
        raise ValueError(f"{length} positions do not match a {height}×{width} latent")
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def read_resnet_temb(args: tuple, kwargs: dict, output) -> Tensor:
    """The ``temb`` argument of a diffusers ResnetBlock2D call (B, D)."""
    return args[1] if len(args) > 1 else kwargs["temb"]


def unet_architecture(name: str, model_inputs, parametrisation: Parametrisation, alias: str) -> Architecture:
    """The student `Architecture` of a `UNet2DConditionModel` family (`model_inputs` differs between SD and SDXL)."""
    return Architecture(
        name, model_inputs, pixels_to_latents, "pc", False, lambda unet: UNET_LORA_TARGETS, packs_outside=False,
        base_class="UNet2DConditionModel", final_norm="conv_norm_out", projection="conv_out",
        temb_module=TEMB_MODULE, read_temb=read_resnet_temb,
        cond_dim=lambda unet: unet.time_embedding.linear_2.out_features, patch_size=lambda unet: 1,
        alias=alias, parametrisation=parametrisation)


def model_inputs(x_t: Tensor, t: Tensor, cond: dict) -> dict:
    """x_t (B, C, H, W), the timestep t (B,) (from the `Parametrisation`), cond → `UNet2DConditionModel` kwargs."""
    cond = base.check_cond(cond, ("encoder_hidden_states",), "Stable Diffusion 1.5")
    return {"sample": x_t, "timestep": t.reshape(-1), "encoder_hidden_states": cond["encoder_hidden_states"]}


PARAMETRISATION = Parametrisation(SD15_SCHEDULER_CONFIG, name="Stable Diffusion 1.5")
ARCHITECTURE = unet_architecture("sd15", model_inputs, PARAMETRISATION, "StableDiffusion")


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the CLIP embeddings (77, D) (the pipeline pads to CLIP's length; `max_sequence_length` unused)."""
    embeds, _ = pipe.encode_prompt(list(prompts), pipe._execution_device, 1, False)
    return [{"encoder_hidden_states": e} for e in embeds]


def tiny_unet(latent_channels: int, seed: int, **config):
    """A two-level UNet2DConditionModel (8, 16 channels, one layer per block, 2-dim heads) with a random
    conv_out (diffusers' default init is fine; re-drawn for informative outputs as the transformers')."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    settings = dict(sample_size=16, in_channels=latent_channels, out_channels=latent_channels,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                    layers_per_block=1, attention_head_dim=2, norm_num_groups=4)
    settings.update(config)
    return UNet2DConditionModel(**settings).eval()


def tiny(latent_channels: int, seed: int) -> dict:
    """StableDiffusionPipeline components: a tiny UNet, a CLIP text encoder, an AutoencoderKL and the published
    scheduler config (PNDM); no safety checker."""
    from diffusers import PNDMScheduler

    from piflow.integrations.diffusers import tiny as t

    unet = tiny_unet(latent_channels, seed, cross_attention_dim=t.TEXT_WIDTH)
    clip = t.byte_level_tokenizer(77, add_bos=True)
    return dict(unet=t.randomise_output_layer(unet, ARCHITECTURE), vae=t.autoencoder_kl(latent_channels, seed + 1),
                text_encoder=t.clip_text_encoder(len(clip), False, seed + 2), tokenizer=clip,
                scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def image_size(pipe, height, width) -> tuple[int, int]:
    """(height, width) in pixels; each defaults to the UNet's sample size times the VAE factor (the stock ones)."""
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return int(height or default), int(width or default)


def latent_noise(pipe, call: dict, batch: int, height: int, width: int) -> Tensor:
    factor = pipe.vae_scale_factor
    return calls.noise((batch, pipe.unet.config.in_channels, height // factor, width // factor), call["latents"],
                       call["generator"], pipe._execution_device)


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    height, width = image_size(pipe, call["height"], call["width"])
    pipe.check_inputs(call["prompt"], height, width, None, prompt_embeds=call["prompt_embeds"])
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_images_per_prompt"]
    prompt_embeds, _ = pipe.encode_prompt(call["prompt"], pipe._execution_device, call["num_images_per_prompt"],
                                          False, prompt_embeds=call["prompt_embeds"], clip_skip=call["clip_skip"])
    noise = latent_noise(pipe, call, batch, height, width)
    return noise, {"encoder_hidden_states": prompt_embeds}, noise.shape[2] * noise.shape[3]


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None),), prepare=prepare, decode=calls.decode_scaled, encode=calls.encode_scaled,
    output="diffusers.pipelines.pipeline_utils.ImagePipelineOutput",
    params={"num_images_per_prompt": 1, "clip_skip": None, "cross_attention_kwargs": None},
    unused={"guidance_scale": None, "negative_prompt": None, "negative_prompt_embeds": None,
            "guidance_rescale": None, "timesteps": None, "eta": None},
    doc="Generate images; `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1; CFG arguments (negative "
        "prompts, `guidance_scale`, `guidance_rescale`) are accepted and unused (guidance is distilled in). No "
        "safety checker runs: the output is an ImagePipelineOutput (images only).")


FAMILIES = (Family("sd15", "sd15", "UNet2DConditionModel", "StableDiffusionPipeline", "PiStableDiffusionPipeline",
                   encode, base.collate_padded, ("encoder_hidden_states",), PIPELINE, tiny, guidance_scale=7.5,
                   latent_packing="inside", denoiser="unet"),)
