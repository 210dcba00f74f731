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


def _pad_stack(embeds: Sequence[Tensor], device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """(L_i, D) embeddings → zero-padded (B, L, D) and the validity mask (B, L) (long)."""
    length = max(e.shape[0] for e in embeds)
    padded = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
    mask = torch.stack([torch.arange(length) < e.shape[0] for e in embeds]).long()
    return padded.to(device=device, dtype=dtype), mask.to(device)


# ---------------------------------------------------------------------------------------------- encode (pipe, ...)
def _encode_flux(pipe, prompts: list[str], max_sequence_length: int) -> list[dict]:
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe._execution_device,
                                           max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(embeds, pooled)]


def _encode_sd3(pipe, prompts: list[str], max_sequence_length: int) -> list[dict]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              device=pipe._execution_device, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e, "pooled_projections": p} for e, p in zip(embeds, pooled)]


def _encode_qwen(pipe, prompts: list[str], max_sequence_length: int) -> list[dict]:
    embeds, mask = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device,
                                      max_sequence_length=max_sequence_length)
    lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(dim=1).tolist()
    return [{"encoder_hidden_states": e[:int(n)]} for e, n in zip(embeds, lengths)]


def _encode_zimage(pipe, prompts: list[str], max_sequence_length: int) -> list[dict]:
    embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe._execution_device,
                                   do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return [{"encoder_hidden_states": e} for e in embeds]


# ---------------------------------------------------------------------------------------------- collate (items, ...)
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
    = in_channels). `video`: latents are (C, T, H, W)."""

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
    references: bool = False
    video: bool = False


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.guidance not in ("embedded", "cfg", "none"):
        raise ValueError(f"guidance must be 'embedded', 'cfg' or 'none', got {family.guidance!r}")
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
                       _encode_zimage, _collate_qwen, ("encoder_hidden_states",), latent_packing="inside"))


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
    matches = [f for f in FAMILIES.values() if f.transformer_class == transformer_class and not f.references]
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
