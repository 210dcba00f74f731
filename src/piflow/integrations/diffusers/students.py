"""π-Flow students on diffusers transformers — FLUX.1, FLUX.2, Qwen-Image(-Edit), SD3, Z-Image and Wan
(algorithm.md §6.3–6.5) — without changing the model's code.

The student runs the transformer unchanged and reads, through forward hooks, the tokens that enter its final
projection (after the final norm) and the conditioning embedding `temb` of that final layer; a `GMHead` (K per-token
copies of the projection's outputs, per-pixel log-weights, log-std MLP on the detached temb) or `DXHead` replaces
the projection and is initialised from it. An `Architecture` says how latents enter the model and how tokens map
back:
* FLUX.1: latents (B, 16, H, W) are 2×2-packed into 64-channel tokens (channel index c·4 + row·2 + col, as the FLUX
  pipelines do); σ ∈ [0, 1] is the timestep (FLUX multiplies by 1000 itself); RoPE image ids are built here.
* FLUX.2: the same packing of the unpatchified (B, 32, H/8, W/8) normalised latent into 128-channel tokens, 4-axis
  ids; reference images are clean tokens after the generated ones (time ids 10, 20, …).
* Qwen-Image(-Edit): the same packing, σ as timestep, `img_shapes` built here (with the Edit references'); cond
  holds the text embeddings and mask.
* SD3: latents go in as they are (the model patchifies); tokens are (p, p, c)-ordered; timestep = σ·1000.
* Z-Image: per-sample lists, t = 1 − σ, x0 − ε output (`output_sign` −1).
* Wan: 5-D latents (B, C, T, H, W), timestep σ·1000, final layer modulated by `scale_shift_table` + temb.
Only the generated tokens (the first L) feed the head and the teacher's velocity; reference tokens condition.

LoRA (§6.6): `add_student_lora` wraps the feed-forward and timestep-MLP layers with a PEFT adapter (each
architecture's targets are listed and explained where it is defined); a student built with
``share_transformer=True`` then shares every frozen base weight with the teacher (`DiffusersTeacher` runs the same
module with adapters disabled and the original final norm), while the student swaps in its own trainable copy.

Adapter files: `piflow.integrations.diffusers.adapter`; pipelines: `piflow.integrations.diffusers.pipelines`;
families (pipelines, conditions, guidance): `piflow.integrations.diffusers.families`.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from piflow.heads import make_policy_head
from piflow.integrations.diffusers.quantization import base_parameter, float_copy, float_linear
from piflow.policies import policy_from_outputs, resolve_policy_kwargs
from piflow.settings import PiIDSettings, policy_kind

PATCH = 2
TEXT_TO_IMAGE_SCHEDULE = {"nfe": 4, "shift": 3.2, "final_step_size_scale": 0.5}   # §4.7

# §6.6 GM-FLUX LoRA targets: feed-forward layers and the timestep MLP, never attention. The single-stream blocks'
# proj_out is listed per block so that the root proj_out (teacher output layer) is never wrapped.
FLUX_LORA_TARGETS = (r".*(single_transformer_blocks\.\d+\.proj_out|proj_mlp|ff\.net\.0\.proj|ff\.net\.2|"
                     r"ff_context\.net\.0\.proj|ff_context\.net\.2|timestep_embedder\.linear_1|"
                     r"timestep_embedder\.linear_2)$")
LORA_ADAPTER = "piflow"
# the settings each policy takes from `policy_kwargs` (saved in adapters' policy_config)
POLICY_SETTINGS = {"gmflow": ("eps",), "dx": ("mode", "segment_size", "shift", "eps")}


def add_student_lora(transformer: nn.Module, rank: int = 256, alpha: Optional[float] = None, dropout: float = 0.05,
                     target_modules: Any = FLUX_LORA_TARGETS, adapter_name: str = LORA_ADAPTER) -> None:
    """Add a PEFT LoRA adapter (Gaussian A, zero B, so the output is unchanged) and freeze all base weights.

    `target_modules` defaults to the FLUX list; use ``ARCHITECTURES[name].lora_targets(transformer)`` otherwise."""
    try:
        from peft import LoraConfig
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError("LoRA students need `pip install peft`") from error
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                                       init_lora_weights="gaussian", target_modules=target_modules), adapter_name)


def set_lora_strength(transformer: nn.Module, strength: float, adapter_name: str = LORA_ADAPTER) -> int:
    """Scale the LoRA update of `adapter_name` by `strength` (1: as trained; other adapters untouched, the policy
    head and final norm are not LoRA and stay as trained). Returns the number of LoRA layers rescaled."""
    from piflow.checks import check_number

    strength = check_number(strength, "strength")
    layers = [m for m in transformer.modules() if adapter_name in getattr(m, "scaling", {}) and hasattr(m, "set_scale")]
    for layer in layers:
        layer.set_scale(adapter_name, strength)
    return len(layers)


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


def _check_cond(cond: Any, required: tuple[str, ...], name: str) -> dict:
    if not isinstance(cond, dict) or any(key not in cond for key in required):
        raise ValueError(f"cond must be a dict with {', '.join(required)} for {name}")
    return dict(cond)


def _flux_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    inputs = _check_cond(cond, ("encoder_hidden_states", "pooled_projections", "txt_ids"), "FLUX")
    inputs.update(hidden_states=pack_latents(latents), timestep=sigma.reshape(-1).to(latents.dtype),
                  img_ids=image_ids(latents.shape[2], latents.shape[3], latents.device))
    return inputs


def _sd3_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    inputs = _check_cond(cond, ("encoder_hidden_states", "pooled_projections"), "SD3")
    inputs.update(hidden_states=latents, timestep=sigma.reshape(-1).to(latents.dtype) * 1000)
    return inputs


def _packed_with_references(latents: Tensor, cond: dict) -> tuple[Tensor, list[tuple[int, int]]]:
    """The 2×2-packed generated tokens followed by each reference image's clean tokens (B, L + Σ L_j, 4C), and the
    token grid (rows, cols) of every image, the generated one first."""
    from piflow.integrations.diffusers.families import reference_latents

    images = [latents]
    for number, reference in enumerate(reference_latents(cond)):
        if reference.shape[:2] != latents.shape[:2]:
            raise ValueError(f"reference image {number}: latents {tuple(reference.shape)} must have the batch and "
                             f"channels of the generated latents {tuple(latents.shape[:2])}")
        images.append(reference.to(latents.dtype))
    grids = [(image.shape[2] // PATCH, image.shape[3] // PATCH) for image in images]
    return torch.cat([pack_latents(image) for image in images], dim=1), grids


def _qwen_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    """Qwen-Image(-Edit) forward kwargs; Edit's reference latents are clean packed tokens after the generated ones,
    their (1, h, w) shapes appended to each sample's `img_shapes`."""
    _check_cond(cond, ("encoder_hidden_states", "encoder_hidden_states_mask"), "Qwen-Image")
    tokens, grids = _packed_with_references(latents, cond)
    shapes = [(1, rows, cols) for rows, cols in grids]
    return {"hidden_states": tokens, "timestep": sigma.reshape(-1).to(latents.dtype),
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "encoder_hidden_states_mask": cond["encoder_hidden_states_mask"],
            "img_shapes": [list(shapes)] * latents.shape[0]}


