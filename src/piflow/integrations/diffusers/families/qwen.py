"""Qwen-Image (`QwenImagePipeline`, `QwenImageTransformer2DModel`): GM-Qwen / DX-Qwen students (§6.4).

The same 2×2 packing as FLUX, σ as the timestep, `img_shapes` built here (with the Edit families' references,
`qwen_edit`); cond holds the text embeddings and their mask; true CFG 4.0 for the teacher.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, AuthorsClasses, Family


def model_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """Qwen-Image(-Edit) forward kwargs; Edit's reference latents are clean packed tokens after the generated ones,
    their (1, h, w) shapes appended to each sample's `img_shapes`."""
    base.check_cond(cond, ("encoder_hidden_states", "encoder_hidden_states_mask"), "Qwen-Image")
    tokens, grids = base.packed_with_references(latents, cond)
    shapes = [(1, rows, cols) for rows, cols in grids]
    return {"hidden_states": tokens, "timestep": sigma.reshape(-1).to(latents.dtype),
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "encoder_hidden_states_mask": cond["encoder_hidden_states_mask"],
            "img_shapes": [list(shapes)] * latents.shape[0]}


def qwen_lora_targets(transformer: nn.Module) -> list[str]:
    """§6.6 Qwen targets: image MLPs, the timestep MLP, and text MLPs of every block but the last (its text output
    is unused, which would leave LoRA parameters without gradients)."""
    names = []
    last = len(transformer.transformer_blocks) - 1
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.endswith(("img_mlp.net.0.proj", "img_mlp.net.2", "timestep_embedder.linear_1",
                          "timestep_embedder.linear_2")):
            names.append(name)
        elif name.endswith(("txt_mlp.net.0.proj", "txt_mlp.net.2")) and not name.startswith(
                f"transformer_blocks.{last}."):
            names.append(name)
    return names


ARCHITECTURE = Architecture(
    "qwen", model_inputs, lambda t, h, w, p: base.unpack_tokens(t, h, w, p), "cp", True, qwen_lora_targets,
    base_class="QwenImageTransformer2DModel", alias="QwenImage",
    authors=AuthorsClasses("GMQwenImageTransformer2DModel", "DXQwenImageTransformer2DModel",
                           "QwenImageTransformer2DModel",
                           ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                            "axes_dims_rope")))


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: the Qwen2.5-VL embeddings (L_i, D), cut to the prompt's length."""
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device,
                                      max_sequence_length=max_sequence_length)
    return base.masked_items(embeds, mask)


def tiny_transformer(latent_channels: int, num_layers: int, seed: int):
    """A `QwenImageTransformer2DModel` of `num_layers` blocks, 2 heads × 16, on 2×2-packed latents (Qwen-Image and
    Qwen-Image-Edit share it)."""
    from diffusers import QwenImageTransformer2DModel

    from piflow.integrations.diffusers import tiny as t

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels,
                                       num_layers=num_layers, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=t.TEXT_WIDTH, axes_dims_rope=(4, 6, 6))


def tiny(latent_channels: int, seed: int) -> dict:
    """QwenImagePipeline components: two blocks, a 2-layer Qwen2.5-VL text model, a one-level Qwen VAE."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from piflow.integrations.diffusers import tiny as t

    transformer = tiny_transformer(latent_channels, 2, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=[0.0] * latent_channels,
                                 latents_std=[1.0] * latent_channels).eval()
    tokenizer = t.byte_level_tokenizer(1024, t.QWEN_SPECIALS, add_eos=False)
    torch.manual_seed(seed + 2)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=t.TEXT_WIDTH, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048,
                       rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2], "rope_type": "default"},
                       rope_theta=10000.0, bos_token_id=0, eos_token_id=3, pad_token_id=0)
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=dict(
        depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=t.TEXT_WIDTH),
        vocab_size=len(tokenizer), hidden_size=t.TEXT_WIDTH, bos_token_id=0, eos_token_id=3, pad_token_id=0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE), vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def decode(pipe, x: Tensor, output_type: str):
    """Normalised latents (B, C, H, W) → images (the Qwen VAE decodes one-frame videos)."""
    image = pipe.vae.decode(calls.denormalised(pipe, x[:, :, None]), return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    height, width = calls.image_size(pipe, call["height"], call["width"])
    pipe.check_inputs(call["prompt"], height, width, prompt_embeds=call["prompt_embeds"],
                      prompt_embeds_mask=call["prompt_embeds_mask"], max_sequence_length=call["max_sequence_length"])
    batch = calls.batch_size(call["prompt"], call["prompt_embeds"]) * call["num_images_per_prompt"]
    device = pipe._execution_device
    prompt_embeds, mask = pipe.encode_prompt(
        prompt=call["prompt"], prompt_embeds=call["prompt_embeds"], prompt_embeds_mask=call["prompt_embeds_mask"],
        device=device, num_images_per_prompt=call["num_images_per_prompt"],
        max_sequence_length=call["max_sequence_length"])
    noise, num_tokens = calls.packed_noise(pipe, batch, height, width, call["latents"], call["generator"], device)
    return noise, {"encoder_hidden_states": prompt_embeds, "encoder_hidden_states_mask": mask}, num_tokens


OUTPUT = "diffusers.pipelines.qwenimage.pipeline_output.QwenImagePipelineOutput"
PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None),), prepare=prepare, decode=decode, encode=calls.encode_normalised, output=OUTPUT,
    params={"num_images_per_prompt": 1, "prompt_embeds_mask": None, "attention_kwargs": None},
    unused={"negative_prompt": None, "true_cfg_scale": 1.0, "guidance_scale": None, "negative_prompt_embeds": None,
            "negative_prompt_embeds_mask": None},
    doc="Generate images; `latents` (optional) is the unpacked noise (B·n, C, H/8, W/8) at σ = 1; no true CFG at "
        "inference (distilled in).")

FAMILIES = (Family("qwen", "qwen", "QwenImageTransformer2DModel", "QwenImagePipeline", "PiQwenImagePipeline", encode,
                   base.collate_masked, ("encoder_hidden_states",), PIPELINE, tiny),)
