"""The paper's ImageNet-256 student at its real width: one π-ID training step and one 1-NFE sample of a SiT-XL/2
(DiT-XL/2 architecture) GM student, measured here, and a FLOP-based GPU-hours estimate of the paper's runs.

    python benchmarks/imagenet_xl.py --dtype float32 bfloat16 --json benchmarks/results/imagenet_xl_cpu_<date>.json
    python benchmarks/imagenet_xl.py --device cuda --dtype bfloat16 --batch 64 --json <folder>/imagenet_xl_b64.json
    python benchmarks/imagenet_xl.py --quick --json /tmp/x.json          # tiny DiT, batch 1: seconds (the test)

Setup (random weights; the timing does not depend on them): teacher = `DiT.from_preset("DiT-XL/2", in_channels=4,
input_size=32, num_classes=1000)` (28 blocks, hidden 1152, 16 heads, patch 2, learn_sigma off: 675M parameters,
256 tokens per 4×32×32 latent) with interval CFG (scale 3.2 on σ ∈ [0, 0.7], null class 1000, batched: every
teacher call runs 2·B samples); student = `PolicyStudent` with a K = 32 GM head and a 1024-wide log-std MLP;
π-ID settings = `PiIDSettings(nfe=1)` (the defaults otherwise: M = 2 intermediate states, local velocity, GM dropout
0.05, loss scale 3, 128 substeps per unit time, shift 1). A training step is loss forward (student, detached
rollouts, teacher calls), backward, gradient-norm clipping at 50 and an AdamW step (β = (0.9, 0.95), no weight
decay) on every student parameter, fp32 states; the power EMA of the real runs is *not* included (another full
copy of the student). ``--dtype bfloat16`` runs the student and teacher under bf16 autocast (fp32 master weights)
with the teacher stored in bf16, as the paper trains; float32 runs both in fp32.

Measured per dtype (each dtype of a CPU run in its own subprocess, so that its memory is its own), at batch B:
(c) one teacher forward (no CFG), (b) one 1-NFE sample (`PiFlow.sample`: student forward + a 128-substep GM
rollout), (a) one π-ID training step.
* Stage by stage: ``--warmup`` untimed calls (the step's first one under the FLOP counter, with the plain-PyTorch
  rollout), then one call for the memory peak. Then ``--repeats`` timed repeats, the three stages in turn within each
  repeat (so that all see the same load on a shared machine), each repeat after a short GEMM probe that gauges the
  machine's matmul rate at that moment: median and min–max per stage. The step's time is split into student forward,
  teacher calls, detached rollouts, backward, optimizer (clip + AdamW) and the rest (policy construction, the loss);
  the sample's into student forward and rollout.
* Memory on the CPU: resident set size from the kernel — the peak of the memory call (VmHWM of /proc/self/status, the
  high-water mark reset through /proc/self/clear_refs just before it) and the process-lifetime peak
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); on CUDA ``torch.cuda.max_memory_allocated`` of the memory call.
* FLOPs (2 per multiply-add): an analytic count of the DiT forward (`dit_forward_flops`), checked against
  ``torch.utils.flop_counter.FlopCounterMode`` on one teacher forward and on the first warm-up step (SDPA on the
  CPU is not in torch's registry; its formula is added here); achieved GFLOP/s = FLOPs / time (median; fastest).

`estimate_gpu_hours` turns the per-image forward FLOPs into GPU-hours of the paper's runs (batch 4096, 140K
iterations for 1 NFE, 24K for 2 NFE, 8 GPUs) under a stated utilisation of the GPU's dense bf16 peak. It is an
estimate from FLOPs, not a measurement: CPU times do not scale to a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import piflow.piid
import piflow.sampling
from piflow import PiFlow, PiIDSettings
from piflow.models import DiT, DiTConfig
from piflow.models.students import PolicyStudent
from piflow.policies.gmflow import fused_rollout
from piflow.teachers import ClassifierFreeGuidance, NetworkTeacher

GIB = 2 ** 30
NUM_CLASSES = 1000                      # the null class is index 1000
GUIDANCE = {"scale": 3.2, "interval": (0.0, 0.7)}
COMPONENTS, LOGSTD_HIDDEN = 32, 1024
OPTIMIZER = {"lr": 5e-5, "betas": (0.9, 0.95), "weight_decay": 0.0, "grad_clip": 50.0}
SETTINGS = PiIDSettings(nfe=1)          # the ImageNet defaults otherwise (M = 2, w = 0, dropout 0.05, 128 substeps)
QUICK_MODEL = dict(hidden_size=64, depth=2, num_heads=2, input_size=8)
QUICK_K, QUICK_LOGSTD_HIDDEN = 8, 64

# the paper's ImageNet runs (algorithm.md §4.7) and GPU peaks (NVIDIA data sheets, dense bf16 tensor-core FLOP/s)
PAPER_RUNS = {"1-NFE": {"batch": 4096, "iterations": 140_000}, "2-NFE": {"batch": 4096, "iterations": 24_000}}
PAPER_GPUS = 8
H100_BF16_DENSE_FLOPS = 989e12          # H100 SXM
A100_BF16_DENSE_FLOPS = 312e12
DEFAULT_UTILIZATION = 0.40
DIT_PAPER_XL2_GFLOPS = 118.6            # the DiT paper's "Gflops" of XL/2 at 256² (a multiply-add count, see markdown)


# ------------------------------------------------------------------------------------------------- FLOP counts

def dit_forward_flops(config: DiTConfig, head_outputs_per_token: Optional[int] = None,
                      logstd_hidden: Optional[int] = None) -> dict:
    """Forward FLOPs of one image through a DiT (2 FLOPs per multiply-add; matmuls and attention only — norms,
    activations, softmax and the GM policy math are elementwise and left out).

    Per token: patch embedding, per block qkv (3d²) + attention output (d²) + MLP (2·d·r·d), and the output
    projection (``head_outputs_per_token`` outputs instead of p²·C_out for a policy head). Attention: per block
    2·L²·d multiply-adds (QKᵀ and PV over all heads). Per image (not per token): the timestep MLP, every block's
    adaLN modulation (6d²) and the final one (2d²), and a GM head's log-std MLP (``logstd_hidden``).
    ``naive_2_params_tokens`` is the 2·params·tokens rule, which over-counts a DiT: about a third of its parameters
    are adaLN weights, applied once per image.
    """
    d, depth, tokens = config.hidden_size, config.depth, config.num_tokens
    inner = int(d * config.mlp_ratio)
    patch_in = config.patch_size ** 2 * config.in_channels
    out = config.patch_size ** 2 * config.out_channels if head_outputs_per_token is None else head_outputs_per_token
    per_token = patch_in * d + depth * (4 * d * d + 2 * d * inner) + d * out
    attention = depth * 2 * tokens * tokens * d
    per_image = config.frequency_embedding_size * d + d * d + depth * 6 * d * d + 2 * d * d
    if logstd_hidden:
        per_image += d * logstd_hidden + logstd_hidden
    macs = tokens * per_token + attention + per_image
    return {"total": 2 * macs, "token_matmuls": 2 * tokens * per_token, "attention": 2 * attention,
            "per_image_matmuls": 2 * per_image, "multiply_adds": macs, "tokens": tokens}


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and PV of the CPU flash-attention kernel: 2·2·B·H·Lq·Lk·D."""
    batch, heads, length_q, dim = query_shape
    return 4 * batch * heads * length_q * key_shape[-2] * dim


