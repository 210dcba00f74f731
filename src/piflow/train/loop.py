"""One training loop for teachers and students: AdamW, linear warm-up, clipping with NaN/Inf skipping (and a stop
after too many in a row), power EMA, safe atomic checkpoints with automatic resume, a checkpoint and a clean stop on
SIGTERM, a run-directory lock, progress that reads well without a terminal, strict-JSON-lines and (optional)
TensorBoard logs."""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from contextlib import ExitStack
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from piflow.errors import TrainingDivergedError, TrainingTerminated
from piflow.files import atomic_write, json_line, one_line, remove_stale_temporary_files
from piflow.checks import NonFiniteError
from piflow.progress import progress_bar
from piflow.train import distributed
from piflow.train.checkpoint import (CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME, CheckpointError, load_checkpoint,
                                     save_checkpoint)
from piflow.train.loggers import TRAIN_SCALARS, check_logger, open_logger
from piflow.train.run_dir import run_lock
from piflow.train.ema import PowerEMA, frozen_parameter_names, load_partial_state, trainable_state_dict

Backward = Callable[[Tensor], None]
LossFn = Callable[[int, torch.Generator, Backward], Tensor]


OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(params: list, config: "TrainConfig") -> torch.optim.Optimizer:
    """AdamW of `config` (lr, betas, weight decay): torch's, or bitsandbytes' 8-bit-state AdamW8bit."""
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        from piflow.errors import require

        return require("bitsandbytes", "train.optimizer=adamw8bit").optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


