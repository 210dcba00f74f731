"""Stable Diffusion XL (`StableDiffusionXLPipeline`, `UNet2DConditionModel` with ``addition_embed_type="text_time"``):
the UNet of `sd15` (same convolutional GM / DX head on ``conv_out``, same LoRA targets, piflow's adapter layout) on
SDXL's ε-prediction scaled-linear schedule (β 0.00085–0.012, 1000 steps; read from the pipeline folder's scheduler
config at run time). Conditioning: the two CLIP encoders' penultimate hidden states, concatenated (77, 768 + 1280),
the pooled projection of the second (``text_embeds``) and the micro-conditioning ``time_ids`` (original size, crop
top-left, target size: 6 numbers) in ``added_cond_kwargs``. True CFG 5.0 for the teacher; the empty negative prompt
is all zeros, as the stock pipeline's ``force_zeros_for_empty_prompt`` (`prompts`).

``time_ids`` come from the cond when given (the π-Flow pipeline's call: original_size, crops_coords_top_left,
target_size), else (distillation) from the latent size times SDXL's 8× VAE: (H, W, 0, 0, H, W) — the stock
pipeline's defaults at that size. The GM log-std MLP reads the embedding the resnets receive: time embedding plus
the text/size embedding (`sd15.read_resnet_temb`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls, sd15
from piflow.integrations.diffusers.families.base import Family, Parametrisation

# the scheduler config of the published SDXL base checkpoint (Euler on the scaled-linear schedule, ε-prediction);
# schedule keys as diffusers' single-file default for SD/SDXL checkpoints (see sd15.py); a real pipeline's scheduler
# config replaces this one
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "use_karras_sigmas": False, "clip_sample": False}
VAE_FACTOR = 8           # SDXL's AutoencoderKL: micro-conditions derived from latent sizes


def default_time_ids(height: int, width: int, batch: int, device=None) -> Tensor:
    """(B, 6) stock defaults for an image of height × width pixels: original = target = (H, W), crop (0, 0)."""
    return torch.tensor([[float(height), float(width), 0.0, 0.0, float(height), float(width)]],
                        device=device).expand(batch, 6)


def model_inputs(x_t: Tensor, t: Tensor, cond: dict) -> dict:
    """x_t (B, C, H, W), the timestep t (B,), cond → `UNet2DConditionModel` kwargs with SDXL's added_cond_kwargs."""
    cond = base.check_cond(cond, ("encoder_hidden_states", "text_embeds"), "Stable Diffusion XL")
    batch, dtype = x_t.shape[0], cond["encoder_hidden_states"].dtype
    time_ids = cond.get("time_ids")
    if time_ids is None:
        time_ids = default_time_ids(x_t.shape[2] * VAE_FACTOR, x_t.shape[3] * VAE_FACTOR, batch, x_t.device)
    elif time_ids.shape[0] == 1 and batch > 1:
        time_ids = time_ids.expand(batch, -1)
    return {"sample": x_t, "timestep": t.reshape(-1), "encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": cond["text_embeds"],
                                  "time_ids": time_ids.to(device=x_t.device, dtype=dtype)}}


PARAMETRISATION = Parametrisation(SDXL_SCHEDULER_CONFIG, name="Stable Diffusion XL")
ARCHITECTURE = sd15.unet_architecture("sdxl", model_inputs, PARAMETRISATION, "StableDiffusionXL")


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the joint CLIP embeddings (77, D₁ + D₂) and the pooled embeddings (D₂) (`max_sequence_length`
    unused: CLIP's 77)."""
    embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=pipe._execution_device,
                                              do_classifier_free_guidance=False)
    return [{"encoder_hidden_states": e, "text_embeds": p} for e, p in zip(embeds, pooled)]


def collate(items, device=None, dtype=None) -> dict:
    """Stacked (B, 77, D) embeddings and pooled (B, D₂) ``text_embeds``."""
    padded, _ = base.pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    pooled = torch.stack([item["text_embeds"] for item in items]).to(device=device, dtype=dtype)
    return {"encoder_hidden_states": padded, "text_embeds": pooled}


