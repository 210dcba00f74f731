"""Tiny random checkpoints in the three published ImageNet teacher layouts, and their reference forward passes.

Key/shape tables re-derived from the official model code (`willisma/SiT` models.py, `sihyun-yu/REPA`
models/sit.py, the π-Flow authors' `DiTTransformer2DModelMod`); the forward passes below are written from
scratch on those raw keys (conv patch embedding, explicit attention and LayerNorm, einsum unpatchify), so they
share no code with `piflow.models`. Run as a script to write the files:

    python tests/checkpoint_layouts.py OUT_DIR
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TINY = dict(channels=4, side=8, patch=2, hidden=48, heads=3, depth=2, mlp=4, classes=10, freq=32)


def sit_shapes(channels, side, patch, hidden, depth, mlp, classes, freq, learn_sigma=True, repa=False,
               z_dim=24, projector_dim=40, **_):
    """The state-dict table of SiT (learn_sigma: 2·C outputs) or REPA (4 outputs + one projector MLP)."""
    tokens = (side // patch) ** 2
    out = patch * patch * channels * (2 if learn_sigma and not repa else 1)
    table = {"pos_embed": (1, tokens, hidden), "x_embedder.proj.weight": (hidden, channels, patch, patch),
             "x_embedder.proj.bias": (hidden,), "t_embedder.mlp.0.weight": (hidden, freq),
             "t_embedder.mlp.0.bias": (hidden,), "t_embedder.mlp.2.weight": (hidden, hidden),
             "t_embedder.mlp.2.bias": (hidden,), "y_embedder.embedding_table.weight": (classes + 1, hidden)}
    for i in range(depth):
        for name, rows, cols in (("attn.qkv", 3 * hidden, hidden), ("attn.proj", hidden, hidden),
                                 ("mlp.fc1", mlp * hidden, hidden), ("mlp.fc2", hidden, mlp * hidden),
                                 ("adaLN_modulation.1", 6 * hidden, hidden)):
            table[f"blocks.{i}.{name}.weight"] = (rows, cols)
            table[f"blocks.{i}.{name}.bias"] = (rows,)
    table.update({"final_layer.linear.weight": (out, hidden), "final_layer.linear.bias": (out,),
                  "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
                  "final_layer.adaLN_modulation.1.bias": (2 * hidden,)})
    if repa:
        for index, (rows, cols) in zip((0, 2, 4), ((projector_dim, hidden), (projector_dim, projector_dim),
                                                   (z_dim, projector_dim))):
            table[f"projectors.0.{index}.weight"] = (rows, cols)
            table[f"projectors.0.{index}.bias"] = (rows,)
    return table


def authors_shapes(channels, side, patch, hidden, depth, mlp, classes, freq, **_):
    """The state-dict table of the authors' DiTTransformer2DModelMod (no stored position table)."""
    table = {"pos_embed.proj.weight": (hidden, channels, patch, patch), "pos_embed.proj.bias": (hidden,),
             "emb.timestep_embedder.linear_1.weight": (hidden, freq), "emb.timestep_embedder.linear_1.bias": (hidden,),
             "emb.timestep_embedder.linear_2.weight": (hidden, hidden),
             "emb.timestep_embedder.linear_2.bias": (hidden,),
             "emb.class_embedder.embedding_table.weight": (classes + 1, hidden)}
    for i in range(depth):
        for name, rows, cols in (("norm1.linear", 6 * hidden, hidden), ("attn1.to_q", hidden, hidden),
                                 ("attn1.to_k", hidden, hidden), ("attn1.to_v", hidden, hidden),
                                 ("attn1.to_out.0", hidden, hidden), ("ff.net.0.proj", mlp * hidden, hidden),
                                 ("ff.net.2", hidden, mlp * hidden)):
            table[f"transformer_blocks.{i}.{name}.weight"] = (rows, cols)
            table[f"transformer_blocks.{i}.{name}.bias"] = (rows,)
    out = patch * patch * channels
    table.update({"proj_out_1.weight": (2 * hidden, hidden), "proj_out_1.bias": (2 * hidden,),
                  "proj_out_2.weight": (out, hidden), "proj_out_2.bias": (out,)})
    return table


