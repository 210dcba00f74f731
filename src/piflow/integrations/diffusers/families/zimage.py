"""Z-Image (`ZImagePipeline`, `ZImageTransformer2DModel`, single-stream S3-DiT): per-sample list inputs, model
time t = 1 − σ, output x0 − ε (so `output_sign` −1). Z-Image base takes true CFG (its pipeline's guidance g is
piflow's scale − 1, default 6.0 here); Z-Image-Turbo is guidance-distilled: distil it with guidance.scale=1.

The final layer ``all_final_layer["2-1"]`` = linear(LayerNorm(x)·(1 + adaLN_modulation(c))) runs on the unified
sequence [image tokens (padded to 32k), caption tokens], image tokens first, (p_row, p_col, c)-ordered.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, Family

FINAL = "all_final_layer.2-1"
# LoRA: the blocks' SwiGLU feed-forward (feed_forward.w1/w2/w3) and the timestep MLP (t_embedder.mlp.0/2), never
# attention (§6.6); the caption and noise refiners' feed-forwards are included (they shape the tokens the policy sees).
ZIMAGE_LORA_TARGETS = r".*(feed_forward\.w1|feed_forward\.w2|feed_forward\.w3|t_embedder\.mlp\.0|t_embedder\.mlp\.2)$"


def caption_list(cond: dict, name: str = "encoder_hidden_states") -> list[Tensor]:
    """Padded (B, L, D) embeddings + ``encoder_hidden_states_mask`` → the per-sample unpadded list."""
    embeds, mask = cond[name], cond.get("encoder_hidden_states_mask")
    if mask is None:
        return list(embeds.unbind(0))
    return [e[: int(n)] for e, n in zip(embeds, mask.sum(dim=1).tolist())]


def model_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """latents (B, C, H, W), σ (B,), cond → `ZImageTransformer2DModel` kwargs (lists of (C, 1, H, W), 1 − σ)."""
    base.check_cond(cond, ("encoder_hidden_states",), "Z-Image")
    if latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"latents height and width must be divisible by 2 for Z-Image, got {tuple(latents.shape)}")
    return {"x": list(latents.unsqueeze(2).unbind(0)), "t": 1 - sigma.reshape(-1).to(latents.dtype),
            "cap_feats": caption_list(cond), "patch_size": 2, "f_patch_size": 1}


def read_output(output: Any) -> Tensor:
    """The model's list of (C, 1, H, W) predictions → (B, C, H, W)."""
    return torch.stack(list(output[0]), dim=0).squeeze(2)


ARCHITECTURE = Architecture(
    "zimage", model_inputs, base.unpatchify_pqc, "pc", False, lambda transformer: ZIMAGE_LORA_TARGETS,
    packs_outside=False, base_class="ZImageTransformer2DModel", final_norm=f"{FINAL}.adaLN_modulation",
    projection=f"{FINAL}.linear", temb_module=FINAL,
    read_temb=lambda args, kwargs, output: kwargs["c"] if "c" in kwargs else args[1],
    cond_dim=lambda transformer: transformer.get_submodule(f"{FINAL}.adaLN_modulation.1").in_features,
    patch_size=lambda transformer: 2, read_output=read_output, output_sign=-1.0, alias="ZImage")


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the Qwen3 embeddings (L_i, D) the pipeline returns as a list."""
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe._execution_device,
                                   do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e} for e in embeds]


def tiny(latent_channels: int, seed: int) -> dict:
    """ZImagePipeline components: one block and one refiner layer each, a 2-layer Qwen3 model, an AutoencoderKL."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    from piflow.integrations.diffusers import tiny as t

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=t.TEXT_WIDTH, rope_theta=256.0,
        axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512])
    with torch.no_grad():           # informative pad tokens (diffusers starts them at zero)
        transformer.x_pad_token.normal_(0, 1.0)
        transformer.cap_pad_token.normal_(0, 1.0)
    tokenizer = t.chat_tokenizer()
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE),
                vae=t.autoencoder_kl(latent_channels, seed + 1),
                text_encoder=t.qwen3_text_encoder(len(tokenizer), seed + 2), tokenizer=tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    """`prompt_embeds` is the stock pipeline's list of (L_i, D) embeddings."""
    height, width = call["height"] or 1024, call["width"] or 1024
    calls.check_multiple(pipe, height, width, pipe.vae_scale_factor * 2)
    device = pipe._execution_device
    prompt = call["prompt"]
    calls.batch_size(prompt, call["prompt_embeds"])                  # one of them is given
    prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)  # encoded in place
    embeds, _ = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False,
                                   prompt_embeds=call["prompt_embeds"],
                                   max_sequence_length=call["max_sequence_length"])
    embeds = [e for e in embeds for _ in range(call["num_images_per_prompt"])]
    latent_h, latent_w = calls.latent_size(pipe, height, width)
    noise = calls.noise((len(embeds), pipe.transformer.config.in_channels, latent_h, latent_w), call["latents"],
                        call["generator"], device)
    padded = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
    mask = torch.stack([torch.arange(padded.shape[1], device=device) < e.shape[0] for e in embeds]).long()
    cond = {"encoder_hidden_states": padded, "encoder_hidden_states_mask": mask}
    return noise, cond, (latent_h // 2) * (latent_w // 2)


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None),), prepare=prepare,
    decode=lambda pipe, x, output_type: calls.decode_scaled(pipe, x, output_type, cast_first=True),
    encode=calls.encode_scaled,
    output="diffusers.pipelines.z_image.pipeline_output.ZImagePipelineOutput",
    params={"num_images_per_prompt": 1, "joint_attention_kwargs": None},
    unused={"guidance_scale": None, "negative_prompt": None, "negative_prompt_embeds": None,
            "cfg_normalization": None, "cfg_truncation": None},
    doc="Generate images; `prompt_embeds` is the stock pipeline's list of (L_i, D) embeddings; `latents` (optional) "
        "is the noise (B·n, C, H/8, W/8) at σ = 1; CFG arguments are accepted and unused.")

FAMILIES = (Family("zimage", "zimage", "ZImageTransformer2DModel", "ZImagePipeline", "PiZImagePipeline", encode,
                   base.collate_masked, ("encoder_hidden_states",), PIPELINE, tiny, guidance_scale=6.0,
                   latent_packing="inside"),)
