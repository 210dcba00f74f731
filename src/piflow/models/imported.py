"""Published ImageNet DiT/SiT teachers as piflow `DiT`s, read without running code from the file.

Three checkpoint layouts are understood (key tables derived from the official model code):

* ``sit`` — `willisma/SiT` (``SiT-XL-2-256x256.pt``, or a `train.py` checkpoint ``{model, ema, opt, args}``):
  ``x_embedder.proj`` (a p×p strided conv), ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``
  (num_classes + 1 rows, the last the null class), ``blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
  adaLN_modulation.1}``, ``final_layer.{linear, adaLN_modulation.1}`` and the fixed ``pos_embed``. Usually
  ``learn_sigma``: the output has 2·C channels of which SiT's sampler keeps the first C.
  **Time:** SiT's t runs from noise (0) to data (1): x_t = t·x0 + (1 − t)·ε and it predicts x0 − ε. piflow's
  σ (x_σ = (1 − σ)·x0 + σ·ε, u = ε − x0) is therefore σ = 1 − t and u = −v_SiT: the DiT feeds 1 − σ to the
  time embedding (`time_reversed`, `timestep_scale` 1) and the sign is folded into ``proj_out``.
* ``repa`` — `sihyun-yu/REPA` (``last.pt`` or a `train.py` checkpoint ``{model, ema, opt, args, steps}``): the
  SiT keys plus ``projectors.*`` (the REPA alignment MLP, a training-only head: dropped). **Time:** REPA's t is σ
  and it predicts ε − x0: `timestep_scale` 1, no sign change.
* ``authors`` — the π-Flow authors' ``DiTTransformer2DModelMod`` (`Lakonik/pi-Flow-ImageNet`
  ``teachers/repa_imagenet.pth`` and ``teachers/flowdit_imagenet.pth``; optionally under ``state_dict``):
  ``pos_embed.proj``, one shared ``emb.{timestep_embedder.linear_{1,2}, class_embedder.embedding_table}``,
  ``transformer_blocks.{i}.{norm1.linear, attn1.to_{q,k,v}, attn1.to_out.0, ff.net.0.proj, ff.net.2}``,
  ``proj_out_1`` (final shift, scale) and ``proj_out_2``; the MLP LayerNorm has eps 1e-5; the position table is
  not stored. Both files predict u = ε − x0 at σ, but feed the timestep differently: the REPA file t = σ
  (``authors-repa``), the flow-matching DiT t = 1000·σ (``authors-fm``). The weights cannot tell them apart, so
  the layout must be named.

All three use the DiT/MAE position table whose first half encodes the *column* index (``position_order``
"col_row"; a stored ``pos_embed`` is checked against it) and the DiT timestep sinusoid (cos first, 256
frequencies, max period 10⁴). The null class is row ``num_classes`` (1000) in all three.

Reading: ``.safetensors`` directly; ``.pt``/``.pth`` through ``torch.load(weights_only=True)`` with exactly one
extra allowed type, ``argparse.Namespace`` (the ``args`` entry of SiT/REPA training checkpoints, a plain record);
anything else in a pickle (a class, a function, a ``__reduce__`` call) is refused before it can run.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from piflow.errors import CheckpointError
from piflow.files import first_line, load_safetensors

from .dit import DiT
from .dit_blocks import sincos_position_embedding
from .dit_config import DIT_PRESETS, DiTConfig

__all__ = ["LAYOUTS", "WEIGHT_CHOICES", "detect_layout", "import_teacher", "read_checkpoint", "select_weights",
           "to_piflow_state"]

LAYOUTS = ("auto", "sit", "repa", "authors-repa", "authors-fm")
WEIGHT_CHOICES = ("ema", "model")
_TIME = {"sit": (1.0, True, -1.0), "repa": (1.0, False, 1.0),          # (timestep_scale, time_reversed, sign)
         "authors-repa": (1.0, False, 1.0), "authors-fm": (1000.0, False, 1.0)}
_HEADS_BY_WIDTH = {preset["hidden_size"]: preset["num_heads"] for preset in DIT_PRESETS.values()}


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """The object stored in a ``.safetensors`` / ``.pt`` / ``.pth`` file, read without executing code (see the
    module docstring); a `CheckpointError` names the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path, "teacher checkpoint")
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 6):
        raise CheckpointError(f"reading {path} safely needs torch >= 2.6 (its restricted unpickler); this is torch "
                              f"{torch.__version__}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} was refused: it is corrupt or holds objects other than tensors, "
                              f"plain containers and argparse.Namespace ({type(error).__name__}: "
                              f"{first_line(error)[:300]})") from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def select_weights(stored: object, weights: str = "ema", source: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside a checkpoint: a plain state dict as is; a training checkpoint's ``ema`` (default) or
    ``model`` entry; an authors' file's ``state_dict`` entry. Every value must be a tensor."""
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{source} holds a {type(stored).__name__}, expected a dict of tensors")
    if "state_dict" in stored and isinstance(stored["state_dict"], dict):
        stored = stored["state_dict"]
    elif "ema" in stored or "model" in stored:
        if weights not in stored:
            raise CheckpointError(f"{source} has no {weights!r} weights (entries: {sorted(map(str, stored))})")
        stored = stored[weights]
    if not isinstance(stored, dict) or not stored:
        raise CheckpointError(f"{source}: the selected weights are not a non-empty dict of tensors")
    state = {}
    for key, value in stored.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, expected tensors only")
        state[key.removeprefix("module.")] = value
    return state


def detect_layout(state: dict[str, Tensor]) -> str:
    """"sit", "repa" or "authors" from the keys of a state dict (a `CheckpointError` for anything else)."""
    if "x_embedder.proj.weight" in state and "t_embedder.mlp.0.weight" in state:
        return "repa" if any(key.startswith("projectors.") for key in state) else "sit"
    if "pos_embed.proj.weight" in state and ("emb.timestep_embedder.linear_1.weight" in state
                                             or "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"
                                             in state):
        return "authors"
    raise CheckpointError("the checkpoint is none of the known DiT layouts (SiT, REPA, the authors' "
                          "DiTTransformer2DModelMod); first keys: " + ", ".join(sorted(state)[:6]))


def _count_blocks(state: dict[str, Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.match(pattern, key))}
    if not indices or indices != set(range(len(indices))):
        raise CheckpointError(f"the checkpoint's blocks are not numbered 0..N-1 (found {sorted(indices)[:8]})")
    return len(indices)


def _velocity_rows(weight: Tensor, patch_area: int, channels: int, sign: float) -> Tensor:
    """Rows of an output projection (p²·C_out, …) → the velocity rows (p²·C, …) times `sign`: a learn-sigma
    output (C_out = 2·C) keeps the first C channels of each patch position, as SiT's sampler does."""
    rows = weight.shape[0]
    if rows == 2 * patch_area * channels:
        weight = weight.reshape(patch_area, 2 * channels, *weight.shape[1:])[:, :channels]
        weight = weight.reshape(patch_area * channels, *weight.shape[2:])
    elif rows != patch_area * channels:
        raise CheckpointError(f"the output projection has {rows} rows; expected p²·C = {patch_area * channels} "
                              f"or 2·p²·C (learn-sigma)")
    return weight * sign


def to_piflow_state(state: dict[str, Tensor], layout: str, num_heads: Optional[int] = None,
                    input_size: Optional[int] = None) -> tuple[DiTConfig, dict[str, Tensor]]:
    """(config, state dict) of a piflow `DiT` computing the same velocity as the checkpoint, in piflow's σ and
    u = ε − x0. `layout` is one of `LAYOUTS` except "auto"; `num_heads` is needed for widths other than the DiT
    presets'; `input_size` (latent side) defaults to the stored position table's or a square token grid."""
    if layout not in _TIME:
        raise CheckpointError(f"layout must be one of {tuple(_TIME)}, got {layout!r}")
    found = detect_layout(state)
    if found != layout.split("-")[0]:
        raise CheckpointError(f"layout {layout!r} was asked for, but the keys are those of the {found!r} layout")
    scale, reversed_, sign = _TIME[layout]
    if found == "authors":
        state = _authors_to_official_names(state)
    conv = state["x_embedder.proj.weight"]                                   # (D, C, p, p)
    hidden, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    heads = num_heads or _HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise CheckpointError(f"num_heads is needed for hidden size {hidden} (not a DiT preset width)")
    depth = _count_blocks(state, r"blocks\.(\d+)\.")
    table = state["y_embedder.embedding_table.weight"]
    stored_pos = state.get("pos_embed")
    tokens = stored_pos.shape[-2] if stored_pos is not None else None
    if input_size is None:
        if tokens is None:
            raise CheckpointError("input_size (the latent side, e.g. 32 for 256² images) is needed: this layout "
                                  "does not store its position table")
        side = round(tokens ** 0.5)
        if side * side != tokens:
            raise CheckpointError(f"the stored position table has {tokens} tokens, not a square grid; pass "
                                  f"input_size")
        input_size = side * patch
    try:
        config = DiTConfig(in_channels=channels, input_size=int(input_size), patch_size=patch, hidden_size=hidden,
                           depth=depth, num_heads=heads,
                           mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                           num_classes=table.shape[0] - 1,
                           frequency_embedding_size=state["t_embedder.mlp.0.weight"].shape[1],
                           timestep_scale=scale, time_reversed=reversed_,
                           mlp_norm_eps=1e-5 if found == "authors" else 1e-6, position_order="col_row")
    except ValueError as error:
        raise CheckpointError(f"the checkpoint does not describe a valid DiT: {first_line(error)}") from None
    if stored_pos is not None:
        expected = sincos_position_embedding(hidden, config.grid_size, "col_row")
        if stored_pos.reshape(-1, hidden).shape != expected.shape or not torch.allclose(
                stored_pos.reshape(-1, hidden).float(), expected, atol=1e-4):
            raise CheckpointError("the stored pos_embed is not the fixed DiT sin-cos table of a "
                                  f"{config.grid_size} token grid (a different input size? pass input_size)")
    area = patch * patch
    out = {"x_embedder.weight": conv.permute(0, 2, 3, 1).reshape(hidden, -1),   # (D, p·p·C), channel fastest
           "x_embedder.bias": state["x_embedder.proj.bias"],
           "t_embedder.0.weight": state["t_embedder.mlp.0.weight"], "t_embedder.0.bias": state["t_embedder.mlp.0.bias"],
           "t_embedder.2.weight": state["t_embedder.mlp.2.weight"], "t_embedder.2.bias": state["t_embedder.mlp.2.bias"],
           "y_embedder.weight": table,
           "proj_out.weight": _velocity_rows(state["final_layer.linear.weight"], area, channels, sign),
           "proj_out.bias": _velocity_rows(state["final_layer.linear.bias"], area, channels, sign)}
    for name in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{name}"] = state[f"final_layer.adaLN_modulation.1.{name}"]
        for i in range(depth):
            for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
                out[f"blocks.{i}.{part}.{name}"] = state[f"blocks.{i}.{part}.{name}"]
    used = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias"} | {
        f"t_embedder.mlp.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")} | {
        key for key in state if key.startswith(("blocks.", "final_layer.adaLN_modulation.1."))}
    unknown = sorted(key for key in state if key not in used and not key.startswith("projectors."))
    if unknown:
        raise CheckpointError(f"the checkpoint has entries this {found} layout does not define: {unknown[:6]}")
    return config, {key: value.detach().to(torch.float32).contiguous() for key, value in out.items()}


