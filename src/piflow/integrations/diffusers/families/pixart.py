"""PixArt-α (`PixArtAlphaPipeline`, `PixArtTransformer2DModel`): the first diffusion family — an ε-prediction DiT
on the DDPM linear schedule (β 0.0001–0.02, T = 1000) with learned variance (the transformer outputs 2C channels,
the first C are ε̂), converted to a flow teacher by its `Parametrisation` (docs/algorithm.md §15): the network sees
x_t = (α_t + s_t)·x_σ and the fractional timestep t(σ), and u = ((α + s)·ε̂ − x_t)/α.

Latents go in as they are (the model patchifies, output tokens (p, p, c)-ordered). Text: T5 embeddings with their
attention mask (`encoder_attention_mask`). Micro-conditioning (the 1024-px models, ``sample_size`` 128):
``added_cond_kwargs`` resolution (B, 2) = (height, width) in pixels and aspect_ratio (B, 1) = height/width; a cond
that carries ``resolution`` / ``aspect_ratio`` (the π-Flow pipeline's, from the call's height and width) uses them,
otherwise they are derived from the latent size times PixArt's 8× VAE; models without micro-conditioning (512 px)
ignore them. True CFG 4.5 against the empty prompt for the teacher.

The final layer is proj_out(LayerNorm(x)·(1 + scale) + shift) with (shift, scale) = scale_shift_table + the
embedded timestep, the second output of ``adaln_single`` (the student trains its own scale_shift_table).
"""
from __future__ import annotations

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, Family, Parametrisation

# LoRA: the blocks' feed-forwards (ff.net.0.proj, ff.net.2) and the timestep MLP
# (adaln_single.emb.timestep_embedder.linear_1/2), never attention (attn1/attn2) — as the other families (§6.6).
PIXART_LORA_TARGETS = (r".*(ff\.net\.0\.proj|ff\.net\.2|adaln_single\.emb\.timestep_embedder\.linear_1|"
                       r"adaln_single\.emb\.timestep_embedder\.linear_2)$")
# the scheduler config of the published PixArt-α checkpoints (PixArt-XL-2-1024-MS / -512x512): DPM-Solver++ on the
# DDPM linear schedule, ε-prediction; only the schedule keys and prediction_type matter for the teacher. diffusers'
# PixArt conversion scripts build `DPMSolverMultistepScheduler()` with its defaults, which are these schedule keys
PIXART_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "algorithm_type": "dpmsolver++", "solver_order": 2,
    "solver_type": "midpoint", "lower_order_final": True, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0, "use_karras_sigmas": False, "steps_offset": 0}
VAE_FACTOR = 8           # PixArt's AutoencoderKL (SD's): resolution micro-conditions derived from latent sizes


def model_inputs(x_t: Tensor, t: Tensor, cond: dict) -> dict:
    """x_t (B, C, H, W), the timestep t (B,) (from the `Parametrisation`), cond → `PixArtTransformer2DModel`
    forward kwargs."""
    cond = base.check_cond(cond, ("encoder_hidden_states", "encoder_attention_mask"), "PixArt")
    batch, height, width = x_t.shape[0], x_t.shape[2] * VAE_FACTOR, x_t.shape[3] * VAE_FACTOR
    dtype, device = cond["encoder_hidden_states"].dtype, x_t.device
    resolution = cond.pop("resolution", None)
    if resolution is None:
        resolution = torch.tensor([[float(height), float(width)]], device=device).expand(batch, 2)
    aspect_ratio = cond.pop("aspect_ratio", None)
    if aspect_ratio is None:
        aspect_ratio = torch.full((batch, 1), float(height / width), device=device)
    return {"hidden_states": x_t, "timestep": t.reshape(-1), "encoder_hidden_states": cond["encoder_hidden_states"],
            "encoder_attention_mask": cond["encoder_attention_mask"],
            "added_cond_kwargs": {"resolution": resolution.to(device=device, dtype=dtype),
                                  "aspect_ratio": aspect_ratio.to(device=device, dtype=dtype)}}


PARAMETRISATION = Parametrisation(PIXART_SCHEDULER_CONFIG,
                                  out_channels=lambda transformer: int(transformer.config.in_channels),
                                  name="PixArt-α")
