"""MLP velocity network for 2-D (low-dimensional) toy data.

Input features = [timestep sinusoid (time_embed_dim) | Fourier embedding of x (pos_embed_dim)], followed by
`num_layers` × (Linear(hidden) + SiLU). A separate small Linear+SiLU maps the timestep sinusoid to a
conditioning embedding `cond_emb` that depends on t only (read by e.g. a log-std head of a policy).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .embeddings import TimestepLike, as_timestep, fourier_position_embedding, timestep_embedding


def _kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal weights (fan_in, ReLU-family gain) and zero biases for every Linear in `module`."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class MLPBackbone2D(nn.Module):
    """Feature extractor h(x, t) for x of shape (B, C).

    Args:
        in_channels: C, the data dimension (2 for 2-D toy data).
        hidden_size: width of every hidden layer (= `feature_dim` = `cond_dim`).
        num_layers: number of Linear+SiLU layers.
        time_embed_dim: size of the timestep sinusoid.
        pos_embed_dim: total size of the Fourier embedding of x; each coordinate gets
            2 · (pos_embed_dim // (2C)) features.
        min_period, max_period: period range of the Fourier embedding (data is assumed to be O(1)).
    """

    def __init__(self, in_channels: int = 2, hidden_size: int = 512, num_layers: int = 5,
                 time_embed_dim: int = 256, pos_embed_dim: int = 256, min_period: float = 5e-3,
                 max_period: float = 50.0) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("time_embed_dim", time_embed_dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        dim_per_coord = 2 * (pos_embed_dim // (2 * in_channels))
        if dim_per_coord < 2:
            raise ValueError(f"pos_embed_dim must be >= 2 * in_channels = {2 * in_channels}, got {pos_embed_dim}")
        self.in_channels = int(in_channels)
        self.hidden_size = int(hidden_size)
        self.time_embed_dim = int(time_embed_dim)
        self.dim_per_coord = dim_per_coord
        self.min_period = float(min_period)
        self.max_period = float(max_period)
        self.feature_dim = self.hidden_size
        self.cond_dim = self.hidden_size

        layers = []
        width = self.time_embed_dim + self.in_channels * dim_per_coord
        for _ in range(num_layers):
            layers += [nn.Linear(width, self.hidden_size), nn.SiLU()]
            width = self.hidden_size
        self.layers = nn.Sequential(*layers)
        self.cond_embed = nn.Sequential(nn.Linear(self.time_embed_dim, self.hidden_size), nn.SiLU())
        _kaiming_init(self)

    def _check_x(self, x: Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.in_channels}), got {shape}")

    def features(self, x: Tensor, t: TimestepLike,
                 extra_condition: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x: (B, C), t: (B,) or float timestep (σ · num_timesteps); extra_condition: (B, time_embed_dim) added to
        the timestep sinusoid (e.g. MeanFlow's embedding of the interval t − r) or None.

        Returns (h: (B, hidden), cond_emb: (B, hidden)); cond_emb depends on t only.
        """
        self._check_x(x)
        t = as_timestep(t, x.shape[0], x.device)
        dtype = self.cond_embed[0].weight.dtype
        t_emb = timestep_embedding(t, self.time_embed_dim).to(dtype)                       # (B, Dt)
        if extra_condition is not None:
            if extra_condition.shape != t_emb.shape:
                raise ValueError(f"extra_condition must have shape {tuple(t_emb.shape)}, "
                                 f"got {tuple(extra_condition.shape)}")
            t_emb = t_emb + extra_condition.to(dtype)
        x_emb = fourier_position_embedding(x, self.dim_per_coord, self.min_period,
                                           self.max_period).to(dtype)                      # (B, Dx)
        h = self.layers(torch.cat([t_emb, x_emb], dim=-1))
        return h, self.cond_embed(t_emb)

    def forward(self, x: Tensor, t: TimestepLike,
                extra_condition: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Same as `features`."""
        return self.features(x, t, extra_condition)


class MLPVelocityModel2D(nn.Module):
    """Velocity network u(x, t) = proj_out(h(x, t)) for x of shape (B, C); unconditional.

    Constructor args are those of `MLPBackbone2D`. `proj_out` (Linear(hidden, C)) is Kaiming-normal
    initialized with unit (linear) gain and zero bias.
    """

    def __init__(self, in_channels: int = 2, hidden_size: int = 512, num_layers: int = 5,
                 time_embed_dim: int = 256, pos_embed_dim: int = 256, min_period: float = 5e-3,
                 max_period: float = 50.0) -> None:
        super().__init__()
        self.backbone = MLPBackbone2D(in_channels, hidden_size, num_layers, time_embed_dim, pos_embed_dim,
                                      min_period, max_period)
        self.in_channels = self.backbone.in_channels
        self.out_channels = self.backbone.in_channels
        self.feature_dim = self.backbone.feature_dim
        self.cond_dim = self.backbone.cond_dim
        self.proj_out = nn.Linear(self.feature_dim, self.out_channels)
        nn.init.kaiming_normal_(self.proj_out.weight, nonlinearity="linear")
        nn.init.zeros_(self.proj_out.bias)

    @staticmethod
    def _check_cond(cond: Optional[Tensor]) -> None:
        if cond is not None:
            raise ValueError("cond must be None: MLPVelocityModel2D is unconditional")

    @property
    def extra_condition_dim(self) -> int:
        """Width of the `extra_condition` embedding added to the timestep sinusoid (= time_embed_dim)."""
        return self.backbone.time_embed_dim

    def features(self, x: Tensor, t: TimestepLike, cond: Optional[Tensor] = None,
                 extra_condition: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x: (B, C), t: (B,) or float -> (h: (B, hidden), cond_emb: (B, hidden))."""
        self._check_cond(cond)
        return self.backbone.features(x, t, extra_condition)

    def forward(self, x: Tensor, t: TimestepLike, cond: Optional[Tensor] = None,
                extra_condition: Optional[Tensor] = None) -> Tensor:
        """x: (B, C), t: (B,) or float timestep (σ · num_timesteps) -> velocity u = ε - x0, (B, C)."""
        h, _ = self.features(x, t, cond, extra_condition)
        return self.proj_out(h)
