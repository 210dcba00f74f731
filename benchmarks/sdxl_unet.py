"""The SDXL base UNet at its real width as a π-ID LoRA student (configs/gmsdxl_k8_4step.yaml): one data-free π-ID
training step and one 4-step sample, timed and with their peak resident memory, on the CPU.

    python benchmarks/sdxl_unet.py --runs 64x2 128x1 --json benchmarks/results/sdxl_unet_cpu_<date>.json
    python benchmarks/sdxl_unet.py --quick --json /tmp/x.json        # tiny text-time UNet: seconds (the test)

Setup (random weights at the published config; no download): `UNet2DConditionModel` with SDXL base 1.0's config
(`SDXL_UNET`: blocks 320/640/1280 with 0/2/10 transformer layers, heads of 64 channels, cross-attention width 2048,
text-time added conditioning 1280 + 6·256; 2.57 B parameters), stored in ``--dtype`` (default bf16: an fp32 base is
10.3 GB before the LoRA state, activations and the optimizer, over this machine's share). The student is built as
`piflow.recipes.text_to_image.build_lora_student` builds it from the config file — PEFT LoRA (rank, α, dropout of
the config: 256, 256, 0.05) on the family's targets (the transformer feed-forwards and the time-embedding MLP), a
K = 8 convolutional GM head copied from conv_out with a 1024-wide log-std MLP, the student's own conv_norm_out,
gradient checkpointing as the config says (on); trainable tensors in fp32 — sharing the frozen UNet with the teacher
(`DiffusersTeacher` on SDXL's scaled-linear ε schedule, adapters disabled for its calls) under true CFG 5.0 against
all-zero negative embeddings, unbatched (two UNet calls per teacher query), as the recipe's `make_text_teacher`. The
π-ID settings are the config's (`t2i_settings`): data-free, 4 NFE, shift 3.2, f 0.5, M = 4 teacher queries per
segment, window 3 substeps, policy dropout 0.1, loss scale 30. The whole forward (student, teacher, rollouts) runs
under bf16 autocast when the base is bf16 (the recipe's mixed_precision=bf16 for a bf16 base).

Conditioning: random (B, 77, 2048) text embeddings, (B, 1280) pooled embeddings and the stock time ids
(H, W, 0, 0, H, W) for the image size (8× the latent size).

Stages, per run (latent size × batch), in this order: (1) ``sample_4step`` — `PiFlow.sample` with 4 student
evaluations and the GM rollouts between them (no teacher, no CFG: guidance is distilled in); (2) ``piid_step`` —
zero_grad, `PiFlow.data_free_loss` (all 4 segments from pure noise, each back-propagated at once, as the training
loop does), gradient clipping at 50 and one AdamW step (lr 1e-4, β (0.9, 0.95), no weight decay) on the LoRA,
head and norm_out parameters. The power EMA of real runs is not included. The step's time is split into teacher
calls (with CFG), backward (with checkpoint recomputation), optimizer and the rest (student forwards, detached
policy rollouts, the loss).
Each stage: ``--warmup`` untimed calls, the first of which is the memory call (VmHWM of /proc/self/status reset
through /proc/self/clear_refs just before it, as benchmarks/imagenet_xl.py; the step's first call allocates the
AdamW state, so its peak is the training peak), then ``--repeats`` timed calls (median, min, max). All stages share
one process (the 5 GB base is built once), so a later stage's resident memory before the call includes what earlier
stages left (the optimizer state); both the peak and the RSS before are reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from imagenet_xl import PeakMemory, machine_info
from piflow import PiFlow
from piflow.config import load_config
from piflow.integrations.diffusers.families.sdxl import SDXL_SCHEDULER_CONFIG, default_time_ids
from piflow.integrations.diffusers.students import (ARCHITECTURES, DiffusersPolicyStudent, DiffusersTeacher,
                                                    add_student_lora)
from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS, t2i_settings
from piflow.teachers import ClassifierFreeGuidance

GIB = 2 ** 30
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gmsdxl_k8_4step.yaml"
OPTIMIZER = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.0, "grad_clip": 50.0}   # TrainConfig + the config

# SDXL base 1.0's unet/config.json (the keys that differ from UNet2DConditionModel's defaults)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32)
TEXT = {"tokens": 77, "width": 2048, "pooled": 1280}
# --quick: a two-level text-time UNet (same block kinds, widths ÷ 10ish), tiny LoRA and log-std MLP
QUICK_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), cross_attention_dim=64,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    use_linear_projection=True, norm_num_groups=8)
QUICK_TEXT = {"tokens": 77, "width": 64, "pooled": 32}
QUICK_STUDENT = {"lora_rank": 4, "lora_alpha": 4.0, "logstd_hidden": 16}
QUICK_SETTINGS = {"nfe": 2, "num_intermediate_states": 1, "total_substeps": 16}   # the test's seconds, not the config's


def distinct_numel(*modules) -> int:
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


def build_unet(quick: bool, dtype: torch.dtype, seed: int = 0):
    """The UNet with random weights, created directly in `dtype` (no fp32 copy of 10 GB on the way)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return UNet2DConditionModel(**(QUICK_UNET if quick else SDXL_UNET)).eval()
    finally:
        torch.set_default_dtype(previous)