def qwen_lora_targets(transformer: nn.Module) -> list[str]:
    """§6.6 Qwen targets: image MLPs, the timestep MLP, and text MLPs of every block but the last (its text output
    is unused, which would leave LoRA parameters without gradients)."""
    names = []
    last = len(transformer.transformer_blocks) - 1
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.endswith(("img_mlp.net.0.proj", "img_mlp.net.2", "timestep_embedder.linear_1",
                          "timestep_embedder.linear_2")):
            names.append(name)
        elif name.endswith(("txt_mlp.net.0.proj", "txt_mlp.net.2")) and not name.startswith(
                f"transformer_blocks.{last}."):
            names.append(name)
    return names


def unpatchify_pqc(tokens: Tensor, height: int, width: int, patch: int) -> Tensor:
    """SD3/DiT token layout (B, (H/p)(W/p), p·p·c) with (p_row, p_col, c) order → (B, c, H, W)."""
    batch, length, features = tokens.shape
    channels = features // patch ** 2
    x = tokens.reshape(batch, height // patch, width // patch, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def _temb_from_norm_args(args: tuple, kwargs: dict, output: Any) -> Tensor:
    """The conditioning embedding given to an adaptive final norm ``norm_out(tokens, temb)``."""
    return args[1] if len(args) > 1 else kwargs.get("conditioning_embedding", kwargs.get("emb"))


def _first_output(output: Any) -> Tensor:
    return output[0]


@dataclass(frozen=True)
class Architecture:
    """How a transformer family takes latents and lays out its output tokens — the bring-your-own-teacher protocol.

    A velocity transformer qualifies when its last layers are a conditioned final norm followed by a linear
    ``projection`` to per-token latent patches. Declare the rest here and `register_architecture` it:
    * model_inputs(latents (B, C, *size), σ (B,), cond dict) → forward kwargs (σ → the model's timestep units,
      packing, position ids, reference/conditioning tokens);
    * tokens_to_latents(tokens (B, L, C·|patch|), *size, patch) → (B, C, *size): how output tokens map back to
      latents (size is (H, W) for images, (T, H, W) for video; `patch` is what `patch_size` returns);
    * layout: "cp" (channel-major within a token, FLUX/Qwen packing) or "pc" (patch-major, SD3/DiT/Wan);
    * output_is_tokens: the model returns tokens (unpatchify here) or latents (it unpatchifies itself);
    * lora_targets(transformer) → PEFT target_modules (feed-forward and timestep MLPs, never attention, §6.6);
    * packs_outside: the 2×2 packing happens in model_inputs (FLUX, Qwen: patch 2) or inside the model (SD3: the
      model's ``config.patch_size``); `patch_size(transformer)` overrides both (Wan: (1, 2, 2));
    * base_class: the transformer class name written into adapter folders;
    * the final layers, read through hooks so the model's code runs unchanged: `final_norm` (dotted path of the
      module, or parameter, of which the student trains its own copy: FLUX's ``norm_out``, Wan's
      ``scale_shift_table``), `projection` (path of the output linear: the head is initialised from it and the
      tokens entering it are captured; only the first L = |size / patch| tokens — the generated ones, ahead of
      any reference or caption tokens — are used), `temb_module` + `read_temb(args, kwargs, output)` (a forward
      hook that reads the conditioning embedding (B, D) the GM log-std MLP sees) and `cond_dim(transformer)` = D;
    * read_output(forward output with return_dict=False) → the model's prediction; `output_sign` −1 for models
      that predict x0 − ε instead of the velocity ε − x0 (the head's initial projection is negated likewise).
    """

    name: str
    model_inputs: Callable[[Tensor, Tensor, dict], dict]           # (latents, σ (B,), cond) → forward kwargs
    tokens_to_latents: Callable[..., Tensor]                      # (tokens, *size, patch) → (B, c, *size)
    layout: str                                                   # GMHead layout of a token's outputs
    output_is_tokens: bool                                        # the model returns tokens (FLUX) or latents (SD3)
    lora_targets: Callable[[nn.Module], Any]                      # transformer → PEFT target_modules
    packs_outside: bool = True                                    # 2×2 packing done here (FLUX, Qwen) or inside
    base_class: str = ""                                          # e.g. "FluxTransformer2DModel"
    final_norm: str = "norm_out"
    projection: str = "proj_out"
    temb_module: str = "norm_out"
    read_temb: Callable[[tuple, dict, Any], Tensor] = _temb_from_norm_args
    cond_dim: Callable[[nn.Module], int] = lambda transformer: transformer.norm_out.linear.in_features
    patch_size: Optional[Callable[[nn.Module], Any]] = None
    read_output: Callable[[Any], Tensor] = _first_output
    output_sign: float = 1.0


# SD3 LoRA: image and context feed-forwards of every joint block and the timestep MLP, never attention (§6.6).
SD3_LORA_TARGETS = (r".*(ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|"
                    r"timestep_embedder\.linear_1|timestep_embedder\.linear_2)$")
FLUX = Architecture("flux", _flux_inputs, lambda t, h, w, p: unpack_tokens(t, h, w, p), "cp", True,
                    lambda transformer: FLUX_LORA_TARGETS, base_class="FluxTransformer2DModel")
SD3 = Architecture("sd3", _sd3_inputs, unpatchify_pqc, "pc", False, lambda transformer: SD3_LORA_TARGETS,
                   packs_outside=False, base_class="SD3Transformer2DModel")
QWEN = Architecture("qwen", _qwen_inputs, lambda t, h, w, p: unpack_tokens(t, h, w, p), "cp", True,
                    qwen_lora_targets, base_class="QwenImageTransformer2DModel")
# Z-Image (single-stream S3-DiT): list inputs, model time t = 1 − σ, output x0 − ε (so output_sign −1); the final
# layer `all_final_layer["2-1"]` = linear(LayerNorm(x)·(1 + adaLN_modulation(c))) runs on the unified sequence
# [image tokens (padded to 32k), caption tokens], image tokens first, (p_row, p_col, c)-ordered.
# LoRA: the blocks' SwiGLU feed-forward (feed_forward.w1/w2/w3) and the timestep MLP (t_embedder.mlp.0/2), never
# attention (§6.6); the caption and noise refiners' feed-forwards are included (they shape the tokens the policy sees).
ZIMAGE_FINAL = "all_final_layer.2-1"
ZIMAGE_LORA_TARGETS = r".*(feed_forward\.w1|feed_forward\.w2|feed_forward\.w3|t_embedder\.mlp\.0|t_embedder\.mlp\.2)$"


def caption_list(cond: dict, name: str = "encoder_hidden_states") -> list[Tensor]:
    """Padded (B, L, D) embeddings + ``encoder_hidden_states_mask`` → the per-sample unpadded list."""
    embeds, mask = cond[name], cond.get("encoder_hidden_states_mask")
    if mask is None:
        return list(embeds.unbind(0))
    return [e[: int(n)] for e, n in zip(embeds, mask.sum(dim=1).tolist())]


def _zimage_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    _check_cond(cond, ("encoder_hidden_states",), "Z-Image")
    if latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"latents height and width must be divisible by 2 for Z-Image, got {tuple(latents.shape)}")
    return {"x": list(latents.unsqueeze(2).unbind(0)), "t": 1 - sigma.reshape(-1).to(latents.dtype),
            "cap_feats": caption_list(cond), "patch_size": 2, "f_patch_size": 1}


