"""Qwen-Image-Edit (`QwenImageEditPipeline`: one reference image) and Edit-Plus (`QwenImageEditPlusPipeline`,
2509 / 2511: several; 2511 is the transformer config zero_cond_t) on the Qwen-Image architecture (`qwen`).

Reference images are resized as the stock pipelines do, encoded by the VAE into clean tokens after the generated
ones, and seen by the vision-language text encoder; the teacher takes true CFG 4.0 against a negative prompt
encoded with the same reference images (``null.*`` per condition).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from piflow.integrations.diffusers.families import base, calls, qwen
from piflow.integrations.diffusers.families.base import NULL_PREFIX, REFERENCE_PREFIX, Family


def qwen_edit_references(pipe, images: Sequence, plus: bool) -> tuple[list, dict]:
    """(images for the vision-language encoder, reference latents ``reference_latents.j`` (C, h, w)) of one
    condition, resized as the stock pipelines do: Edit one image at ~1 MP for both, Edit-Plus each image at
    ~384² for the encoder and ~1 MP for the VAE (their module-level sizes, read at call time)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    if not plus and len(images) != 1:
        raise ValueError(f"images: Qwen-Image-Edit takes one reference image per condition, got {len(images)} "
                         "(Qwen-Image-Edit-Plus, 2509/2511, takes several)")
    encoder_images, latents = [], {}
    for number, image in enumerate(images):
        width, height = image.size
        if plus:
            cond_w, cond_h = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, width / height)
            vae_w, vae_h = edit_plus.calculate_dimensions(edit_plus.VAE_IMAGE_SIZE, width / height)
            encoder_images.append(pipe.image_processor.resize(image, cond_h, cond_w))
            pixels = pipe.image_processor.preprocess(image, vae_h, vae_w)
        else:
            vae_w, vae_h, _ = edit.calculate_dimensions(1024 * 1024, width / height)
            resized = pipe.image_processor.resize(image, vae_h, vae_w)
            encoder_images.append(resized)
            pixels = pipe.image_processor.preprocess(resized, vae_h, vae_w)
        if pixels.shape[1] != 3:
            raise ValueError(f"images: reference image {number} must be RGB (3 channels), got {pixels.shape[1]}")
        encoded = pipe._encode_vae_image(pixels.unsqueeze(2).to(pipe._execution_device, pipe.vae.dtype),
                                         generator=None)                           # (1, C, 1, h, w), normalised
        latents[f"{REFERENCE_PREFIX}{number}"] = encoded[0, :, 0]
    return encoder_images, latents


def _encoder(plus: bool):
    def encode(pipe, prompts: list[str], max_sequence_length: int, references=None,
               negative_prompt: Optional[str] = None) -> list[dict]:
        """Per condition: its text embeddings (the vision-language encoder sees its images), reference latents and,
        given `negative_prompt`, the negative's embeddings with the same images (``null.*``)."""
        def text(prompt: str, encoder_images: list) -> dict:
            embeds, mask = pipe.encode_prompt(prompt=[prompt], image=encoder_images if plus else encoder_images[0],
                                              device=pipe._execution_device,
                                              max_sequence_length=max_sequence_length)
            return base.masked_items(embeds, mask)[0]

        items = []
        for prompt, images in zip(prompts, references):        # the stock pipelines encode one condition a call
            encoder_images, latents = qwen_edit_references(pipe, images, plus)
            item = {**text(prompt, encoder_images), **latents}
            if negative_prompt is not None:
                item.update({NULL_PREFIX + k: v for k, v in text(negative_prompt, encoder_images).items()})
            items.append(item)
        return items
    return encode


QWEN_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# the words around the user's instruction in Qwen-Image-Edit's prompt template: BPE merges learned on them make its
# system prefix 64 tokens long, the pipelines' `prompt_template_encode_start_idx`, as with the real tokenizer
EDIT_TEMPLATE_TEXT = [
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets the "
    "user's requirements while maintaining consistency with the original input where appropriate.\nuser\n"
    "assistant\n", "Picture 1: Picture 2: Picture 3: ", " Picture Picture:"]


def qwen_vl_tokenizer():
    """A `Qwen2Tokenizer` (Qwen's pre-tokenisation, byte-level BPE with merges learned on the edit templates) with the
    Qwen2.5-VL special tokens."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    learner.train_from_iterator(EDIT_TEMPLATE_TEXT, trainer=trainers.BpeTrainer(
        vocab_size=2048, min_frequency=1, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(learner.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({token: len(vocab) + i for i, token in enumerate(QWEN_VL_SPECIALS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                    for m in model["merges"]],
                               unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_VL_SPECIALS],
                         special_tokens=True)
    return tokenizer




def tiny(latent_channels: int, seed: int) -> dict:
    """Qwen-Image-Edit / Edit-Plus: the Qwen-Image transformer, an 8× Qwen VAE, a Qwen2.5-VL text encoder with a
    tiny vision tower (patch 14, temporal patch 2, merge 2) and its processor."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from piflow.integrations.diffusers import tiny as t
    from piflow.integrations.diffusers.compat import allow_processor_without_video

    allow_processor_without_video()
    transformer = qwen.tiny_transformer(latent_channels, 1, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=[0.1 * i for i in range(latent_channels)],
                                 latents_std=[1.0 + 0.5 * i for i in range(latent_channels)]).eval()
    tokenizer = qwen_vl_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_VL_SPECIALS}
    torch.manual_seed(seed + 2)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=t.TEXT_WIDTH, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2], "rope_type": "default"},
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    vision_config = dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=14,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
                         out_hidden_size=t.TEXT_WIDTH)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])).eval()
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, temporal_patch_size=2, merge_size=2),
        tokenizer=tokenizer)
    return dict(transformer=t.randomise_output_layer(transformer, qwen.ARCHITECTURE), vae=vae, text_encoder=encoder,
                tokenizer=tokenizer, processor=processor, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))




