"""Output heads that turn backbone features into policy parameters (algorithm.md §6.1, §6.5).

Both heads work on features of shape (B, *positions, in_dim) — one position for an MLP, one per token for a
transformer — and produce, per position, what the teacher's output projection produced (``out_dim`` numbers, e.g.
p²·C for a DiT token) once per component/node. Reassembling positions into (B, K, C, *spatial) ("unpatchify") is the
backbone's job, done exactly as for the teacher's output.

Convolutional (UNet) heads: with ``kernel_size`` set, the projections are ``nn.Conv2d(in_dim, ·, kernel_size,
padding=kernel_size // 2)`` like a UNet's ``conv_out``: features come channel-first (B, in_dim, H, W) — what enters
``conv_out`` — and the outputs are laid out per pixel like the linear heads', positions = (H, W): means
(B, H, W, K, out_dim), log-weights (B, H, W, K, 1), DX nodes (B, H, W, N, out_dim); out_dim = C (one pixel per
position).
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


def projection_shape(projection: nn.Module) -> tuple[int, int, Optional[int]]:
    """(in features, out features, kernel size or None) of a teacher output layer: an `nn.Linear` (token models)
    or a square, odd-sized, stride-1 `nn.Conv2d` (UNets' ``conv_out``)."""
    if isinstance(projection, nn.Linear):
        return projection.in_features, projection.out_features, None
    if isinstance(projection, nn.Conv2d):
        kernel = projection.kernel_size[0]
        if (projection.kernel_size != (kernel, kernel) or kernel % 2 == 0 or projection.stride != (1, 1)
                or projection.padding != (kernel // 2, kernel // 2) or projection.groups != 1
                or projection.dilation != (1, 1)):
            raise ValueError(f"a convolutional teacher projection must be a square odd-sized 'same' convolution, got "
                             f"{projection}")
        return projection.in_channels, projection.out_channels, kernel
    raise TypeError(f"teacher projection must be an nn.Linear or nn.Conv2d, got {type(projection).__name__}")


def _check_teacher_projection(projection: nn.Module, in_dim: int, out_dim: int,
                              kernel_size: Optional[int] = None) -> None:
    found_in, found_out, kernel = projection_shape(projection)
    if kernel != kernel_size:
        raise TypeError(f"teacher projection {type(projection).__name__} (kernel {kernel}) does not fit a head with "
                        f"kernel_size {kernel_size}")
    if found_in != in_dim or found_out != out_dim:
        raise ValueError(f"teacher projection must map {in_dim} → {out_dim} features, got {found_in} → {found_out}")


def _projection(in_dim: int, out_dim: int, kernel_size: Optional[int]) -> nn.Module:
    if kernel_size is None:
        return nn.Linear(in_dim, out_dim)
    return nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)


def _apply(layer: nn.Module, features: Tensor, in_dim: int, copies: int) -> Tensor:
    """`layer` on (B, *positions, in_dim) features (linear) or (B, in_dim, H, W) (conv) → (B, *positions, copies,
    per-copy outputs), with positions = (H, W) for a conv (output channel = copy · per-copy + index)."""
    if isinstance(layer, nn.Conv2d):
        if features.dim() != 4 or features.shape[1] != in_dim:
            raise ValueError(f"features must be (B, {in_dim}, H, W), got shape {tuple(features.shape)}")
        out = layer(features)
        batch, _, height, width = out.shape
        return out.reshape(batch, copies, -1, height, width).permute(0, 3, 4, 1, 2)
    if features.shape[-1] != in_dim:
        raise ValueError(f"features must end with in_dim={in_dim}, got shape {tuple(features.shape)}")
    return layer(features).reshape(*features.shape[:-1], copies, -1)


def _repeat_weight(weight: Tensor, copies: int) -> Tensor:
    return weight.repeat(copies, *([1] * (weight.dim() - 1)))


class GMHead(nn.Module):
    """Gaussian-mixture head: K means per position, per-pixel log-weights, one log-std per sample.

    Args:
        in_dim: feature size of the backbone. out_dim: outputs per position of the teacher projection (P·C).
        num_components: K. channels: C, the size of one GM chunk (latent channels). out_dim must be P·C.
        cond_dim: size of the conditioning embedding read (detached) by the log-std MLP.
        logstd_hidden, num_logstd_layers: the MLP [SiLU, Linear]×(L−1), SiLU, Linear(·, 1).
        layout: how a position's out_dim numbers are ordered: "pc" (pixel-major, channel fastest; DiT) or
            "cp" (channel-major; FLUX's c·4 + pixel packing).
        kernel_size: None (linear projections on tokens) or the kernel of a UNet's ``conv_out``: the mean and
            log-weight projections are then convolutions on (B, in_dim, H, W) features (see the module doc).
    """

    def __init__(self, in_dim: int, out_dim: int, num_components: int, cond_dim: int, channels: Optional[int] = None,
                 logstd_hidden: int = 1024, num_logstd_layers: int = 2, layout: str = "pc",
                 kernel_size: Optional[int] = None):
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
        self.layout, self.kernel_size = layout, kernel_size
        self.proj_means = _projection(in_dim, num_components * out_dim, kernel_size)
        self.proj_logweights = _projection(in_dim, num_components * self.pixels, kernel_size)
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
        _check_teacher_projection(projection, self.in_dim, self.out_dim, self.kernel_size)
        self.proj_means.weight.copy_(_repeat_weight(projection.weight, self.num_components))
        bias = projection.bias if projection.bias is not None else torch.zeros(self.out_dim)
        self.proj_means.bias.copy_(bias.repeat(self.num_components) + self._component_noise(noise_std, generator))
        self.logstd_mlp[-1].bias.fill_(math.log(init_std))

    def forward(self, features: Tensor, cond_emb: Tensor) -> GMHeadOutput:
        """features (B, *positions, in_dim) — (B, in_dim, H, W) for a conv head —, cond_emb (B, cond_dim) →
        `GMHeadOutput`."""
        means = _apply(self.proj_means, features, self.in_dim, self.num_components)
        logits = _apply(self.proj_logweights, features, self.in_dim, self.num_components)
        logstds = self.logstd_mlp(cond_emb.detach()).reshape(features.shape[0])
        return GMHeadOutput(means, torch.log_softmax(logits.float(), dim=-2), logstds)


class DXHead(nn.Module):
    """DX head: N x0-grid nodes (or polynomial coefficients) per position, as velocities (B, *positions, N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, num_nodes: int, mode: str = "grid",
                 kernel_size: Optional[int] = None):
        super().__init__()
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if mode not in ("grid", "polynomial"):
            raise ValueError(f"mode must be 'grid' or 'polynomial', got {mode!r}")
        self.in_dim, self.out_dim, self.num_nodes, self.mode = in_dim, out_dim, num_nodes, mode
        self.kernel_size = kernel_size
        self.proj = _projection(in_dim, num_nodes * out_dim, kernel_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def init_from_teacher(self, projection: nn.Linear) -> None:
        """Grid: the teacher projection on every node. Polynomial: order 0 = teacher, higher orders zero."""
        _check_teacher_projection(projection, self.in_dim, self.out_dim, self.kernel_size)
        bias = projection.bias if projection.bias is not None else torch.zeros(self.out_dim)
        if self.mode == "grid":
            self.proj.weight.copy_(_repeat_weight(projection.weight, self.num_nodes))
            self.proj.bias.copy_(bias.repeat(self.num_nodes))
        else:
            self.proj.weight.zero_()
            self.proj.bias.zero_()
            self.proj.weight[: self.out_dim].copy_(projection.weight)
            self.proj.bias[: self.out_dim].copy_(bias)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, *positions, in_dim) — (B, in_dim, H, W) for a conv head — → (B, *positions, N, out_dim)."""
        return _apply(self.proj, features, self.in_dim, self.num_nodes)


def make_policy_head(policy: str, in_dim: int, out_dim: int, *, channels: int, cond_dim: int,
                     num_components: int = 8, num_nodes: int = 10, dx_mode: str = "grid", logstd_hidden: int = 1024,
                     layout: str = "pc", teacher_projection: Optional[nn.Module] = None, noise_std: float = 0.05,
                     generator: Optional[torch.Generator] = None, kernel_size: Optional[int] = None) -> nn.Module:
    """The policy head of a student (the one factory used by every student class).

    Args:
        policy: "gmflow" (alias "gm": a `GMHead` with `num_components`, `logstd_hidden`, `layout`) or "dx" (a
            `DXHead` with `num_nodes` and `dx_mode`).
        in_dim, out_dim: feature size and outputs per position of the teacher projection (out_dim = P·channels).
        channels: C of one GM chunk. cond_dim: size of the conditioning embedding (GM log-std MLP input).
        teacher_projection: the teacher's output layer; when given the head is initialised from it (GM: K copies
            plus bias noise of std `noise_std` drawn from `generator`), else the no-teacher initialisation. An
            `nn.Linear` (token models) or a UNet's `nn.Conv2d` ``conv_out``: the head is then convolutional with
            its kernel size (`kernel_size` is only needed without a teacher projection).
    """
    kind = policy_kind(policy)
    if teacher_projection is not None:
        kernel_size = projection_shape(teacher_projection)[2]
    if kind == "gmflow":
        head = GMHead(in_dim, out_dim, num_components, cond_dim, channels=channels, logstd_hidden=logstd_hidden,
                      layout=layout, kernel_size=kernel_size)
        if teacher_projection is not None:
            head.init_from_teacher(teacher_projection, noise_std=noise_std, generator=generator)
        return head
    head = DXHead(in_dim, out_dim, num_nodes, mode=dx_mode, kernel_size=kernel_size)
    if teacher_projection is not None:
        head.init_from_teacher(teacher_projection)
    return head