def _zimage_output(output: Any) -> Tensor:
    return torch.stack(list(output[0]), dim=0).squeeze(2)


ZIMAGE = Architecture(
    "zimage", _zimage_inputs, unpatchify_pqc, "pc", False, lambda transformer: ZIMAGE_LORA_TARGETS,
    packs_outside=False, base_class="ZImageTransformer2DModel", final_norm=f"{ZIMAGE_FINAL}.adaLN_modulation",
    projection=f"{ZIMAGE_FINAL}.linear", temb_module=ZIMAGE_FINAL,
    read_temb=lambda args, kwargs, output: kwargs["c"] if "c" in kwargs else args[1],
    cond_dim=lambda transformer: transformer.get_submodule(f"{ZIMAGE_FINAL}.adaLN_modulation.1").in_features,
    patch_size=lambda transformer: 2, read_output=_zimage_output, output_sign=-1.0)



def flux2_ids(rows: int, cols: int, time: int = 0, device=None) -> Tensor:
    """FLUX.2 4-axis RoPE ids (L, 4) = (t, row, col, 0) of a token grid; reference image j has t = 10 + 10·j."""
    grid = torch.cartesian_prod(torch.tensor([time]), torch.arange(rows), torch.arange(cols), torch.arange(1))
    return grid.to(device)


