"""Parameter and model-state memory of LoRA π-Flow students at the real model dimensions (FLUX.1-dev, Qwen-Image,
SD3.5-Large, FLUX.2 [dev] and [klein] 4B, Z-Image 6B; with --video Wan 2.1 1.3B / 14B and Wan 2.2 TI2V-5B), for one GPU
(DDP: every GPU holds the whole base) and N GPUs (FSDP2: the frozen base is sharded), and of the frozen base stored
quantized (FLUX.1-dev, Qwen-Image, FLUX.2 [klein] 4B).

    python benchmarks/t2i_memory.py [--rank 256] [--components 8] [--gpus 8] [--video]

Builds each transformer with its parameters on the meta device (no weights, no memory, no download), adds the LoRA
adapter and the GM
head exactly as training does, and counts distinct parameter tensors of teacher, student and its power EMA. Memory is
*computed* from those counts — bf16 base (2 B/param, sharded 1/N under FSDP) + fp32 trainable tensors with their
gradient, two AdamW moments and the EMA (20 B/param, replicated) — not measured; activations come on top and depend
on resolution, batch and gradient checkpointing.

Quantized rows (`--quantized`): every `nn.Linear` weight of the base stored as the backend stores it — TorchAO int8
weight-only 1 B/weight + a bf16 scale per output row; bitsandbytes NF4 0.5 B + an fp32 absmax per 64 weights;
GGUF Q8_0 34 B and Q4_0 18 B per block of 32 — and every other base parameter in bf16. FLUX.2 [klein] 4B: its
published transformer config (5 + 20 blocks, 24 heads × 128, text width 7680). Video activations (81 frames at
480×832 are 21 × 30 × 52 = 32,760 tokens per clip) dominate a Wan run and are not in these model-state figures.
"""
from __future__ import annotations

import argparse
import json

import torch

from piflow.integrations.diffusers.students import ARCHITECTURES, DiffusersPolicyStudent, add_student_lora
from piflow.train import PowerEMA

GIB = 2 ** 30


# published transformer configs (diffusers config.json of each checkpoint)
WAN = {"wan2.1-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
       "wan2.1-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
       "wan2.2-ti2v-5b": dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30,
                              in_channels=48, out_channels=48)}
ZIMAGE_6B = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                 n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560)


def build(architecture: str):
    """(transformer on the current (meta) device, latent channels, architecture) of a model name."""
    import diffusers

    if architecture == "flux":     # FLUX.1-dev: 19 double + 38 single blocks, guidance embedding
        return diffusers.FluxTransformer2DModel(guidance_embeds=True), 16, "flux"
    if architecture == "qwen":     # Qwen-Image (also -2512, -Edit, -Edit-2509/2511): 60 MMDiT blocks
        return diffusers.QwenImageTransformer2DModel(), 16, "qwen"
    if architecture == "flux2-klein-4b":
        return diffusers.Flux2Transformer2DModel(**KLEIN_4B), 32, "flux2"
    if architecture == "flux2-dev":  # FLUX.2 [dev]: 8 double + 48 single blocks, 48 heads × 128 (the class defaults)
        return diffusers.Flux2Transformer2DModel(), 32, "flux2"
    if architecture == "zimage-6b":
        return diffusers.ZImageTransformer2DModel(**ZIMAGE_6B), 16, "zimage"
    if architecture in WAN:
        config = WAN[architecture]
        return diffusers.WanTransformer3DModel(**config), config.get("in_channels", 16), "wan"
    return diffusers.SD3Transformer2DModel(              # SD3.5-Large
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm"), 16, "sd3"


KLEIN_4B = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, mlp_ratio=3.0, guidance_embeds=False)
# bytes per weight of a quantized nn.Linear: (per weight, per output row)
STORAGE = {"bf16": (2.0, 0.0), "torchao-int8": (1.0, 2.0), "bnb-nf4": (0.5 + 4 / 64, 0.0),
           "gguf-Q8_0": (34 / 32, 0.0), "gguf-Q4_0": (18 / 32, 0.0)}


def base_storage_gib(transformer: torch.nn.Module, storage: str) -> float:
    per_weight, per_row = STORAGE[storage]
    linear = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    linear_ids = {id(m.weight) for m in linear}
    other = sum(p.numel() for p in transformer.parameters() if id(p) not in linear_ids)
    weights = sum(m.weight.numel() for m in linear)
    rows = sum(m.out_features for m in linear)
    return (per_weight * weights + per_row * rows + 2.0 * other) / GIB


