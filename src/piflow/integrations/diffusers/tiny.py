"""Tiny random-weight FLUX / SD3 / Qwen-Image pipelines built from scratch — no download, seconds on a CPU.

They are the real diffusers classes (transformer, VAE, text encoders) at toy width, with byte-level BPE
tokenizers built here, so every code path that runs the 12B/20B models (``from_pretrained``, text encoding, LoRA,
adapters, pipelines, distillation) can be exercised offline, as diffusers' own tests do with tiny configs:

    pipe = tiny_pipeline("flux")                 # a FluxPipeline with random weights
    pipe.save_pretrained("runs/tiny-flux")       # a local checkpoint `from_pretrained` can load

The weights are random: images are noise-like; use these for plumbing and for tests, not for quality. Besides the
test suite, they are the offline smoke run of the text-to-image commands (docs/text_to_image.md): save one with
``tiny_pipeline("flux").save_pretrained("runs/tiny-flux")`` and run ``piflow distill pipeline=runs/tiny-flux …``,
``piflow export`` and ``piflow sample`` on it without a GPU or a download.
`latent_channels` is the VAE's latent channel count (16 in the real models, 4 here by default).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

BYTE_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
QWEN_SPECIALS = ("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>")
TEXT_WIDTH = 32


def byte_level_tokenizer(model_max_length: int, specials: tuple[str, ...] = BYTE_SPECIALS,
                         add_bos: bool = False, add_eos: bool = True):
    """A `PreTrainedTokenizerFast` over the 256 byte symbols (no merges) plus `specials` = (pad, unk, bos, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pad, unk, bos, eos = specials[:4]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*specials, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    template = " ".join([*([bos] if add_bos else []), "$A", *([eos] if add_eos else [])])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in (bos, eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, pad_token=pad,
                                   unk_token=unk, bos_token=bos, eos_token=eos,
                                   additional_special_tokens=[t for t in specials if t not in (pad, unk, bos, eos)])


def _clip_text_encoder(vocab_size: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5_encoder(vocab_size: int, width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _autoencoder_kl(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=1.5,
                         shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False).eval()


def _randomise_output_layer(transformer: torch.nn.Module) -> torch.nn.Module:
    """diffusers zero-initialises the final projection; random values make a tiny teacher's outputs informative."""
    from piflow.integrations.diffusers.families import family_of_transformer
    from piflow.integrations.diffusers.students import get_architecture

    architecture = get_architecture(family_of_transformer(type(transformer).__name__).architecture)
    projection = transformer.get_submodule(architecture.projection)
    with torch.no_grad():
        projection.weight.normal_(0, 0.05)
        if projection.bias is not None:
            projection.bias.normal_(0, 0.05)
    return transformer.eval()


def _flux_components(latent_channels: int, seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
                                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    clip_tokenizer = byte_level_tokenizer(77, add_bos=True)
    t5_tokenizer = byte_level_tokenizer(512)
    return dict(transformer=_randomise_output_layer(transformer), vae=_autoencoder_kl(latent_channels, seed + 1),
                text_encoder=_clip_text_encoder(len(clip_tokenizer), False, seed + 2), tokenizer=clip_tokenizer,
                text_encoder_2=_t5_encoder(len(t5_tokenizer), TEXT_WIDTH, seed + 3), tokenizer_2=t5_tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=16,
                                                          max_image_seq_len=256))


def _sd3_components(latent_channels: int, seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=latent_channels, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * TEXT_WIDTH,
                                        caption_projection_dim=16, pooled_projection_dim=2 * TEXT_WIDTH,
                                        out_channels=latent_channels, pos_embed_max_size=32)
    clip = byte_level_tokenizer(77, add_bos=True)
    t5 = byte_level_tokenizer(256)
    return dict(transformer=_randomise_output_layer(transformer), vae=_autoencoder_kl(latent_channels, seed + 1),
                text_encoder=_clip_text_encoder(len(clip), True, seed + 2), tokenizer=clip,
                text_encoder_2=_clip_text_encoder(len(clip), True, seed + 3), tokenizer_2=clip,
                text_encoder_3=_t5_encoder(len(t5), 2 * TEXT_WIDTH, seed + 4), tokenizer_3=t5,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _qwen_transformer(latent_channels: int, num_layers: int, seed: int):
    """A `QwenImageTransformer2DModel` of `num_layers` blocks, 2 heads × 16, on 2×2-packed latents (Qwen-Image and
    Qwen-Image-Edit share it)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels,
                                       num_layers=num_layers, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6))


def _qwen_components(latent_channels: int, seed: int) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = _qwen_transformer(latent_channels, 2, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=[0.0] * latent_channels,
                                 latents_std=[1.0] * latent_channels).eval()
    tokenizer = byte_level_tokenizer(1024, QWEN_SPECIALS, add_eos=False)
    torch.manual_seed(seed + 2)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2], "rope_type": "default"},
                       rope_theta=10000.0, bos_token_id=0, eos_token_id=3, pad_token_id=0)
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=dict(
        depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH),
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, bos_token_id=0, eos_token_id=3, pad_token_id=0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return dict(transformer=_randomise_output_layer(transformer), vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


# ChatML, as the Qwen3 chat template renders one user turn (Z-Image and FLUX.2 [klein] template their prompts)
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen3_text_encoder(vocab_size: int, seed: int):
    """A 2-layer Qwen3 text model (pipelines read a hidden layer before the last)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    return Qwen3Model(config).eval()


def _chat_tokenizer():
    tokenizer = byte_level_tokenizer(1024, QWEN_SPECIALS, add_eos=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _zimage_components(latent_channels: int, seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_WIDTH, rope_theta=256.0,
        axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512])
    with torch.no_grad():           # informative pad tokens (diffusers starts them at zero)
        transformer.x_pad_token.normal_(0, 1.0)
        transformer.cap_pad_token.normal_(0, 1.0)
    tokenizer = _chat_tokenizer()
    return dict(transformer=_randomise_output_layer(transformer), vae=_autoencoder_kl(latent_channels, seed + 1),
                text_encoder=_qwen3_text_encoder(len(tokenizer), seed + 2), tokenizer=tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


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


def _flux2_vae(latent_channels: int, seed: int):
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


def _mistral3_text_encoder(tokenizer, layers: int, seed: int):
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


def _flux2_components(latent_channels: int, seed: int, family: str = "flux2") -> dict:
    """FLUX.2 [dev] (Mistral-3 text encoder, embedded guidance) or [klein] (Qwen3 text encoder, CFG): one double
    and one single block, 2 heads × 16, text width 3 × 16 (three stacked hidden layers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    dev = family == "flux2"
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * FLUX2_TEXT_WIDTH, timestep_guidance_channels=32,
        mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=dev)
    layers = FLUX2_TEXT_LAYERS[family]
    if dev:        # the real [dev] loads a PixtralProcessor (needs torchvision); text encoding uses only its tokenizer
        tokenizer = byte_level_tokenizer(1024, MISTRAL_SPECIALS[:4] + MISTRAL_SPECIALS[4:], add_bos=False,
                                         add_eos=False)
        tokenizer.chat_template = MISTRAL_TEMPLATE
        text = dict(text_encoder=_mistral3_text_encoder(tokenizer, layers, seed + 2), tokenizer=tokenizer)
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        tokenizer = _chat_tokenizer()
        torch.manual_seed(seed + 2)
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=FLUX2_TEXT_WIDTH, intermediate_size=32,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0, eos_token_id=3)
        text = dict(text_encoder=Qwen3ForCausalLM(config).eval(), tokenizer=tokenizer)
    return dict(transformer=_randomise_output_layer(transformer), vae=_flux2_vae(latent_channels, seed + 1),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), **text)


def _wan_components(latent_channels: int, seed: int) -> dict:
    """Wan 2.1: a 1-layer WanTransformer3DModel (patch (1, 2, 2)), an AutoencoderKLWan with 8× spatial and 4×
    temporal compression (like the real one) at toy width, a 2-layer UMT5 encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=latent_channels, out_channels=latent_channels,
                                        text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=1,
                                        rope_max_seq_len=32)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1 * i for i in range(latent_channels)],
                           latents_std=[1.0 + 0.5 * i for i in range(latent_channels)]).eval()
    tokenizer = byte_level_tokenizer(512)
    torch.manual_seed(seed + 2)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=8, d_ff=37,
                                          num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                          pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)).eval()
    return dict(transformer=_randomise_output_layer(transformer), vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0))


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


