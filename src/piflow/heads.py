"""Output heads that turn backbone features into policy parameters (algorithm.md §6.1, §6.5).

Both heads work on features of shape (B, *positions, in_dim) — one position for an MLP, one per token for a
transformer — and produce, per position, what the teacher's output projection produced (``out_dim`` numbers, e.g.
p²·C for a DiT token) once per component/node. Reassembling positions into (B, K, C, *spatial) ("unpatchify") is the
backbone's job, done exactly as for the teacher's output.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from piflow.settings import policy_kind

LAYOUTS = ("pc", "cp")


class GMHeadOutput(NamedTuple):
    means: Tensor        # (B, *positions, K, out_dim) u-space means, in the teacher projection's layout
    logweights: Tensor   # (B, *positions, K, P) log-softmaxed over K, one per pixel of the position
    logstds: Tensor      # (B,) one log-std per sample


def _check_teacher_projection(projection: nn.Linear, in_dim: int, out_dim: int) -> None:
    if not isinstance(projection, nn.Linear):
        raise TypeError(f"teacher projection must be an nn.Linear, got {type(projection).__name__}")
    if projection.in_features != in_dim or projection.out_features != out_dim:
        raise ValueError(f"teacher projection must map {in_dim} → {out_dim} features, got "
                         f"{projection.in_features} → {projection.out_features}")


class GMHead(nn.Module):
    """Gaussian-mixture head: K means per position, per-pixel log-weights, one log-std per sample.

    Args:
        in_dim: feature size of the backbone. out_dim: outputs per position of the teacher projection (P·C).
        num_components: K. channels: C, the size of one GM chunk (latent channels). out_dim must be P·C.
        cond_dim: size of the conditioning embedding read (detached) by the log-std MLP.
        logstd_hidden, num_logstd_layers: the MLP [SiLU, Linear]×(L−1), SiLU, Linear(·, 1).
        layout: how a position's out_dim numbers are ordered: "pc" (pixel-major, channel fastest; DiT) or
            "cp" (channel-major; FLUX's c·4 + pixel packing).
    """

    def __init__(self, in_dim: int, out_dim: int, num_components: int, cond_dim: int, channels: Optional[int] = None,
                 logstd_hidden: int = 1024, num_logstd_layers: int = 2, layout: str = "pc"):
        super().__init__()
        channels = out_dim if channels is None else channels
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if channels < 1 or out_dim % channels:
            raise ValueError(f"out_dim ({out_dim}) must be a multiple of channels ({channels})")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if num_logstd_layers < 1:
            raise ValueError(f"num_logstd_layers must be >= 1, got {num_logstd_layers}")
        self.in_dim, self.out_dim, self.num_components, self.channels = in_dim, out_dim, num_components, channels
        self.pixels = out_dim // channels
        self.layout = layout
        self.proj_means = nn.Linear(in_dim, num_components * out_dim)
        self.proj_logweights = nn.Linear(in_dim, num_components * self.pixels)
        layers: list[nn.Module] = []
        width = cond_dim
        for _ in range(num_logstd_layers - 1):
            layers += [nn.SiLU(), nn.Linear(width, logstd_hidden)]
            width = logstd_hidden
        layers += [nn.SiLU(), nn.Linear(width, 1)]
        self.logstd_mlp = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self, noise_std: float = 0.1, generator: Optional[torch.Generator] = None) -> None:
        """Init without a teacher: zero mean weights with bias noise, uniform weights, Xavier log-std MLP (last 0)."""
        nn.init.zeros_(self.proj_means.weight)
        with torch.no_grad():
            self.proj_means.bias.copy_(self._component_noise(noise_std, generator))
        nn.init.zeros_(self.proj_logweights.weight)
        nn.init.zeros_(self.proj_logweights.bias)
        linears = [m for m in self.logstd_mlp if isinstance(m, nn.Linear)]
        for linear in linears[:-1]:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(linears[-1].weight)
        nn.init.zeros_(linears[-1].bias)

    def _component_noise(self, noise_std: float, generator: Optional[torch.Generator]) -> Tensor:
        """Bias noise per (component, channel), shared by all pixels of a position: (K·out_dim,)."""
        noise = torch.randn(self.num_components, self.channels, generator=generator) * noise_std
        if self.layout == "pc":
            noise = noise.unsqueeze(1).expand(-1, self.pixels, -1)      # (K, P, C)
        else:
            noise = noise.unsqueeze(2).expand(-1, -1, self.pixels)      # (K, C, P)
        return noise.reshape(-1).to(self.proj_means.bias)

    @torch.no_grad()
    def init_from_teacher(self, projection: nn.Linear, noise_std: float = 0.05, init_std: float = 0.05,
                          generator: Optional[torch.Generator] = None) -> None:
        """Replicate the teacher's output projection K times (+ symmetry-breaking bias noise); initial s = init_std."""
        _check_teacher_projection(projection, self.in_dim, self.out_dim)
        self.proj_means.weight.copy_(projection.weight.repeat(self.num_components, 1))
        bias = projection.bias if projection.bias is not None else torch.zeros(self.out_dim)
        self.proj_means.bias.copy_(bias.repeat(self.num_components) + self._component_noise(noise_std, generator))
        self.logstd_mlp[-1].bias.fill_(math.log(init_std))

    def forward(self, features: Tensor, cond_emb: Tensor) -> GMHeadOutput:
        """features (B, *positions, in_dim), cond_emb (B, cond_dim) → `GMHeadOutput`."""
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"features must end with in_dim={self.in_dim}, got shape {tuple(features.shape)}")
        lead = features.shape[:-1]
        means = self.proj_means(features).reshape(*lead, self.num_components, self.out_dim)
        logits = self.proj_logweights(features).reshape(*lead, self.num_components, self.pixels)
        logstds = self.logstd_mlp(cond_emb.detach()).reshape(features.shape[0])
        return GMHeadOutput(means, torch.log_softmax(logits.float(), dim=-2), logstds)