def _authors_to_official_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' diffusers-style names → the SiT names `to_piflow_state` reads (q, k, v stacked into qkv). A
    file with per-block embeddings (diffusers' DiT layout) uses block 0's, as the authors' loader does."""
    if "emb.timestep_embedder.linear_1.weight" not in state:
        state = {key.replace("transformer_blocks.0.norm1.emb.", "emb.", 1): value for key, value in state.items()
                 if ".norm1.emb." not in key or key.startswith("transformer_blocks.0.norm1.emb.")}
    names = {"pos_embed.proj.": "x_embedder.proj.", "emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
             "emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
             "emb.class_embedder.embedding_table.": "y_embedder.embedding_table.",
             "proj_out_1.": "final_layer.adaLN_modulation.1.", "proj_out_2.": "final_layer.linear."}
    block_parts = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
                   "ff.net.2": "mlp.fc2"}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = re.match(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match:
            index, part, kind = match.groups()
            if part in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
                if part == "attn1.to_q":
                    out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
                        [state[f"transformer_blocks.{index}.attn1.to_{x}.{kind}"] for x in "qkv"])
                continue
            if part in block_parts:
                out[f"blocks.{index}.{block_parts[part]}.{kind}"] = value
                continue
        for old, new in names.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            out[key] = value                 # unknown: reported by to_piflow_state
    return out


def import_teacher(path: Union[str, os.PathLike], layout: str = "auto", weights: str = "ema",
                   num_heads: Optional[int] = None, input_size: Optional[int] = None) -> DiT:
    """A published teacher checkpoint (SiT, REPA, the authors' two ImageNet files) as a float32 piflow `DiT` that
    takes t = σ·1000 and returns u = ε − x0. `layout` "auto" recognises SiT and REPA; the authors' files need
    "authors-repa" or "authors-fm" (see the module docstring). Training checkpoints give their `weights`
    ("ema" by default, or "model")."""
    state = select_weights(read_checkpoint(path), weights, str(path))
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = detect_layout(state)
        if layout == "authors":
            raise CheckpointError(f"{path} is in the π-Flow authors' layout, which does not record how its timestep "
                                  f"is fed: pass layout authors-repa (t = σ: repa_imagenet.pth) or authors-fm "
                                  f"(t = 1000·σ: flowdit_imagenet.pth)")
    config, converted = to_piflow_state(state, layout, num_heads, input_size)
    model = DiT(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()