def _flux2_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    _check_cond(cond, ("encoder_hidden_states",), "FLUX.2")
    tokens, grids = _packed_with_references(latents, cond)       # references: time ids 10, 20, … (image j: 10·j)
    ids = [flux2_ids(rows, cols, 10 * j, latents.device) for j, (rows, cols) in enumerate(grids)]
    text = cond["encoder_hidden_states"]
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                   torch.arange(text.shape[1])).to(latents.device)
    return {"hidden_states": tokens, "encoder_hidden_states": text,
            "timestep": sigma.reshape(-1).to(latents.dtype), "img_ids": torch.cat(ids), "txt_ids": txt_ids,
            "guidance": cond.get("guidance")}


# FLUX.2 [dev] / [klein] (Flux2Transformer2DModel): 2×2-packed 4C-channel tokens (the pipelines' patchified,
# batch-norm-normalised latents, unpatchified here to (C, H/8, W/8) as the authors' GM-FLUX.2 does), σ as timestep,
# 4-axis ids; reference images are clean tokens after the generated ones. LoRA: the double blocks' feed-forward
# (ff, ff_context: linear_in/linear_out), the single blocks' fused attention+MLP linears (attn.to_qkv_mlp_proj,
# attn.to_out: FLUX.2 has no separate MLP there, as FLUX.1's proj_mlp/proj_out) and the timestep/guidance MLPs.
FLUX2_LORA_TARGETS = (r".*(transformer_blocks\.\d+\.ff\.linear_in|transformer_blocks\.\d+\.ff\.linear_out|"
                      r"ff_context\.linear_in|ff_context\.linear_out|single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj|"
                      r"single_transformer_blocks\.\d+\.attn\.to_out|timestep_embedder\.linear_1|"
                      r"timestep_embedder\.linear_2|guidance_embedder\.linear_1|guidance_embedder\.linear_2)$")