def tiny(latent_channels: int, seed: int) -> dict:
    """StableDiffusionXLPipeline components: a tiny text-time UNet, two CLIP encoders (the second with projection),
    an AutoencoderKL and the published scheduler config (Euler); empty negatives are zeros as in SDXL base."""
    from diffusers import EulerDiscreteScheduler

    from piflow.integrations.diffusers import tiny as t

    time_dim = 8
    unet = sd15.tiny_unet(latent_channels, seed, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * t.TEXT_WIDTH,
                          addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                          projection_class_embeddings_input_dim=t.TEXT_WIDTH + 6 * time_dim,
                          use_linear_projection=True)
    clip = t.byte_level_tokenizer(77, add_bos=True)
    return dict(unet=t.randomise_output_layer(unet, ARCHITECTURE), vae=t.autoencoder_kl(latent_channels, seed + 1),
                text_encoder=t.clip_text_encoder(len(clip), False, seed + 2), tokenizer=clip,
                text_encoder_2=t.clip_text_encoder(len(clip), True, seed + 3), tokenizer_2=clip,
                scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG), image_encoder=None,
                feature_extractor=None, force_zeros_for_empty_prompt=True)


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    height, width = sd15.image_size(pipe, call["height"], call["width"])
    pipe.check_inputs(call["prompt"], call["prompt_2"], height, width, None, prompt_embeds=call["prompt_embeds"],
                      pooled_prompt_embeds=call["pooled_prompt_embeds"])
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_images_per_prompt"]
    device = pipe._execution_device
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        call["prompt"], call["prompt_2"], device=device, num_images_per_prompt=call["num_images_per_prompt"],
        do_classifier_free_guidance=False, prompt_embeds=call["prompt_embeds"],
        pooled_prompt_embeds=call["pooled_prompt_embeds"], clip_skip=call["clip_skip"])
    original = tuple(call["original_size"] or (height, width))
    target = tuple(call["target_size"] or (height, width))
    time_ids = torch.tensor([[*map(float, original), *map(float, call["crops_coords_top_left"]),
                              *map(float, target)]], device=device).expand(batch, 6)
    noise = sd15.latent_noise(pipe, call, batch, height, width)
    cond = {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled, "time_ids": time_ids}
    return noise, cond, noise.shape[2] * noise.shape[3]


@contextlib.contextmanager
def _vae_in_float32_if_needed(pipe):
    """Inside: a float16 VAE whose config says ``force_upcast`` (SDXL base's VAE overflows in float16) is float32,
    and float16 again after (as the stock pipelines do around their VAE calls)."""
    upcast = pipe.vae.dtype == torch.float16 and bool(getattr(pipe.vae.config, "force_upcast", False))
    if upcast:
        pipe.vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            pipe.vae.to(torch.float16)


def _latent_statistics(pipe, like: Tensor):
    """(mean, std) (1, C, 1, 1) of a VAE config with latents_mean/latents_std, else (None, None)."""
    config = pipe.vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    shape = (1, len(mean), 1, 1)
    return torch.tensor(mean).view(shape).to(like), torch.tensor(std).view(shape).to(like)


def decode(pipe, x: Tensor, output_type: str):
    """Latents → images as the stock pipeline: x·latents_std / scaling_factor + latents_mean when the VAE config has
    them, else x / scaling_factor; decoded and post-processed (no watermark), in float32 for a float16 VAE with
    ``force_upcast``."""
    mean, std = _latent_statistics(pipe, x)
    scale = pipe.vae.config.scaling_factor
    x = x / scale if mean is None else x * std / scale + mean
    with _vae_in_float32_if_needed(pipe):
        image = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def encode_image(pipe, pixels: Tensor) -> Tensor:
    """Pixels (B, 3, H, W) in [−1, 1] → latents as the UNet sees them: the inverse of `decode` (VAE mode)."""
    with _vae_in_float32_if_needed(pipe):
        latents = calls.posterior_mode(pipe, pixels).float()
    mean, std = _latent_statistics(pipe, latents)
    scale = pipe.vae.config.scaling_factor
    return latents * scale if mean is None else (latents - mean) * scale / std


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None), ("prompt_2", None)), prepare=prepare, decode=decode, encode=encode_image,
    output="diffusers.pipelines.stable_diffusion_xl.pipeline_output.StableDiffusionXLPipelineOutput",
    params={"num_images_per_prompt": 1, "pooled_prompt_embeds": None, "clip_skip": None,
            "cross_attention_kwargs": None, "original_size": None, "crops_coords_top_left": (0, 0),
            "target_size": None},
    unused={"guidance_scale": None, "negative_prompt": None, "negative_prompt_2": None,
            "negative_prompt_embeds": None, "negative_pooled_prompt_embeds": None, "guidance_rescale": None,
            "timesteps": None, "eta": None, "denoising_end": None, "negative_original_size": None,
            "negative_crops_coords_top_left": None, "negative_target_size": None},
    doc="Generate images; `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1; `original_size`, "
        "`crops_coords_top_left` and `target_size` are SDXL's micro-conditioning (defaults: the image size, (0, 0)); "
        "CFG arguments (negative prompts and sizes, `guidance_scale`) are accepted and unused (guidance is "
        "distilled in). No watermark is applied.")

FAMILIES = (Family("sdxl", "sdxl", "UNet2DConditionModel", "StableDiffusionXLPipeline", "PiStableDiffusionXLPipeline",
                   encode, collate, ("encoder_hidden_states", "text_embeds"), PIPELINE, tiny, guidance_scale=5.0,
                   latent_packing="inside", denoiser="unet"),)