def _default_size(ratio: float) -> tuple[int, int]:
    """(width, height) of ~1 MP at the first (Edit) / last (Plus) reference's aspect ratio, as the stock ones."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit

    width, height, _ = edit.calculate_dimensions(1024 * 1024, ratio)
    return width, height


def _preparer(plus: bool):
    def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
        """Reference image(s) encoded as in distillation (the same resizing, VAE normalisation and
        vision-language prompt)."""
        from PIL import Image

        from piflow.integrations.diffusers.prompts import collate_text

        image, prompt, prompt_embeds = call["image"], call["prompt"], call["prompt_embeds"]
        if image is None or (isinstance(image, list) and not image):
            raise ValueError(f"image: {type(pipe).__name__} edits a reference image; pass image=PIL.Image "
                             f"({'a list of reference images' if plus else 'or one per prompt'})")
        images = image if isinstance(image, list) else [image]
        if not all(isinstance(item, Image.Image) for item in images):
            raise ValueError("image must be a PIL image or a list of PIL images (the reference images)")
        count = calls.batch_size(prompt, prompt_embeds)
        if not plus and len(images) not in (1, count):
            raise ValueError(f"image: give one reference image, or one per prompt ({count}), got {len(images)}")
        images = [item.convert("RGB") for item in images]
        # Plus: every reference for every prompt; Edit: one reference shared, or one per prompt
        per_prompt = [images] * count if plus else [[images[i if len(images) == count else 0]] for i in range(count)]
        family = "qwen-edit-plus" if plus else "qwen-edit"
        if prompt_embeds is None:                 # as in distillation: one encoder for both
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            conditions = _encoder(plus)(pipe, prompts, call["max_sequence_length"], per_prompt)
        else:
            conditions = []
            for index, references in enumerate(per_prompt):
                mask = call["prompt_embeds_mask"]
                mask = None if mask is None else mask[index:index + 1]
                conditions.append({**base.masked_items(prompt_embeds[index:index + 1], mask)[0],
                                   **qwen_edit_references(pipe, references, plus)[1]})
        device = pipe._execution_device
        items = [item for item in conditions for _ in range(call["num_images_per_prompt"])]
        cond = collate_text(items, family, device=device, dtype=pipe.transformer.dtype)
        size = images[-1 if plus else 0].size
        default_w, default_h = _default_size(size[0] / size[1])
        height, width = call["height"] or default_h, call["width"] or default_w
        calls.check_multiple(pipe, height, width, pipe.vae_scale_factor * 2)
        noise, num_tokens = calls.packed_noise(pipe, len(items), height, width, call["latents"], call["generator"],
                                               device)
        return noise, cond, num_tokens
    return prepare


REFERENCES = {False: "one PIL image, or one per prompt", True: "the list of reference images shared by the prompts"}


def _pipeline(plus: bool) -> calls.PipelineHooks:
    return calls.PipelineHooks(
        positional=(("image", None), ("prompt", None)), prepare=_preparer(plus), decode=qwen.decode,
        output=qwen.OUTPUT, params={"num_images_per_prompt": 1, "prompt_embeds_mask": None, "attention_kwargs": None},
        unused={"negative_prompt": None, "true_cfg_scale": 1.0, "guidance_scale": None,
                "negative_prompt_embeds": None, "negative_prompt_embeds_mask": None},
        doc=f"Edit `image` ({REFERENCES[plus]}) by `prompt`; CFG arguments (`negative_prompt`, `true_cfg_scale`, "
            "…) are accepted and unused (guidance is distilled in); `latents`: noise (B·n, C, H/8, W/8) at σ = 1.")


FAMILIES = tuple(
    Family(name, "qwen", "QwenImageTransformer2DModel", stock, pi, _encoder(plus), base.collate_masked,
           ("encoder_hidden_states",), _pipeline(plus), tiny, references="required", null_per_item=True)
    for name, stock, pi, plus in (("qwen-edit", "QwenImageEditPipeline", "PiQwenImageEditPipeline", False),
                                  ("qwen-edit-plus", "QwenImageEditPlusPipeline", "PiQwenImageEditPlusPipeline",
                                   True)))
