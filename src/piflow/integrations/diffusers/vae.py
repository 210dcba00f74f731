"""The latent space of latent-diffusion teachers: a diffusers `AutoencoderKL` (SD-VAE ``stabilityai/sd-vae-ft-ema``
for the ImageNet SiT/REPA/π-Flow teachers) and its scaling.

A teacher's latents are z = (mean(E(x)) − shift_factor) · scaling_factor (0.18215, shift 0 for SD-VAE); images are
decoded as D(z / scaling_factor + shift_factor) and quantised to uint8 as the authors' evaluation does
(round(127.5·x + 127.5) of x clamped to [−1, 1]).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from piflow.errors import ConfigError

__all__ = ["LatentCodec", "load_vae", "to_uint8"]


def load_vae(name_or_path: str, device: Optional[torch.device | str] = None,
             dtype: torch.dtype = torch.float32) -> "LatentCodec":
    """`LatentCodec` of a diffusers `AutoencoderKL` folder or Hub id (a local folder: nothing is downloaded)."""
    from piflow.errors import require

    diffusers = require("diffusers", "the latent VAE (`vae:`)")
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        from piflow.files import first_line

        raise ConfigError(f"vae {name_or_path!r} is not a loadable diffusers AutoencoderKL folder or Hub id "
                          f"({first_line(error)[:200]})") from None
    return LatentCodec(vae.to(device or "cpu").eval().requires_grad_(False))


class LatentCodec:
    """Encode images in [−1, 1] (B, 3, H, W) to scaled latents and decode them back."""

    def __init__(self, vae) -> None:
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor, sample_generator: Optional[torch.Generator] = None) -> Tensor:
        """(B, 3, H, W) in [−1, 1] → scaled latents (B, C, H/8, W/8): the posterior mean, or a posterior sample
        with `sample_generator`."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        latents = dist.mean if sample_generator is None else dist.sample(sample_generator)
        return ((latents.float() - self.shift_factor) * self.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) → images (B, 3, 8h, 8w) in [−1, 1] (clamped), float32 on the latents' device."""
        z = latents.to(self.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0).to(latents.device)


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [−1, 1] → uint8 (B, H, W, 3), rounded (the authors' 127.5·x + 128, truncated)."""
    return (images.clamp(-1.0, 1.0) * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
