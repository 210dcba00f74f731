"""Wan 2.1 / 2.2 text-to-video (`WanPipeline`, one `WanTransformer3DModel`: Wan 2.1, Wan 2.2 TI2V-5B): 5-D latents
(B, C, T, H, W), timestep σ·1000, velocity output already unpatchified; CFG 5.0 against the negative prompt for the
teacher. The final layer is proj_out(LayerNorm(x)·(1 + scale) + shift) with (shift, scale) = scale_shift_table +
temb, temb the first output of condition_embedder.
"""
from __future__ import annotations

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, Family
from piflow.timewarp import NUM_TIMESTEPS

# LoRA: the blocks' feed-forward (ffn.net.0.proj, ffn.net.2) and the timestep MLP
# (condition_embedder.time_embedder.linear_1/2, time_proj), never attention (§6.6).
WAN_LORA_TARGETS = (r".*(ffn\.net\.0\.proj|ffn\.net\.2|condition_embedder\.time_embedder\.linear_1|"
                    r"condition_embedder\.time_embedder\.linear_2|condition_embedder\.time_proj)$")


def unpatchify_video(tokens: Tensor, frames: int, height: int, width: int, patch) -> Tensor:
    """Wan token layout (B, T'H'W', p_t·p_h·p_w·c) with (p_t, p_h, p_w, c) order → (B, c, T, H, W)."""
    p_t, p_h, p_w = patch
    batch, length, features = tokens.shape
    channels = features // (p_t * p_h * p_w)
    x = tokens.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, channels, frames, height, width)


def model_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """latents (B, C, T, H, W), σ (B,), cond → `WanTransformer3DModel` forward kwargs."""
    base.check_cond(cond, ("encoder_hidden_states",), "Wan")
    if latents.dim() != 5:
        raise ValueError(f"latents must be 5-D (B, C, T, H, W) video latents for Wan, got {tuple(latents.shape)}")
    if latents.shape[3] % 2 or latents.shape[4] % 2:
        raise ValueError(f"latent height and width must be divisible by 2 for Wan, got {tuple(latents.shape)}")
    return {"hidden_states": latents, "timestep": sigma.reshape(-1).to(latents.dtype) * NUM_TIMESTEPS,
            "encoder_hidden_states": cond["encoder_hidden_states"]}


ARCHITECTURE = Architecture(
    "wan", model_inputs, unpatchify_video, "pc", False, lambda transformer: WAN_LORA_TARGETS, packs_outside=False,
    base_class="WanTransformer3DModel", final_norm="scale_shift_table", temb_module="condition_embedder",
    read_temb=lambda args, kwargs, output: output[0],
    cond_dim=lambda transformer: transformer.scale_shift_table.shape[-1],
    patch_size=lambda transformer: tuple(int(p) for p in transformer.config.patch_size), alias="Wan")


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the UMT5 embeddings (L, D), zero-padded to max_sequence_length as the pipeline does."""
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                   max_sequence_length=max_sequence_length, device=pipe._execution_device)
    return [{"encoder_hidden_states": e} for e in embeds]


def tiny(latent_channels: int, seed: int) -> dict:
    """Wan 2.1: a 1-layer WanTransformer3DModel (patch (1, 2, 2)), an AutoencoderKLWan with 8× spatial and 4×
    temporal compression (like the real one) at toy width, a 2-layer UMT5 encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from piflow.integrations.diffusers import tiny as t

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=latent_channels, out_channels=latent_channels,
                                        text_dim=t.TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=1,
                                        rope_max_seq_len=32)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1 * i for i in range(latent_channels)],
                           latents_std=[1.0 + 0.5 * i for i in range(latent_channels)]).eval()
    tokenizer = t.byte_level_tokenizer(512)
    torch.manual_seed(seed + 2)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=t.TEXT_WIDTH, d_kv=8, d_ff=37,
                                          num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                          pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)).eval()
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE), vae=vae, text_encoder=encoder,
                tokenizer=tokenizer,
                scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0))



def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    num_frames, height, width = int(call["num_frames"]), call["height"], call["width"]
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be 1 + a multiple of {temporal} (the VAE's temporal factor), "
                         f"got {num_frames}")
    patch = pipe.transformer.config.patch_size
    calls.check_multiple(pipe, height, width, spatial * patch[1])
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_videos_per_prompt"]
    device = pipe._execution_device
    prompt_embeds, _ = pipe.encode_prompt(prompt=call["prompt"], do_classifier_free_guidance=False,
                                          num_videos_per_prompt=call["num_videos_per_prompt"],
                                          prompt_embeds=call["prompt_embeds"],
                                          max_sequence_length=call["max_sequence_length"], device=device)
    shape = (batch, pipe.transformer.config.in_channels, (num_frames - 1) // temporal + 1,
             int(height) // spatial, int(width) // spatial)
    noise = calls.noise(shape, call["latents"], call["generator"], device)
    return (noise, {"encoder_hidden_states": prompt_embeds},
            shape[2] * (shape[3] // patch[1]) * (shape[4] // patch[2]))


def decode(pipe, x: Tensor, output_type: str):
    """Normalised (B, C, T, H, W) → videos."""
    video = pipe.vae.decode(calls.denormalised(pipe, x), return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type=output_type)


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None),), prepare=prepare, decode=decode,
    output="diffusers.pipelines.wan.pipeline_output.WanPipelineOutput", output_field="frames",
    params={"height": 480, "width": 832, "num_frames": 81, "num_videos_per_prompt": 1, "output_type": "np",
            "attention_kwargs": None},
    unused={"negative_prompt": None, "guidance_scale": None, "guidance_scale_2": None,
            "negative_prompt_embeds": None},
    doc="Generate videos; `latents` (optional) is the noise (B·n, C, (num_frames − 1)/4 + 1, H/8, W/8) at σ = 1; "
        "CFG arguments are accepted and unused (guidance is distilled in). Returns ``frames`` like the stock one.")

FAMILIES = (Family("wan", "wan", "WanTransformer3DModel", "WanPipeline", "PiWanPipeline", encode,
                   base.collate_padded, ("encoder_hidden_states",), PIPELINE, tiny, guidance="cfg",
                   guidance_scale=5.0, latent_packing="inside", video=True),)
