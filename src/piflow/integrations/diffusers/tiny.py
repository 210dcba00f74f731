"""Tiny random-weight pipelines of every family built from scratch — no download, seconds on a CPU.

They are the real diffusers classes (transformer, VAE, text encoders) at toy width, with byte-level BPE
tokenizers built here, so every code path that runs the 12B/20B models (``from_pretrained``, text encoding, LoRA,
adapters, pipelines, distillation) can be exercised offline, as diffusers' own tests do with tiny configs:

    pipe = tiny_pipeline("flux")                 # a FluxPipeline with random weights
    pipe.save_pretrained("runs/tiny-flux")       # a local checkpoint `from_pretrained` can load

The weights are random: images are noise-like; use these for plumbing and for tests, not for quality. Besides the
test suite, they are the offline smoke run of the text-to-image commands (docs/text_to_image.md): save one with
``tiny_pipeline("flux").save_pretrained("runs/tiny-flux")`` and run ``piflow distill pipeline=runs/tiny-flux …``,
``piflow export`` and ``piflow sample`` on it without a GPU or a download.
`latent_channels` is the VAE's latent channel count (16 in the real models, 4 here by default). Each family's
builder is the ``tiny`` function of its family file (`piflow.integrations.diffusers.families`); this module holds
the tokenizers, text encoders and VAE they share.
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


def clip_text_encoder(vocab_size: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_encoder(vocab_size: int, width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def autoencoder_kl(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=1.5,
                         shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False).eval()


def randomise_output_layer(transformer: torch.nn.Module, architecture) -> torch.nn.Module:
    """diffusers zero-initialises the final projection; random values make a tiny teacher's outputs informative."""
    projection = transformer.get_submodule(architecture.projection)
    with torch.no_grad():
        projection.weight.normal_(0, 0.05)
        if projection.bias is not None:
            projection.bias.normal_(0, 0.05)
    return transformer.eval()


# ChatML, as the Qwen3 chat template renders one user turn (Z-Image and FLUX.2 [klein] template their prompts)
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen3_text_encoder(vocab_size: int, seed: int):
    """A 2-layer Qwen3 text model (pipelines read a hidden layer before the last)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    return Qwen3Model(config).eval()


def chat_tokenizer():
    tokenizer = byte_level_tokenizer(1024, QWEN_SPECIALS, add_eos=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_components(family: str, latent_channels: int = 4, seed: int = 0) -> dict:
    """The keyword arguments of the stock pipeline of `family` (a name of `families.FAMILIES`), random weights
    (each family file's ``tiny`` builder)."""
    from piflow.integrations.diffusers.families import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"unknown architecture {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family].tiny(latent_channels, seed)


def tiny_pipeline(family: str, pipeline_class: Optional[type] = None, latent_channels: int = 4, seed: int = 0):
    """The stock diffusers pipeline of `family` (FluxPipeline, StableDiffusion3Pipeline, …), or `pipeline_class`,
    built from `tiny_components`."""
    if pipeline_class is None:
        import diffusers

        from piflow.integrations.diffusers.families import get_family

        pipeline_class = getattr(diffusers, get_family(family).stock_pipeline)
    components = tiny_components(family, latent_channels, seed)
    pipe = pipeline_class(**components)
    # constructor settings that are not modules (DiT's id2label): into the pipeline config, so that save_pretrained
    # writes them to model_index.json (DiTPipeline does not register its id2label itself)
    settings = {k: v for k, v in components.items()
                if isinstance(v, (dict, list, str, int, float, bool)) and k not in pipe.config}
    if settings:
        pipe.register_to_config(**settings)
    return pipe


@contextlib.contextmanager
def small_reference_area(area: int = 32 * 32):
    """Inside the block, the Qwen-Image-Edit pipelines (stock and π-Flow, and piflow's condition encoding) resize
    reference images to ~`area` pixels instead of ~1 MP — for tiny offline pipelines, where a 1 MP reference would
    be thousands of tokens. Edit's area is a literal inside ``calculate_dimensions``' caller, so that function is
    wrapped; Edit-Plus reads the module constants VAE_IMAGE_SIZE / CONDITION_IMAGE_SIZE, which are set. FLUX.1
    Kontext references keep their own size (piflow's default for ``_auto_resize`` is off inside the block)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    from piflow.integrations.diffusers.families import flux_kontext

    original = edit.calculate_dimensions
    saved = (edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE, flux_kontext.AUTO_RESIZE)
    edit.calculate_dimensions = lambda target_area, ratio: original(area, ratio)
    edit_plus.VAE_IMAGE_SIZE = edit_plus.CONDITION_IMAGE_SIZE = area
    flux_kontext.AUTO_RESIZE = False
    try:
        yield
    finally:
        edit.calculate_dimensions = original
        edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE, flux_kontext.AUTO_RESIZE = saved
