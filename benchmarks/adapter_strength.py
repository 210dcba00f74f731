"""How the LoRA `strength` of a π-Flow adapter moves a few-step student's samples relative to its teacher — what a
"weak" adapter means, measured on a tiny FLUX.1 pipeline (random weights, CPU, seconds to minutes).

    python benchmarks/adapter_strength.py --json benchmarks/results/adapter_strength_<date>.json

1. A tiny random FLUX.1 pipeline (`piflow.integrations.diffusers.tiny`) is saved; `piflow distill` trains a GM
   student (K = 4, LoRA rank 16, data-free π-ID, 4 NFE, ``--iters`` iterations) on a prompt file; `piflow export`
   writes its adapter.
2. The teacher's reference: the stock `FluxPipeline` with 64 Euler steps (its own scheduler) from the same noise,
   as latents.
3. For each strength s, `PiFluxPipeline.load_piflow_adapter(adapter, strength=s)` samples the same prompts and noise
   at 4 NFE. Reported per strength: the RMS distance of the 4-NFE latents to the teacher's 64-step latents, relative
   to that of the teacher's own 4-step Euler (the stock pipeline with 4 steps), and the RMS distance to the samples
   at strength 1.

Strength scales the LoRA update only; the policy head and the student's final norm are always the trained ones, so
strength 0 is the base network's features read by the trained head — not the teacher.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue bird on a wire", "a lighthouse at dusk", "two green apples", "a snowy mountain",
           "a yellow taxi", "an old wooden boat", "a bowl of soup"]


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().mean().sqrt())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--strengths", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    import diffusers

    from piflow.cli import main as cli
    from piflow.integrations.diffusers.pipelines import pipeline_class
    from piflow.integrations.diffusers.students import pack_latents, unpack_tokens
    from piflow.integrations.diffusers.tiny import tiny_pipeline

    size, latent = 32, 16
    work = Path(tempfile.mkdtemp(prefix="adapter_strength_"))
    base = work / "tiny-flux"
    tiny_pipeline("flux").save_pretrained(base)
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    start = time.perf_counter()
    assert cli(["distill", "--run-dir", str(work / "run"), f"pipeline={base}", f"resolution=[{size},{size}]",
                f"prompts={work / 'prompts.txt'}", "student.lora_rank=16", "student.lora_alpha=16",
                "student.logstd_hidden=32", "student.num_components=4", "distill.batch_size=4",
                "distill.total_substeps=32", "train.warmup_iters=20", "train.progress=false", "eval.nfe=[4]",
                f"train.iters={args.iters}", "train.lr=1e-3", "train.checkpoint_every=0", "max_sequence_length=32"]) == 0
    train_seconds = time.perf_counter() - start
    assert cli(["export", "--run-dir", str(work / "run"), "--out", str(work / "adapter"), "--no-card"]) == 0

    stock = diffusers.FluxPipeline.from_pretrained(base)
    stock.set_progress_bar_config(disable=True)
    channels = stock.transformer.config.in_channels // 4
    noise = torch.randn(len(PROMPTS), channels, latent, latent, generator=torch.Generator().manual_seed(1234))

    def teacher(steps: int) -> torch.Tensor:
        packed = stock(prompt=PROMPTS, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                       latents=pack_latents(noise), output_type="latent", max_sequence_length=32).images
        return unpack_tokens(packed, latent, latent)

    with torch.no_grad():
        reference, euler4 = teacher(64), teacher(4)
    euler4_distance = _rms(euler4, reference)
    rows, samples = [], {}
    for strength in args.strengths:
        pipe = pipeline_class("flux").from_pretrained(base)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_piflow_adapter(work / "adapter", strength=strength)
        with torch.no_grad():
            samples[strength] = pipe(prompt=PROMPTS, height=size, width=size, num_inference_steps=4, latents=noise,
                                     output_type="latent", max_sequence_length=32).images
    for strength in args.strengths:
        distance = _rms(samples[strength], reference)
        rows.append({"strength": strength, "rms_to_teacher_64": distance,
                     "relative_to_teacher_euler4": distance / euler4_distance,
                     "rms_to_strength_1": _rms(samples[strength], samples[1.0]) if 1.0 in samples else None})
    result = {"benchmark": "adapter_strength", "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "iters": args.iters, "train_seconds": train_seconds,
              "teacher_euler4_rms_to_teacher_64": euler4_distance,
              "latent_rms": float(reference.float().square().mean().sqrt()), "rows": rows,
              "median_relative": statistics.median(r["relative_to_teacher_euler4"] for r in rows)}
    print("| strength | RMS to teacher (64 Euler) | ÷ teacher's own 4-step Euler | RMS to strength 1 |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['strength']:.2f} | {r['rms_to_teacher_64']:.4f} | {r['relative_to_teacher_euler4']:.2f} | "
              f"{r['rms_to_strength_1']:.4f} |")
    print(f"teacher 4-step Euler: RMS {euler4_distance:.4f} to its 64-step output (latent RMS "
          f"{result['latent_rms']:.3f}); distillation {train_seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
