"""Power-function EMA of the trainable parameters (β = (1 − 1/t)^(γ+1), Karras et al. 2024 style; §4.6)."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


class PowerEMA:
    """EMA copy of `model` whose decay grows with the iteration count.

    After iteration `it`: t = max(it + 1 − start_iter, 1), β = min((1 − 1/t)^(γ+1), 1) and
    ema ← β·ema + (1 − β)·param for trainable parameters; before `start_iter` the EMA is a plain copy. Buffers are
    copied. Frozen parameters are *shared* with `model` (weight tying, §6.6): the EMA of a LoRA student costs only
    its trainable tensors, not a second copy of the base.
    """

    def __init__(self, model: nn.Module, gamma: float = 7.0, start_iter: int = 0, copy_model: bool = True):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma, self.start_iter = float(gamma), int(start_iter)
        self.model: Optional[nn.Module] = None
        self.tensors: dict[str, torch.Tensor] = {}
        if not copy_model:   # tensor mode (FSDP modules cannot be deep-copied): trainable tensors only
            self.tensors = {name: param.detach().clone() for name, param in model.named_parameters()
                            if param.requires_grad}
            return
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=dict(frozen)).eval()
        for param in self.model.parameters():
            if id(param) not in frozen:
                param.requires_grad_(False)
        # names of the shared (frozen) parameters: not part of the EMA's own state
        self.shared_names = {name for name, param in self.model.named_parameters(remove_duplicate=False)
                             if id(param) in frozen}

    def beta(self, iteration: int) -> float:
        if iteration < self.start_iter:
            return 0.0
        t = max(iteration + 1 - self.start_iter, 1)
        return min((1 - 1 / t) ** (self.gamma + 1), 1.0)

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> None:
        beta = self.beta(iteration)
        if self.model is None:
            for name, param in model.named_parameters():
                if name in self.tensors:
                    if beta > 0:
                        self.tensors[name].lerp_(param.detach().to(self.tensors[name].dtype), 1 - beta)
                    else:
                        self.tensors[name].copy_(param.detach())
            return
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            if ema_param is param:               # a shared frozen parameter
                continue
            if param.requires_grad and beta > 0:
                ema_param.lerp_(param.detach().to(ema_param.dtype), 1 - beta)
            else:
                ema_param.copy_(param.detach())
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        """The EMA's own tensors: averaged parameters and buffers, not the frozen weights it shares."""
        if self.model is None:
            return {"gamma": self.gamma, "start_iter": self.start_iter, "model": dict(self.tensors)}
        own = {k: v for k, v in self.model.state_dict().items() if k not in self.shared_names}
        return {"gamma": self.gamma, "start_iter": self.start_iter, "model": own}

    def load_state_dict(self, state: dict) -> None:
        self.gamma, self.start_iter = float(state["gamma"]), int(state["start_iter"])
        if self.model is None:
            if set(state["model"]) != set(self.tensors):
                raise RuntimeError(f"EMA state does not match the model's trainable parameters: "
                                   f"{sorted(set(state['model']) ^ set(self.tensors))[:5]}")
            for name, value in state["model"].items():
                self.tensors[name].copy_(value)
            return
        load_partial_state(self.model, state["model"], self.shared_names)

    @contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """The EMA weights as a module: the EMA copy, or (tensor mode) `model` with the EMA tensors swapped into its
        trainable parameters for the duration of the block."""
        if self.model is not None:
            yield self.model
            return
        params = dict(model.named_parameters())
        backup = {name: params[name].detach().clone() for name in self.tensors}
        with torch.no_grad():
            for name, value in self.tensors.items():
                params[name].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)


def trainable_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` without frozen parameters (they come from the base model, never from a checkpoint)."""
    frozen = frozen_parameter_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def frozen_parameter_names(model: nn.Module) -> set:
    return {name for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad}


def load_partial_state(model: nn.Module, state: dict, skipped: set) -> None:
    """Load `state` into `model`, which must cover exactly the model's state keys minus `skipped` (shapes checked);
    a RuntimeError names the missing or unexpected keys."""
    expected = set(model.state_dict()) - set(skipped)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"state does not match the model: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]}")
    model.load_state_dict(state, strict=False)