def build(quick: bool, dtype: torch.dtype) -> dict:
    """UNet, LoRA student, CFG teacher and `PiFlow` as the text-to-image recipe builds them from the config."""
    config = load_config(T2I_DISTILL_DEFAULTS, str(CONFIG))
    s = dict(config["student"], **(QUICK_STUDENT if quick else {}))
    start = time.perf_counter()
    unet = build_unet(quick, dtype)
    build_s = time.perf_counter() - start
    base = distinct_numel(unet)
    add_student_lora(unet, rank=int(s["lora_rank"]), alpha=float(s["lora_alpha"]), dropout=float(s["lora_dropout"]),
                     target_modules=ARCHITECTURES["sdxl"].lora_targets(unet))
    if s["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    settings = t2i_settings(config)
    if quick:
        settings = dataclasses.replace(settings, **QUICK_SETTINGS)
    student = DiffusersPolicyStudent(
        unet, "gmflow", num_components=int(s["num_components"]), latent_channels=4,
        head_noise_std=float(s["head_noise_std"]), logstd_hidden=int(s["logstd_hidden"]), share_transformer=True,
        architecture="sdxl", generator=torch.Generator().manual_seed(0), settings=settings,
        scheduler_config=SDXL_SCHEDULER_CONFIG)
    for module in (student.head, student.norm_out):          # trainable tensors in fp32, the base keeps its dtype
        module.float()
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    text = QUICK_TEXT if quick else TEXT
    null = {"encoder_hidden_states": torch.zeros(1, text["tokens"], text["width"], dtype=dtype),
            "text_embeds": torch.zeros(1, text["pooled"], dtype=dtype)}      # force_zeros_for_empty_prompt
    teacher = ClassifierFreeGuidance(DiffusersTeacher(unet, "sdxl", scheduler_config=SDXL_SCHEDULER_CONFIG),
                                     float(config["guidance"]["scale"]), null, tuple(config["guidance"]["interval"]),
                                     batched=False)
    pf = PiFlow(student, teacher, settings, policy_kwargs=student.policy_kwargs)
    lora = sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad and "lora_" in n)
    head = sum(p.numel() for p in student.head.parameters())
    norm = sum(p.numel() for p in student.norm_out.parameters())
    trainable = [p for p in student.parameters() if p.requires_grad]
    params = {"base": base, "lora": lora, "gm_head": head, "norm_out": norm,
              "trainable": sum(p.numel() for p in trainable), "lora_layers": sum(
                  1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))}
    return {"config": config, "student_config": s, "unet": unet, "student": student, "pf": pf, "teacher": teacher,
            "settings": settings, "params": params, "trainable": trainable, "text": text, "build_s": build_s}


def condition(text: dict, batch: int, size: int, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, text["tokens"], text["width"], generator=g).to(dtype),
            "text_embeds": torch.randn(batch, text["pooled"], generator=g).to(dtype),
            "time_ids": default_time_ids(8 * size, 8 * size, batch).to(dtype)}