FLUX2 = Architecture("flux2", _flux2_inputs, lambda t, h, w, p: unpack_tokens(t, h, w, p), "cp", True,
                     lambda transformer: FLUX2_LORA_TARGETS, base_class="Flux2Transformer2DModel")


def unpatchify_video(tokens: Tensor, frames: int, height: int, width: int, patch) -> Tensor:
    """Wan token layout (B, T'H'W', p_t·p_h·p_w·c) with (p_t, p_h, p_w, c) order → (B, c, T, H, W)."""
    p_t, p_h, p_w = patch
    batch, length, features = tokens.shape
    channels = features // (p_t * p_h * p_w)
    x = tokens.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, channels, frames, height, width)


def _wan_inputs(latents: Tensor, sigma: Tensor, cond: dict) -> dict:
    _check_cond(cond, ("encoder_hidden_states",), "Wan")
    if latents.dim() != 5:
        raise ValueError(f"latents must be 5-D (B, C, T, H, W) video latents for Wan, got {tuple(latents.shape)}")
    if latents.shape[3] % 2 or latents.shape[4] % 2:
        raise ValueError(f"latent height and width must be divisible by 2 for Wan, got {tuple(latents.shape)}")
    return {"hidden_states": latents, "timestep": sigma.reshape(-1).to(latents.dtype) * 1000,
            "encoder_hidden_states": cond["encoder_hidden_states"]}


# Wan 2.1 / 2.2 (WanTransformer3DModel): 5-D latents, timestep σ·1000, velocity output already unpatchified; the
# final layer is proj_out(LayerNorm(x)·(1 + scale) + shift) with (shift, scale) = scale_shift_table + temb, temb the
# first output of condition_embedder. LoRA: the blocks' feed-forward (ffn.net.0.proj, ffn.net.2) and the timestep
# MLP (condition_embedder.time_embedder.linear_1/2, time_proj), never attention (§6.6).
WAN_LORA_TARGETS = (r".*(ffn\.net\.0\.proj|ffn\.net\.2|condition_embedder\.time_embedder\.linear_1|"
                    r"condition_embedder\.time_embedder\.linear_2|condition_embedder\.time_proj)$")
WAN = Architecture(
    "wan", _wan_inputs, unpatchify_video, "pc", False, lambda transformer: WAN_LORA_TARGETS, packs_outside=False,
    base_class="WanTransformer3DModel", final_norm="scale_shift_table", temb_module="condition_embedder",
    read_temb=lambda args, kwargs, output: output[0],
    cond_dim=lambda transformer: transformer.scale_shift_table.shape[-1],
    patch_size=lambda transformer: tuple(int(p) for p in transformer.config.patch_size))

ARCHITECTURES = {"flux": FLUX, "sd3": SD3, "qwen": QWEN, "zimage": ZIMAGE, "flux2": FLUX2, "wan": WAN}


