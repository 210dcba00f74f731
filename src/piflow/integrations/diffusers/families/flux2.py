"""FLUX.2 [dev] (`Flux2Pipeline`: guidance-distilled, embedded guidance 4.0) and FLUX.2 [klein]
(`Flux2KleinPipeline`: the base models take true CFG against the empty prompt, 4.0; the step-distilled [klein]
checkpoints, pipeline config is_distilled, take none, which the recipe's default scale follows), one transformer
(`Flux2Transformer2DModel`), text-to-image and multi-reference editing.

Latents: the pipelines' patchified, batch-norm-normalised latents unpatchified to (C, H/8, W/8) as the authors'
GM-FLUX.2 does, 2×2-packed here into 4C-channel tokens; σ as the timestep; 4-axis RoPE ids; reference images are
clean tokens after the generated ones (time ids 10, 20, …).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import REFERENCE_PREFIX, Architecture, AuthorsClasses, Family


def flux2_ids(rows: int, cols: int, time: int = 0, device=None) -> Tensor:
    """FLUX.2 4-axis RoPE ids (L, 4) = (t, row, col, 0) of a token grid; reference image j has t = 10 + 10·j."""
    grid = torch.cartesian_prod(torch.tensor([time]), torch.arange(rows), torch.arange(cols), torch.arange(1))
    return grid.to(device)


def model_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """latents (B, C, H, W), σ (B,), cond (with ``reference_latents.j``) → `Flux2Transformer2DModel` kwargs."""
    base.check_cond(cond, ("encoder_hidden_states",), "FLUX.2")
    tokens, grids = base.packed_with_references(latents, cond)   # references: time ids 10, 20, … (image j: 10·j)
    ids = [flux2_ids(rows, cols, 10 * j, latents.device) for j, (rows, cols) in enumerate(grids)]
    text = cond["encoder_hidden_states"]
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                   torch.arange(text.shape[1])).to(latents.device)
    return {"hidden_states": tokens, "encoder_hidden_states": text,
            "timestep": sigma.reshape(-1).to(latents.dtype), "img_ids": torch.cat(ids), "txt_ids": txt_ids,
            "guidance": cond.get("guidance")}


# LoRA: the double blocks' feed-forward (ff, ff_context: linear_in/linear_out), the single blocks' fused
# attention+MLP linears (attn.to_qkv_mlp_proj, attn.to_out: FLUX.2 has no separate MLP there, as FLUX.1's
# proj_mlp/proj_out) and the timestep/guidance MLPs.
FLUX2_LORA_TARGETS = (r".*(transformer_blocks\.\d+\.ff\.linear_in|transformer_blocks\.\d+\.ff\.linear_out|"
                      r"ff_context\.linear_in|ff_context\.linear_out|"
                      r"single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj|"
                      r"single_transformer_blocks\.\d+\.attn\.to_out|timestep_embedder\.linear_1|"
                      r"timestep_embedder\.linear_2|guidance_embedder\.linear_1|guidance_embedder\.linear_2)$")
# the authors' GM-FLUX.2 (dev and klein): 128-channel tokens, 4 per-pixel log-weights; they publish no DX-FLUX.2,
# and the base's bias-free proj_out could not hold a DX head's bias
ARCHITECTURE = Architecture(
    "flux2", model_inputs, lambda t, h, w, p: base.unpack_tokens(t, h, w, p), "cp", True,
    lambda transformer: FLUX2_LORA_TARGETS, base_class="Flux2Transformer2DModel", alias="Flux2",
    authors=AuthorsClasses("GMFlux2Transformer2DModel", "", "Flux2Transformer2DModel",
                           ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                            "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio", "axes_dims_rope",
                            "rope_theta", "eps", "guidance_embeds")))


def flux2_condition_image(pipe, image):
    """A reference image as the FLUX.2 pipelines prepare it: at most 1 MP, cropped to a multiple of 16 px,
    normalised to [−1, 1] (1, 3, H, W)."""
    width, height = image.size
    if width * height > 1024 * 1024:
        image = pipe.image_processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.size
    multiple = pipe.vae_scale_factor * 2
    if width < multiple or height < multiple:
        raise ValueError(f"images: a reference image of {width}×{height} px is smaller than one {multiple}-px patch")
    return pipe.image_processor.preprocess(image, height=height // multiple * multiple,
                                           width=width // multiple * multiple, resize_mode="crop")


def reference_latent(pipe, image, device=None, where: str = "images: a reference image") -> Tensor:
    """One reference image → its latents (1, C, h, w): VAE mean, patchified and batch-norm normalised as the
    pipelines do, unpatchified back to the latent grid piflow's students work on (`where` names it in errors)."""
    pixels = flux2_condition_image(pipe, image).to(device or pipe._execution_device, pipe.vae.dtype)
    if pixels.shape[1] != 3:
        raise ValueError(f"{where} must be an RGB image (3 channels), got {pixels.shape[1]} channels")
    return pipe._unpatchify_latents(pipe._encode_vae_image(image=pixels, generator=None))


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per condition: the text embeddings (L, D), padded to max_sequence_length as the pipelines do, and the
    reference latents ``reference_latents.j`` (C, h, w) of its images."""
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe._execution_device,
                                   max_sequence_length=max_sequence_length)
    items = [{"encoder_hidden_states": e} for e in embeds]
    for item, images in zip(items, references or ()):
        item.update({f"{REFERENCE_PREFIX}{j}": reference_latent(pipe, image)[0] for j, image in enumerate(images)})
    return items


# Mistral-Small-3.1's chat format as FLUX.2 [dev] renders its (system, user) messages: content may be a string or a
# list of {"type": "text" | "image"} chunks
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['content'] is string %}"
    "{% set chunks = [{'type': 'text', 'text': message['content']}] %}{% else %}"
    "{% set chunks = message['content'] %}{% endif %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{% endif %}{% for chunk in chunks %}{% if chunk['type'] == 'text' %}"
    "{{ chunk['text'] }}{% elif chunk['type'] == 'image' %}[IMG]{% endif %}{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")
MISTRAL_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]")
FLUX2_TEXT_LAYERS = {"flux2": 30, "flux2-klein": 27}    # the pipelines stack hidden layers (10, 20, 30) / (9, 18, 27)
FLUX2_TEXT_WIDTH = 16


def tiny_vae(latent_channels: int, seed: int):
    """AutoencoderKLFlux2 with 4 levels (8× like the real one) and random batch-norm statistics (the pipelines
    normalise patchified latents by them)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                             layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=64,
                             patch_size=(2, 2))
    generator = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=generator) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=generator) + 0.5)
    return vae.eval()


