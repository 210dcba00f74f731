"""`DiTConfig`, the architecture of a `DiT`, and the named size presets `DIT_PRESETS` (DiT-T ... DiT-XL)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple, Union

__all__ = ["DIT_PRESETS", "DiTConfig", "POSITION_ORDERS"]

POSITION_ORDERS = ("row_col", "col_row")

DIT_PRESETS: Dict[str, Dict[str, int]] = {
    "DiT-T": dict(hidden_size=64, depth=2, num_heads=2),
    "DiT-S": dict(hidden_size=384, depth=12, num_heads=6),
    "DiT-B": dict(hidden_size=768, depth=12, num_heads=12),
    "DiT-L": dict(hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


@dataclass
class DiTConfig:
    """Architecture of a DiT. Defaults are DiT-XL/2 on 32×32×4 latents with 1000 classes.

    input_size: int S (image S×S), (H, W) (image) or (T, H, W) (video); H and W must be divisible by
    patch_size. Output channels are 2·in_channels with learn_sigma, else in_channels.
    """

    in_channels: int = 4
    input_size: Union[int, Tuple[int, ...]] = 32
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    frequency_embedding_size: int = 256
    # conventions of imported checkpoints (piflow's own DiTs keep the defaults); callers always pass t = σ·1000
    # and read u = ε − x0 (a checkpoint's velocity sign is folded into `proj_out` when it is imported)
    timestep_scale: float = 1000.0       # the time embedding sees timestep_scale·τ …
    time_reversed: bool = False          # … with τ = 1 − σ (SiT: t = 1 is data) instead of τ = σ
    mlp_norm_eps: float = 1e-6           # eps of the LayerNorm before each MLP (1e-5 in diffusers-layout DiTs)
    position_order: str = "row_col"      # which index the first half of the 2-D sin-cos features encodes:
                                         # "row_col" (piflow) or "col_row" (DiT/SiT/REPA/diffusers checkpoints)

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        elif isinstance(size, (list, tuple)) and len(size) in (2, 3) and all(
                isinstance(s, int) and not isinstance(s, bool) for s in size):
            size = tuple(size)
        else:
            raise ValueError(f"input_size must be an int, (H, W) or (T, H, W) of ints, got {self.input_size!r}")
        self.input_size = size
        for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                     "frequency_embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(s < 1 for s in size):
            raise ValueError(f"input_size entries must be positive, got {size}")
        if size[-1] % self.patch_size or size[-2] % self.patch_size:
            raise ValueError(f"input_size (H, W) = {size[-2:]} must be divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2-D sin-cos embedding), got {self.hidden_size}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1], got {self.class_dropout_prob}")
        self.learn_sigma = bool(self.learn_sigma)
        if isinstance(self.timestep_scale, bool) or not isinstance(self.timestep_scale, (int, float)) \
                or not math.isfinite(self.timestep_scale) or self.timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be a finite number > 0, got {self.timestep_scale!r}")
        self.timestep_scale = float(self.timestep_scale)
        if not isinstance(self.time_reversed, bool):
            raise ValueError(f"time_reversed must be true or false, got {self.time_reversed!r}")
        if isinstance(self.mlp_norm_eps, bool) or not isinstance(self.mlp_norm_eps, (int, float)) \
                or not 0 < self.mlp_norm_eps < 1:
            raise ValueError(f"mlp_norm_eps must be a number in (0, 1), got {self.mlp_norm_eps!r}")
        self.mlp_norm_eps = float(self.mlp_norm_eps)
        if self.position_order not in POSITION_ORDERS:
            raise ValueError(f"position_order must be one of {POSITION_ORDERS}, got {self.position_order!r}")
        self.mlp_ratio = float(self.mlp_ratio)
        self.class_dropout_prob = float(self.class_dropout_prob)

    # derived quantities
    @property
    def is_video(self) -> bool:
        return len(self.input_size) == 3

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> Tuple[int, ...]:
        """Token grid: (H/p, W/p) for images, (T, H/p, W/p) for videos."""
        p = self.patch_size
        return (*self.input_size[:-2], self.input_size[-2] // p, self.input_size[-1] // p)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid_size)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DiTConfig":
        """`name` is a key of DIT_PRESETS, optionally with a patch suffix ("DiT-B/2"); overrides win."""
        base, _, patch = name.partition("/")
        if base not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; expected one of {sorted(DIT_PRESETS)} "
                             f"(optionally with '/<patch_size>')")
        kwargs: Dict[str, Any] = dict(DIT_PRESETS[base])
        if patch:
            if not patch.isdigit() or int(patch) < 1:
                raise ValueError(f"preset patch suffix must be a positive integer, got {name!r}")
            kwargs["patch_size"] = int(patch)
        kwargs.update(overrides)
        return cls.from_dict(kwargs)