class StepTimer:
    """Accumulated seconds per label."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)
        return timed


def stages(model: dict, size: int, batch: int, dtype: torch.dtype, seed: int = 0):
    """(name → call returning its time split) for one run."""
    pf = model["pf"]
    cond = condition(model["text"], batch, size, dtype, seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    optimizer: dict[str, Any] = {}
    timer = StepTimer()
    pf.teacher = timer.wrap("teacher calls (CFG, 2 UNet calls each)", model["teacher"])

    def noise(offset: int) -> torch.Tensor:
        return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed + offset))

    def sample() -> dict:
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            x = pf.sample(noise(1), nfe=pf.settings.nfe, cond=cond)
        assert x.shape == (batch, 4, size, size) and torch.isfinite(x).all()
        return {"total": time.perf_counter() - start}

    def step() -> dict:
        if "adamw" not in optimizer:
            optimizer["adamw"] = torch.optim.AdamW(model["trainable"], lr=OPTIMIZER["lr"], betas=OPTIMIZER["betas"],
                                                   weight_decay=OPTIMIZER["weight_decay"])
        timer.seconds = {}
        start = time.perf_counter()
        optimizer["adamw"].zero_grad(set_to_none=True)
        with autocast:
            loss = pf.data_free_loss(noise(2), cond, iteration=0, backward=timer.wrap("backward", torch.Tensor.backward),
                                     generator=torch.Generator().manual_seed(seed + 3))
        opt_start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model["trainable"], OPTIMIZER["grad_clip"])
        optimizer["adamw"].step()
        timer.add("optimizer (clip + AdamW)", time.perf_counter() - opt_start)
        total = time.perf_counter() - start
        assert torch.isfinite(loss)
        split = dict(timer.seconds)
        split["other (student forwards, rollouts, loss)"] = total - sum(split.values())
        return {"total": total, "split": split, "loss": float(loss)}

    return {"sample_4step": sample, "piid_step": step}


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def measure_stage(fn, warmup: int, repeats: int) -> dict:
    memory = PeakMemory(torch.device("cpu"))
    calls = []
    memory.reset()
    calls.append(fn())                      # the memory call (first warm-up)
    peak = memory.read()
    for _ in range(max(warmup - 1, 0)):
        calls.append(fn())
    timed = [fn() for _ in range(repeats)]
    out: dict[str, Any] = {"warmup": max(warmup, 1), "repeats": repeats, "memory": peak,
                           "warmup_times_s": [c["total"] for c in calls]}
    if timed:
        out.update(_summary([c["total"] for c in timed]))
        if "split" in timed[0]:
            out["split_median_s"] = {k: statistics.median(c["split"][k] for c in timed) for k in timed[0]["split"]}
            out["losses"] = [c["loss"] for c in calls + timed]
    elif "split" in calls[0]:                # no timed repeat: the warm-up's split, labelled as such
        out["split_warmup_s"] = calls[0]["split"]
    return out


def markdown(result: dict) -> str:
    m, p, setup = result["machine"], result["params"], result["setup"]
    title = "tiny text-time UNet (--quick)" if result["quick"] else "SDXL base UNet at real width"
    lines = [f"# {title}: π-ID LoRA student on the CPU ({m['date']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cpus', m['logical_cpus'])} usable CPUs "
             f"({', '.join(m.get('cpu_flags', []))}), torch {m['torch']}, {m['torch_threads']} threads, "
             f"{m.get('memory_total_GiB', 0):.0f} GiB RAM (shared with other jobs).", "",
             f"Base UNet: {p['base'] / 1e9:.3f} B parameters, random weights, stored in {setup['base_dtype']}"
             f"{' (bf16 autocast for all compute)' if setup['autocast_bf16'] else ''}; built in "
             f"{result['build_s']:.0f} s. Trainable (fp32): {p['trainable'] / 1e6:.1f} M = LoRA {p['lora'] / 1e6:.1f} M "
             f"(rank {setup['lora_rank']}, {p['lora_layers']} layers) + GM head {p['gm_head'] / 1e6:.2f} M "
             f"(K = {setup['num_components']}, log-std MLP {setup['logstd_hidden']}) + norm_out {p['norm_out']}.",
             "", f"Settings: {json.dumps(setup['settings'])}; CFG {setup['guidance_scale']} (unbatched); gradient "
             f"checkpointing {setup['gradient_checkpointing']}.", "",
             "| run | stage | warm-up (s) | timed repeats | median (s) | min–max (s) | peak RSS (GiB) | RSS before (GiB) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        label = f"{8 * run['latent']}² (latents {run['latent']}×{run['latent']}), batch {run['batch']}"
        for stage in ("sample_4step", "piid_step"):
            r = run.get(stage)
            if r is None:
                lines.append(f"| {label} | {stage} | not measured | | | | | |")
                continue
            warm = ", ".join(f"{t:.1f}" for t in r["warmup_times_s"])
            med = f"{r['median_s']:.1f}" if "median_s" in r else "—"
            span = f"{r['min_s']:.1f}–{r['max_s']:.1f}" if "median_s" in r else "—"
            lines.append(f"| {label} | {stage} | {warm} | {r['repeats']} | {med} | {span} | "
                         f"{r['memory']['peak_rss_GiB']:.2f} | {r['memory']['rss_before_GiB']:.2f} |")
    for run in result["runs"]:
        step = run.get("piid_step")
        if step:
            split = step.get("split_median_s") or step.get("split_warmup_s")
            which = "median of the timed repeats" if "split_median_s" in step else "the warm-up call"
            lines += ["", f"Step split at latents {run['latent']}², batch {run['batch']} ({which}): " + "; ".join(
                f"{k} {v:.1f} s" for k, v in split.items())]
    lines += ["", "Memory: VmHWM after a /proc/self/clear_refs reset before the stage's first (warm-up) call; the "
              "step's first call allocates the AdamW state. Not included: the power EMA (another fp32 copy of the "
              "trainable tensors), the text encoders and VAE (random embeddings stand in), data loading.", ""]
    if result.get("notes"):
        lines += [f"Notes: {result['notes']}", ""]
    return "\n".join(lines)


def write(result: dict, path: Optional[str]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    Path(path).with_suffix(".md").write_text(markdown(result))


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny UNet, latents 8×8 batch 1, fp32, 2 NFE, M = 1, 16 substeps; 1 warm-up, 2 (step 1) repeats")
    parser.add_argument("--runs", nargs="*", default=["64x2", "128x1"],
                        help="latent size × batch per run (64x2 = 512² images, batch 2)")
    parser.add_argument("--stages", nargs="*", default=["sample_4step", "piid_step"])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the frozen base")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=None, help="timed repeats of piid_step (default: --repeats)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--notes", default="")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = ["8x1"] if args.quick else args.runs
    if args.quick:
        args.warmup, args.repeats, args.step_repeats = 1, 2, 1
    dtype = torch.float32 if args.quick else getattr(torch, args.dtype)
    model = build(args.quick, dtype)
    s, settings = model["student_config"], model["settings"]
    result: dict[str, Any] = {
        "benchmark": "sdxl_unet", "quick": args.quick,
        "command": "python benchmarks/sdxl_unet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(torch.device("cpu")), "params": model["params"], "build_s": model["build_s"],
        "setup": {"unet_config": QUICK_UNET if args.quick else SDXL_UNET, "base_dtype": str(dtype).split(".")[-1],
                  "trainable_dtype": "float32", "autocast_bf16": dtype == torch.bfloat16,
                  "lora_rank": int(s["lora_rank"]), "lora_alpha": float(s["lora_alpha"]),
                  "lora_targets": ARCHITECTURES["sdxl"].lora_targets(model["unet"]),
                  "num_components": int(s["num_components"]), "logstd_hidden": int(s["logstd_hidden"]),
                  "gradient_checkpointing": bool(s["gradient_checkpointing"]),
                  "guidance_scale": float(model["config"]["guidance"]["scale"]), "cfg_batched": False,
                  "settings": {k: getattr(settings, k) for k in (
                      "nfe", "final_step_size_scale", "shift", "num_intermediate_states", "window_substeps",
                      "policy_dropout", "loss_scale", "total_substeps")},
                  "data_free": True, "optimizer": OPTIMIZER, "text": model["text"], "config_file": str(
                      CONFIG.relative_to(ROOT))},
        "runs": [], "notes": args.notes}
    for spec in runs:
        size, batch = (int(v) for v in spec.split("x"))
        run: dict[str, Any] = {"latent": size, "image": 8 * size, "batch": batch}
        result["runs"].append(run)
        calls = stages(model, size, batch, dtype)
        for stage in args.stages:
            print(f"[sdxl_unet] latents {size}² batch {batch}: {stage} …", file=sys.stderr, flush=True)
            repeats = args.step_repeats if stage == "piid_step" and args.step_repeats is not None else args.repeats
            run[stage] = measure_stage(calls[stage], args.warmup, repeats)
            print(f"[sdxl_unet]   {json.dumps(run[stage])}", file=sys.stderr, flush=True)
            write(result, args.json)                 # after every stage: partial results survive an interruption
    write(result, args.json)
    return result


if __name__ == "__main__":
    main()