def mae_position_table(hidden: int, grid: int) -> np.ndarray:
    """The MAE/DiT 2-D sin-cos table re-derived: meshgrid(w, h), so the first half encodes the column index."""
    positions_w, positions_h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_d(hidden // 2, positions_w), one_d(hidden // 2, positions_h)], axis=1)


def random_state(table: dict, seed: int, spec: dict) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {key: 0.15 * torch.randn(shape, generator=generator) for key, shape in table.items()}
    if "pos_embed" in state:
        grid = spec["side"] // spec["patch"]
        state["pos_embed"] = torch.from_numpy(mae_position_table(spec["hidden"], grid)).float()[None]
    return state


# ---------------------------------------------------------------------------------------------------- forwards

def _layer_norm(x, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    batch, length, dim = x.shape
    split = lambda z: z.reshape(batch, length, heads, dim // heads).transpose(1, 2)   # noqa: E731
    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, length, dim) @ wo.T + bo


def _timestep_sinusoid(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _run(x, c, tokens, blocks, final_shift_scale, final_linear, spec, mlp_eps):
    silu = F.silu
    h = tokens
    for block in blocks:
        mod = silu(c) @ block["ada_w"].T + block["ada_b"]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None].chunk(6, dim=-1)
        h = h + gate1 * _attention(_layer_norm(h, 1e-6) * (1 + scale1) + shift1, *block["attn"], spec["heads"])
        inner = _gelu_tanh((_layer_norm(h, mlp_eps) * (1 + scale2) + shift2) @ block["fc1_w"].T + block["fc1_b"])
        h = h + gate2 * (inner @ block["fc2_w"].T + block["fc2_b"])
    shift, scale = (silu(c) @ final_shift_scale[0].T + final_shift_scale[1])[:, None].chunk(2, dim=-1)
    out = (_layer_norm(h, 1e-6) * (1 + scale) + shift) @ final_linear[0].T + final_linear[1]
    grid, p = spec["side"] // spec["patch"], spec["patch"]
    out = out.reshape(x.shape[0], grid, grid, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], -1, grid * p, grid * p)


def sit_reference(state: dict, x, t, y, spec: dict):
    """The SiT/REPA forward on raw keys (float64): model(x, t, y) in the checkpoint's own time; learn-sigma
    channels dropped as SiT's forward does."""
    state = {k: v.double() for k, v in state.items()}
    x = x.double()
    p = spec["patch"]
    tokens = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2) + state["pos_embed"]
    temb = _timestep_sinusoid(t, state["t_embedder.mlp.0.weight"].shape[1])
    temb = F.silu(temb @ state["t_embedder.mlp.0.weight"].T + state["t_embedder.mlp.0.bias"])
    c = temb @ state["t_embedder.mlp.2.weight"].T + state["t_embedder.mlp.2.bias"] + \
        state["y_embedder.embedding_table.weight"][y]
    blocks = []
    for i in range(spec["depth"]):
        g = lambda name: state[f"blocks.{i}.{name}"]   # noqa: E731
        wq, wk, wv = g("attn.qkv.weight").chunk(3)
        bq, bk, bv = g("attn.qkv.bias").chunk(3)
        blocks.append({"ada_w": g("adaLN_modulation.1.weight"), "ada_b": g("adaLN_modulation.1.bias"),
                       "attn": (wq, bq, wk, bk, wv, bv, g("attn.proj.weight"), g("attn.proj.bias")),
                       "fc1_w": g("mlp.fc1.weight"), "fc1_b": g("mlp.fc1.bias"),
                       "fc2_w": g("mlp.fc2.weight"), "fc2_b": g("mlp.fc2.bias")})
    out = _run(x, c, tokens, blocks,
               (state["final_layer.adaLN_modulation.1.weight"], state["final_layer.adaLN_modulation.1.bias"]),
               (state["final_layer.linear.weight"], state["final_layer.linear.bias"]), spec, 1e-6)
    channels = spec["channels"]
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def authors_reference(state: dict, x, t, y, spec: dict):
    """The authors' DiTTransformer2DModelMod forward on raw keys (float64), in its own timestep units."""
    state = {k: v.double() for k, v in state.items()}
    x = x.double()
    p = spec["patch"]
    grid = spec["side"] // p
    tokens = F.conv2d(x, state["pos_embed.proj.weight"], state["pos_embed.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2) + torch.from_numpy(mae_position_table(spec["hidden"], grid))
    temb = _timestep_sinusoid(t, state["emb.timestep_embedder.linear_1.weight"].shape[1])
    temb = F.silu(temb @ state["emb.timestep_embedder.linear_1.weight"].T + state["emb.timestep_embedder.linear_1.bias"])
    c = temb @ state["emb.timestep_embedder.linear_2.weight"].T + state["emb.timestep_embedder.linear_2.bias"] + \
        state["emb.class_embedder.embedding_table.weight"][y]
    blocks = []
    for i in range(spec["depth"]):
        g = lambda name: state[f"transformer_blocks.{i}.{name}"]   # noqa: E731
        blocks.append({"ada_w": g("norm1.linear.weight"), "ada_b": g("norm1.linear.bias"),
                       "attn": (g("attn1.to_q.weight"), g("attn1.to_q.bias"), g("attn1.to_k.weight"),
                                g("attn1.to_k.bias"), g("attn1.to_v.weight"), g("attn1.to_v.bias"),
                                g("attn1.to_out.0.weight"), g("attn1.to_out.0.bias")),
                       "fc1_w": g("ff.net.0.proj.weight"), "fc1_b": g("ff.net.0.proj.bias"),
                       "fc2_w": g("ff.net.2.weight"), "fc2_b": g("ff.net.2.bias")})
    return _run(x, c, tokens, blocks, (state["proj_out_1.weight"], state["proj_out_1.bias"]),
                (state["proj_out_2.weight"], state["proj_out_2.bias"]), spec, 1e-5)


# ------------------------------------------------------------------------------------------------------- files

def write_files(out: Path, spec: dict = TINY) -> dict[str, Path]:
    """Every layout as the files users download: SiT's release (a plain state dict) and a SiT training
    checkpoint; a REPA training checkpoint; the authors' file (under state_dict). Returns name → path."""
    out.mkdir(parents=True, exist_ok=True)
    sit_table, repa_table = sit_shapes(**spec), sit_shapes(**spec, repa=True)
    args = argparse.Namespace(model="SiT-XL/2", image_size=spec["side"] * 8, num_classes=spec["classes"])
    files = {"sit_release": out / "SiT-tiny.pt", "sit_train": out / "0000100.pt", "repa_train": out / "repa.pt",
             "authors": out / "authors_teacher.pth"}
    torch.save(random_state(sit_table, 1, spec), files["sit_release"])
    torch.save({"model": random_state(sit_table, 2, spec), "ema": random_state(sit_table, 3, spec), "opt": {},
                "args": args}, files["sit_train"])
    torch.save({"model": random_state(repa_table, 4, spec), "ema": random_state(repa_table, 5, spec), "opt": {},
                "args": args, "steps": 100}, files["repa_train"])
    torch.save({"state_dict": random_state(authors_shapes(**spec), 6, spec)}, files["authors"])
    return files


if __name__ == "__main__":
    for name, path in write_files(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_checkpoints")).items():
        print(name, path)