def quantized_rows(rank: int, components: int) -> list[dict]:
    rows = []
    for name in ("flux", "qwen", "flux2-klein-4b"):
        with empty_weights(name):
            transformer, channels, architecture = build(name)
            row = {"model": name, "base_params_B": distinct_numel(transformer) / 1e9,
                   **{f"base_GiB_{s}": base_storage_gib(transformer, s) for s in STORAGE}}
            add_student_lora(transformer, rank=rank,
                             target_modules=ARCHITECTURES[architecture].lora_targets(transformer))
            student = DiffusersPolicyStudent(transformer, "gmflow", num_components=components,
                                             latent_channels=channels, share_transformer=True,
                                             architecture=architecture)
            trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
            row.update(trainable_params_M=trainable / 1e6, trainable_state_GiB=20 * trainable / GIB)
        rows.append(row)
    return rows


def empty_weights(name: str):
    """Everything on the meta device (no memory); for Wan, whose rotary tables call .item() while being built,
    parameters only (accelerate's init_empty_weights), the small buffers computed for real."""
    if name not in WAN:
        return torch.device("meta")
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def distinct_numel(*modules) -> int:
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


def measure(architecture: str, rank: int, components: int, gpus: int) -> dict:
    with empty_weights(architecture):
        transformer, channels, kind = build(architecture)
        base = distinct_numel(transformer)
        add_student_lora(transformer, rank=rank, target_modules=ARCHITECTURES[kind].lora_targets(transformer))
        student = DiffusersPolicyStudent(transformer, "gmflow", num_components=components, latent_channels=channels,
                                         share_transformer=True, architecture=kind)
        ema = PowerEMA(student)
        total = distinct_numel(transformer, student, ema.model)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    replicated = 20 * trainable / GIB
    return {"architecture": architecture, "base_params_B": base / 1e9, "trainable_params_M": trainable / 1e6,
            "teacher_student_ema_params_B": total / 1e9, "ratio_to_base": total / base,
            "model_state_GiB_1gpu_ddp": 2 * base / GIB + replicated,
            f"model_state_GiB_per_gpu_fsdp{gpus}": 2 * base / GIB / gpus + replicated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--architectures", nargs="*", default=["flux", "qwen", "sd3", "flux2-dev", "flux2-klein-4b",
                                                               "zimage-6b"],
                        help="models (also wan2.1-1.3b, wan2.1-14b, wan2.2-ti2v-5b: the video table is --video)")
    parser.add_argument("--video", action="store_true", help="the Wan rows (text-to-video students) instead")
    parser.add_argument("--quantized", action="store_true", help="also the quantized-base rows")
    args = parser.parse_args()
    names = list(WAN) if args.video else args.architectures
    rows = [measure(name, args.rank, args.components, args.gpus) for name in names]
    print("| model | base params | trainable (LoRA r=%d, GM K=%d, norm_out) | teacher+student+EMA | "
          "model state, 1 GPU | model state per GPU, FSDP×%d |" % (args.rank, args.components, args.gpus))
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['architecture']} | {row['base_params_B']:.2f} B | {row['trainable_params_M']:.1f} M | "
              f"{row['teacher_student_ema_params_B']:.2f} B = {row['ratio_to_base']:.2f}× base | "
              f"{row['model_state_GiB_1gpu_ddp']:.1f} GiB | "
              f"{row[f'model_state_GiB_per_gpu_fsdp{args.gpus}']:.1f} GiB |")
    if args.quantized:
        quantized = quantized_rows(args.rank, args.components)
        print("\n| model | base bf16 | TorchAO int8 | bnb NF4 | GGUF Q8_0 | GGUF Q4_0 | trainable state (fp32 + grad + "
              "AdamW + EMA) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in quantized:
            trainable = f"{row['trainable_state_GiB']:.1f} GiB ({row['trainable_params_M']:.0f} M)"
            print(f"| {row['model']} | " + " | ".join(f"{row[f'base_GiB_{s}']:.1f} GiB" for s in STORAGE)
                  + f" | {trainable} |")
        rows = {"students": rows, "quantized_bases": quantized}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
