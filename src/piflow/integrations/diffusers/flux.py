"""π-Flow students on diffusers' `FluxTransformer2DModel` (algorithm.md §6.3, §6.5), no weights changed in place.

Latents (B, 16, H, W) are 2×2-packed into 64-channel tokens (channel index c·4 + row·2 + col, as the FLUX
pipelines do). The student runs the transformer unchanged and reads the tokens that enter its final `proj_out`
(after `norm_out`) and the conditioning embedding `temb` given to `norm_out`, through forward hooks; a `GMHead`
(K·64 means, K·4 log-weights per token, log-std MLP on the detached temb) or `DXHead` (N·64) replaces `proj_out`
and is initialised from it. FLUX takes σ ∈ [0, 1] as its timestep (it multiplies by 1000 itself).

LoRA (§6.6): `add_student_lora` wraps the feed-forward and timestep-MLP layers with a PEFT adapter; a student built
with ``share_transformer=True`` then shares every frozen base weight with the teacher (`FluxTeacher` runs the same
module with adapters disabled and the original `norm_out`), while the student swaps in its own trainable `norm_out`.

Status: students, teacher wrapper, packing and LoRA weight tying are implemented and tested on tiny random configs;
pipelines, adapter files and FSDP are not yet (see the open issue).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn

from piflow.heads import DXHead, GMHead

PATCH = 2

# §6.6 GM-FLUX LoRA targets: feed-forward layers and the timestep MLP, never attention. The single-stream blocks'
# proj_out is listed per block so that the root proj_out (teacher output layer) is never wrapped.
FLUX_LORA_TARGETS = (r".*(single_transformer_blocks\.\d+\.proj_out|proj_mlp|ff\.net\.0\.proj|ff\.net\.2|"
                     r"ff_context\.net\.0\.proj|ff_context\.net\.2|timestep_embedder\.linear_1|"
                     r"timestep_embedder\.linear_2)$")
LORA_ADAPTER = "piflow"


def add_student_lora(transformer: nn.Module, rank: int = 256, alpha: Optional[float] = None, dropout: float = 0.05,
                     target_modules: str = FLUX_LORA_TARGETS, adapter_name: str = LORA_ADAPTER) -> None:
    """Add a PEFT LoRA adapter (Gaussian A, zero B, so the output is unchanged) and freeze all base weights."""
    try:
        from peft import LoraConfig
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError("LoRA students need `pip install peft`") from error
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                                       init_lora_weights="gaussian", target_modules=target_modules), adapter_name)


def pack_latents(latents: Tensor, patch: int = PATCH) -> Tensor:
    """(B, C, H, W) → (B, (H/p)(W/p), C·p²) tokens, channel index c·p² + row·p + col (FLUX packing)."""
    batch, channels, height, width = latents.shape
    if height % patch or width % patch:
        raise ValueError(f"latent height and width must be divisible by {patch}, got {height}×{width}")
    tokens = latents.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return tokens.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // patch) * (width // patch), channels * patch ** 2)


def unpack_tokens(tokens: Tensor, height: int, width: int, patch: int = PATCH) -> Tensor:
    """Inverse of `pack_latents`: (B, L, C·p²) → (B, C, H, W)."""
    batch, length, features = tokens.shape
    channels = features // patch ** 2
    if length != (height // patch) * (width // patch) or features % patch ** 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match a {height}×{width} latent with patch {patch}")
    x = tokens.reshape(batch, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def image_ids(height: int, width: int, device=None, patch: int = PATCH) -> Tensor:
    """FLUX RoPE ids of the token grid: (L, 3) with (0, row, col)."""
    rows, cols = height // patch, width // patch
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def _transformer_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    if not isinstance(cond, dict) or "encoder_hidden_states" not in cond:
        raise ValueError("cond must be a dict with encoder_hidden_states, pooled_projections, txt_ids "
                         "(and guidance for guidance-distilled FLUX)")
    inputs = dict(cond)
    inputs.update(hidden_states=pack_latents(latents), timestep=sigma.reshape(-1).to(latents.dtype),
                  img_ids=image_ids(latents.shape[2], latents.shape[3], latents.device))
    return inputs


@contextmanager
def capture_final_features(transformer: nn.Module):
    """Record the tokens entering `transformer.proj_out` and the conditioning embedding given to `norm_out`."""
    captured: dict[str, Tensor] = {}

    def before_norm(module, args, kwargs):
        captured["temb"] = args[1] if len(args) > 1 else kwargs.get("conditioning_embedding", kwargs.get("emb"))

    def before_proj(module, args):
        captured["tokens"] = args[0]

    handles = [transformer.norm_out.register_forward_pre_hook(before_norm, with_kwargs=True),
               transformer.proj_out.register_forward_pre_hook(before_proj)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def adapters_disabled(transformer: nn.Module):
    """Run `transformer` as the base model (PEFT adapters off) inside the block; a no-op without adapters."""
    has_adapters = bool(getattr(transformer, "_hf_peft_config_loaded", False))
    if has_adapters:
        transformer.disable_adapters()
    try:
        yield
    finally:
        if has_adapters:
            transformer.enable_adapters()


class FluxTeacher:
    """σ-space teacher around a FLUX transformer: ``teacher(latents (B,16,H,W), sigma (B,), cond) -> u``.

    LoRA adapters that a shared student added are disabled for every teacher call."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, latents: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        with adapters_disabled(self.transformer):
            out = self.transformer(**_transformer_inputs(latents, sigma, cond), return_dict=False)[0]
        return unpack_tokens(out, latents.shape[2], latents.shape[3]).to(latents.dtype)