def register_architecture(architecture: Architecture) -> Architecture:
    """Make `architecture` known by name (students, teachers and `load_piflow_adapter` look it up)."""
    if architecture.layout not in ("cp", "pc"):
        raise ValueError(f"layout must be 'cp' or 'pc', got {architecture.layout!r}")
    if not architecture.base_class:
        raise ValueError("an Architecture needs base_class (the transformer class name) to be registered")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def get_architecture(name: Union[str, Architecture]) -> Architecture:
    """The registered `Architecture` called `name` (an `Architecture` is returned as is)."""
    if isinstance(name, Architecture):
        return name
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)} "
                         "(register your own with register_architecture)")
    return ARCHITECTURES[name]


def _patch_size(transformer: nn.Module, architecture: Architecture):
    if architecture.patch_size is not None:
        return architecture.patch_size(transformer)
    return PATCH if architecture.packs_outside else int(transformer.config.patch_size)


def _num_tokens(size: tuple[int, ...], patch) -> int:
    """Generated tokens of a latent of spatial `size` (H, W) or (T, H, W) with `patch` (int or per-axis tuple)."""
    patches = (patch,) * len(size) if isinstance(patch, int) else tuple(patch)
    count = 1
    for extent, step in zip(size, patches):
        count *= extent // step
    return count


def _patch_volume(patch) -> int:
    return patch ** 2 if isinstance(patch, int) else int(torch.tensor(patch).prod())


