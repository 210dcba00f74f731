"""LongCat-Image (`LongCatImagePipeline`, `LongCatImageTransformer2DModel`): GM / DX LongCat students.

The transformer is FLUX.1's design without pooled text or guidance embeddings: 16-channel latents 2×2-packed into
64-channel tokens (as FLUX), σ as the timestep (the model multiplies by 1000), the same block and layer names (so
FLUX.1's LoRA targets: feed-forwards, single-block MLPs and the timestep MLP). What differs, all taken from the stock
pipeline: the text is Qwen2.5-VL's last hidden state of a captioning chat template, always 512 tokens (padded, no
attention mask); RoPE ids are (0, i, i) for text token i and (1, 512 + row, 512 + col) for image tokens; the teacher
takes true CFG against the negative prompt (stock default 4.5). The stock pipeline also rescales the guided
prediction's per-token norm to at most the conditional one (``enable_cfg_renorm``, on by default); piflow's teacher
applies plain CFG on the velocity, as for every family, so a student distilled here imitates CFG without that
renormalisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, Family
from piflow.integrations.diffusers.families.flux import FLUX_LORA_TARGETS

TEXT_TOKENS = 512            # the pipeline's tokenizer_max_length: text length and the image ids' offset


def position_ids(modality: int, rows: int, cols: int = 0, start: int = 0, device=None) -> Tensor:
    """LongCat RoPE ids: text (L = rows, 3) = (modality, start + i, start + i); image (rows·cols, 3) =
    (modality, start + row, start + col)."""
    if cols == 0:
        steps = torch.arange(rows, device=device, dtype=torch.float32) + start
        return torch.stack([torch.full_like(steps, modality), steps, steps], dim=1)
    grid = torch.zeros(rows, cols, 3, device=device)
    grid[..., 0] = modality
    grid[..., 1] = torch.arange(rows, device=device)[:, None] + start
    grid[..., 2] = torch.arange(cols, device=device)[None, :] + start
    return grid.reshape(rows * cols, 3)


def model_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """latents (B, C, H, W), σ (B,), cond → `LongCatImageTransformer2DModel` forward kwargs."""
    base.check_cond(cond, ("encoder_hidden_states",), "LongCat-Image")
    text = cond["encoder_hidden_states"]
    rows, cols = latents.shape[2] // base.PATCH, latents.shape[3] // base.PATCH
    return {"hidden_states": base.pack_latents(latents), "encoder_hidden_states": text,
            "timestep": sigma.reshape(-1).to(latents.dtype),
            "txt_ids": position_ids(0, text.shape[1], device=latents.device),
            "img_ids": position_ids(1, rows, cols, TEXT_TOKENS, latents.device)}


ARCHITECTURE = Architecture(
    "longcat", model_inputs, lambda t, h, w, p: base.unpack_tokens(t, h, w, p), "cp", True,
    lambda transformer: FLUX_LORA_TARGETS, base_class="LongCatImageTransformer2DModel", alias="LongCatImage")


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the (512, D) text embeddings of the stock pipeline's encoding (its template and quotation
    handling; `max_sequence_length` does not apply: LongCat always uses 512)."""
    embeds = pipe._encode_prompt(list(prompts))
    return [{"encoder_hidden_states": e} for e in embeds]


def tiny(latent_channels: int, seed: int) -> dict:
    """LongCatImagePipeline components: one double and one single block, a 2-layer Qwen2.5-VL text model (the
    Qwen-Image family's), an AutoencoderKL. The stock pipeline draws 16 latent channels, so the tiny VAE and
    transformer have 16 whatever `latent_channels` says."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImageTransformer2DModel

    from piflow.integrations.diffusers import tiny as t
    from piflow.integrations.diffusers.families import qwen

    channels = 16
    torch.manual_seed(seed)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=4 * channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t.TEXT_WIDTH, pooled_projection_dim=t.TEXT_WIDTH,
        axes_dims_rope=[4, 6, 6])
    text = qwen.tiny(4, seed)
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE),
                vae=t.autoencoder_kl(channels, seed + 1), text_encoder=text["text_encoder"],
                tokenizer=text["tokenizer"], text_processor=None,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=16,
                                                          max_image_seq_len=256))


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    if call["enable_prompt_rewrite"]:
        raise ValueError("enable_prompt_rewrite: the π-Flow pipeline does not rewrite prompts with the text model; "
                         "rewrite them with the stock pipeline's rewire_prompt first")
    height, width = calls.image_size(pipe, call["height"], call["width"])
    calls.check_multiple(pipe, height, width, pipe.vae_scale_factor * 2)
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_images_per_prompt"]
    device = pipe._execution_device
    prompt = [call["prompt"]] if isinstance(call["prompt"], str) else call["prompt"]
    prompt_embeds, _ = pipe.encode_prompt(prompt=prompt, prompt_embeds=call["prompt_embeds"],
                                          num_images_per_prompt=call["num_images_per_prompt"])
    noise, num_tokens = calls.packed_noise(pipe, batch, height, width, call["latents"], call["generator"], device)
    return noise, {"encoder_hidden_states": prompt_embeds.to(device)}, num_tokens


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None),), prepare=prepare, decode=calls.decode_scaled, encode=calls.encode_scaled,
    optional_components=("text_processor",),
    output="diffusers.pipelines.longcat_image.pipeline_output.LongCatImagePipelineOutput",
    params={"num_images_per_prompt": 1, "joint_attention_kwargs": None, "enable_prompt_rewrite": False},
    unused={"negative_prompt": None, "negative_prompt_embeds": None, "guidance_scale": None,
            "enable_cfg_renorm": None, "cfg_renorm_min": None},
    doc="Generate images; `latents` (optional) is the unpacked noise (B·n, 16, H/8, W/8) at σ = 1; CFG arguments "
        "(negative prompts, `guidance_scale`, the CFG renorm settings) are accepted and unused (guidance is "
        "distilled in); prompt rewriting with the text model is not done.")

FAMILIES = (Family("longcat", "longcat", "LongCatImageTransformer2DModel", "LongCatImagePipeline",
                   "PiLongCatImagePipeline", encode, base.collate_padded, ("encoder_hidden_states",), PIPELINE, tiny,
                   guidance="cfg", guidance_scale=4.5),)
