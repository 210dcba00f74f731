"""One training loop for teachers and students: AdamW, linear warm-up, clipping with NaN/Inf skipping, power EMA,
atomic checkpoints with automatic resume, tqdm progress, JSON-lines and (optional) TensorBoard logs."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from piflow.train import distributed
from piflow.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from piflow.train.ema import PowerEMA, frozen_parameter_names, load_partial_state, trainable_state_dict

LossFn = Callable[[int, torch.Generator], Union[Tensor, tuple[Tensor, bool]]]


@dataclass
class TrainConfig:
    iters: int = 1000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_iters: int = 100          # linear warm-up from lr·1e-3
    grad_clip: float = 50.0          # global norm; 0 disables
    grad_clip_from: int = 100        # clipping starts at this iteration
    ema_gamma: float = 7.0
    ema_start: int = 100
    checkpoint_every: int = 500      # 0: only at the end
    log_every: int = 50
    seed: int = 0
    progress: bool = True
    grad_accum_steps: int = 1        # loss_fn is called this many times per iteration, each loss scaled 1/steps
    mixed_precision: str = "no"      # "no" | "bf16" | "fp16" (fp16 uses a GradScaler; CUDA only)

    def __post_init__(self):
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite positive number, got {self.lr}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    model: nn.Module
    ema: PowerEMA
    history: list = field(default_factory=list)     # dicts: iter, loss, lr, grad_norm, skipped
    resumed_from: Optional[int] = None


def _tensorboard_writer(run_dir: Optional[Path]):
    if run_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(model: nn.Module, loss_fn: LossFn, config: TrainConfig, run_dir: Optional[Union[str, Path]] = None,
          desc: str = "train") -> TrainResult:
    """Optimise the trainable parameters of `model` with `loss_fn(iteration, generator)`.

    `loss_fn` returns a graph-carrying scalar loss, or ``(detached_loss, True)`` when it already back-propagated
    (data-free π-ID; it must then scale by 1/grad_accum_steps itself). It is called `grad_accum_steps` times per
    iteration. With `run_dir`, ``checkpoint.pt`` there is resumed automatically and rewritten atomically every
    `checkpoint_every` iterations and at the end (by rank 0); losses go to ``train_log.jsonl``. Checkpoints hold the
    trainable parameters, buffers, EMA, optimizer, scheduler and RNG states — never frozen (base) weights.
    Under torchrun (see `piflow.train.distributed`) every rank starts from rank 0's weights, draws its own data
    (seed + rank) and gradients are averaged before clipping, so all ranks take identical optimizer steps.
    """
    dist_info = distributed.current()
    run_dir = Path(run_dir) if run_dir is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    warmup = max(int(config.warmup_iters), 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 1.0 if warmup == 0 else min(1.0, 1e-3 + (1 - 1e-3) * it / warmup))
    from piflow.train.fsdp import is_fsdp_module

    ema = PowerEMA(model, config.ema_gamma, config.ema_start, copy_model=not is_fsdp_module(model))
    generator = torch.Generator().manual_seed(config.seed + dist_info.rank)
    device_type = next(iter(params)).device.type
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    scaler = torch.amp.GradScaler(device_type) if config.mixed_precision == "fp16" else None
    if dist_info.enabled:
        distributed.broadcast_parameters(model)
    history: list[dict[str, Any]] = []
    start, resumed_from = 0, None
    checkpoint_path = run_dir / "checkpoint.pt" if run_dir is not None else None
    if checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        try:
            load_partial_state(model, state["model"], frozen_parameter_names(model))
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"checkpoint {checkpoint_path} does not match this model/config: {error}") from error
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = state.get("history", [])
        start = resumed_from = int(state["step"])

    def checkpoint(step: int) -> None:
        if checkpoint_path is None or not dist_info.is_main:
            return
        save_checkpoint(checkpoint_path, {
            "step": step, "model": trainable_state_dict(model), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(), "history": history, "config": asdict(config)})

    main_dir = run_dir if dist_info.is_main else None
    writer = _tensorboard_writer(main_dir)
    if main_dir is not None:
        main_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(main_dir / "train_log.jsonl", "a") if main_dir is not None else None
    model.train()
    bar = tqdm(range(start, config.iters), desc=desc, disable=not (config.progress and dist_info.is_main),
               initial=start, total=config.iters)
    accum = config.grad_accum_steps
    try:
        for iteration in bar:
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for _ in range(accum):
                with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = loss_fn(iteration, generator)
                loss, done = out if isinstance(out, tuple) else (out, False)
                if not done:
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_value += float(loss.detach()) / accum
            if dist_info.enabled:
                distributed.average_gradients(params)
                loss_value = distributed.all_ranks_mean(loss_value)
            if scaler is not None:
                scaler.unscale_(optimizer)
            clip = config.grad_clip if (config.grad_clip > 0 and iteration >= config.grad_clip_from) else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            skipped = not math.isfinite(grad_norm) or not math.isfinite(loss_value)
            if scaler is not None:
                scaler.step(optimizer)          # skips non-finite steps itself and adapts the scale
                scaler.update()
            elif skipped:
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
            scheduler.step()
            ema.update(model, iteration)
            record = {"iter": iteration, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm, "skipped": skipped}
            history.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
            if writer is not None:
                for key in ("loss", "lr", "grad_norm"):
                    writer.add_scalar(f"train/{key}", record[key], iteration)
            if iteration % max(config.log_every, 1) == 0:
                bar.set_postfix(loss=f"{record['loss']:.4g}")
            if config.checkpoint_every > 0 and (iteration + 1) % config.checkpoint_every == 0:
                if log_file is not None:
                    log_file.flush()
                checkpoint(iteration + 1)
        checkpoint(config.iters)
    finally:
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
    return TrainResult(model, ema, history, resumed_from)
