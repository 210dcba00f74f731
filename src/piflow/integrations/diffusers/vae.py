"""The latent space of latent-diffusion teachers: a diffusers `AutoencoderKL` (SD-VAE ``stabilityai/sd-vae-ft-ema``
for the ImageNet SiT/REPA/π-Flow teachers) and its scaling.

A teacher's latents are z = (mean(E(x)) − shift_factor) · scaling_factor (0.18215, shift 0 for SD-VAE); images are
decoded as D(z / scaling_factor + shift_factor) and quantised to uint8 as the authors' evaluation does
(round(127.5·x + 127.5) of x clamped to [−1, 1]).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from piflow.errors import ConfigError, require

__all__ = ["LatentCodec", "load_vae", "to_uint8", "vae_factors", "vae_location"]


def _looks_local(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def vae_location(name_or_path: str, option: str = "--vae") -> tuple[str, dict[str, Any]]:
    """(name for `from_pretrained`, its extra arguments) of a VAE folder (its own, or a pipeline folder's
    ``vae/``) or Hub id; a local path that does not exist or holds no config is a `ConfigError` (nothing loaded)."""
    name = str(name_or_path)
    kwargs: dict[str, Any] = {}
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {name} is a file; give the VAE's folder (config.json and safetensors "
                              f"weights) or a Hub id")
        if not (path / "config.json").is_file():
            if not (path / "vae" / "config.json").is_file():
                raise ConfigError(f"{option} folder {name} holds no config.json (nor vae/config.json): not a "
                                  f"diffusers AutoencoderKL folder")
            kwargs["subfolder"] = "vae"
        name = str(path)
    elif _looks_local(name):
        raise ConfigError(f"{option} folder {name} does not exist")
    return name, kwargs


def load_vae(name_or_path: str, device: Union[str, torch.device] = "cpu", option: str = "--vae"):
    """A diffusers `AutoencoderKL` from a local folder (its own, or a pipeline folder's ``vae/``) or a Hub id,
    weights from safetensors only, in float32 on `device`, frozen."""
    diffusers = require("diffusers", f"the latent VAE ({option})")
    name, kwargs = vae_location(name_or_path, option)
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(name, use_safetensors=True, torch_dtype=torch.float32,
                                                      **kwargs)
    except Exception as error:       # OSError (missing/offline/no safetensors), ValueError, config mismatches, …
        from piflow.files import one_line

        raise ConfigError(f"{option} {name_or_path}: cannot load a diffusers AutoencoderKL with safetensors weights "
                          f"({type(error).__name__}: {one_line(error, 300)})") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_factors(vae) -> tuple[float, float, int, int]:
    """(scaling_factor, shift_factor (0 without one), latent channels, spatial down-sampling) of an AutoencoderKL."""
    config = vae.config
    scaling = config.get("scaling_factor")
    shift = config.get("shift_factor")
    scaling = 1.0 if scaling is None else float(scaling)
    shift = 0.0 if shift is None else float(shift)
    channels = int(config.get("latent_channels", 4))
    factor = 2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1)
    return scaling, shift, channels, factor


class LatentCodec:
    """Decode a teacher's scaled latents to images (`piflow.data.encode_images` writes them)."""

    def __init__(self, vae) -> None:
        self.vae = vae
        self.scaling_factor, self.shift_factor = vae_factors(vae)[:2]

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) → images (B, 3, 8h, 8w) in [−1, 1] (clamped), float32 on the latents' device."""
        z = latents.to(self.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0).to(latents.device)


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [−1, 1] → uint8 (B, H, W, 3), rounded (the authors' 127.5·x + 128, truncated)."""
    return (images.clamp(-1.0, 1.0) * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
