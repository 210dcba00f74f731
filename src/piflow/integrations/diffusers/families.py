"""The base-model families piflow distils, one record each: which transformer and pipelines, which student
`Architecture`, how their conditions are encoded, cached and batched, and how the teacher is guided.

A family is named by its stock diffusers pipeline (``model_index.json``'s ``_class_name``): FLUX.2 [dev] and
FLUX.2 [klein] share one transformer class but not their text encoders or guidance; Qwen-Image and Qwen-Image-Edit
share one transformer but Edit also conditions on reference images. Per condition (one prompt, with its reference
images for editing families) `encode` returns a dict of tensors without the batch dimension, `collate` pads and
batches such dicts into the ``cond`` the students and teachers take, and `item_names` are the tensors a prompt cache
must hold per item. Importing this module loads neither diffusers nor the models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor


REFERENCE_PREFIX = "reference_latents."     # cond / cache keys of reference latents: reference_latents.0, …
NULL_PREFIX = "null."                       # per-item negative embeddings: null.encoder_hidden_states, …


def reference_latents(cond: dict) -> list[Tensor]:
    """The (B, C, h, w) reference latents of a collated `cond`, in order (empty for text-to-image)."""
    names = sorted((k for k in cond if k.startswith(REFERENCE_PREFIX)), key=lambda k: int(k[len(REFERENCE_PREFIX):]))
    return [cond[name] for name in names]


def _pad_stack(embeds: Sequence[Tensor], device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """(L_i, D) embeddings → zero-padded (B, L, D) and the validity mask (B, L) (long)."""
    length = max(e.shape[0] for e in embeds)
    padded = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
    mask = torch.stack([torch.arange(length) < e.shape[0] for e in embeds]).long()
    return padded.to(device=device, dtype=dtype), mask.to(device)


# ---------------------------------------------------------------------------------------------- encode (pipe, ...)
def _encode_flux(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe._execution_device,
                                           max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(embeds, pooled)]


def _encode_sd3(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              device=pipe._execution_device, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(embeds, pooled)]


def _encode_qwen(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device,
                                      max_sequence_length=max_sequence_length)
    lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(dim=1).tolist()
    return [{"encoder_hidden_states": e[:int(n)]} for e, n in zip(embeds, lengths)]


def _encode_zimage(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe._execution_device,
                                   do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e} for e in embeds]


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


def _flux2_references(pipe, references) -> list[dict]:
    """Per condition, its reference latents (C, h, w): VAE mean, patchified and batch-norm normalised as the
    pipelines do, unpatchified back to the latent grid piflow's students work on."""
    items = []
    for images in references:
        item = {}
        for number, image in enumerate(images):
            pixels = flux2_condition_image(pipe, image).to(pipe._execution_device, pipe.vae.dtype)
            latents = pipe._encode_vae_image(image=pixels, generator=None)       # (1, 4C, h/2, w/2)
            item[f"{REFERENCE_PREFIX}{number}"] = pipe._unpatchify_latents(latents)[0]
        items.append(item)
    return items


def _encode_flux2(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe._execution_device,
                                   max_sequence_length=max_sequence_length)
    items = [{"encoder_hidden_states": e} for e in embeds]        # padded to max_sequence_length, as the pipelines
    if references is not None:
        for item, refs in zip(items, _flux2_references(pipe, references)):
            item.update(refs)
    return items


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


def _qwen_text(embeds: Tensor, mask: Optional[Tensor]) -> list[dict]:
    lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None else mask.sum(dim=1).tolist()
    return [{"encoder_hidden_states": e[:int(n)]} for e, n in zip(embeds, lengths)]


def _encoder_qwen_edit(plus: bool):
    def encode(pipe, prompts: list[str], max_sequence_length: int, references=None,
               negative_prompt: Optional[str] = None) -> list[dict]:
        """Per condition: its text embeddings (the vision-language encoder sees its images), reference latents and,
        given `negative_prompt`, the negative's embeddings with the same images (``null.*``)."""
        def text(prompt: str, encoder_images: list) -> dict:
            embeds, mask = pipe.encode_prompt(prompt=[prompt], image=encoder_images if plus else encoder_images[0],
                                              device=pipe._execution_device,
                                              max_sequence_length=max_sequence_length)
            return _qwen_text(embeds, mask)[0]

        items = []
        for prompt, images in zip(prompts, references):        # the stock pipelines encode one condition a call
            encoder_images, latents = qwen_edit_references(pipe, images, plus)
            item = {**text(prompt, encoder_images), **latents}
            if negative_prompt is not None:
                item.update({NULL_PREFIX + k: v for k, v in text(negative_prompt, encoder_images).items()})
            items.append(item)
        return items
    return encode


