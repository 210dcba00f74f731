"""Velocity networks: a 2-D toy MLP, a class-conditional DiT (image / video) and U-Net (small images)."""
from .dit import DIT_PRESETS, DiT, DiTConfig
from .embeddings import as_timestep, fourier_position_embedding, timestep_embedding
from .mlp import MLPBackbone2D, MLPVelocityModel2D
from .pretrained import load_image_network, read_image_network_config
from .unet import UNet, UNetConfig

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "MLPBackbone2D",
    "MLPVelocityModel2D",
    "as_timestep",
    "fourier_position_embedding",
    "UNet",
    "UNetConfig",
    "load_image_network",
    "read_image_network_config",
    "timestep_embedding",
]