ARCHITECTURE = Architecture(
    "pixart", model_inputs, base.unpatchify_pqc, "pc", False, lambda transformer: PIXART_LORA_TARGETS,
    packs_outside=False, base_class="PixArtTransformer2DModel", final_norm="scale_shift_table",
    temb_module="adaln_single", read_temb=lambda args, kwargs, output: output[1],
    cond_dim=lambda transformer: transformer.scale_shift_table.shape[-1], alias="PixArt",
    parametrisation=PARAMETRISATION)


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the T5 embeddings (L_i, D), cut to the prompt's attention mask (collation re-pads and masks)."""
    embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            device=pipe._execution_device, clean_caption=False,
                                            max_sequence_length=max_sequence_length)
    return base.masked_items(embeds, mask)


def collate(items, device=None, dtype=None) -> dict:
    """Padded T5 embeddings (B, L, D) and their `encoder_attention_mask` (B, L)."""
    padded, mask = base.pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    return {"encoder_hidden_states": padded, "encoder_attention_mask": mask}


def tiny(latent_channels: int, seed: int) -> dict:
    """PixArtAlphaPipeline components: a 2-layer PixArtTransformer2DModel with learned variance (2C outputs,
    sample_size 32: no micro-conditioning, like the 256/512 models), a T5 encoder, an AutoencoderKL and the
    published DPM-Solver++ scheduler config."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    from piflow.integrations.diffusers import tiny as t

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=latent_channels,
                                           out_channels=2 * latent_channels, num_layers=2, norm_num_groups=4,
                                           cross_attention_dim=16, sample_size=32, patch_size=2,
                                           caption_channels=t.TEXT_WIDTH)
    t5 = t.byte_level_tokenizer(256)
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE),
                vae=t.autoencoder_kl(latent_channels, seed + 1),
                text_encoder=t.t5_encoder(len(t5), t.TEXT_WIDTH, seed + 2), tokenizer=t5,
                scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG))


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    if call["use_resolution_binning"]:
        raise ValueError("use_resolution_binning: the π-Flow PixArt pipeline samples at the given height and width; "
                         "pass a size from PixArt's aspect-ratio bins and use_resolution_binning=False")
    factor = pipe.vae_scale_factor
    height = call["height"] or pipe.transformer.config.sample_size * factor
    width = call["width"] or pipe.transformer.config.sample_size * factor
    pipe.check_inputs(call["prompt"], height, width, None, 1, call["prompt_embeds"], None,
                      call["prompt_attention_mask"], None)
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_images_per_prompt"]
    device = pipe._execution_device
    prompt_embeds, mask, _, _ = pipe.encode_prompt(
        call["prompt"], False, num_images_per_prompt=call["num_images_per_prompt"], device=device,
        prompt_embeds=call["prompt_embeds"], prompt_attention_mask=call["prompt_attention_mask"],
        clean_caption=call["clean_caption"], max_sequence_length=call["max_sequence_length"])
    latent_h, latent_w = int(height) // factor, int(width) // factor
    noise = calls.noise((batch, pipe.transformer.config.in_channels, latent_h, latent_w), call["latents"],
                        call["generator"], device)
    cond = {"encoder_hidden_states": prompt_embeds, "encoder_attention_mask": mask,
            "resolution": torch.tensor([[float(height), float(width)]], device=device).expand(batch, 2),
            "aspect_ratio": torch.full((batch, 1), float(height / width), device=device)}
    patch = pipe.transformer.config.patch_size
    return noise, cond, (latent_h // patch) * (latent_w // patch)


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None),), prepare=prepare, decode=calls.decode_scaled,
    output="diffusers.pipelines.pipeline_utils.ImagePipelineOutput",
    params={"num_images_per_prompt": 1, "prompt_attention_mask": None, "clean_caption": True,
            "use_resolution_binning": False, "max_sequence_length": 120},
    unused={"guidance_scale": None, "negative_prompt": None, "negative_prompt_embeds": None,
            "negative_prompt_attention_mask": None, "timesteps": None, "eta": None},
    doc="Generate images; `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1; CFG arguments (negative "
        "prompts, `guidance_scale`) are accepted and unused (guidance is distilled in). The image is sampled at "
        "`height`×`width` as given (no aspect-ratio binning: use_resolution_binning=True is refused).")

FAMILIES = (Family("pixart", "pixart", "PixArtTransformer2DModel", "PixArtAlphaPipeline", "PiPixArtAlphaPipeline",
                   encode, collate, ("encoder_hidden_states",), PIPELINE, tiny, guidance_scale=4.5,
                   latent_packing="inside"),)
