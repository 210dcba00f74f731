"""Velocity networks: a 2-D toy MLP and a class-conditional DiT (image / video)."""
from .dit import DIT_PRESETS, DiT, DiTConfig
from .embeddings import as_timestep, fourier_position_embedding, timestep_embedding
from .mlp import MLPBackbone2D, MLPVelocityModel2D

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "MLPBackbone2D",
    "MLPVelocityModel2D",
    "as_timestep",
    "fourier_position_embedding",
    "timestep_embedding",
]
