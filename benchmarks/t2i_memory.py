"""Parameter and model-state memory of LoRA π-Flow students at the real model dimensions (FLUX.1-dev, Qwen-Image,
SD3.5-Large), for one GPU (DDP: every GPU holds the whole base) and N GPUs (FSDP2: the frozen base is sharded).

    python benchmarks/t2i_memory.py [--rank 256] [--components 8] [--gpus 8]

Builds each transformer on the meta device (no weights, no memory, no download), adds the LoRA adapter and the GM
head exactly as training does, and counts distinct parameter tensors of teacher, student and its power EMA. Memory is
*computed* from those counts — bf16 base (2 B/param, sharded 1/N under FSDP) + fp32 trainable tensors with their
gradient, two AdamW moments and the EMA (20 B/param, replicated) — not measured; activations come on top and depend
on resolution, batch and gradient checkpointing.
"""
from __future__ import annotations

import argparse
import json

import torch

from piflow.integrations.diffusers.students import ARCHITECTURES, DiffusersPolicyStudent, add_student_lora
from piflow.train import PowerEMA

GIB = 2 ** 30


def build(architecture: str):
    import diffusers

    if architecture == "flux":     # FLUX.1-dev: 19 double + 38 single blocks, guidance embedding
        return diffusers.FluxTransformer2DModel(guidance_embeds=True), 16
    if architecture == "qwen":     # Qwen-Image: 60 MMDiT blocks
        return diffusers.QwenImageTransformer2DModel(), 16
    return diffusers.SD3Transformer2DModel(              # SD3.5-Large
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm"), 16


def distinct_numel(*modules) -> int:
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


def measure(architecture: str, rank: int, components: int, gpus: int) -> dict:
    with torch.device("meta"):
        transformer, channels = build(architecture)
        base = distinct_numel(transformer)
        add_student_lora(transformer, rank=rank, target_modules=ARCHITECTURES[architecture].lora_targets(transformer))
        student = DiffusersPolicyStudent(transformer, "gmflow", num_components=components, latent_channels=channels,
                                         share_transformer=True, architecture=architecture)
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
    parser.add_argument("--architectures", nargs="*", default=["flux", "qwen", "sd3"])
    args = parser.parse_args()
    rows = [measure(name, args.rank, args.components, args.gpus) for name in args.architectures]
    print("| model | base params | trainable (LoRA r=%d, GM K=%d, norm_out) | teacher+student+EMA | "
          "model state, 1 GPU | model state per GPU, FSDP×%d |" % (args.rank, args.components, args.gpus))
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['architecture']} | {row['base_params_B']:.2f} B | {row['trainable_params_M']:.1f} M | "
              f"{row['teacher_student_ema_params_B']:.2f} B = {row['ratio_to_base']:.2f}× base | "
              f"{row['model_state_GiB_1gpu_ddp']:.1f} GiB | {row[f'model_state_GiB_per_gpu_fsdp{args.gpus}']:.1f} GiB |")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
