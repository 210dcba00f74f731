"""DiT building blocks: fixed sin-cos position embeddings, the adaLN-Zero transformer block and final modulation.

Position embeddings: 2-D sin-cos (half the features for the row index, half for the column index); for video a
1-D sin-cos embedding of the frame index is added. Blocks regress shift/scale/gate for attention and MLP from
the conditioning vector c (B, hidden).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DiTBlock", "FinalModulation", "sincos_embedding_1d", "sincos_position_embedding"]


def sincos_embedding_1d(dim: int, positions: Tensor) -> Tensor:
    """positions: (N,) -> (N, dim) float64 = [sin(pos·ω_k), cos(pos·ω_k)], ω_k = 10000^(-k/(dim/2))."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_position_embedding(dim: int, grid_size: Sequence[int], order: str = "row_col") -> Tensor:
    """Fixed sin-cos embedding of a (rows, cols) or (frames, rows, cols) token grid -> (L, dim) float32.

    Spatial: half the features encode the row index, half the column index — the row index first for
    order="row_col" (piflow's DiTs), the column index first for "col_row" (the MAE/DiT/SiT/REPA function, whose
    meshgrid puts the width first). Video: a 1-D embedding of the frame index (dim features) is added. Token
    order matches `DiT.patchify` (frame-major, row-major).
    """
    rows, cols = grid_size[-2], grid_size[-1]
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    halves = [sincos_embedding_1d(dim // 2, row_idx.reshape(-1)), sincos_embedding_1d(dim // 2, col_idx.reshape(-1))]
    if order == "col_row":
        halves.reverse()
    elif order != "row_col":
        raise ValueError(f"order must be 'row_col' or 'col_row', got {order!r}")
    spatial = torch.cat(halves, dim=1)                                                     # (rows·cols, dim)
    if len(grid_size) == 3:
        temporal = sincos_embedding_1d(dim, torch.arange(grid_size[0]))                    # (T, dim)
        spatial = (temporal[:, None, :] + spatial[None, :, :]).reshape(-1, dim)
    return spatial.to(torch.float32)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: (B, L, D); shift, scale: (B, 1, D)."""
    return x * (1 + scale) + shift


class _Attention(nn.Module):
    """Multi-head self-attention with fused qkv, via scaled_dot_product_attention."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class _FeedForward(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = _FeedForward(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, L, D) tokens, c: (B, D) conditioning -> (B, L, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        x = x + gate_msa * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalModulation(nn.Module):
    """LayerNorm (no affine) + adaLN shift/scale; `DiT.proj_out` is applied after it."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, L, D), c: (B, D) -> (B, L, D)."""
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return _modulate(self.norm_final(x), shift, scale)
