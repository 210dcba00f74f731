"""DX policy: a grid (or polynomial) of x0 predictions over the segment, interpolated in raw time (§2.1).

The network outputs N velocity maps d_n at (x_src, σ_src); every slot is turned into an x0 prediction
x̂0_n = x_src − σ_src·d_n. The policy's x̂0 depends on time only (not on x_t): it follows a fixed x0 path and
returns u = (x_t − x̂0(τ))/σ_t.
"""
from __future__ import annotations

import torch
from torch import Tensor

from typing import Optional

from piflow.checks import check_finite, check_state, draw
from piflow.policies.base import Policy
from piflow.timewarp import unwarp

DX_MODES = ("grid", "polynomial")


class DXPolicy(Policy):
    """DX policy.

    Args:
        u_grid: the network's N velocity maps, (B, N, C, *spatial).
        x_src: (B, C, *spatial); sigma_src: float or (B,) in (0, 1].
        segment_size: raw-time length S_DX covered by the grid (grid mode). Intrinsic: keep the training value.
        shift: the time warp m_DX used to map σ to raw time for the interpolation. Intrinsic too.
        mode: "grid" (index 0 = segment end, N−1 = τ_src; linear interpolation) or "polynomial"
            (x̂0 = Σ_i (τ_src − τ)^i x̂0_i).
    """

    def __init__(self, u_grid: Tensor, x_src: Tensor, sigma_src, segment_size: float = 1.0, shift: float = 1.0,
                 mode: str = "grid", eps: float = 1e-4):
        if mode not in DX_MODES:
            raise ValueError(f"mode must be one of {DX_MODES}, got {mode!r}")
        if u_grid.dim() < 3:
            raise ValueError(f"u_grid must have shape (B, N, C, *spatial), got {tuple(u_grid.shape)}")
        state = (u_grid.shape[0], *u_grid.shape[2:])
        sigma = check_state(x_src, "x_src", state, sigma_src, "sigma_src",
                            f"shape (B, C, *spatial) = {state} to match u_grid {tuple(u_grid.shape)}")
        if not segment_size > 0:
            raise ValueError(f"segment_size must be > 0, got {segment_size}")
        check_finite(u_grid.detach(), "u_grid")
        x_src32 = x_src.float()
        self._init(x_src32.unsqueeze(1) - sigma.unsqueeze(1) * u_grid.float(), x_src32, sigma,
                   float(segment_size), float(shift), mode, float(eps))

    def _init(self, x0_grid: Tensor, x_src: Tensor, sigma_src: Tensor, segment_size: float, shift: float,
              mode: str, eps: float) -> None:
        self.x0_grid = x0_grid                        # (B, N, C, *S)
        self.x_src = x_src
        self.sigma_src = sigma_src                    # (B, 1, …)
        self.segment_size, self.shift, self.mode, self.eps = segment_size, shift, mode, eps
        self.tau_src = unwarp(sigma_src, shift)
        self.tau_end = (self.tau_src - segment_size).clamp(min=0)
        self.length = (self.tau_src - self.tau_end).clamp(min=eps)

    @property
    def num_nodes(self) -> int:
        return self.x0_grid.shape[1]

    def _x0(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        tau = unwarp(sigma_t, self.shift)                                      # (B, 1, …)
        num_nodes = self.num_nodes
        if self.mode == "polynomial":
            offset = (self.tau_src - tau).unsqueeze(1)                         # (B, 1, 1, …)
            powers = offset ** torch.arange(num_nodes, device=offset.device, dtype=offset.dtype).reshape(
                1, num_nodes, *([1] * (offset.dim() - 2)))
            return (powers * self.x0_grid).sum(dim=1)
        if num_nodes == 1:
            return self.x0_grid[:, 0]
        position = ((tau - self.tau_end) / self.length).clamp(0, 1) * (num_nodes - 1)     # (B, 1, …)
        lower = position.floor().clamp(0, num_nodes - 2)
        frac = position - lower
        index = lower.long().unsqueeze(1).expand(-1, 1, *self.x0_grid.shape[2:])       # (B, 1, C, *S)
        x0_lower = self.x0_grid.gather(1, index).squeeze(1)
        x0_upper = self.x0_grid.gather(1, index + 1).squeeze(1)
        return (1 - frac) * x0_lower + frac * x0_upper

    def detach(self) -> "DXPolicy":
        policy = self._with_grid(self.x0_grid.detach())
        policy.x_src = self.x_src.detach()
        return policy

    def dropout(self, p: float, generator: Optional[torch.Generator] = None) -> "DXPolicy":
        """Policy dropout for DX (piflow's definition; the authors' DX policy has none, see docs/algorithm.md §14):
        drop each (sample, node) with probability p, never all nodes of a sample.

        Grid mode: a dropped node's x̂0 is re-interpolated linearly (in node index) from the nearest kept nodes on
        either side (the nearest kept node at the ends), so the perturbed path still runs through the kept nodes.
        Polynomial mode: dropped coefficients of order ≥ 1 become 0 (order 0, x̂0 at τ_src, is always kept).
        No-op for p ≤ 0 or p ≥ 1, or a single node.
        """
        num = self.num_nodes
        if not 0.0 < p < 1.0 or num == 1:
            return self
        batch = self.x0_grid.shape[0]
        device = self.x0_grid.device
        keep = draw("uniform", (batch, num), generator, device) >= p
        if self.mode == "polynomial":
            keep[:, 0] = True
            mask = keep.reshape(batch, num, *([1] * (self.x0_grid.dim() - 2))).to(self.x0_grid.dtype)
            return self._with_grid(self.x0_grid * mask)
        keep |= ~keep.any(dim=1, keepdim=True)
        index = torch.arange(num, device=device).expand(batch, num)
        left = torch.where(keep, index, -1).cummax(dim=1).values
        right = torch.where(keep, index, num).flip(1).cummin(dim=1).values.flip(1)
        left = torch.where(left < 0, right, left)
        right = torch.where(right >= num, left, right)
        span = (right - left).clamp(min=1)
        weight = ((index - left) / span).to(self.x0_grid.dtype)
        shape = (batch, num, *([1] * (self.x0_grid.dim() - 2)))
        expand = (batch, num, *self.x0_grid.shape[2:])
        lower = self.x0_grid.gather(1, left.reshape(shape).expand(expand))
        upper = self.x0_grid.gather(1, right.reshape(shape).expand(expand))
        weight = weight.reshape(shape)
        return self._with_grid((1 - weight) * lower + weight * upper)

    def _with_grid(self, x0_grid: Tensor) -> "DXPolicy":
        policy = self.__class__.__new__(self.__class__)
        policy._init(x0_grid, self.x_src, self.sigma_src, self.segment_size, self.shift, self.mode, self.eps)
        return policy
