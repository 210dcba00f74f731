"""FLUX.1 Kontext (`FluxKontextPipeline`): reference-image editing on the FLUX.1 transformer.

The students are FLUX.1 students (architecture "flux": the same transformer, LoRA targets, heads and adapters); a
condition adds the reference image's clean latent tokens after the generated ones, with RoPE ids (1, row, col), as
the stock pipeline does (`flux.model_inputs`). The reference image is prepared as the stock pipeline prepares it:
resized to the Kontext training resolution nearest its aspect ratio (``_auto_resize``, default on), cropped to a
multiple of 16 px, encoded with the VAE posterior's mode, shifted and scaled. The output is height × width (a
multiple of 16 px); ``max_area=`` rescales that size to an area at its aspect ratio, which the stock pipeline always
does (its default 1024²) — the one default that differs, so that a run's training resolution is what it samples.
Without an image the call is text-to-image. Image-to-image from a starting image takes ``init_image=`` and
``strength=`` (``image`` is the reference).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from piflow.integrations.diffusers.families import calls, flux
from piflow.integrations.diffusers.families.base import REFERENCE_PREFIX, Family

# the (width, height) pairs FLUX.1 Kontext was trained at (published with the model; the stock pipeline's list)
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))
AUTO_RESIZE = True       # the default of ``_auto_resize`` (`tiny.small_reference_area` turns it off for toy tests)


def kontext_pixels(pipe, image, auto_resize: Optional[bool] = None) -> Tensor:
    """A reference image (PIL, array or tensor) → pixels (1, 3, H, W) in [−1, 1] as `FluxKontextPipeline` prepares
    it: the Kontext resolution nearest its aspect ratio (`auto_resize`, default `AUTO_RESIZE`), then a multiple of
    16 px."""
    height, width = pipe.image_processor.get_default_height_width(image)
    if AUTO_RESIZE if auto_resize is None else auto_resize:
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    multiple = pipe.vae_scale_factor * 2
    height, width = height // multiple * multiple, width // multiple * multiple
    if height < multiple or width < multiple:
        raise ValueError(f"image: a reference image must be at least {multiple}×{multiple} px")
    return pipe.image_processor.preprocess(pipe.image_processor.resize(image, height, width), height, width)


def reference_latent(pipe, image, device=None, auto_resize: Optional[bool] = None) -> Tensor:
    """One reference image → its latents (1, C, h, w) as the transformer sees them."""
    pixels = kontext_pixels(pipe, image, auto_resize).to(device or pipe._execution_device)
    return calls.encode_scaled(pipe, pixels)


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per condition: FLUX.1's text embeddings and the latents ``reference_latents.0`` of its one reference
    image (none: text-to-image)."""
    items = flux.encode(pipe, prompts, max_sequence_length)
    for number, (item, images) in enumerate(zip(items, references or ())):
        if len(images) > 1:
            raise ValueError(f"images: condition {number} has {len(images)} reference images; FLUX.1 Kontext "
                             f"takes one")
        if images:
            item[f"{REFERENCE_PREFIX}0"] = reference_latent(pipe, images[0])[0]
    return items


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    """FLUX.1's text-to-image preparation at the stock Kontext output size, plus the reference image."""
    height, width = calls.image_size(pipe, call["height"], call["width"])
    if call["max_area"] is not None:                 # the stock pipeline's rescaling to an area
        aspect = width / height
        width, height = round((call["max_area"] * aspect) ** 0.5), round((call["max_area"] / aspect) ** 0.5)
    multiple = pipe.vae_scale_factor * 2
    height, width = height // multiple * multiple, width // multiple * multiple
    noise, cond, num_tokens = flux.prepare(pipe, dict(call, height=height, width=width))
    image = call["image"]
    if image is not None:
        if isinstance(image, list):
            if len(image) != 1:
                raise ValueError(f"image: FLUX.1 Kontext takes one reference image, got {len(image)}")
            image = image[0]
        reference = reference_latent(pipe, image, noise.device, call["_auto_resize"]).float()
        cond[f"{REFERENCE_PREFIX}0"] = reference.expand(noise.shape[0], *reference.shape[1:])
    return noise, cond, num_tokens


PIPELINE = calls.PipelineHooks(
    positional=(("image", None), ("prompt", None), ("prompt_2", None)), prepare=prepare,
    decode=calls.decode_scaled, encode=calls.encode_scaled, init_image_argument="init_image",
    output="diffusers.pipelines.flux.pipeline_output.FluxPipelineOutput",
    params={**flux.PIPELINE.params, "max_area": None, "_auto_resize": None},
    unused={**flux.PIPELINE.unused, "ip_adapter_image": None, "ip_adapter_image_embeds": None},
    doc="Edit ``image`` (one reference image) following the prompt, or generate without one; the output size is "
        "height × width (with `max_area`: rescaled to that area, as the stock pipeline always does); `latents` "
        "(optional) is the unpacked noise (B·n, C, H/8, W/8) at σ = 1; the student takes the distilled-guidance "
        "scalar `guidance_scale` (3.5) as the teacher did; image-to-image from ``init_image`` with ``strength``.")

FAMILIES = (Family("flux-kontext", "flux", "FluxTransformer2DModel", "FluxKontextPipeline", "PiFluxKontextPipeline",
                   encode, flux.collate, ("encoder_hidden_states", "pooled_projections"), PIPELINE, flux.tiny,
                   guidance="embedded", guidance_scale=3.5, references="optional"),)
