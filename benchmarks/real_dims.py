"""FLUX.2 [klein] 4B at its published transformer dimensions, random weights (no download): one π-ID training step
and one 4-step π-Flow sample, with the time and peak memory of each.

    python benchmarks/real_dims.py                                   # CPU, bf16, 256² (what fits this machine)
    python benchmarks/real_dims.py --device cuda --resolution 1024    # the same at 1024² on a GPU
    python benchmarks/real_dims.py --preset flux2-dev --num-layers 2 --num-single-layers 8 --device cuda \
        --resolution 1024                          # a block stack at FLUX.2 [dev]'s full width (6144, text 15360)

The transformer is `Flux2Transformer2DModel` with klein-4B's config (5 double + 20 single blocks, 24 heads × 128,
text width 7680 = 3 × 2560 stacked Qwen3-4B layers, mlp_ratio 3, no guidance embedding; 3.88 B parameters,
7.2 GiB in bf16), built on the meta device and filled in place with random bf16 weights (N(0, 1/fan_in) linears,
unit norms), so it never exists in float32. The text encoder is not loaded: the condition is a random
(1, --text-tokens, 7680) embedding in its place. The student is the GM student piflow trains (LoRA rank
--lora-rank on the feed-forward and timestep layers, K = 8 head, gradient checkpointing), the teacher the same
transformer with the LoRA disabled; the π-ID step is data-dependent π-ID on one latent (one student forward and
backward, `num_intermediate_states` teacher forwards), the sample 4 student evaluations of the π-Flow loop.
Peak memory: process peak RSS (CPU) or torch.cuda.max_memory_allocated (GPU). Writes a JSON summary (--out).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path

import torch

KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
# FLUX.2 [dev]'s transformer width (48 heads × 128 = 6144, Mistral-3 text width 15360, 8 double + 48 single blocks,
# embedded guidance); --num-layers / --num-single-layers cut the stack to fit a short check.
FLUX2_DEV = dict(KLEIN_4B, num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                 guidance_embeds=True)
PRESETS = {"klein-4b": KLEIN_4B, "flux2-dev": FLUX2_DEV}
GIB = 2 ** 30


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB      # Linux: KiB


@torch.no_grad()
def random_flux2(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**config)
    transformer = transformer.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in transformer.named_parameters():
        if param.dim() >= 2:
            param.normal_(0, 1 / math.sqrt(param.shape[1]), generator=generator)
        elif "norm" in name:
            param.fill_(1.0)
        else:
            param.zero_()
    for name, buffer in transformer.named_buffers():
        buffer.zero_()
    return transformer.eval().requires_grad_(False)


def main() -> None:
    from piflow import PiFlow
    from piflow.integrations.diffusers.students import (ARCHITECTURES, DiffusersPolicyStudent, DiffusersTeacher,
                                                        add_student_lora)
    from piflow.settings import PiIDSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="klein-4b", choices=sorted(PRESETS))
    parser.add_argument("--num-layers", type=int, default=None, help="double-stream blocks (default: the preset's)")
    parser.add_argument("--num-single-layers", type=int, default=None, help="single-stream blocks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = side / 8)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text embedding length (klein pads to 512)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/real_dims.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.bfloat16
    config = dict(PRESETS[args.preset])
    for key in ("num_layers", "num_single_layers"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    started = time.perf_counter()
    transformer = random_flux2(config, device, dtype)
    parameters = sum(p.numel() for p in transformer.parameters())
    build_s = time.perf_counter() - started
    add_student_lora(transformer, rank=args.lora_rank, target_modules=ARCHITECTURES["flux2"].lora_targets(transformer))
    transformer.enable_gradient_checkpointing()
    settings = PiIDSettings(policy="gmflow", nfe=4, shift=3.2, final_step_size_scale=0.5, num_intermediate_states=2,
                            window_substeps=3, policy_dropout=0.1)
    student = DiffusersPolicyStudent(transformer, "gmflow", num_components=8, latent_channels=32, logstd_hidden=256,
                                     share_transformer=True, architecture="flux2", settings=settings,
                                     generator=torch.Generator().manual_seed(0)).to(device)
    for module in (student.head, student.norm_out):      # trainable parts in float32, as the recipe does
        module.float()
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    teacher = DiffusersTeacher(transformer, "flux2")
    pf = PiFlow(student, teacher, settings)
    side = args.resolution // 8
    generator = torch.Generator(device=device).manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, args.text_tokens, config["joint_attention_dim"],
                                                 generator=generator, device=device, dtype=dtype)}
    if config["guidance_embeds"]:
        cond["guidance"] = torch.full((1,), 4.0, device=device)
    x0 = torch.randn(1, 32, side, side, generator=generator, device=device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    student.train()
    synchronize()
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype):       # mixed precision, as the recipe trains a bf16 base
        loss = pf(x0, cond, generator=torch.Generator(device=device).manual_seed(2))
    loss.backward()
    optimizer.step()
    synchronize()
    step_s = time.perf_counter() - started
    step_peak = peak_gib(device)
    student.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        latents = pf.sample(torch.randn(1, 32, side, side, generator=generator, device=device), nfe=4, cond=cond,
                            temperature="auto")
    synchronize()
    sample_s = time.perf_counter() - started
    result = {
        "model": {"klein-4b": "FLUX.2 [klein] 4B transformer", "flux2-dev": "FLUX.2 [dev]-width block stack"}[
            args.preset] + ", random bf16 weights", "preset": args.preset, "config": config,
        "parameters_B": parameters / 1e9, "trainable_M": trainable / 1e6, "lora_rank": args.lora_rank,
        "resolution": args.resolution, "image_tokens": (side // 2) ** 2, "text_tokens": args.text_tokens,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": "bfloat16", "build_s": build_s, "piid_step_s": step_s, "piid_step_loss": float(loss),
        "sample_4step_s": sample_s, "sample_finite": bool(torch.isfinite(latents).all()),
        "peak_memory_GiB_after_step": step_peak, "peak_memory_GiB_after_sample": peak_gib(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