def mistral3_text_encoder(tokenizer, layers: int, seed: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=FLUX2_TEXT_WIDTH,
                         intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=2048, sliding_window=None, **ids),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=64, patch_size=8),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
        **ids)
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()


def _tiny(latent_channels: int, seed: int, family: str) -> dict:
    """FLUX.2 [dev] (Mistral-3 text encoder, embedded guidance) or [klein] (Qwen3 text encoder, CFG): one double
    and one single block, 2 heads × 16, text width 3 × 16 (three stacked hidden layers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from piflow.integrations.diffusers import tiny as t

    dev = family == "flux2"
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * FLUX2_TEXT_WIDTH, timestep_guidance_channels=32,
        mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=dev)
    layers = FLUX2_TEXT_LAYERS[family]
    if dev:        # the real [dev] loads a PixtralProcessor (needs torchvision); text encoding uses only its tokenizer
        tokenizer = t.byte_level_tokenizer(1024, MISTRAL_SPECIALS[:4] + MISTRAL_SPECIALS[4:], add_bos=False,
                                         add_eos=False)
        tokenizer.chat_template = MISTRAL_TEMPLATE
        text = dict(text_encoder=mistral3_text_encoder(tokenizer, layers, seed + 2), tokenizer=tokenizer)
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        tokenizer = t.chat_tokenizer()
        torch.manual_seed(seed + 2)
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=FLUX2_TEXT_WIDTH, intermediate_size=32,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0, eos_token_id=3)
        text = dict(text_encoder=Qwen3ForCausalLM(config).eval(), tokenizer=tokenizer)
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE),
                vae=tiny_vae(latent_channels, seed + 1),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), **text)




def _noise(pipe, batch: int, height: int, width: int, latents: Optional[Tensor], generator, device) -> Tensor:
    """Noise (B, C, H/8, W/8); the stock pipelines' patchified (B, 4C, H/16, W/16) noise is unpatchified first."""
    channels = pipe.transformer.config.in_channels // 4
    latent_h, latent_w = calls.latent_size(pipe, height, width)
    if latents is not None and latents.dim() == 4 and tuple(latents.shape) == (
            batch, 4 * channels, latent_h // 2, latent_w // 2):
        latents = pipe._unpatchify_latents(latents)
    return calls.noise((batch, channels, latent_h, latent_w), latents, generator, device)


def _preparer(dev: bool):
    def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
        """Text-to-image, or editing with a list of reference images shared by the batch."""
        image, prompt = call["image"], call["prompt"]
        if dev and call["caption_upsample_temperature"]:
            prompt = pipe.upsample_prompt(prompt, images=image, temperature=call["caption_upsample_temperature"],
                                          device=pipe._execution_device)
        batch = calls.batch_size(prompt, call["prompt_embeds"]) * call["num_images_per_prompt"]
        device = pipe._execution_device
        prompt_embeds, _ = pipe.encode_prompt(prompt=prompt, prompt_embeds=call["prompt_embeds"], device=device,
                                              num_images_per_prompt=call["num_images_per_prompt"],
                                              max_sequence_length=call["max_sequence_length"],
                                              text_encoder_out_layers=call["text_encoder_out_layers"])
        cond = {"encoder_hidden_states": prompt_embeds}
        height, width = call["height"], call["width"]
        if image is not None and not (isinstance(image, list) and not image):
            references = []
            for number, item in enumerate(image if isinstance(image, list) else [image]):
                pipe.image_processor.check_image_input(item)
                latent = reference_latent(pipe, item, device, where=f"image[{number}]")
                references.append(latent.float().expand(batch, -1, -1, -1))
            cond.update({f"{REFERENCE_PREFIX}{j}": r for j, r in enumerate(references)})
            height = height or references[0].shape[2] * pipe.vae_scale_factor     # the first reference's size
            width = width or references[0].shape[3] * pipe.vae_scale_factor
        height, width = calls.image_size(pipe, height, width)
        calls.check_multiple(pipe, height, width, pipe.vae_scale_factor * 2)
        cond = calls.embedded_guidance(pipe, cond, batch, call["guidance_scale"] if dev else 1.0, device)
        noise = _noise(pipe, batch, height, width, call["latents"], call["generator"], device)
        return noise, cond, noise.shape[2] * noise.shape[3] // 4
    return prepare


def encode_init(pipe, pixels: Tensor) -> Tensor:
    """Pixels (B, 3, H, W) in [−1, 1] → normalised latents (B, C, H/8, W/8), as the pipelines encode reference
    images (VAE mode, patchified, batch-norm normalised, unpatchified): the inverse of `decode`."""
    return pipe._unpatchify_latents(pipe._encode_vae_image(image=pixels.to(pipe.vae.dtype), generator=None)).float()


def decode(pipe, x: Tensor, output_type: str):
    """Normalised (B, C, H/8, W/8) → images: patchified, batch-norm statistics undone, unpatchified, decoded."""
    packed = pipe._patchify_latents(x.to(pipe.vae.dtype))
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(packed)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(packed)
    image = pipe.vae.decode(pipe._unpatchify_latents(packed * std + mean), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


OUTPUT = "diffusers.pipelines.flux2.pipeline_output.Flux2PipelineOutput"
DOC = ("Generate, or edit with ``image=[…]`` (reference images; image-to-image takes ``init_image=`` and "
       "``strength=``); `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1 (or "
       "the stock pipeline's patchified (B·n, 4C, H/16, W/16)); output_type \"latent\" returns the normalised "
       "(B, C, H/8, W/8). ")
DEV = calls.PipelineHooks(
    positional=(("image", None), ("prompt", None)), prepare=_preparer(True), decode=decode, output=OUTPUT,
    encode=encode_init, init_image_argument="init_image",
    params={"guidance_scale": 4.0, "num_images_per_prompt": 1, "text_encoder_out_layers": (10, 20, 30),
            "caption_upsample_temperature": None, "attention_kwargs": None},
    doc=DOC + "The distilled-guidance scalar `guidance_scale` (4.0) is the student's input as the teacher's; "
              "`caption_upsample_temperature` rewrites the prompts with the text encoder first, as the stock one.")
KLEIN = calls.PipelineHooks(
    positional=(("image", None), ("prompt", None)), prepare=_preparer(False), decode=decode, output=OUTPUT,
    encode=encode_init, init_image_argument="init_image",
    params={"num_images_per_prompt": 1, "text_encoder_out_layers": (9, 18, 27), "attention_kwargs": None},
    unused={"guidance_scale": None, "negative_prompt_embeds": None},
    doc=DOC + "CFG arguments are accepted and unused (guidance is distilled in).")

FAMILIES = (
    Family("flux2", "flux2", "Flux2Transformer2DModel", "Flux2Pipeline", "PiFlux2Pipeline", encode,
           base.collate_padded, ("encoder_hidden_states",), DEV, lambda c, s: _tiny(c, s, "flux2"),
           guidance="embedded", guidance_scale=4.0, references="optional"),
    Family("flux2-klein", "flux2", "Flux2Transformer2DModel", "Flux2KleinPipeline", "PiFlux2KleinPipeline", encode,
           base.collate_padded, ("encoder_hidden_states",), KLEIN, lambda c, s: _tiny(c, s, "flux2-klein"),
           guidance="cfg", guidance_scale=4.0, references="optional"))
