"""Class-conditional convolutional U-Net velocity network for small images (ADM / DDPM style).

Layout
------
* Conditioning c = timestep_mlp(sinusoid(t)) + class_emb(y) (+ an ``extra_condition``), shape (B, cond_dim) with
  cond_dim = 4·channels. The class table has num_classes + 1 rows; row `num_classes` is the null class (CFG).
* ``conv_in`` (3×3) → per level ℓ (width channels·channel_mults[ℓ]) `num_res_blocks` residual blocks (GroupNorm,
  SiLU, 3×3 convs; c enters as a scale and shift after the second GroupNorm, adaGN), self-attention at the levels in
  `attention_levels`, a stride-2 conv between levels → middle (res, attention, res) → the mirrored up path, whose
  blocks take the matching down-path activations concatenated (num_res_blocks + 1 per level), nearest-neighbour ×2
  upsampling and a 3×3 conv between levels.
* Output: GroupNorm + SiLU gives per-pixel features (B, H·W, feature_dim = channels·channel_mults[0]) — `features`
  returns them as tokens — and `proj_out`, a Linear(feature_dim, out_channels) applied per pixel (a 1×1 conv),
  gives the velocity. So the U-Net has the interface `PolicyStudent` needs (``features``, ``proj_out``,
  ``unpatchify``; tokens are pixels, patch 1) and MeanFlow's ``extra_condition``.
* The last conv of every residual block and attention, and `proj_out`, start at zero: an untrained U-Net outputs 0.

The network receives t = σ · 1000 and predicts the rectified-flow velocity u = ε − x0 (or, trained with a diffusion
``objective``, that objective's output).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .embeddings import TimestepLike
from .pretrained import ClassLabels, PretrainedModel

__all__ = ["UNet", "UNetConfig"]


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass
class UNetConfig:
    """Architecture of a `UNet`. input_size: S (S×S) or (H, W), each divisible by 2^(len(channel_mults) − 1).

    channels: width of the first level; channel_mults: per-level multipliers; attention_levels: indices of the
    levels (0 = full resolution) with self-attention after each residual block (the middle always has one);
    groups: GroupNorm groups (must divide every width).
    """

    in_channels: int = 1
    input_size: Union[int, Tuple[int, int]] = 28
    channels: int = 64
    channel_mults: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: Tuple[int, ...] = (2,)
    num_heads: int = 4
    groups: int = 32
    dropout: float = 0.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    frequency_embedding_size: int = 256

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"input_size must be a positive int or (H, W), got {self.input_size!r}")
        self.input_size = tuple(size)
        for name in ("in_channels", "channels", "num_res_blocks", "num_heads", "groups", "frequency_embedding_size"):
            _positive_int(getattr(self, name), name)
        if not isinstance(self.channel_mults, (list, tuple)) or not self.channel_mults:
            raise ValueError(f"channel_mults must be a non-empty list of positive integers, got {self.channel_mults!r}")
        self.channel_mults = tuple(_positive_int(m, "channel_mults entries") for m in self.channel_mults)
        if not isinstance(self.attention_levels, (list, tuple)) or not all(
                isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(self.channel_mults)
                for a in self.attention_levels):
            raise ValueError(f"attention_levels must list level indices in [0, {len(self.channel_mults) - 1}], "
                             f"got {self.attention_levels!r}")
        self.attention_levels = tuple(sorted(set(self.attention_levels)))
        factor = 2 ** (len(self.channel_mults) - 1)
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"input_size {tuple(size)} must be divisible by 2^(levels - 1) = {factor} "
                             f"(channel_mults has {len(self.channel_mults)} levels)")
        for width in self.widths:
            if width % self.groups or width % self.num_heads:
                raise ValueError(f"every level width (channels·channel_mults = {list(self.widths)}) must be "
                                 f"divisible by groups={self.groups} and num_heads={self.num_heads}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        for name in ("dropout", "class_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
            setattr(self, name, float(value))

    @property
    def widths(self) -> Tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mults)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("input_size", "channel_mults", "attention_levels"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


class ResBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN · (1 + scale(c)) + shift(c) → SiLU → dropout → conv3×3 (zero init), plus the input
    (1×1 conv when the width changes). x (B, C_in, H, W), c (B, cond_dim) → (B, C_out, H, W)."""

    def __init__(self, in_width: int, out_width: int, cond_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_width)
        self.conv1 = nn.Conv2d(in_width, out_width, 3, padding=1)
        self.modulation = nn.Linear(cond_dim, 2 * out_width)
        self.norm2 = nn.GroupNorm(groups, out_width)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_width == out_width else nn.Conv2d(in_width, out_width, 1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.modulation(F.silu(c))[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of (B, C, H, W), residual, output projection at zero."""

    def __init__(self, width: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.proj = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        batch, width, height, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, width // self.num_heads, height * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))              # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(batch, width, height, w)
        return x + self.proj(out)


class UNet(ClassLabels, PretrainedModel, nn.Module):
    """Class-conditional U-Net velocity network: ``model(x (B, C, H, W), t (B,) = σ·1000, y (B,) or None)`` →
    (B, C, H, W). Build with `UNet(UNetConfig(...))` or `UNet(in_channels=..., input_size=..., ...)`."""

    config_class = UNetConfig
    model_type = "UNet"

    def __init__(self, config: Optional[UNetConfig] = None, *, gradient_checkpointing: bool = False,
                 **config_kwargs: Any) -> None:
        super().__init__()
        self.config = config = self.build_config(config, config_kwargs)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.in_channels = self.out_channels = config.in_channels
        self.input_size = config.input_size
        self.num_classes = config.num_classes
        self.num_tokens = math.prod(config.input_size)
        base, groups = config.channels, config.groups
        self.feature_dim = config.widths[0]          # per-pixel features before proj_out: the full-resolution width
        self.cond_dim = 4 * base

        self.t_embedder = nn.Sequential(nn.Linear(config.frequency_embedding_size, self.cond_dim), nn.SiLU(),
                                        nn.Linear(self.cond_dim, self.cond_dim))
        self.y_embedder = nn.Embedding(config.num_classes + 1, self.cond_dim) if config.num_classes > 0 else None
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)

        def res(in_width: int, out_width: int) -> ResBlock:
            return ResBlock(in_width, out_width, self.cond_dim, groups, config.dropout)

        widths = config.widths
        self.down = nn.ModuleList()          # each entry: a ModuleList (res[, attn]) or a downsampling conv
        skip_widths, width = [base], base
        for level, level_width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers = [res(width, level_width)]
                if level in config.attention_levels:
                    layers.append(AttentionBlock(level_width, config.num_heads, groups))
                self.down.append(nn.ModuleList(layers))
                width = level_width
                skip_widths.append(width)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        self.middle = nn.ModuleList([res(width, width), AttentionBlock(width, config.num_heads, groups),
                                     res(width, width)])
        self.up = nn.ModuleList()            # each entry: a ModuleList (res[, attn]) or an upsampling conv
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                layers = [res(width + skip_widths.pop(), widths[level])]
                width = widths[level]
                if level in config.attention_levels:
                    layers.append(AttentionBlock(width, config.num_heads, groups))
                self.up.append(nn.ModuleList(layers))
            if level > 0:
                self.up.append(nn.Conv2d(width, width, 3, padding=1))
        self.norm_out = nn.GroupNorm(groups, width)
        self.proj_out = nn.Linear(width, config.in_channels)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def extra_condition_dim(self) -> int:
        """Width of the `extra_condition` embedding that `features`/`forward` add to c (= cond_dim)."""
        return self.cond_dim

    def _run(self, layers: nn.ModuleList, h: Tensor, c: Tensor) -> Tensor:
        for layer in layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, c, use_reentrant=False)
            else:
                h = layer(h, c)
        return h

    def features(self, x: Tensor, t: TimestepLike, y: Optional[Tensor] = None,
                 extra_condition: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x (B, C, H, W), t (B,) or float (σ · 1000), y (B,) int or None, extra_condition (B, cond_dim) or None
        → (per-pixel features (B, H·W, feature_dim) right before `proj_out`, c (B, cond_dim))."""
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.input_size):
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}), "
                             f"got {shape}")
        batch = x.shape[0]
        c = self.condition_embedding(t, y, batch, x.device, extra_condition)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, c) if isinstance(layer, nn.ModuleList) else layer(h)
            skips.append(h)
        h = self._run(self.middle, h, c)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = self._run(layer, torch.cat([h, skips.pop()], dim=1), c)
            else:
                h = layer(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = F.silu(self.norm_out(h))
        return h.flatten(2).transpose(1, 2), c

    def unpatchify(self, tokens_out: Tensor, channels: int) -> Tensor:
        """Per-pixel outputs (B, H·W, channels) -> (B, channels, H, W)."""
        if not torch.is_tensor(tokens_out) or tokens_out.dim() != 3 or tokens_out.shape[1] != self.num_tokens \
                or tokens_out.shape[2] != channels:
            shape = tuple(tokens_out.shape) if torch.is_tensor(tokens_out) else type(tokens_out).__name__
            raise ValueError(f"tokens_out must have shape (B, {self.num_tokens}, {channels}), got {shape}")
        return tokens_out.transpose(1, 2).reshape(tokens_out.shape[0], channels, *self.input_size)

    def forward(self, x: Tensor, t: TimestepLike, y: Optional[Tensor] = None,
                extra_condition: Optional[Tensor] = None) -> Tensor:
        """Velocity u = ε − x0, (B, C, H, W)."""
        tokens, _ = self.features(x, t, y, extra_condition)
        return self.unpatchify(self.proj_out(tokens), self.out_channels)