def _sdpa_cpu_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """dV, dP, dQ, dK: twice the forward."""
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


def flop_counter():
    """A FlopCounterMode that also counts the CPU SDPA kernel (absent from torch's registry)."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    custom = {}
    aten = torch.ops.aten
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops)):
        packet = getattr(aten, name, None)
        if packet is not None and packet not in flop_registry:
            custom[packet] = fn
    return FlopCounterMode(display=False, custom_mapping=custom)


def estimate_gpu_hours(forward_flops: float, batch_size: int, iterations: int, *,
                       student_forward_flops: Optional[float] = None, teacher_calls: int = 2, cfg_factor: int = 2,
                       backward_factor: float = 2.0, recompute: bool = True,
                       peak_flops: float = H100_BF16_DENSE_FLOPS, utilization: float = DEFAULT_UTILIZATION,
                       num_gpus: int = PAPER_GPUS) -> dict:
    """GPU-hours of a π-ID run from network FLOPs alone (an estimate, not a measurement).

    Per training sample: the student's forward (``student_forward_flops``, default ``forward_flops``), its backward
    (``backward_factor`` × forward) and, with per-block gradient checkpointing (``recompute``, the paper's setting),
    one more forward; plus ``teacher_calls`` (= M intermediate states) teacher forwards, each ``cfg_factor`` × for
    batched CFG. Times batch × iterations, divided by ``utilization`` × ``peak_flops`` (achieved FLOP/s of the
    executed FLOPs, recomputation included). Policy rollouts, the optimizer, the EMA and data loading are left out
    (elementwise or per-parameter work, small next to ~2 s of matmuls per step at the paper's per-GPU batch).
    """
    student = forward_flops if student_forward_flops is None else student_forward_flops
    student_passes = 1.0 + backward_factor + (1.0 if recompute else 0.0)
    per_sample = student * student_passes + teacher_calls * cfg_factor * forward_flops
    per_iteration = per_sample * batch_size
    total = per_iteration * iterations
    gpu_seconds = total / (utilization * peak_flops)
    return {"forward_flops": forward_flops, "student_forward_flops": student, "student_passes": student_passes,
            "teacher_forwards_per_sample": teacher_calls * cfg_factor, "flops_per_sample": per_sample,
            "flops_per_iteration": per_iteration, "total_flops": total, "batch_size": batch_size,
            "iterations": iterations, "peak_flops": peak_flops, "utilization": utilization,
            "achieved_flops_per_gpu": utilization * peak_flops, "gpu_hours": gpu_seconds / 3600,
            "num_gpus": num_gpus, "wall_hours": gpu_seconds / 3600 / num_gpus,
            "seconds_per_iteration": gpu_seconds / iterations / num_gpus}


def paper_estimates(teacher_flops: float, student_flops: float) -> dict:
    """The main estimate (H100, 40 % utilisation, checkpointing on) for both paper runs, and its sensitivity."""
    out: dict[str, Any] = {"assumptions": {
        "gpu": "H100 SXM, 989 TFLOP/s dense bf16", "utilization_of_peak": DEFAULT_UTILIZATION,
        "utilization_applies_to": "executed FLOPs (gradient-checkpointing recomputation included)",
        "student_passes": "forward + backward (2× forward) + 1 recomputed forward (per-block checkpointing)",
        "teacher": f"{SETTINGS.num_intermediate_states} calls per sample × 2 (batched CFG: both branches always)",
        "not_counted": "GM rollouts, policy math, AdamW, EMA, gradient all-reduce, data loading",
        "gpus": PAPER_GPUS}, "runs": {}, "sensitivity": []}
    for name, run in PAPER_RUNS.items():
        out["runs"][name] = estimate_gpu_hours(teacher_flops, run["batch"], run["iterations"],
                                               student_forward_flops=student_flops,
                                               teacher_calls=SETTINGS.num_intermediate_states)
    for gpu, peak in (("H100", H100_BF16_DENSE_FLOPS), ("A100", A100_BF16_DENSE_FLOPS)):
        for utilization in (0.3, 0.4, 0.5):
            for recompute in (True, False):
                row = {"gpu": gpu, "utilization": utilization, "recompute": recompute}
                for name, run in PAPER_RUNS.items():
                    row[f"{name} GPU-hours"] = estimate_gpu_hours(
                        teacher_flops, run["batch"], run["iterations"], student_forward_flops=student_flops,
                        teacher_calls=SETTINGS.num_intermediate_states, peak_flops=peak,
                        utilization=utilization, recompute=recompute)["gpu_hours"]
                out["sensitivity"].append(row)
    return out


# ------------------------------------------------------------------------------------------------- machine, memory

def machine_info(device: torch.device) -> dict:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "logical_cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
        info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), None)
        flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as handle:
            total = next(l for l in handle if l.startswith("MemTotal:"))
        info["memory_total_GiB"] = int(total.split()[1]) / 2 ** 20
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = props.total_memory / GIB
        info["cuda"] = torch.version.cuda
    return info


def _status_kib(field: str) -> Optional[int]:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    return None


def _ru_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20          # KiB on Linux


class PeakMemory:
    """Peak memory of one stage: on CUDA max_memory_allocated, on the CPU the RSS high-water mark (VmHWM) after a
    reset through /proc/self/clear_refs; where that reset is refused, ru_maxrss (then the process peak so far)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ("torch.cuda.max_memory_allocated (reset_peak_memory_stats before the timed calls)"
                       if device.type == "cuda" else "VmHWM after /proc/self/clear_refs reset")
        self.before = 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / GIB
            return
        self.before = (_status_kib("VmRSS") or 0) / 2 ** 20
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.method = "ru_maxrss (VmHWM reset refused: process peak so far)"

    def read(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / GIB
            return {"peak_allocated_GiB": peak, "allocated_before_GiB": self.before,
                    "peak_above_before_GiB": peak - self.before,
                    "reserved_GiB": torch.cuda.memory_reserved(self.device) / GIB}
        hwm = _status_kib("VmHWM")
        peak = hwm / 2 ** 20 if hwm is not None and self.method.startswith("VmHWM") else _ru_maxrss_gib()
        return {"peak_rss_GiB": peak, "rss_before_GiB": self.before,
                "peak_above_before_GiB": max(peak - self.before, 0)}


# ------------------------------------------------------------------------------------------------- timing helpers

class Split:
    """Accumulated wall time per label of wrapped calls (device-synchronised around each)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[label] += time.perf_counter() - start
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


class TimedModule(torch.nn.Module):
    """`module` with its calls timed under `label` (parameters stay the module's own)."""

    def __init__(self, module: torch.nn.Module, split: Split, label: str):
        super().__init__()
        self.inner = module
        self._call = split.wrap(label, module)

    def forward(self, *args, **kwargs):
        return self._call(*args, **kwargs)


@contextlib.contextmanager
def patched(module, name: str, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def gemm_probe(device: torch.device, dtype: str, sync: Callable[[], None], repeats: int = 5,
               shape: tuple[int, int, int] = (1024, 1152, 4608)) -> dict:
    """The machine's matmul rate right now: one MLP-shaped GEMM (default 1024 tokens × 1152 → 4608, as in XL/2 at
    batch 4), fastest of `repeats`, in `dtype` — a ceiling to read the achieved GFLOP/s against, and a gauge of
    contention."""
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows, inner, cols = shape
    a = torch.randn(rows, inner, generator=gen).to(device, torch_dtype)
    b = torch.randn(inner, cols, generator=gen).to(device, torch_dtype)
    flops = 2 * rows * inner * cols
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    times = times[1:]
    return {"flops": flops, "best_GFLOPs_per_s": flops / min(times) / 1e9,
            "median_GFLOPs_per_s": flops / statistics.median(times) / 1e9}


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


# ------------------------------------------------------------------------------------------------- the measurement

def model_config(quick: bool) -> DiTConfig:
    if quick:
        return DiTConfig.from_preset("DiT-T/2", in_channels=4, num_classes=NUM_CLASSES, learn_sigma=False,
                                     **QUICK_MODEL)
    return DiTConfig.from_preset("DiT-XL/2", in_channels=4, input_size=32, num_classes=NUM_CLASSES,
                                 learn_sigma=False)


def build(config: DiTConfig, quick: bool, device: torch.device, dtype: str, checkpointing: bool, seed: int = 0):
    torch.manual_seed(seed)
    teacher_model = DiT(config).eval()
    with torch.no_grad():                  # DiT zero-initialises its output layer: make the teacher informative
        teacher_model.proj_out.weight.normal_(0, 0.02)
    teacher_model.requires_grad_(False)
    student = PolicyStudent(teacher_model, "gmflow", num_components=QUICK_K if quick else COMPONENTS,
                            logstd_hidden=QUICK_LOGSTD_HIDDEN if quick else LOGSTD_HIDDEN,
                            generator=torch.Generator().manual_seed(seed)).train()
    student.backbone.gradient_checkpointing = checkpointing
    if dtype == "bfloat16":                # the paper's teacher runs in pure bf16 (student: fp32 master weights)
        teacher_model.to(torch.bfloat16)
    teacher_model.to(device)
    student.to(device)
    return teacher_model, student


def measure(args, dtype: str, progress: Callable[[dict], None] = lambda row: None) -> dict:
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    memory = PeakMemory(device)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    row: dict[str, Any] = {"dtype": dtype, "device": str(device), "batch": args.batch, "repeats": args.repeats,
                           "warmup": warmup, "gradient_checkpointing": args.checkpointing,
                           "memory_method": memory.method}
    rss_start = (_status_kib("VmRSS") or 0) / 2 ** 20
    if hasattr(os, "getloadavg"):
        row["loadavg_1_5_15_at_start"] = list(os.getloadavg())
    probe_shape = (64, 64, 256) if args.quick else (1024, 1152, 4608)
    row["gemm_probe_at_start"] = gemm_probe(device, dtype, sync, shape=probe_shape)
    start = time.perf_counter()
    config = model_config(args.quick)
    teacher_model, student = build(config, args.quick, device, dtype, args.checkpointing)
    row["build_s"] = time.perf_counter() - start
    row["params"] = {"teacher": sum(p.numel() for p in teacher_model.parameters()),
                     "student": sum(p.numel() for p in student.parameters()),
                     "student_trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
                     "student_head": sum(p.numel() for p in student.head.parameters())}
    if device.type == "cpu":
        row["rss_after_build_GiB"] = (_status_kib("VmRSS") or 0) / 2 ** 20
        row["rss_at_start_GiB"] = rss_start

    split = Split(sync)
    teacher = ClassifierFreeGuidance(NetworkTeacher(teacher_model), GUIDANCE["scale"], NUM_CLASSES,
                                     GUIDANCE["interval"])
    pf = PiFlow(TimedModule(student, split, "student forward"), split.wrap("teacher calls (CFG)", teacher),
                SETTINGS)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=OPTIMIZER["lr"], betas=OPTIMIZER["betas"],
                                  weight_decay=OPTIMIZER["weight_decay"])
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, config.in_channels, *config.input_size)
    x0 = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(device)
    sigma = torch.rand(args.batch, generator=gen).clamp(min=0.05).to(device)
    x_t = ((1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * noise)

    def teacher_forward():
        with torch.no_grad(), autocast:
            teacher_model(x_t, sigma * 1000, labels)

    def sample():
        with autocast:
            pf.sample(noise, nfe=1, cond=labels)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = pf(x0, labels, generator=torch.Generator(device).manual_seed(2))
        split.wrap("backward", loss.backward)()

        def optimize():
            torch.nn.utils.clip_grad_norm_(params, OPTIMIZER["grad_clip"])
            optimizer.step()
        split.wrap("optimizer (clip + AdamW)", optimize)()
        return loss

    # analytic and counted forward FLOPs
    head_out = student.head.proj_means.out_features + student.head.proj_logweights.out_features
    analytic_teacher = dit_forward_flops(config)
    analytic_student = dit_forward_flops(config, head_outputs_per_token=head_out,
                                         logstd_hidden=QUICK_LOGSTD_HIDDEN if args.quick else LOGSTD_HIDDEN)
    with flop_counter() as counter, torch.no_grad(), autocast:
        teacher_model(x_t[:1], sigma[:1] * 1000, labels[:1])
    naive = 2 * row["params"]["teacher"] * config.num_tokens
    row["flops_per_image_forward"] = {
        "teacher_analytic": analytic_teacher["total"], "teacher_counted": counter.get_total_flops(),
        "student_analytic": analytic_student["total"], "breakdown_teacher": analytic_teacher,
        "naive_2_params_tokens": naive}
    per_step = args.batch * (3 * analytic_student["total"]
                             + SETTINGS.num_intermediate_states * 2 * analytic_teacher["total"])
    row["analytic_step_flops"] = per_step + (args.batch * analytic_student["total"] if args.checkpointing else 0)
    row["analytic_sample_flops"] = args.batch * analytic_student["total"]
    progress(row)

    stages = {"teacher_forward": teacher_forward, "sample_1nfe": sample, "piid_step": step}
    with patched(piflow.sampling, "rollout", split.wrap("rollout", piflow.sampling.rollout)), \
            patched(piflow.piid, "rollout_tau", split.wrap("detached rollouts", piflow.piid.rollout_tau)):
        # phase 1, stage by stage (so that the sample runs before the optimizer states exist): warm-up calls (the
        # step's first one under the FLOP counter, with the plain-PyTorch rollout), then one call for the memory peak
        for name, fn in stages.items():
            for i in range(warmup):
                if name == "piid_step" and i == 0:
                    with flop_counter() as counter, fused_rollout(False):
                        fn()
                    row["piid_step_counted_flops"] = counter.get_total_flops()
                else:
                    fn()
            split.take()
            memory.reset()
            sync()
            begin = time.perf_counter()
            fn()
            sync()
            row[f"{name}_memory"] = {**memory.read(), "call_s": time.perf_counter() - begin}
            split.take()
            progress(row)
        # phase 2, the timed repeats: the stages in turn within each repeat (all see the same machine load), with a
        # GEMM probe before each repeat as a gauge of contention
        times: dict[str, list[float]] = {name: [] for name in stages}
        splits: dict[str, list[dict]] = {name: [] for name in stages}
        row["gemm_probe_per_repeat_GFLOPs_per_s"] = []
        for _ in range(args.repeats):
            probe = gemm_probe(device, dtype, sync, 3, probe_shape)
            row["gemm_probe_per_repeat_GFLOPs_per_s"].append(probe["best_GFLOPs_per_s"])
            for name, fn in stages.items():
                split.take()
                sync()
                begin = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - begin)
                splits[name].append(split.take())
            for name in stages:
                out = {**_summary(times[name]), "memory": row[f"{name}_memory"]}
                seen = sorted({k for part in splits[name] for k in part})
                if seen:
                    parts = {k: statistics.median(part.get(k, 0.0) for part in splits[name]) for k in seen}
                    parts["other"] = statistics.median(t - sum(part.values())
                                                       for t, part in zip(times[name], splits[name]))
                    out["split_median_s"] = parts
                row[name] = out
            progress(row)
    for name in stages:
        del row[f"{name}_memory"]
    flops = {"teacher_forward": args.batch * analytic_teacher["total"],
             "sample_1nfe": row["analytic_sample_flops"], "piid_step": row.pop("piid_step_counted_flops")}
    for name, count in flops.items():
        row[name]["flops"] = count
        row[name]["achieved_GFLOPs_per_s"] = count / row[name]["median_s"] / 1e9
        row[name]["achieved_GFLOPs_per_s_fastest"] = count / row[name]["min_s"] / 1e9
    row["piid_step"]["flops_counted"] = True
    row["piid_step"]["achieved_GFLOPs_per_s_analytic"] = row["analytic_step_flops"] / row["piid_step"]["median_s"] / 1e9
    if device.type == "cpu":
        row["process_peak_rss_GiB_ru_maxrss"] = _ru_maxrss_gib()
    row["gemm_probe_at_end"] = gemm_probe(device, dtype, sync, shape=probe_shape)
    if hasattr(os, "getloadavg"):
        row["loadavg_1_5_15_at_end"] = list(os.getloadavg())
    progress(row)
    return row


# ------------------------------------------------------------------------------------------------- report

def _fmt_hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}"


def markdown(result: dict) -> str:
    machine, runs = result["machine"], result["runs"]
    title = "tiny DiT (--quick)" if result["quick"] else "SiT-XL/2 π-ID student at real width"
    lines = [f"# {title} ({result['device']}, {machine['date'][:10]})", "",
             "Command: `" + result["command"] + "`", "",
             f"Machine: {machine.get('cpu_model')} ({machine.get('usable_cpus')} usable of "
             f"{machine.get('logical_cpus')} logical CPUs, flags {', '.join(machine.get('cpu_flags', []))}), "
             f"{machine.get('memory_total_GiB', 0):.0f} GiB RAM shared with other jobs, torch {machine['torch']} "
             f"({machine['torch_threads']} threads)" + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
             + ". Times are wall-clock on a shared, noisy machine.", "",
             f"Setup: {result['setup']['model']}, random weights; student = PolicyStudent, GM K = "
             f"{result['setup']['K']}, log-std MLP {result['setup']['logstd_hidden']}; teacher with batched interval "
             f"CFG {GUIDANCE['scale']} on σ ∈ {list(GUIDANCE['interval'])} (null class {NUM_CLASSES}); "
             f"`PiIDSettings(nfe=1)` (M = {SETTINGS.num_intermediate_states}, dropout {SETTINGS.policy_dropout}, "
             f"{SETTINGS.total_substeps} substeps); step = loss forward + backward + clip + AdamW (fp32 states), "
             "no EMA; batch " + str(result["setup"]["batch"]) + ".", ""]
    if not runs:
        return "\n".join(lines + ["(no run finished)", ""])
    first = runs[0]
    lines += [f"Parameters: teacher {first['params']['teacher'] / 1e6:.1f} M, student "
              f"{first['params']['student'] / 1e6:.1f} M (GM head {first['params']['student_head'] / 1e6:.2f} M), "
              f"{first['params']['student_trainable'] / 1e6:.1f} M of them trained.", ""]
    mem_key = "peak_allocated_GiB" if result["device"].startswith("cuda") else "peak_rss_GiB"
    lines += ["| | " + " | ".join(r["dtype"] for r in runs) + " |", "|---|" + "---|" * len(runs)]

    def add(label, fn):
        cells = []
        for r in runs:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def timing(key):
        return lambda r: (f"{r[key]['median_s']:.2f} s ({r[key]['min_s']:.2f}–{r[key]['max_s']:.2f}, "
                          f"{len(r[key]['times_s'])} repeats)")

    add("π-ID step (median, min–max)", timing("piid_step"))
    for part in ("student forward", "teacher calls (CFG)", "detached rollouts", "backward", "optimizer (clip + AdamW)",
                 "other"):
        add(f"  · {part}", lambda r, p=part: f"{r['piid_step']['split_median_s'][p]:.2f} s")
    add("π-ID step peak memory", lambda r: f"{r['piid_step']['memory'][mem_key]:.2f} GiB")
    add("π-ID step GFLOP/s (counted FLOPs / median; / fastest)",
        lambda r: f"{r['piid_step']['achieved_GFLOPs_per_s']:.0f}; "
                  f"{r['piid_step']['achieved_GFLOPs_per_s_fastest']:.0f} "
                  f"({r['piid_step']['flops'] / 1e12:.2f} TFLOP counted, "
                  f"{r['analytic_step_flops'] / 1e12:.2f} analytic)")
    add("1-NFE sample", timing("sample_1nfe"))
    add("  · student forward", lambda r: f"{r['sample_1nfe']['split_median_s']['student forward']:.2f} s")
    add("  · 128-substep rollout", lambda r: f"{r['sample_1nfe']['split_median_s']['rollout']:.2f} s")
    add("1-NFE sample peak memory", lambda r: f"{r['sample_1nfe']['memory'][mem_key]:.2f} GiB")
    add("teacher forward (no CFG)", timing("teacher_forward"))
    add("teacher forward GFLOP/s (median; fastest)",
        lambda r: f"{r['teacher_forward']['achieved_GFLOPs_per_s']:.0f}; "
                  f"{r['teacher_forward']['achieved_GFLOPs_per_s_fastest']:.0f}")
    add("1-NFE sample GFLOP/s (median; fastest)",
        lambda r: f"{r['sample_1nfe']['achieved_GFLOPs_per_s']:.0f}; "
                  f"{r['sample_1nfe']['achieved_GFLOPs_per_s_fastest']:.0f}")
    add("GEMM probe GFLOP/s: start; per repeat; end (one MLP-shaped GEMM, fastest of 5/3/5)",
        lambda r: f"{r['gemm_probe_at_start']['best_GFLOPs_per_s']:.0f}; "
                  + ", ".join(f"{g:.0f}" for g in r["gemm_probe_per_repeat_GFLOPs_per_s"])
                  + f"; {r['gemm_probe_at_end']['best_GFLOPs_per_s']:.0f}")
    add("load average (1 min), start / end",
        lambda r: f"{r['loadavg_1_5_15_at_start'][0]:.1f} / {r['loadavg_1_5_15_at_end'][0]:.1f}")
    if not result["device"].startswith("cuda"):
        add("memory after building teacher + student", lambda r: f"{r['rss_after_build_GiB']:.2f} GiB")
        add("process peak (ru_maxrss)", lambda r: f"{r['process_peak_rss_GiB_ru_maxrss']:.2f} GiB")
    probe_lines = []
    for r in runs:
        with contextlib.suppress(KeyError, ValueError, ZeroDivisionError):
            probe = statistics.median(r["gemm_probe_per_repeat_GFLOPs_per_s"])
            probe_lines.append(
                f"{r['dtype']}: step {r['piid_step']['achieved_GFLOPs_per_s']:.0f}, teacher forward "
                f"{r['teacher_forward']['achieved_GFLOPs_per_s']:.0f} GFLOP/s (medians) against {probe:.0f} GFLOP/s "
                f"of one large GEMM in the same repeats ({r['piid_step']['achieved_GFLOPs_per_s'] / probe:.0%} and "
                f"{r['teacher_forward']['achieved_GFLOPs_per_s'] / probe:.0%})")
    if probe_lines:
        lines += ["", "FLOP-rate check: " + "; ".join(probe_lines) + ". The step's FLOPs are counted by "
                  "FlopCounterMode (matmuls and attention); its non-matmul work (AdamW over every parameter, "
                  "elementwise ops) brings its rate below the forward's."]
    lines += ["", "Timing: the warm-up calls of each stage first (the step's first one under the FLOP counter), then "
              "the repeats with the three stages in turn within each repeat, so that all see the same machine load. "
              "Memory: " + first["memory_method"] + ", over one call of each stage after its warm-up, stage by stage "
              "(teacher forward, sample, then step), before the timed repeats" + (
                  ": the whole process, i.e. the sample's peak holds the teacher's weights too but not yet the "
                  "gradients and AdamW states, the step's holds everything." if not result["device"].startswith("cuda")
                  else "."), ""]

    flops = first["flops_per_image_forward"]
    b = flops["breakdown_teacher"]
    lines += ["## FLOPs of one forward (per image, 2 FLOPs per multiply-add)", "",
              f"* analytic (`dit_forward_flops`): **{flops['teacher_analytic'] / 1e9:.1f} GFLOP** = token matmuls "
              f"{b['token_matmuls'] / 1e9:.1f} + attention {b['attention'] / 1e9:.1f} + per-image matmuls (adaLN, "
              f"timestep MLP) {b['per_image_matmuls'] / 1e9:.2f}; student with the GM head "
              f"{flops['student_analytic'] / 1e9:.1f};",
              f"* counted by FlopCounterMode on one teacher forward: {flops['teacher_counted'] / 1e9:.1f} GFLOP;",
              f"* the DiT paper's {DIT_PAPER_XL2_GFLOPS} \"Gflops\" for XL/2 match our multiply-add count "
              f"({b['multiply_adds'] / 1e9:.1f} G) to the digit, i.e. they count a multiply-add as one flop; in the "
              "2-per-multiply-add convention of GPU peak FLOP/s the forward is twice that (taking 118.6 as FLOPs "
              "would halve every GPU-hours figure below);",
              f"* 2·params·tokens = {flops['naive_2_params_tokens'] / 1e9:.1f} GFLOP over-counts: the adaLN "
              "modulation weights (6·d² per block, about a third of the parameters) act once per image, not per "
              "token.", ""]
    est = result.get("gpu_hours_estimate")
    if est:
        a = est["assumptions"]
        one = est["runs"]["1-NFE"]
        lines += ["## GPU-hours estimate of the paper's ImageNet runs (an estimate from FLOPs, not a measurement)", "",
                  f"Per training sample: student forward + backward (2×) + one recomputed forward (per-block "
                  f"checkpointing, the paper's setting) = {one['student_passes']:.0f} × "
                  f"{one['student_forward_flops'] / 1e9:.1f} GFLOP, plus {one['teacher_forwards_per_sample']} "
                  f"teacher forwards ({SETTINGS.num_intermediate_states} intermediate states × 2 for batched CFG) × "
                  f"{one['forward_flops'] / 1e9:.1f} GFLOP = **{one['flops_per_sample'] / 1e12:.2f} TFLOP per "
                  f"sample**, {one['flops_per_iteration'] / 1e15:.2f} PFLOP per iteration at batch "
                  f"{one['batch_size']}. Assumed achieved throughput: {a['utilization_of_peak']:.0%} of "
                  f"{a['gpu']} = {one['achieved_flops_per_gpu'] / 1e12:.0f} TFLOP/s per GPU on the executed FLOPs. "
                  f"Not counted: {a['not_counted']}.", "",
                  "| run | iterations | total FLOPs | H100-hours | wall time on 8 GPUs |", "|---|---|---|---|---|"]
        for name, run in est["runs"].items():
            lines.append(f"| {name} | {run['iterations']:,} | {run['total_flops']:.2e} | "
                         f"**{_fmt_hours(run['gpu_hours'])}** | {run['wall_hours']:.0f} h "
                         f"({run['wall_hours'] / 24:.1f} days, {run['seconds_per_iteration']:.2f} s/iteration) |")
        lines += ["", "Sensitivity (GPU-hours):", "", "| GPU | utilisation | checkpointing | 1-NFE | 2-NFE |",
                  "|---|---|---|---|---|"]
        for row in est["sensitivity"]:
            lines.append(f"| {row['gpu']} | {row['utilization']:.0%} | {'on' if row['recompute'] else 'off'} | "
                         f"{_fmt_hours(row['1-NFE GPU-hours'])} | {_fmt_hours(row['2-NFE GPU-hours'])} |")
        lines += ["", "The utilisation is an assumption (no GPU measurement exists yet: `benchmarks/gpu_check.sh` "
                  "measures the XL/2 step at batch 64 in bf16 when a GPU is lent; its time per sample, scaled by "
                  "4096 × iterations, replaces the assumption). The paper does not say which GPUs it used here; "
                  "the A100 rows are for comparison.", ""]
    lines += ["## Caveats", "",
              "* CPU numbers show the memory and the work of one step at the real width; their absolute times say "
              "nothing about GPU time (the estimate above is from FLOPs).",
              "* Random weights (the teacher's output layer set to N(0, 0.02²), adaLN-Zero gates zero): the work "
              "per call is the same as trained weights'.",
              "* Every student parameter is trained (`PolicyStudent` makes its copy of the frozen teacher "
              "trainable), as in the paper's full fine-tune.",
              "* AdamW keeps fp32 moments (the paper uses 8-bit AdamW); the power EMA (another student copy) is not "
              "held or updated.",
              "* The CFG teacher always runs both branches on the doubled batch, inside or outside the interval; "
              "skipping the unconditional branch outside σ ≤ 0.7 would save about 15 % of the teacher cost at "
              "1 NFE (the two states are the min and max of two uniform draws: P(σ ≤ 0.7) = 0.49 and 0.91).", ""]
    return "\n".join(lines)


def result_skeleton(args, argv: list[str]) -> dict:
    device = torch.device(args.device)
    config = model_config(args.quick)
    return {"benchmark": "imagenet_xl", "quick": args.quick, "device": str(device),
            "command": " ".join(["python", "benchmarks/imagenet_xl.py", *argv]),
            "machine": machine_info(device),
            "setup": {"model": "DiT-T/2 (quick)" if args.quick else "DiT-XL/2 = SiT-XL/2 architecture, 256² images",
                      "config": config.to_dict(), "K": QUICK_K if args.quick else COMPONENTS,
                      "logstd_hidden": QUICK_LOGSTD_HIDDEN if args.quick else LOGSTD_HIDDEN,
                      "guidance": {"scale": GUIDANCE["scale"], "interval": list(GUIDANCE["interval"]),
                                   "null_class": NUM_CLASSES, "batched": True},
                      "settings": SETTINGS.to_dict(), "batch": args.batch, "optimizer": "AdamW",
                      "optimizer_settings": {**OPTIMIZER, "betas": list(OPTIMIZER["betas"])},
                      "ema": False, "gradient_checkpointing": args.checkpointing,
                      "teacher_dtype": "bfloat16 when dtype is bfloat16, else float32",
                      "student": "fp32 master weights (bf16 autocast when dtype is bfloat16)"},
            "runs": []}


def write(result: dict, path: Optional[str], md: Optional[str]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    if md:
        Path(md).write_text(markdown(result))


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per stage (default: 1 CPU, 2 CUDA)")
    parser.add_argument("--checkpointing", action="store_true", help="per-block gradient checkpointing")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny DiT, batch 1 (seconds; the test)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None, help="default: the --json path with .md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # one dtype, row on stdout
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.warmup is not None and args.warmup < 1):
        parser.error("--repeats and --warmup must be >= 1 (the first warm-up step is the FLOP-counted one)")
    if args.batch is None:
        args.batch = 1 if args.quick else 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args, args.dtype[0])), flush=True)
        return {}
    md = args.markdown or (str(Path(args.json).with_suffix(".md")) if args.json else None)
    result = result_skeleton(args, argv)
    separate = len(args.dtype) > 1 and torch.device(args.device).type == "cpu"
    for dtype in args.dtype:
        print(f"== {dtype}", file=sys.stderr, flush=True)
        if separate:                      # its own process: the memory peak is this dtype's alone
            worker = list(argv)
            index = worker.index("--dtype")
            end = index + 1
            while end < len(worker) and not worker[end].startswith("--"):
                end += 1
            worker[index:end] = ["--dtype", dtype]
            out = subprocess.run([sys.executable, __file__, *worker, "--worker"], stdout=subprocess.PIPE, text=True,
                                 check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            result["runs"].append(row)
        else:
            result["runs"].append({})
            index = len(result["runs"]) - 1

            def progress(row, index=index):
                result["runs"][index] = row
                write(result, args.json, None)          # partial results survive a time limit
            measure(args, dtype, progress)
        print(json.dumps({k: v for k, v in result["runs"][-1].items() if k in ("dtype", "piid_step")}),
              file=sys.stderr, flush=True)
        write(result, args.json, None)
    # the estimate always comes from the analytic XL/2 count (the paper's model), whatever size was measured
    xl = model_config(False)
    teacher = dit_forward_flops(xl)["total"]
    student = dit_forward_flops(xl, head_outputs_per_token=xl.patch_size ** 2 * COMPONENTS * (xl.in_channels + 1),
                                logstd_hidden=LOGSTD_HIDDEN)["total"]
    result["gpu_hours_estimate"] = {"model": "DiT-XL/2 (analytic count)", "teacher_forward_flops": teacher,
                                    "student_forward_flops": student, **paper_estimates(teacher, student)}
    write(result, args.json, md)
    return result


if __name__ == "__main__":
    main()
