"""The per-family part of a π-Flow pipeline call (`PipelineHooks`) and the helpers the families' hooks share. The
one call skeleton that runs them is `piflow.integrations.diffusers.pipelines.PiFlowPipelineMixin`.

A family's `prepare(pipe, call)` turns the bound call arguments (a dict: every parameter of the pipeline's
signature) into (noise (B, C, *size) float32 at σ = 1, cond dict, image_seq_len) and `decode(pipe, x, output_type)`
turns the student's σ = 0 latents (B, C, *size) into the stock pipeline's images (or frames).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

# the parameters the skeleton itself reads, with their defaults (a family may change a default in `params`)
COMMON_PARAMETERS = {
    "height": None, "width": None, "num_inference_steps": None, "sigmas": None, "temperature": "auto",
    "generator": None, "latents": None, "prompt_embeds": None, "output_type": "pil", "return_dict": True,
    "callback_on_step_end": None, "callback_on_step_end_tensor_inputs": ("latents",), "max_sequence_length": 512,
    "total_substeps": None}


@dataclass(frozen=True)
class PipelineHooks:
    """What differs between the families' π-Flow pipeline calls.

    positional: the leading parameters that may be given by position, with their defaults (as the stock
    pipeline's first ones); params: the family's other parameters (and changed defaults of `COMMON_PARAMETERS`);
    unused: stock CFG arguments the call accepts and ignores (the student has guidance distilled in), each with
    the value at which no warning is given; prepare / decode: see the module docstring; output: the stock output
    class (dotted path) and `output_field` its field ("images" or "frames"); doc: the call's docstring.
    encode(pipe, pixels (B, 3, H, W) in [−1, 1]) → latents (B, C, h, w) as the student sees them (the inverse of
    `decode`; the VAE posterior's mode): families that have it take image-to-image calls, an init image through
    the argument `init_image_argument` ("image", or "init_image" where ``image`` holds reference images) and
    ``strength`` (`piflow.schedule.strength_raw_times`). optional_components: stock components the π-Flow
    pipeline can do without (LongCat's text_processor, used only to rewrite prompts)."""

    positional: tuple[tuple[str, Any], ...]
    prepare: Callable[[Any, dict], tuple[Tensor, dict, int]]
    decode: Callable[[Any, Tensor, str], Any]
    output: str
    doc: str
    params: dict = field(default_factory=dict)
    unused: dict = field(default_factory=dict)
    output_field: str = "images"
    encode: Optional[Callable[[Any, Tensor], Tensor]] = None
    init_image_argument: str = "image"
    optional_components: tuple[str, ...] = ()

    def signature(self) -> inspect.Signature:
        """``(self, <positional>, *, <the rest>)`` with the defaults above."""
        kind = inspect.Parameter
        parameters = [kind("self", kind.POSITIONAL_OR_KEYWORD)]
        parameters += [kind(name, kind.POSITIONAL_OR_KEYWORD, default=value) for name, value in self.positional]
        img2img = {self.init_image_argument: None, "strength": 1.0} if self.encode is not None else {}
        rest = {**COMMON_PARAMETERS, **img2img, **self.params, **self.unused}
        parameters += [kind(name, kind.KEYWORD_ONLY, default=value) for name, value in rest.items()
                       if name not in dict(self.positional)]
        return inspect.Signature(parameters)

    def output_class(self) -> type:
        import importlib

        module, _, name = self.output.rpartition(".")
        return getattr(importlib.import_module(module), name)


def batch_size(prompt, prompt_embeds) -> int:
    """Conditions of a call: one per prompt (or per row of `prompt_embeds`)."""
    if prompt is None and prompt_embeds is None:
        raise ValueError("give `prompt` or `prompt_embeds`")
    if prompt is None:
        return len(prompt_embeds)
    return 1 if isinstance(prompt, str) else len(prompt)


def noise(shape: tuple[int, ...], latents: Optional[Tensor], generator, device) -> Tensor:
    """The float32 noise (B, C, *size) at σ = 1: the caller's `latents` (checked) or drawn as the stock pipelines."""
    from diffusers.utils.torch_utils import randn_tensor

    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)} (B, C, H, W) at σ = 1, "
                             f"got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=torch.float32)
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def latent_size(pipe, height: int, width: int) -> tuple[int, int]:
    """(h, w) latent size of a 2×2-packed family's (height, width) image (even, as the stock pipelines)."""
    multiple = pipe.vae_scale_factor * 2
    return 2 * (int(height) // multiple), 2 * (int(width) // multiple)


def packed_noise(pipe, batch: int, height: int, width: int, latents: Optional[Tensor], generator,
                 device) -> tuple[Tensor, int]:
    """Noise (B, C, h, w) of the 2×2-packed families (FLUX, Qwen-Image) and its token count."""
    latent_h, latent_w = latent_size(pipe, height, width)
    channels = pipe.transformer.config.in_channels // 4
    return (noise((batch, channels, latent_h, latent_w), latents, generator, device),
            (latent_h // 2) * (latent_w // 2))


def image_size(pipe, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """(height, width) in pixels; each defaults to the model's sample size, as in the stock pipelines."""
    default = getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor
    return height or default, width or default


def check_multiple(pipe, height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for {type(pipe).__name__}, got "
                         f"{height}×{width}")


def embedded_guidance(pipe, cond: dict, batch: int, scale: float, device) -> dict:
    """`cond` with the distilled-guidance scalar (B,) when the transformer embeds guidance (FLUX [dev])."""
    if pipe.transformer.config.guidance_embeds:
        cond["guidance"] = torch.full((batch,), float(scale), device=device, dtype=torch.float32)
    return cond


def decode_scaled(pipe, x: Tensor, output_type: str, cast_first: bool = False):
    """AutoencoderKL latents (B, C, H, W) → images: x / scaling_factor + shift_factor (none for SD's VAE), decoded and
    post-processed (`cast_first`: to the VAE dtype before scaling, as the Z-Image pipeline)."""
    if cast_first:
        x = x.to(pipe.vae.dtype)
    x = x / pipe.vae.config.scaling_factor + (getattr(pipe.vae.config, "shift_factor", None) or 0.0)
    image = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def posterior_mode(pipe, pixels: Tensor) -> Tensor:
    """The VAE posterior's mode of pixels (B, 3, H, W) in [−1, 1] (a 5-D video VAE gets one-frame clips)."""
    pixels = pixels.to(pipe.vae.dtype)
    video = pipe.vae.__class__.__name__ in ("AutoencoderKLQwenImage", "AutoencoderKLWan")
    posterior = pipe.vae.encode(pixels[:, :, None] if video else pixels).latent_dist
    latents = posterior.mode()
    return latents[:, :, 0] if video else latents


def encode_scaled(pipe, pixels: Tensor) -> Tensor:
    """Pixels → AutoencoderKL latents as the transformer sees them: (mode − shift_factor)·scaling_factor (the
    inverse of `decode_scaled`)."""
    latents = posterior_mode(pipe, pixels).float()
    return (latents - (getattr(pipe.vae.config, "shift_factor", None) or 0.0)) * pipe.vae.config.scaling_factor


def encode_normalised(pipe, pixels: Tensor) -> Tensor:
    """Pixels → normalised latents (B, C, h, w) of the Qwen / Wan VAEs: (mode − latents_mean)/latents_std (the
    inverse of `denormalised`)."""
    latents = posterior_mode(pipe, pixels).float()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1).to(latents)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1).to(latents)
    return (latents - mean) / std


def denormalised(pipe, x: Tensor) -> Tensor:
    """Normalised 5-D latents (B, C, T, H, W) → the VAE's latents (Qwen / Wan VAEs: x·latents_std + latents_mean)."""
    x = x.to(pipe.vae.dtype)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1).to(x)
    return x * std + mean