class DXHead(nn.Module):
    """DX head: N x0-grid nodes (or polynomial coefficients) per position, as velocities (B, *positions, N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, num_nodes: int, mode: str = "grid"):
        super().__init__()
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if mode not in ("grid", "polynomial"):
            raise ValueError(f"mode must be 'grid' or 'polynomial', got {mode!r}")
        self.in_dim, self.out_dim, self.num_nodes, self.mode = in_dim, out_dim, num_nodes, mode
        self.proj = nn.Linear(in_dim, num_nodes * out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def init_from_teacher(self, projection: nn.Linear) -> None:
        """Grid: the teacher projection on every node. Polynomial: order 0 = teacher, higher orders zero."""
        _check_teacher_projection(projection, self.in_dim, self.out_dim)
        bias = projection.bias if projection.bias is not None else torch.zeros(self.out_dim)
        if self.mode == "grid":
            self.proj.weight.copy_(projection.weight.repeat(self.num_nodes, 1))
            self.proj.bias.copy_(bias.repeat(self.num_nodes))
        else:
            self.proj.weight.zero_()
            self.proj.bias.zero_()
            self.proj.weight[: self.out_dim].copy_(projection.weight)
            self.proj.bias[: self.out_dim].copy_(bias)

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"features must end with in_dim={self.in_dim}, got shape {tuple(features.shape)}")
        return self.proj(features).reshape(*features.shape[:-1], self.num_nodes, self.out_dim)


def make_policy_head(policy: str, in_dim: int, out_dim: int, *, channels: int, cond_dim: int,
                     num_components: int = 8, num_nodes: int = 10, dx_mode: str = "grid", logstd_hidden: int = 1024,
                     layout: str = "pc", teacher_projection: Optional[nn.Linear] = None, noise_std: float = 0.05,
                     generator: Optional[torch.Generator] = None) -> nn.Module:
    """The policy head of a student (the one factory used by every student class).

    Args:
        policy: "gmflow" (alias "gm": a `GMHead` with `num_components`, `logstd_hidden`, `layout`) or "dx" (a
            `DXHead` with `num_nodes` and `dx_mode`).
        in_dim, out_dim: feature size and outputs per position of the teacher projection (out_dim = P·channels).
        channels: C of one GM chunk. cond_dim: size of the conditioning embedding (GM log-std MLP input).
        teacher_projection: the teacher's output layer; when given the head is initialised from it (GM: K copies
            plus bias noise of std `noise_std` drawn from `generator`), else the no-teacher initialisation.
    """
    kind = policy_kind(policy)
    if kind == "gmflow":
        head = GMHead(in_dim, out_dim, num_components, cond_dim, channels=channels, logstd_hidden=logstd_hidden,
                      layout=layout)
        if teacher_projection is not None:
            head.init_from_teacher(teacher_projection, noise_std=noise_std, generator=generator)
        return head
    head = DXHead(in_dim, out_dim, num_nodes, mode=dx_mode)
    if teacher_projection is not None:
        head.init_from_teacher(teacher_projection)
    return head
