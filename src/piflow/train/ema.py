"""Power-function EMA of the trainable parameters (β = (1 − 1/t)^(γ+1), Karras et al. 2024 style; §4.6)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class PowerEMA:
    """EMA copy of `model` whose decay grows with the iteration count.

    After iteration `it`: t = max(it + 1 − start_iter, 1), β = min((1 − 1/t)^(γ+1), 1) and
    ema ← β·ema + (1 − β)·param for trainable parameters; before `start_iter` the EMA is a plain copy. Buffers are
    copied. Frozen parameters are *shared* with `model` (weight tying, §6.6): the EMA of a LoRA student costs only
    its trainable tensors, not a second copy of the base.
    """

    def __init__(self, model: nn.Module, gamma: float = 7.0, start_iter: int = 0):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma, self.start_iter = float(gamma), int(start_iter)
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=dict(frozen)).eval()
        for param in self.model.parameters():
            if id(param) not in frozen:
                param.requires_grad_(False)

    def beta(self, iteration: int) -> float:
        if iteration < self.start_iter:
            return 0.0
        t = max(iteration + 1 - self.start_iter, 1)
        return min((1 - 1 / t) ** (self.gamma + 1), 1.0)

    @torch.no_grad()
    def update(self, model: nn.Module, iteration: int) -> None:
        beta = self.beta(iteration)
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
        return {"gamma": self.gamma, "start_iter": self.start_iter, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gamma, self.start_iter = float(state["gamma"]), int(state["start_iter"])
        self.model.load_state_dict(state["model"])