class FluxPolicyStudent(nn.Module):
    """GM-FLUX / DX-FLUX student ``(latents, sigma, cond) -> dict`` of policy parameters.

    Args:
        transformer: the FLUX transformer (deep-copied unless `share_transformer`; sharing is for LoRA setups where
            the teacher is the same module with adapters disabled).
        policy: "gmflow" (K components, one 16-channel GM per latent pixel) or "dx" (N nodes, grid/polynomial).
    """

    def __init__(self, transformer: nn.Module, policy: str = "gmflow", num_components: int = 8,
                 num_nodes: int = 10, dx_mode: str = "grid", latent_channels: int = 16,
                 head_noise_std: float = 0.05, logstd_hidden: int = 1024, share_transformer: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.transformer = transformer if share_transformer else copy.deepcopy(transformer)
        # the student's own final norm (trainable, §6.6); swapped in only while the student runs
        self.norm_out = copy.deepcopy(self.transformer.norm_out).requires_grad_(True)
        projection = self.transformer.proj_out
        self.latent_channels = latent_channels
        self.policy_kind = "gmflow" if policy in ("gm", "gmflow") else policy
        in_dim, out_dim = projection.in_features, projection.out_features
        if out_dim != latent_channels * PATCH ** 2:
            raise ValueError(f"proj_out has {out_dim} outputs, expected latent_channels·4 = {latent_channels * 4}")
        if self.policy_kind == "gmflow":
            self.head = GMHead(in_dim, out_dim, num_components, cond_dim=in_dim, channels=latent_channels,
                               logstd_hidden=logstd_hidden, layout="cp")
            self.head.init_from_teacher(projection, noise_std=head_noise_std, generator=generator)
        elif self.policy_kind == "dx":
            self.head = DXHead(in_dim, out_dim, num_nodes, mode=dx_mode)
            self.head.init_from_teacher(projection)
        else:
            raise ValueError(f"unknown policy {policy!r}; expected 'gmflow' or 'dx'")

    def _unpack(self, per_token: Tensor, height: int, width: int) -> Tensor:
        """(B, L, N, c·4) → (B, N, c, H, W)."""
        batch, length, num, features = per_token.shape
        flat = per_token.permute(0, 2, 1, 3).reshape(batch * num, length, features)
        spatial = unpack_tokens(flat, height, width)
        return spatial.reshape(batch, num, *spatial.shape[1:])

    def forward(self, latents: Tensor, sigma: Tensor, cond: Any = None) -> dict:
        height, width = latents.shape[2:]
        teacher_norm = self.transformer.norm_out
        self.transformer._modules["norm_out"] = self.norm_out
        try:
            with capture_final_features(self.transformer) as captured:
                self.transformer(**_transformer_inputs(latents, sigma, cond), return_dict=False)
        finally:
            self.transformer._modules["norm_out"] = teacher_norm
        tokens, temb = captured["tokens"], captured["temb"]
        if self.policy_kind == "dx":
            return {"u_grid": self._unpack(self.head(tokens), height, width)}
        out = self.head(tokens, temb)
        return {"means": self._unpack(out.means, height, width),
                "logweights": self._unpack(out.logweights, height, width), "logstds": out.logstds}
