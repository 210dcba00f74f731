"""A π-ID training step vs the cost of its networks alone, timed in one process with interleaved repeats.

    python benchmarks/piid_step.py [--models DiT-B/2 DiT-S/2] [--components 8 32] [--batch 4] [--repeats 5]
    python benchmarks/piid_step.py --device cuda --dtype bfloat16 --models DiT-B/2 --components 32 --batch 64 256

For each backbone (a class-conditional DiT on 4×32×32 latents, random weights) and GM size K:
* **full step**: data-dependent π-ID (`PiFlow(student, teacher)(x0, labels)` + backward) with the text-to-image
  settings of algorithm.md §4.7 (4 NFE, f = 0.5, shift 3.2, M = 4 intermediate states, micro-window 3, GM dropout
  0.1, 128 substeps per unit time);
* **network only**: the same batch through the student once with backward (loss = sum of its outputs) and the
  teacher M = 4 times without grad — the networks a π-ID step cannot avoid.
The two sides alternate within each repeat (same machine load); the script prints medians, min–max spreads, the
non-network overhead (full − network) as a share of the full step, and (``--memory``) each side's peak RSS measured
in its own subprocess (Linux VmHWM of one step after a warm-up step, the high-water mark reset just before it). With
``--profile`` it also writes the top operators of one full step (torch.profiler, self CPU time). On CUDA the peak
memory of each side is torch.cuda.max_memory_allocated over one step (after a warm-up step), in the same process;
``--dtype bfloat16`` runs both sides under bf16 autocast (float32 master weights), as the recipes train.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from piflow import PiFlow, PiIDSettings
from piflow.models import DiT
from piflow.models.students import PolicyStudent
from piflow.teachers import NetworkTeacher
from timing import interleaved_seconds

SETTINGS = dict(policy="gmflow", nfe=4, final_step_size_scale=0.5, shift=3.2, num_intermediate_states=4,
                window_substeps=3, policy_dropout=0.1, total_substeps=128)


def build(model_name: str, components: int, batch: int, seed: int = 0, device: str = "cpu", dtype: str = "float32"):
    torch.manual_seed(seed)
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    teacher_model = DiT.from_preset(model_name, in_channels=4, input_size=32, num_classes=10).eval()
    with torch.no_grad():                      # DiT zero-initialises its output layer: make the teacher informative
        teacher_model.proj_out.weight.normal_(0, 0.02)
    teacher_model.requires_grad_(False)
    student = PolicyStudent(teacher_model, "gmflow", num_components=components, logstd_hidden=256,
                            generator=torch.Generator().manual_seed(seed)).train()
    teacher_model.to(device)
    student.to(device)
    pf = PiFlow(student, NetworkTeacher(teacher_model), PiIDSettings(**SETTINGS))
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(batch, 4, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    sigma = torch.rand(batch, generator=gen).clamp(min=0.05)
    x_src = (1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    x0, labels, sigma, x_src = (t.to(device) for t in (x0, labels, sigma, x_src))
    teacher = NetworkTeacher(teacher_model)

    def full():
        student.zero_grad(set_to_none=True)
        with autocast:
            loss = pf(x0, labels, generator=torch.Generator(device).manual_seed(2))
        loss.backward()

    def network():
        student.zero_grad(set_to_none=True)
        with autocast:
            out = student(x_src, sigma, labels)
            total = sum(value.float().sum() for value in out.values())
        total.backward()
        with autocast, torch.no_grad():
            for _ in range(SETTINGS["num_intermediate_states"]):
                teacher(x_src, sigma, labels)

    return {"full step": full, "network only": network}, student


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_of(model_name: str, components: int, batch: int, side: str) -> dict:
    """Peak RSS (VmHWM) of one step of `side` in this fresh process, after one untimed warm-up step; the
    high-water mark is reset (``/proc/self/clear_refs``) just before the measured step."""
    sides, _ = build(model_name, components, batch)
    sides[side]()                                                    # warm-up: allocator pools, autograd graph
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:               # reset VmHWM to the current RSS
        handle.write("5")
    sides[side]()
    peak = _status_kib("VmHWM")
    return {"step_peak_rss_GiB": peak / 2 ** 20, "rss_before_step_GiB": before / 2 ** 20,
            "step_peak_above_start_GiB": max(peak - before, 0) / 2 ** 20}


def measure(args, model_name: str, components: int, batch: int, device: torch.device, sync) -> dict:
    sides, student = build(model_name, components, batch, device=args.device, dtype=args.dtype)
    times = interleaved_seconds(sides, args.repeats, warmup=1, sync=sync)
    full, network = (statistics.median(times[k]) for k in ("full step", "network only"))
    per_repeat = [(f - n) / f for f, n in zip(times["full step"], times["network only"])]
    row = {"model": model_name, "K": components, "batch": batch, "device": str(device), "dtype": args.dtype,
           "params_M": sum(p.numel() for p in student.parameters()) / 1e6,
           "full_step_median_s": full, "full_step_spread_s": [min(times["full step"]), max(times["full step"])],
           "network_only_median_s": network, "network_only_spread_s": [min(times["network only"]),
                                                                         max(times["network only"])],
           "overhead_share_of_step": (full - network) / full,
           "overhead_share_per_repeat_spread": [min(per_repeat), max(per_repeat)]}
    if device.type == "cuda":
        for side, fn in sides.items():
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync()
            row[f"memory {side}"] = {"step_peak_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2 ** 30}
        row["peak_memory_full_over_network"] = (row["memory full step"]["step_peak_allocated_GiB"]
                                                / row["memory network only"]["step_peak_allocated_GiB"])
    elif args.memory:
        for side in sides:
            out = subprocess.run([sys.executable, __file__, "--memory-of", model_name, str(components), str(batch),
                                  side] + (["--threads", str(args.threads)] if args.threads else []),
                                 capture_output=True, text=True, check=True)
            row[f"memory {side}"] = json.loads(out.stdout.strip().splitlines()[-1])
    if args.profile and model_name == args.models[0] and components == args.components[-1]:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            sides["full step"]()
            sync()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=20)
        Path(args.profile).write_text(f"{model_name}, K = {components}, batch {batch}: one full "
                                      f"π-ID step, top operators by {sort}\n\n{table}\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-B/2", "DiT-S/2"])
    parser.add_argument("--components", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--memory", action="store_true", help="also each side's peak RSS (one subprocess per side)")
    parser.add_argument("--profile", default=None, help="write the top operators of one full step here (.txt)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-of", nargs=4, default=None, help=argparse.SUPPRESS)   # model K batch side
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        model_name, components, batch, side = args.memory_of
        print(json.dumps(memory_of(model_name, int(components), int(batch), side)))
        return
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for model_name in args.models:
        for components in args.components:
            for batch in args.batch:
                rows.append(measure(args, model_name, components, batch, device, sync))
                print(json.dumps(rows[-1]), flush=True)
    result = {"settings": SETTINGS, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
