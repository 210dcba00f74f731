"""FLUX.1 (`FluxPipeline`, `FluxTransformer2DModel`): GM-FLUX / DX-FLUX students (§6.3).

Latents (B, 16, H, W) are 2×2-packed into 64-channel tokens (channel index c·4 + row·2 + col, as the FLUX
pipelines do); σ ∈ [0, 1] is the timestep (FLUX multiplies by 1000 itself); RoPE image ids are built here; the
teacher and student take the distilled-guidance scalar ``cond["guidance"]`` (3.5).
"""
from __future__ import annotations

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, AuthorsClasses, Family

# §6.6 GM-FLUX LoRA targets: feed-forward layers and the timestep MLP, never attention. The single-stream blocks'
# proj_out is listed per block so that the root proj_out (teacher output layer) is never wrapped.
FLUX_LORA_TARGETS = (r".*(single_transformer_blocks\.\d+\.proj_out|proj_mlp|ff\.net\.0\.proj|ff\.net\.2|"
                     r"ff_context\.net\.0\.proj|ff_context\.net\.2|timestep_embedder\.linear_1|"
                     r"timestep_embedder\.linear_2)$")


def image_ids(height: int, width: int, device=None, patch: int = base.PATCH) -> Tensor:
    """FLUX RoPE ids of the token grid: (L, 3) with (0, row, col)."""
    rows, cols = height // patch, width // patch
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def model_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """latents (B, C, H, W), σ (B,), cond → `FluxTransformer2DModel` forward kwargs. FLUX.1 Kontext conditions
    (``reference_latents.j``) add each reference image's clean tokens after the generated ones, with RoPE ids
    (1, row, col), as `FluxKontextPipeline` does."""
    inputs = {key: value for key, value in base.check_cond(
        cond, ("encoder_hidden_states", "pooled_projections", "txt_ids"), "FLUX").items()
        if not key.startswith(base.REFERENCE_PREFIX)}
    tokens, grids = base.packed_with_references(latents, cond)
    ids = [image_ids(rows * base.PATCH, cols * base.PATCH, latents.device) for rows, cols in grids]
    for reference in ids[1:]:
        reference[:, 0] = 1
    inputs.update(hidden_states=tokens, timestep=sigma.reshape(-1).to(latents.dtype), img_ids=torch.cat(ids))
    return inputs


ARCHITECTURE = Architecture(
    "flux", model_inputs, lambda t, h, w, p: base.unpack_tokens(t, h, w, p), "cp", True,
    lambda transformer: FLUX_LORA_TARGETS, base_class="FluxTransformer2DModel", alias="Flux",
    authors=AuthorsClasses("GMFluxTransformer2DModel", "DXFluxTransformer2DModel", "FluxTransformer2DModel",
                           ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                            "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")))


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: T5 embeddings (L, D) and the pooled CLIP embedding (D')."""
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe._execution_device,
                                           max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(embeds, pooled)]


def collate(items, device=None, dtype=None) -> dict:
    """`base.collate_pooled` plus the (L, 3) zero text ids."""
    cond = base.collate_pooled(items, device, dtype)
    cond["txt_ids"] = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=device, dtype=dtype)
    return cond


def tiny(latent_channels: int, seed: int) -> dict:
    """FluxPipeline components: one double and one single block, CLIP + T5 encoders, an AutoencoderKL."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from piflow.integrations.diffusers import tiny as t

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=t.TEXT_WIDTH, pooled_projection_dim=t.TEXT_WIDTH,
                                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    clip_tokenizer = t.byte_level_tokenizer(77, add_bos=True)
    t5_tokenizer = t.byte_level_tokenizer(512)
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE),
                vae=t.autoencoder_kl(latent_channels, seed + 1),
                text_encoder=t.clip_text_encoder(len(clip_tokenizer), False, seed + 2), tokenizer=clip_tokenizer,
                text_encoder_2=t.t5_encoder(len(t5_tokenizer), t.TEXT_WIDTH, seed + 3), tokenizer_2=t5_tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=16,
                                                          max_image_seq_len=256))


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    height, width = calls.image_size(pipe, call["height"], call["width"])
    pipe.check_inputs(call["prompt"], call["prompt_2"], height, width, prompt_embeds=call["prompt_embeds"],
                      pooled_prompt_embeds=call["pooled_prompt_embeds"],
                      max_sequence_length=call["max_sequence_length"])
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_images_per_prompt"]
    device = pipe._execution_device
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=call["prompt"], prompt_2=call["prompt_2"], prompt_embeds=call["prompt_embeds"],
        pooled_prompt_embeds=call["pooled_prompt_embeds"], device=device,
        num_images_per_prompt=call["num_images_per_prompt"], max_sequence_length=call["max_sequence_length"])
    noise, num_tokens = calls.packed_noise(pipe, batch, height, width, call["latents"], call["generator"], device)
    cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled, "txt_ids": text_ids}
    return noise, calls.embedded_guidance(pipe, cond, batch, call["guidance_scale"], device), num_tokens


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None), ("prompt_2", None)), prepare=prepare, decode=calls.decode_scaled,
    encode=calls.encode_scaled, output="diffusers.pipelines.flux.pipeline_output.FluxPipelineOutput",
    params={"guidance_scale": 3.5, "num_images_per_prompt": 1, "pooled_prompt_embeds": None,
            "joint_attention_kwargs": None},
    unused={"negative_prompt": None, "negative_prompt_2": None, "true_cfg_scale": 1.0, "negative_prompt_embeds": None,
            "negative_pooled_prompt_embeds": None, "negative_ip_adapter_image": None,
            "negative_ip_adapter_image_embeds": None},
    doc="Generate images; `latents` (optional) is the unpacked noise (B·n, C, H/8, W/8) at σ = 1; the student "
        "takes the distilled-guidance scalar `guidance_scale` (3.5) as the teacher did; true-CFG arguments "
        "(negative prompts, `true_cfg_scale`) are accepted and unused.")

FAMILIES = (Family("flux", "flux", "FluxTransformer2DModel", "FluxPipeline", "PiFluxPipeline", encode, collate,
                   ("encoder_hidden_states", "pooled_projections"), PIPELINE, tiny, guidance="embedded",
                   guidance_scale=3.5),)