def _encode_wan(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                   max_sequence_length=max_sequence_length, device=pipe._execution_device)
    return [{"encoder_hidden_states": e} for e in embeds]         # zero-padded to max_sequence_length (UMT5)


# ---------------------------------------------------------------------------------------------- collate (items, ...)
def _collate_padded(items: Sequence[dict], device=None, dtype=None) -> dict:
    """Text embeddings the pipelines pad to a fixed length themselves (FLUX.2, Wan): stacked (padded if needed)."""
    padded, _ = _pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    return {"encoder_hidden_states": padded}


def _collate_pooled(items: Sequence[dict], device=None, dtype=None) -> dict:
    padded, _ = _pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    pooled = torch.stack([item["pooled_projections"] for item in items]).to(device=device, dtype=dtype)
    return {"encoder_hidden_states": padded, "pooled_projections": pooled}


def _collate_flux(items: Sequence[dict], device=None, dtype=None) -> dict:
    cond = _collate_pooled(items, device, dtype)
    cond["txt_ids"] = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=device, dtype=dtype)
    return cond


def _collate_qwen(items: Sequence[dict], device=None, dtype=None) -> dict:
    padded, mask = _pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    return {"encoder_hidden_states": padded, "encoder_hidden_states_mask": mask}


@dataclass(frozen=True)
class Family:
    """One base-model family (see the module docstring).

    guidance: "embedded" (the teacher and student take the distilled-guidance scalar ``cond["guidance"]``,
    FLUX.1 [dev]), "cfg" (true classifier-free guidance of the teacher against the negative prompt; the student
    has it distilled in) or "none". `latent_packing`: "outside" (2×2 packing of (C, H, W) latents into 4C-channel
    tokens done by piflow: latent channels = in_channels / 4) or "inside" (the model patchifies: latent channels
    = in_channels). `video`: latents are (C, T, H, W). `references`: "none", "optional" (text-to-image and
    editing, FLUX.2) or "required" (Qwen-Image-Edit): conditions carry reference images, encoded into
    ``reference_latents.j`` (C, h, w) tensors (the model sees their clean tokens after the generated ones).
    `null_per_item`: the negative prompt is encoded with each condition's reference images (Qwen-Image-Edit's
    vision-language encoder sees the image), stored as ``null.<name>`` beside the condition's own tensors: such a
    family's `encode` takes the negative prompt as a fifth argument."""

    name: str
    architecture: str
    transformer_class: str
    stock_pipeline: str
    pi_pipeline: str
    encode: Callable[[Any, list, int], list]
    collate: Callable[..., dict]
    item_names: tuple[str, ...]
    guidance: str = "cfg"
    guidance_scale: float = 4.0
    latent_packing: str = "outside"
    references: str = "none"
    null_per_item: bool = False
    video: bool = False


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.guidance not in ("embedded", "cfg", "none"):
        raise ValueError(f"guidance must be 'embedded', 'cfg' or 'none', got {family.guidance!r}")
    if family.references not in ("none", "optional", "required"):
        raise ValueError(f"references must be 'none', 'optional' or 'required', got {family.references!r}")
    if family.latent_packing not in ("outside", "inside"):
        raise ValueError(f"latent_packing must be 'outside' or 'inside', got {family.latent_packing!r}")
    FAMILIES[family.name] = family
    return family


register_family(Family("flux", "flux", "FluxTransformer2DModel", "FluxPipeline", "PiFluxPipeline", _encode_flux,
                       _collate_flux, ("encoder_hidden_states", "pooled_projections"), guidance="embedded",
                       guidance_scale=3.5))
