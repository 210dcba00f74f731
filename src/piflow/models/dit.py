"""Class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023) for images and videos.

Layout
------
* Patchify: an image (B, C, H, W) is cut into non-overlapping p×p patches, token order row-major over the
  (H/p, W/p) grid, each token's features laid out as (p_row, p_col, c) with the channel fastest. A video
  (B, C, T, H, W) uses a temporal patch of 1: tokens are ordered frame-major (t, row, col). A Linear maps
  p·p·C → hidden (equivalent to DiT's strided Conv).
* Position embedding (fixed, not saved): 2-D sin-cos (hidden/2 features for the row index, hidden/2 for the
  column index). For video, a 1-D sin-cos embedding of the frame index (hidden features) is *added* to the
  2-D spatial one.
* Conditioning c = timestep_mlp(sinusoid(t)) + class_emb(y), shape (B, hidden). The class table has
  num_classes + 1 rows; row `num_classes` is the null class used for classifier-free guidance (and whenever
  y is None). num_classes = 0 means unconditional (no table, y must be None).
* Blocks: adaLN-Zero (shift/scale/gate for attention and MLP regressed from c), final layer = LayerNorm
  (no affine) + adaLN shift/scale + `proj_out` Linear(hidden, p·p·C_out). Modulation linears and `proj_out`
  start at zero, so an untrained model outputs exactly 0.

The network receives t = σ · num_timesteps and predicts the rectified-flow velocity u = ε - x0. Imported
checkpoints keep their own time input through `DiTConfig.timestep_scale` / `time_reversed` (e.g. SiT sees
1 − σ, REPA σ) and their position-feature order through `position_order`; see `piflow.models.imported`.

`DiTConfig` / `DIT_PRESETS` live in `dit_config`, the blocks and position embeddings in `dit_blocks`; both are
re-exported here.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from piflow.timewarp import NUM_TIMESTEPS

from .dit_blocks import DiTBlock, FinalModulation, sincos_embedding_1d, sincos_position_embedding
from .dit_config import DIT_PRESETS, DiTConfig
from .embeddings import TimestepLike
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, ClassLabels, PretrainedModel

__all__ = [
    "CONFIG_NAME",
    "DIT_PRESETS",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "FinalModulation",
    "WEIGHTS_NAME",
    "sincos_embedding_1d",
    "sincos_position_embedding",
]


class DiT(ClassLabels, PretrainedModel, nn.Module):
    """Class-conditional DiT velocity network.

    Build with `DiT(DiTConfig(...))`, `DiT(in_channels=..., input_size=..., ...)` (keyword args override the
    given config's fields) or `DiT.from_preset("DiT-B/2", ...)`. `gradient_checkpointing` recomputes each
    block in the backward pass (training only); it can also be toggled later via the attribute.
    """

    config_class = DiTConfig
    model_type = "DiT"

    def __init__(self, config: Optional[DiTConfig] = None, *, gradient_checkpointing: bool = False,
                 **config_kwargs: Any) -> None:
        super().__init__()
        self.config = config = self.build_config(config, config_kwargs)
        self.gradient_checkpointing = bool(gradient_checkpointing)

        hidden, p = config.hidden_size, config.patch_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = p
        self.hidden_size = hidden
        self.feature_dim = hidden
        self.cond_dim = hidden
        self.num_classes = config.num_classes
        self.is_video = config.is_video
        self.input_size = config.input_size
        self.grid_size = config.grid_size
        self.num_tokens = config.num_tokens

        self.x_embedder = nn.Linear(p * p * config.in_channels, hidden)
        self.t_embedder = nn.Sequential(nn.Linear(config.frequency_embedding_size, hidden), nn.SiLU(),
                                        nn.Linear(hidden, hidden))
        self.y_embedder = nn.Embedding(config.num_classes + 1, hidden) if config.num_classes > 0 else None
        self.register_buffer("pos_embed", sincos_position_embedding(hidden, self.grid_size,
                                                                       config.position_order)[None],
                             persistent=False)                                       # (1, L, hidden)
        self.blocks = nn.ModuleList(DiTBlock(hidden, config.num_heads, config.mlp_ratio, config.mlp_norm_eps)
                                    for _ in range(config.depth))
        self.final_layer = FinalModulation(hidden)
        self.proj_out = nn.Linear(hidden, p * p * self.out_channels)
        self.initialize_weights()

    # -- construction helpers -------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, *, gradient_checkpointing: bool = False, **overrides: Any) -> "DiT":
        """E.g. `DiT.from_preset("DiT-B/2", in_channels=4, input_size=32, num_classes=1000)`."""
        return cls(DiTConfig.from_preset(name, **overrides), gradient_checkpointing=gradient_checkpointing)

    def initialize_weights(self) -> None:
        """DiT init: Xavier-uniform linears with zero bias, N(0, 0.02) for the timestep MLP and class table,
        zero adaLN modulation and zero `proj_out` (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # -- patches --------------------------------------------------------------------------------------------

    def _check_spatial(self, x: Tensor, name: str) -> None:
        dims = "(B, C, T, H, W)" if self.is_video else "(B, C, H, W)"
        if not torch.is_tensor(x) or x.dim() != 2 + len(self.input_size) or tuple(x.shape[2:]) != self.input_size:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must have shape {dims} with spatial size {self.input_size}, got {shape}")

    def patchify(self, x: Tensor) -> Tensor:
        """(B, c, H, W) -> (B, L, p·p·c), or (B, c, T, H, W) -> (B, T·L_hw, p·p·c); any channel count c.

        Token order: (frame,) row, col; per-token layout (p_row, p_col, c), channel fastest.
        """
        self._check_spatial(x, "x")
        p = self.patch_size
        batch, channels = x.shape[:2]
        *lead, rows, cols = self.grid_size                      # lead = [] or [T]
        x = x.reshape(batch, channels, *lead, rows, p, cols, p)
        if self.is_video:
            x = x.permute(0, 2, 3, 5, 4, 6, 1)                 # (B, T, rows, cols, p, p, c)
        else:
            x = x.permute(0, 2, 4, 3, 5, 1)                    # (B, rows, cols, p, p, c)
        return x.reshape(batch, self.num_tokens, p * p * channels)

    def unpatchify(self, tokens_out: Tensor, channels: int) -> Tensor:
        """Inverse of `patchify`: (B, L, p·p·channels) -> (B, channels, H, W) or (B, channels, T, H, W)."""
        p = self.patch_size
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels}")
        if not torch.is_tensor(tokens_out) or tokens_out.dim() != 3 or tokens_out.shape[1] != self.num_tokens \
                or tokens_out.shape[2] != p * p * channels:
            shape = tuple(tokens_out.shape) if torch.is_tensor(tokens_out) else type(tokens_out).__name__
            raise ValueError(f"tokens_out must have shape (B, {self.num_tokens}, {p * p * channels}) "
                             f"(L, p*p*channels), got {shape}")
        batch = tokens_out.shape[0]
        *lead, rows, cols = self.grid_size
        x = tokens_out.reshape(batch, *lead, rows, cols, p, p, channels)
        if self.is_video:
            x = x.permute(0, 6, 1, 2, 4, 3, 5)                 # (B, c, T, rows, p, cols, p)
        else:
            x = x.permute(0, 5, 1, 3, 2, 4)                    # (B, c, rows, p, cols, p)
        return x.reshape(batch, channels, *self.input_size)

    # -- forward --------------------------------------------------------------------------------------------

    def network_time(self, t: Tensor) -> Tensor:
        """The time the embedding sees, from piflow's t = σ·1000 (B,): t itself for piflow's DiTs, else
        `timestep_scale`·τ with τ = σ, or 1 − σ for `time_reversed` checkpoints (SiT)."""
        scale, reversed_ = self.config.timestep_scale, self.config.time_reversed
        if scale == NUM_TIMESTEPS and not reversed_:
            return t
        sigma = t / NUM_TIMESTEPS
        return scale * ((1.0 - sigma) if reversed_ else sigma)

    @property
    def extra_condition_dim(self) -> int:
        """Width of the `extra_condition` embedding that `features`/`forward` add to c (= hidden size)."""
        return self.config.hidden_size

    def features(self, x: Tensor, t: TimestepLike, y: Optional[Tensor] = None,
                 extra_condition: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x: (B, C, H, W) or (B, C, T, H, W); t: (B,) or float (σ · num_timesteps); y: (B,) int or None;
        extra_condition: (B, hidden) added to c (e.g. MeanFlow's embedding of the interval t − r) or None.

        Returns (tokens (B, L, hidden) right before `proj_out`, cond_emb c (B, hidden)).
        """
        self._check_spatial(x, "x")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got shape {tuple(x.shape)}")
        batch = x.shape[0]
        c = self.condition_embedding(t, y, batch, x.device, extra_condition)
        h = self.x_embedder(self.patchify(x).to(self.x_embedder.weight.dtype)) + self.pos_embed.to(c.dtype)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if use_checkpoint else block(h, c)
        return self.final_layer(h, c), c

    def forward(self, x: Tensor, t: TimestepLike, y: Optional[Tensor] = None,
                extra_condition: Optional[Tensor] = None) -> Tensor:
        """Velocity u = ε - x0 with the shape of x (2·C channels with learn_sigma)."""
        tokens, _ = self.features(x, t, y, extra_condition)
        return self.unpatchify(self.proj_out(tokens), self.out_channels)