def _split_path(transformer: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (transformer.get_submodule(parent) if parent else transformer), leaf


class FinalParameter(nn.Module):
    """A student's own copy of a final-layer parameter (Wan's ``scale_shift_table``): the parameter ``weight``."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.weight = nn.Parameter(value.detach().clone())


def final_norm_copy(transformer: nn.Module, architecture: Architecture) -> nn.Module:
    """A trainable float copy of the architecture's final norm (a module, or a `FinalParameter`)."""
    parent, leaf = _split_path(transformer, architecture.final_norm)
    if leaf in parent._parameters:
        return FinalParameter(parent._parameters[leaf])
    return float_copy(parent._modules[leaf])


@contextmanager
def final_norm_swapped(transformer: nn.Module, architecture: Architecture, norm: nn.Module):
    """Run `transformer` with the student's final norm `norm` in place of its own inside the block."""
    parent, leaf = _split_path(transformer, architecture.final_norm)
    slots = parent._parameters if isinstance(norm, FinalParameter) else parent._modules
    original = slots[leaf]
    slots[leaf] = norm.weight if isinstance(norm, FinalParameter) else norm
    try:
        yield
    finally:
        slots[leaf] = original


def output_projection(transformer: nn.Module, architecture: Architecture) -> nn.Linear:
    """The teacher's output layer as a float `nn.Linear`, times `output_sign` (the head starts from it)."""
    projection = float_linear(transformer.get_submodule(architecture.projection))
    if architecture.output_sign == 1:
        return projection
    signed = copy.deepcopy(projection)            # never the teacher's own layer
    with torch.no_grad():
        signed.weight.mul_(architecture.output_sign)
        if signed.bias is not None:
            signed.bias.mul_(architecture.output_sign)
    return signed


@contextmanager
def capture_final_features(transformer: nn.Module, architecture: Union[str, Architecture] = "flux"):
    """Record the tokens entering the architecture's output projection and its conditioning embedding."""
    arch = get_architecture(architecture)
    captured: dict[str, Tensor] = {}

    def read_temb(module, args, kwargs, output):
        captured["temb"] = arch.read_temb(args, kwargs, output)

    def before_proj(module, args):
        captured["tokens"] = args[0]

    handles = [transformer.get_submodule(arch.temb_module).register_forward_hook(read_temb, with_kwargs=True),
               transformer.get_submodule(arch.projection).register_forward_pre_hook(before_proj)]
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


class DiffusersTeacher:
    """σ-space teacher around a diffusers transformer: ``teacher(latents (B,C,H,W), sigma (B,), cond) -> u``.

    LoRA adapters that a shared student added are disabled for every teacher call."""

    def __init__(self, transformer: nn.Module, architecture: Union[str, Architecture] = "flux"):
        self.transformer = transformer
        self.architecture = get_architecture(architecture)

    @torch.no_grad()
    def __call__(self, latents: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        arch = self.architecture
        with adapters_disabled(self.transformer):
            out = arch.read_output(self.transformer(**arch.model_inputs(latents, sigma, cond), return_dict=False))
        if arch.output_is_tokens:
            patch = _patch_size(self.transformer, arch)
            out = arch.tokens_to_latents(out[:, :_num_tokens(latents.shape[2:], patch)], *latents.shape[2:], patch)
        if arch.output_sign != 1:
            out = out * arch.output_sign
        return out.to(latents.dtype)


class DiffusersPolicyStudent(nn.Module):
    """GM / DX student ``(latents, sigma, cond) -> dict`` of policy parameters on a diffusers transformer.

    Args:
        transformer: the transformer (deep-copied unless `share_transformer`; sharing is for LoRA setups where
            the teacher is the same module with adapters disabled).
        policy: "gmflow" (K components, one `latent_channels`-dim GM per latent pixel) or "dx" (N nodes).
        latent_channels: the VAE latent channels C of one GM chunk (16 for FLUX/SD3, 4 in tiny tests).
        architecture: "flux", "sd3", "qwen" or a registered `Architecture`.
        settings: the π-ID settings it is (or was) trained with; pipelines sample on its schedule (nfe, shift,
            final_step_size_scale, total_substeps) and adapters save it. Default: the text-to-image schedule of
            §4.7 (4 NFE, shift 3.2, f 0.5).
        policy_kwargs: settings of the policy built from the outputs (GM ``eps``; DX ``mode``, ``segment_size``,
            ``shift`` — DX defaults come from `settings`), saved in the adapter's ``policy_config``.
    """

    def __init__(self, transformer: nn.Module, policy: str = "gmflow", num_components: int = 8,
                 num_nodes: int = 10, dx_mode: str = "grid", latent_channels: int = 16,
                 head_noise_std: float = 0.05, logstd_hidden: int = 1024, share_transformer: bool = False,
                 generator: Optional[torch.Generator] = None, architecture: Union[str, Architecture] = "flux",
                 settings: Optional[PiIDSettings] = None, policy_kwargs: Optional[dict] = None):
        super().__init__()
        self.policy_kind = policy_kind(policy)
        self.settings = settings if settings is not None else PiIDSettings(
            policy=self.policy_kind, **TEXT_TO_IMAGE_SCHEDULE)
        if self.settings.policy != self.policy_kind:
            raise ValueError(f"settings.policy={self.settings.policy!r} does not match policy={policy!r}")
        self.policy_kwargs = dict(policy_kwargs or {})
        unknown = sorted(set(self.policy_kwargs) - set(POLICY_SETTINGS[self.policy_kind]))
        if unknown:
            raise ValueError(f"policy_kwargs {unknown} are not {self.policy_kind} policy settings; expected some of "
                             f"{list(POLICY_SETTINGS[self.policy_kind])}")
        if self.policy_kind == "dx":             # the policy interpolates the nodes the head was built for
            if self.policy_kwargs.setdefault("mode", dx_mode) != dx_mode:
                raise ValueError(f"policy_kwargs mode={self.policy_kwargs['mode']!r} differs from dx_mode={dx_mode!r}")
        self.architecture = get_architecture(architecture)
        self.transformer = transformer if share_transformer else copy.deepcopy(transformer)
        # the student's own final norm (trainable, §6.6; a float copy on a quantized base), swapped in only while
        # the student runs
        self.norm_out = final_norm_copy(self.transformer, self.architecture).requires_grad_(True)
        projection = output_projection(self.transformer, self.architecture)   # the head starts from the teacher's
        self.latent_channels = latent_channels
        in_dim, out_dim = projection.in_features, projection.out_features
        self.patch = _patch_size(self.transformer, self.architecture)
        if out_dim != latent_channels * _patch_volume(self.patch):
            raise ValueError(f"{self.architecture.projection} has {out_dim} outputs, expected latent_channels·"
                             f"|patch| = {latent_channels * _patch_volume(self.patch)}")
        self.head = make_policy_head(
            self.policy_kind, in_dim, out_dim, channels=latent_channels,
            cond_dim=self.architecture.cond_dim(self.transformer), num_components=num_components,
            num_nodes=num_nodes, dx_mode=dx_mode, logstd_hidden=logstd_hidden, layout=self.architecture.layout,
            teacher_projection=projection, noise_std=head_noise_std, generator=generator)

    @property
    def sampling(self) -> dict:
        """The training schedule (nfe, shift, final_step_size_scale, total_substeps) pipelines sample on."""
        return self.settings.sampling

    def resolved_policy_kwargs(self) -> dict:
        """`policy_kwargs` with the DX defaults of the training schedule filled in (what adapters save)."""
        s = self.settings
        return resolve_policy_kwargs(self.policy_kind, self.policy_kwargs, nfe=s.nfe,
                                     final_step_size_scale=s.final_step_size_scale, shift=s.shift)

    def policy(self, latents: Tensor, sigma: Tensor, cond: Any = None):
        """One evaluation at (latents, σ (B,)) as its policy, on the student's own schedule. The transformer sees
        the latents in its own dtype (bf16 bases); the policy is built at the float32 state `latents`."""
        dtype = base_parameter(self.transformer).dtype
        return policy_from_outputs(self(latents.to(dtype), sigma, cond), latents, sigma, self.policy_kind,
                                   policy_kwargs=self.resolved_policy_kwargs())

    def _unpack(self, per_token: Tensor, size: tuple[int, ...]) -> Tensor:
        """(B, L, N, F) per generated token → (B, N, c, *size)."""
        batch, length, num, features = per_token.shape
        flat = per_token.permute(0, 2, 1, 3).reshape(batch * num, length, features)
        spatial = self.architecture.tokens_to_latents(flat, *size, self.patch)
        return spatial.reshape(batch, num, *spatial.shape[1:])

    def forward(self, latents: Tensor, sigma: Tensor, cond: Any = None) -> dict:
        size = tuple(latents.shape[2:])
        arch = self.architecture
        with final_norm_swapped(self.transformer, arch, self.norm_out), \
                capture_final_features(self.transformer, arch) as captured:
            self.transformer(**arch.model_inputs(latents, sigma, cond), return_dict=False)
        tokens, temb = captured["tokens"][:, :_num_tokens(size, self.patch)], captured["temb"]
        if self.policy_kind == "dx":
            return {"u_grid": self._unpack(self.head(tokens), size)}
        out = self.head(tokens, temb)
        return {"means": self._unpack(out.means, size), "logweights": self._unpack(out.logweights, size),
                "logstds": out.logstds}


def _bind_architecture(name: str, cls, architecture: Architecture, doc: str):
    """A documented alias `name`: ``name(transformer, …)`` = ``cls(transformer, …, architecture=architecture)``."""
    def build(*args, **kwargs):
        kwargs.setdefault("architecture", architecture)
        return cls(*args, **kwargs)
    build.__doc__ = doc
    build.__name__ = build.__qualname__ = name
    return build


# Aliases kept for readability of user code; each builds the generic class with its architecture.
FluxTeacher = _bind_architecture("FluxTeacher", DiffusersTeacher, FLUX, "`DiffusersTeacher` on a FLUX transformer.")
SD3Teacher = _bind_architecture("SD3Teacher", DiffusersTeacher, SD3, "`DiffusersTeacher` on an SD3 transformer.")
QwenImageTeacher = _bind_architecture("QwenImageTeacher", DiffusersTeacher, QWEN,
                                      "`DiffusersTeacher` on a Qwen-Image transformer.")
FluxPolicyStudent = _bind_architecture("FluxPolicyStudent", DiffusersPolicyStudent, FLUX,
                                       "GM-FLUX / DX-FLUX student (§6.3).")
SD3PolicyStudent = _bind_architecture("SD3PolicyStudent", DiffusersPolicyStudent, SD3,
                                      "GM / DX student on `SD3Transformer2DModel`.")
QwenImagePolicyStudent = _bind_architecture("QwenImagePolicyStudent", DiffusersPolicyStudent, QWEN,
                                            "GM-Qwen / DX-Qwen student on `QwenImageTransformer2DModel` (§6.4).")
