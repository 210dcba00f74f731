"""Stable Diffusion 3 (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`): latents go in as they are (the model
patchifies, tokens (p, p, c)-ordered); timestep = σ·1000; true CFG 4.0 for the teacher."""
from __future__ import annotations

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, Family
from piflow.timewarp import NUM_TIMESTEPS

# SD3 LoRA: image and context feed-forwards of every joint block and the timestep MLP, never attention (§6.6).
SD3_LORA_TARGETS = (r".*(ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|"
                    r"timestep_embedder\.linear_1|timestep_embedder\.linear_2)$")


def model_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """latents (B, C, H, W), σ (B,), cond → `SD3Transformer2DModel` forward kwargs."""
    inputs = base.check_cond(cond, ("encoder_hidden_states", "pooled_projections"), "SD3")
    inputs.update(hidden_states=latents, timestep=sigma.reshape(-1).to(latents.dtype) * NUM_TIMESTEPS)
    return inputs


ARCHITECTURE = Architecture("sd3", model_inputs, base.unpatchify_pqc, "pc", False,
                            lambda transformer: SD3_LORA_TARGETS, packs_outside=False,
                            base_class="SD3Transformer2DModel", alias="SD3")


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the joint CLIP + T5 embeddings (L, D) and the pooled CLIP embeddings (D')."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              device=pipe._execution_device, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(embeds, pooled)]


def tiny(latent_channels: int, seed: int) -> dict:
    """StableDiffusion3Pipeline components: two joint blocks, two CLIP encoders and a T5, an AutoencoderKL."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from piflow.integrations.diffusers import tiny as t

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=latent_channels, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=2 * t.TEXT_WIDTH, caption_projection_dim=16,
                                        pooled_projection_dim=2 * t.TEXT_WIDTH, out_channels=latent_channels,
                                        pos_embed_max_size=32)
    clip = t.byte_level_tokenizer(77, add_bos=True)
    t5 = t.byte_level_tokenizer(256)
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE),
                vae=t.autoencoder_kl(latent_channels, seed + 1),
                text_encoder=t.clip_text_encoder(len(clip), True, seed + 2), tokenizer=clip,
                text_encoder_2=t.clip_text_encoder(len(clip), True, seed + 3), tokenizer_2=clip,
                text_encoder_3=t.t5_encoder(len(t5), 2 * t.TEXT_WIDTH, seed + 4), tokenizer_3=t5,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    height, width = calls.image_size(pipe, call["height"], call["width"])
    pipe.check_inputs(call["prompt"], call["prompt_2"], call["prompt_3"], height, width,
                      prompt_embeds=call["prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
                      max_sequence_length=call["max_sequence_length"])
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_images_per_prompt"]
    device = pipe._execution_device
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=call["prompt"], prompt_2=call["prompt_2"], prompt_3=call["prompt_3"], device=device,
        num_images_per_prompt=call["num_images_per_prompt"], do_classifier_free_guidance=False,
        prompt_embeds=call["prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
        max_sequence_length=call["max_sequence_length"])
    latent_h, latent_w = int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor
    noise = calls.noise((batch, pipe.transformer.config.in_channels, latent_h, latent_w), call["latents"],
                        call["generator"], device)
    patch = pipe.transformer.config.patch_size
    cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}
    return noise, cond, (latent_h // patch) * (latent_w // patch)


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None), ("prompt_2", None), ("prompt_3", None)), prepare=prepare,
    decode=calls.decode_scaled, encode=calls.encode_scaled,
    output="diffusers.pipelines.stable_diffusion_3.pipeline_output.StableDiffusion3PipelineOutput",
    params={"num_images_per_prompt": 1, "pooled_prompt_embeds": None, "max_sequence_length": 256,
            "joint_attention_kwargs": None},
    unused={"guidance_scale": None, "negative_prompt": None, "negative_prompt_2": None, "negative_prompt_3": None,
            "negative_prompt_embeds": None, "negative_pooled_prompt_embeds": None, "skip_guidance_layers": None,
            "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_stop": 0.2, "skip_layer_guidance_start": 0.01},
    doc="Generate images; `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1; CFG arguments (negative "
        "prompts, `guidance_scale`, skip-layer guidance) are accepted and unused (guidance is distilled in).")

FAMILIES = (Family("sd3", "sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline", "PiSD3Pipeline", encode,
                   base.collate_pooled, ("encoder_hidden_states", "pooled_projections"), PIPELINE, tiny,
                   latent_packing="inside"),)