def _qwen_vl_tokenizer():
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


def _qwen_edit_components(latent_channels: int, seed: int) -> dict:
    """Qwen-Image-Edit / Edit-Plus: the Qwen-Image transformer, an 8× Qwen VAE, a Qwen2.5-VL text encoder with a
    tiny vision tower (patch 14, temporal patch 2, merge 2) and its processor."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from piflow.integrations.diffusers.compat import allow_processor_without_video

    allow_processor_without_video()
    transformer = _qwen_transformer(latent_channels, 1, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=[0.1 * i for i in range(latent_channels)],
                                 latents_std=[1.0 + 0.5 * i for i in range(latent_channels)]).eval()
    tokenizer = _qwen_vl_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIALS}
    torch.manual_seed(seed + 2)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2], "rope_type": "default"},
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    vision_config = dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=14,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
                         out_hidden_size=TEXT_WIDTH)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])).eval()
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, temporal_patch_size=2, merge_size=2),
        tokenizer=tokenizer)
    return dict(transformer=_randomise_output_layer(transformer), vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                processor=processor, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


COMPONENTS = {"flux": _flux_components, "sd3": _sd3_components, "qwen": _qwen_components,
              "zimage": _zimage_components, "flux2": _flux2_components,
              "flux2-klein": lambda channels, seed: _flux2_components(channels, seed, "flux2-klein"),
              "wan": _wan_components, "qwen-edit": _qwen_edit_components, "qwen-edit-plus": _qwen_edit_components}
STOCK_PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "qwen": "QwenImagePipeline",
                   "zimage": "ZImagePipeline", "flux2": "Flux2Pipeline", "flux2-klein": "Flux2KleinPipeline",
                   "wan": "WanPipeline", "qwen-edit": "QwenImageEditPipeline",
                   "qwen-edit-plus": "QwenImageEditPlusPipeline"}


def tiny_components(architecture: str, latent_channels: int = 4, seed: int = 0) -> dict:
    """The keyword arguments of the stock pipeline of `architecture` ("flux", "sd3", "qwen"), random weights."""
    if architecture not in COMPONENTS:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(COMPONENTS)}")
    return COMPONENTS[architecture](latent_channels, seed)


def tiny_pipeline(architecture: str, pipeline_class: Optional[type] = None, latent_channels: int = 4, seed: int = 0):
    """A stock diffusers pipeline (FluxPipeline, StableDiffusion3Pipeline, QwenImagePipeline) or `pipeline_class`
    built from `tiny_components`."""
    if pipeline_class is None:
        import diffusers

        pipeline_class = getattr(diffusers, STOCK_PIPELINES[architecture])
    return pipeline_class(**tiny_components(architecture, latent_channels, seed))


@contextlib.contextmanager
def small_reference_area(area: int = 32 * 32):
    """Inside the block, the Qwen-Image-Edit pipelines (stock and π-Flow, and piflow's condition encoding) resize
    reference images to ~`area` pixels instead of ~1 MP — for tiny offline pipelines, where a 1 MP reference would
    be thousands of tokens. Edit's area is a literal inside ``calculate_dimensions``' caller, so that function is
    wrapped; Edit-Plus reads the module constants VAE_IMAGE_SIZE / CONDITION_IMAGE_SIZE, which are set."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    original = edit.calculate_dimensions
    saved = (edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE)
    edit.calculate_dimensions = lambda target_area, ratio: original(area, ratio)
    edit_plus.VAE_IMAGE_SIZE = edit_plus.CONDITION_IMAGE_SIZE = area
    try:
        yield
    finally:
        edit.calculate_dimensions = original
        edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE = saved