register_family(Family("sd3", "sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline", "PiSD3Pipeline",
                       _encode_sd3, _collate_pooled, ("encoder_hidden_states", "pooled_projections"),
                       latent_packing="inside"))
register_family(Family("qwen", "qwen", "QwenImageTransformer2DModel", "QwenImagePipeline", "PiQwenImagePipeline",
                       _encode_qwen, _collate_qwen, ("encoder_hidden_states",)))

# Z-Image base takes true CFG (its pipeline's guidance g is piflow's scale − 1); Z-Image-Turbo is guidance-distilled:
# distil it with guidance.scale=1.
register_family(Family("zimage", "zimage", "ZImageTransformer2DModel", "ZImagePipeline", "PiZImagePipeline",
                       _encode_zimage, _collate_qwen, ("encoder_hidden_states",), guidance_scale=6.0,
                       latent_packing="inside"))


# Qwen-Image-Edit (one reference) and Edit-Plus (2509 / 2511: several; 2511 is the transformer config
# zero_cond_t): true CFG 4.0 against a negative prompt encoded with the same reference images.
register_family(Family("qwen-edit", "qwen", "QwenImageTransformer2DModel", "QwenImageEditPipeline",
                       "PiQwenImageEditPipeline", _encoder_qwen_edit(False), _collate_qwen, ("encoder_hidden_states",),
                       references="required", null_per_item=True))
register_family(Family("qwen-edit-plus", "qwen", "QwenImageTransformer2DModel", "QwenImageEditPlusPipeline",
                       "PiQwenImageEditPlusPipeline", _encoder_qwen_edit(True), _collate_qwen,
                       ("encoder_hidden_states",), references="required", null_per_item=True))
# FLUX.2 [dev]: guidance-distilled (embedded guidance 4.0), text-to-image and multi-reference editing.
register_family(Family("flux2", "flux2", "Flux2Transformer2DModel", "Flux2Pipeline", "PiFlux2Pipeline", _encode_flux2,
                       _collate_padded, ("encoder_hidden_states",), guidance="embedded", guidance_scale=4.0,
                       references="optional"))
# FLUX.2 [klein]: the base models take true CFG against the empty prompt (4.0); the step-distilled [klein]
# checkpoints (pipeline config is_distilled) take none, which the recipe's default scale follows (1 there).
register_family(Family("flux2-klein", "flux2", "Flux2Transformer2DModel", "Flux2KleinPipeline",
                       "PiFlux2KleinPipeline", _encode_flux2, _collate_padded, ("encoder_hidden_states",),
                       guidance="cfg", guidance_scale=4.0, references="optional"))
# Wan 2.1 / 2.2 text-to-video (one transformer: Wan 2.1, Wan 2.2 TI2V-5B); CFG 5.0 against the negative prompt.
register_family(Family("wan", "wan", "WanTransformer3DModel", "WanPipeline", "PiWanPipeline", _encode_wan,
                       _collate_padded, ("encoder_hidden_states",), guidance="cfg", guidance_scale=5.0,
                       latent_packing="inside", video=True))


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(pipeline_class: str, transformer_class: Optional[str] = None) -> Family:
    """The family of a stock (or π-Flow) pipeline class name; a pipeline piflow does not know, but whose
    transformer class is that of exactly one text-to-image family, maps to that family."""
    for family in FAMILIES.values():
        if pipeline_class in (family.stock_pipeline, family.pi_pipeline):
            return family
    matches = [f for f in FAMILIES.values() if f.transformer_class == transformer_class and f.references != "required"]
    if transformer_class is not None and len(matches) >= 1:
        return matches[0]
    known = sorted({f.stock_pipeline for f in FAMILIES.values()})
    raise ValueError(f"pipeline class {pipeline_class} (transformer {transformer_class}) is not supported; "
                     f"expected one of {known} (see the bring-your-own-teacher guide)")


def family_of_transformer(transformer_class: str) -> Family:
    """The text-to-image family of a transformer class (the first registered one)."""
    for family in FAMILIES.values():
        if family.transformer_class == transformer_class:
            return family
    known = sorted({f.transformer_class for f in FAMILIES.values()})
    raise ValueError(f"transformer class {transformer_class} is not supported; expected one of {known} "
                     "(see the bring-your-own-teacher guide)")