@dataclass
class TrainConfig:
    iters: int = 1000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_iters: int = 100          # linear warm-up from lr·1e-3
    decay_iters: int = 0             # linear decay towards 0 over the last decay_iters iterations (0: constant)
    grad_clip: float = 50.0          # global norm; 0 disables
    grad_clip_from: int = 100        # clipping starts at this iteration
    ema_gamma: float = 7.0
    ema_start: int = 100
    checkpoint_every: Optional[int] = None   # None: auto = clamp(iters // 10, 1, 500); 0: only at the end
    log_every: int = 50              # window of the running-mean loss shown by the progress bar
    seed: int = 0
    progress: bool = True
    grad_accum_steps: int = 1        # loss_fn is called this many times per iteration, each loss scaled 1/steps
    mixed_precision: str = "no"      # "no" | "bf16" | "fp16" (fp16 uses a GradScaler)
    max_skipped_steps: int = 5       # stop after this many consecutive non-finite (skipped) steps; 0: never
    optimizer: str = "adamw"         # "adamw" (torch) | "adamw8bit" (bitsandbytes, CUDA: the paper's ImageNet runs)
    logger: str = "tensorboard"      # experiment tracker: "tensorboard" (when installed) | "wandb" | "none"
    wandb_project: Optional[str] = None      # W&B project of train.logger=wandb (default: "piflow")

    def __post_init__(self):
        if self.mixed_precision is False:          # YAML 1.1 reads `mixed_precision: no` as false
            self.mixed_precision = "no"
        for name in ("iters", "warmup_iters", "decay_iters", "grad_clip_from", "ema_start", "log_every", "seed",
                     "grad_accum_steps", "max_skipped_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"train.{name} must be an integer, got {value!r}")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or isinstance(self.checkpoint_every, bool)
                                                  or self.checkpoint_every < 0):
            raise ValueError(f"train.checkpoint_every must be an integer >= 0 or null (auto), got "
                             f"{self.checkpoint_every!r}")
        for name in ("warmup_iters", "decay_iters", "grad_clip_from", "ema_start", "seed", "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("iters", "log_every", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name, positive in (("lr", True), ("weight_decay", False), ("grad_clip", False), ("ema_gamma", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise ValueError(f"train.{name} must be a finite number {'> 0' if positive else '>= 0'}, got "
                                 f"{value!r}")
        betas = self.betas
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {betas!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_logger(self.logger)
        if self.wandb_project is not None and not isinstance(self.wandb_project, str):
            raise ValueError(f"train.wandb_project must be a string or null, got {self.wandb_project!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"train.progress must be true/false, got {self.progress!r}")
        self.betas = tuple(self.betas)

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based) over `lr`: a linear warm-up from 1e-3 over
        `warmup_iters`, constant, then a linear decay over the last `decay_iters` steps of `iters`
        (d/(d+1), …, 1/(d+1) for d = decay_iters: warm-up, stable, decay). The decay depends only on `iters`, so a
        run trained at a constant rate is given its decay later by resuming it with a larger `iters` and
        `decay_iters`, and then takes the steps a run planned that way takes."""
        factor = 1.0 if self.warmup_iters == 0 else min(1.0, 1e-3 + (1 - 1e-3) * step / self.warmup_iters)
        if self.decay_iters > 0:
            factor *= min(1.0, max(self.iters - step, 0) / (self.decay_iters + 1))
        return factor

    @property
    def checkpoint_interval(self) -> int:
        """Iterations between checkpoints (0: only at the end); auto: a tenth of the run, at most 500."""
        if self.checkpoint_every is not None:
            return int(self.checkpoint_every)
        return min(max(self.iters // 10, 1), 500)


@dataclass
class TrainResult:
    model: nn.Module
    ema: PowerEMA
    history: list = field(default_factory=list)     # dicts: iter, loss, lr, grad_norm, skipped
    resumed_from: Optional[int] = None
    # wall seconds of the training loop up to its last step, summed over every invocation that reached a
    # checkpoint (work lost to a kill after the last checkpoint is not counted); None when resumed from a
    # checkpoint written before piflow recorded it
    train_seconds: Optional[float] = None




def train(model: nn.Module, loss_fn: LossFn, config: TrainConfig, run_dir: Optional[Union[str, Path]] = None,
          desc: str = "train", on_start: Optional[Callable[[], None]] = None) -> TrainResult:
    """Optimise the trainable parameters of `model` with `loss_fn(iteration, generator, backward)`.

    `loss_fn` returns a scalar loss (for the log). A loss function that back-propagates in parts (data-free π-ID:
    one backward per segment, so that each graph is freed at once) calls ``backward(part)`` for each part and returns
    the detached total; otherwise the loop calls ``backward(loss)`` on the returned graph-carrying loss. `backward`
    applies the 1/grad_accum_steps scaling and, under fp16, the GradScaler's loss scale, outside autocast.
    `loss_fn` runs under autocast (bf16/fp16 when `mixed_precision` says so), `grad_accum_steps` times per
    iteration. With `run_dir` (locked against other processes for the duration), ``checkpoint.safetensors`` there
    is resumed automatically and rewritten atomically every `checkpoint_interval` iterations and at the end (by
    rank 0); losses go to ``train_log.jsonl`` (strict JSON, one line per iteration, cut back to the checkpoint's
    step on resume). Checkpoints hold the trainable parameters, buffers, EMA, optimizer, scheduler, GradScaler and
    RNG states — never frozen (base) weights. A step whose loss or gradient norm is NaN/Inf (or whose loss function
    raised `NonFiniteError`: NaN policy parameters from diverged weights) is skipped without advancing the
    learning-rate schedule; after `max_skipped_steps` in a row a `TrainingDivergedError` stops training and the
    last checkpoint is kept. SIGTERM (a scheduler's preemption, `kill`) lets the step in progress finish, writes its
    checkpoint and raises `TrainingTerminated` (single-process runs on the main thread).
    `on_start` is called once the checkpoint (if any) has been loaded into the model, before the first iteration
    (the recipes write the run's config there: see `piflow.train.run_dir.Run.commit`).
    Under torchrun (see `piflow.train.distributed`) every rank starts from rank 0's weights, draws its own data
    (seed + rank) and gradients are averaged before clipping, so all ranks take identical optimizer steps.
    """
    dist_info = distributed.current()
    run_dir = Path(run_dir) if run_dir is not None else None
    with ExitStack() as stack:
        if run_dir is not None and dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(run_lock(run_dir))
            remove_stale_temporary_files(run_dir)
        return _train(model, loss_fn, config, run_dir, desc, dist_info, on_start)


class _Optimisation:
    """Everything a step changes and a checkpoint holds: AdamW with linear warm-up, the power EMA, the data
    generator, the fp16 GradScaler, and the loss functions' `backward`."""

    def __init__(self, model: nn.Module, config: TrainConfig, dist_info: distributed.DistInfo):
        from piflow.train.fsdp import is_fsdp_module

        self.model, self.config, self.dist_info = model, config, dist_info
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters")
        self.optimizer = make_optimizer(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: config.lr_factor(step))
        self.ema = PowerEMA(model, config.ema_gamma, config.ema_start, copy_model=not is_fsdp_module(model))
        self.generator = torch.Generator().manual_seed(config.seed + dist_info.rank)
        self.device_type = self.params[0].device.type
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        self.scaler = torch.amp.GradScaler(self.device_type) if config.mixed_precision == "fp16" else None
        self.backward_calls = 0

    def backward(self, loss: Tensor) -> None:
        """The `backward` handed to loss functions: 1/grad_accum_steps, the fp16 loss scale, outside autocast."""
        self.backward_calls += 1
        scaled = loss / self.config.grad_accum_steps
        with torch.autocast(self.device_type, enabled=False):
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def state(self, step: int, history: list) -> dict:
        return {"step": step, "model": trainable_state_dict(self.model), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "config": asdict(self.config),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, state: dict, path: Path) -> None:
        try:
            load_partial_state(self.model, state["model"], frozen_parameter_names(self.model))
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            # the rate of the next step follows this config (train.lr, iters, decay_iters may differ on resume)
            self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr * self.config.lr_factor(self.scheduler.last_epoch)
            if self.scaler is not None and state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise CheckpointError(f"checkpoint {path} does not match this model/config: "
                                  f"{one_line(error, 400)}") from None

    def gradients(self, loss_fn: LossFn, iteration: int) -> tuple[float, str]:
        """Run `loss_fn` grad_accum_steps times (back-propagating each loss once); (mean loss, why it is NaN)."""
        loss_value = 0.0
        try:
            for _ in range(self.config.grad_accum_steps):
                calls_before = self.backward_calls
                with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = loss_fn(iteration, self.generator, self.backward)
                if not torch.is_tensor(loss) or loss.numel() != 1:
                    raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
                if self.backward_calls == calls_before:
                    if not loss.requires_grad:
                        raise TypeError("loss_fn returned a loss without a graph and never called backward(loss)")
                    self.backward(loss)
                loss_value += float(loss.detach()) / self.config.grad_accum_steps
        except NonFiniteError as error:   # NaN policy parameters or states: a non-finite step like any other
            for param in self.params:     # NaN gradients, so that every rank agrees to skip this step
                param.grad = torch.full_like(param, math.nan)
            return math.nan, str(error)
        return loss_value, ""

    def step(self, loss_fn: LossFn, iteration: int) -> tuple[dict, str]:
        """One iteration: gradients (averaged over ranks), clipping, the optimizer step — skipped, without
        advancing the learning-rate schedule, when the loss or the gradient norm is NaN/Inf — and the EMA."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_value, reason = self.gradients(loss_fn, iteration)
        if self.dist_info.enabled:
            distributed.average_gradients(self.params)
            loss_value = distributed.all_ranks_mean(loss_value)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        config = self.config
        clip = config.grad_clip if (config.grad_clip > 0 and iteration >= config.grad_clip_from) else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        skipped = not math.isfinite(grad_norm) or not math.isfinite(loss_value)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)          # skips non-finite steps itself and adapts the scale
            self.scaler.update()
        elif skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.ema.update(self.model, iteration)
        return {"iter": iteration, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, "skipped": skipped}, reason


def _train(model: nn.Module, loss_fn: LossFn, config: TrainConfig, run_dir: Optional[Path], desc: str,
           dist_info: distributed.DistInfo, on_start: Optional[Callable[[], None]]) -> TrainResult:
    run = _Optimisation(model, config, dist_info)
    if dist_info.enabled:
        distributed.broadcast_parameters(model)
    history: list[dict[str, Any]] = []
    start, resumed_from = 0, None
    checkpoint_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    if checkpoint_path is not None and (checkpoint_path.exists() or (run_dir / LEGACY_CHECKPOINT_NAME).exists()):
        state = load_checkpoint(checkpoint_path)      # a legacy checkpoint.pt alone is refused with a message
        _check_resumable(state, checkpoint_path, config)
        run.load(state, checkpoint_path)
        history = state.get("history", [])
        start = resumed_from = int(state["step"])
        seconds_before = state.get("train_seconds")
    else:
        seconds_before = 0.0
    last_checkpoint = start if resumed_from is not None else None
    loop_start = time.perf_counter()

    def seconds() -> Optional[float]:
        return None if seconds_before is None else float(seconds_before) + time.perf_counter() - loop_start

    def checkpoint(step: int) -> None:
        """Flush the loss log (it then holds every step the checkpoint does) and write the checkpoint of `step`."""
        nonlocal last_checkpoint
        if log_file is not None:
            log_file.flush()
        if checkpoint_path is None:
            return
        last_checkpoint = step                        # rank 0 writes it for every rank
        if dist_info.is_main:
            save_checkpoint(checkpoint_path, dict(run.state(step, history), train_seconds=seconds()))

    if on_start is not None:
        on_start()
    main_dir = run_dir if dist_info.is_main else None
    writer = open_logger(config.logger, main_dir, config.wandb_project)
    log_file = _open_log(main_dir / "train_log.jsonl", start) if main_dir is not None else None
    model.train()
    bar = progress_bar(config.iters, desc, initial=start, enabled=config.progress and dist_info.is_main)
    recent: list[float] = []
    skipped_in_a_row, non_finite_reason = 0, ""
    termination = _catch_sigterm() if not dist_info.enabled else None
    try:
        for iteration in range(start, config.iters):
            record, reason = run.step(loss_fn, iteration)
            history.append(record)
            if log_file is not None:
                log_file.write(json_line(record))
            writer.scalars({f"train/{key}": record[key] for key in TRAIN_SCALARS}, iteration)
            # a gradient overflow under fp16 is the GradScaler's business; a non-finite loss is never normal
            bad = not math.isfinite(record["loss"]) or (record["skipped"] and run.scaler is None)
            skipped_in_a_row = skipped_in_a_row + 1 if bad else 0
            non_finite_reason = (reason or non_finite_reason) if bad else ""
            if config.max_skipped_steps and skipped_in_a_row >= config.max_skipped_steps:
                raise _diverged(desc, skipped_in_a_row, iteration, non_finite_reason, last_checkpoint)
            if math.isfinite(record["loss"]):
                recent = (recent + [record["loss"]])[-max(config.log_every, 1):]
            if recent:
                bar.set_postfix_str(f"loss {sum(recent) / len(recent):.4g}")
            bar.update(1)
            interval = config.checkpoint_interval
            if interval > 0 and (iteration + 1) % interval == 0 and iteration + 1 < config.iters \
                    and skipped_in_a_row == 0:        # never checkpoint in the middle of a run of skipped steps
                checkpoint(iteration + 1)
            if termination is not None and termination.requested and iteration + 1 < config.iters:
                if skipped_in_a_row == 0 and last_checkpoint != iteration + 1:
                    checkpoint(iteration + 1)
                raise _terminated(desc, iteration + 1, last_checkpoint)
        checkpoint(config.iters)
    finally:
        if termination is not None:
            termination.restore()
        bar.close()
        if log_file is not None:
            log_file.close()
        writer.close()
    return TrainResult(model, run.ema, history, resumed_from, seconds())


class _Termination:
    """SIGTERM while training: noted, so that the loop stops after the step it is in, with a checkpoint."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _catch_sigterm() -> Optional[_Termination]:
    """A `_Termination` handling SIGTERM for the duration of a single-process training loop (None off the main
    thread, where Python cannot install signal handlers; under torchrun, ranks keep the default so that none
    waits in a collective for a rank that stopped)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return _Termination()


def _terminated(desc: str, step: int, last_checkpoint: Optional[int]) -> TrainingTerminated:
    kept = f"checkpoint at step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint written"
    return TrainingTerminated(f"{desc}: terminated by SIGTERM after step {step} ({kept}); run the same command "
                              f"again to resume")


def _diverged(desc: str, count: int, iteration: int, reason: str, last_checkpoint: Optional[int]) -> Exception:
    kept = (f"the last checkpoint (step {last_checkpoint}) is kept" if last_checkpoint is not None
            else "no checkpoint was written")
    reason = f" (last: {reason})" if reason else ""
    return TrainingDivergedError(
        f"{desc}: {count} consecutive steps (iterations {iteration - count + 1}–{iteration}) had a NaN/Inf loss or "
        f"gradient and were skipped{reason}, so training stopped; {kept}. Check the data and the teacher for NaN/Inf, "
        f"or lower train.lr (train.max_skipped_steps sets the limit)")


def _check_resumable(state: dict, path: Path, config: TrainConfig) -> None:
    """A `CheckpointError` unless the checkpoint's step and history are what the loop writes, within this run."""
    step, history = state.get("step"), state.get("history", [])
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid step {step!r}")
    if step > config.iters:
        raise CheckpointError(f"checkpoint {path} is at step {step}, beyond train.iters={config.iters}; raise "
                              f"train.iters (with --allow-config-change) or use another run directory")
    if not isinstance(history, list) or len(history) != step or not all(
            isinstance(record, dict) and record.get("iter") == i and "loss" in record
            for i, record in enumerate(history)):
        raise CheckpointError(f"checkpoint {path} has an invalid history (expected {step} per-iteration records)")
    for key in ("model", "ema", "optimizer", "scheduler"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"checkpoint {path} has no {key!r} state (a mapping)")
    for key in ("generator", "torch_rng"):
        if not torch.is_tensor(state.get(key)):
            raise CheckpointError(f"checkpoint {path} has no {key!r} RNG state (a tensor)")


def _open_log(path: Path, start: int):
    """The JSON-lines log opened for appending after its records of iterations < `start` (later ones, written
    after the checkpoint that is being resumed, are dropped so that no iteration appears twice)."""
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if int(json.loads(line)["iter"]) < start:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue                    # a torn last line from a kill mid-write
    atomic_write(path, "".join(kept).encode("utf-8"))
    return open(path, "a", encoding="utf-8")
