"""π-ID (the paper's method, algorithm.md §4): a GM or DX policy student regressed onto the teacher's velocity
along its own detached rollouts (`PiFlow`), data-dependent or data-free."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from piflow.config import ConfigError
from piflow.methods.base import Method
from piflow.model import PiFlow
from piflow.settings import PiIDSettings
from piflow.train.loop import LossFn


def piid_settings(config: dict, **overrides) -> PiIDSettings:
    """`PiIDSettings` of a config (``distill`` section, policy = ``student.policy``; "x0" students are one-node DX);
    a bad value is a `ConfigError` naming it."""
    policy = config["student"]["policy"]
    overrides.setdefault("policy", "dx" if policy == "x0" else policy)
    try:
        return PiIDSettings.from_mapping(config["distill"], **overrides)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"distill/student settings: {error}") from None


def as_run(config: dict, settings: PiIDSettings) -> dict:
    """The config as it is run: ``distill.policy_dropout`` resolved (null → the policy's default), so that the run's
    config.yaml records the value used and a resume compares values, not defaults."""
    return dict(config, distill=dict(config["distill"], policy_dropout=settings.policy_dropout))


def build_piflow(config: dict, student: nn.Module, teacher, **overrides) -> PiFlow:
    """`PiFlow` from a config's ``student``/``distill`` sections, complete with its teacher."""
    dx_mode = config["student"].get("dx_mode", "grid")
    settings = piid_settings(config, **overrides)
    return PiFlow(student, teacher, settings, policy_kwargs={"mode": dx_mode} if settings.policy == "dx" else None)


def piid_loss_fn(pf: PiFlow, draw_batch: Callable[[torch.Generator], tuple[Any, Any]], batch_size: int,
                 data_free: bool, noise_shape: tuple[int, ...], device: Any = "cpu") -> LossFn:
    """The training loop's loss function of π-ID: ``draw_batch(generator) -> (x0, cond)`` per call; data-free
    runs then draw noise (batch_size, *noise_shape) and back-propagate per segment with the loop's `backward`."""
    def loss_fn(iteration: int, generator: torch.Generator, backward) -> torch.Tensor:
        x0, cond = draw_batch(generator)
        if data_free:
            noise = torch.randn(batch_size, *noise_shape, generator=generator).to(device)
            return pf.data_free_loss(noise, cond, iteration=iteration, backward=backward, generator=generator)
        return pf(x0, cond, iteration=iteration, generator=generator)

    return loss_fn


class PiID(Method):
    """π-ID on a `PolicyStudent` (``student.policy`` gmflow or dx) with the ``distill`` section's settings."""

    name = "piid"
    title = "π-ID"
    paper = "Chen et al., pi-Flow (ICLR 2026), arXiv 2510.14974"
    loss_title = "π-ID loss"

    def __init__(self, setup):
        super().__init__(setup)
        self.piid = piid_settings(self.config, **self.policy_override())

    def policy_override(self) -> dict:
        return {}

    def config_as_run(self) -> dict:
        return as_run(self.config, self.piid)

    def student(self) -> nn.Module:
        return self.setup.policy_student(self.piid.policy, int(self.config["student"]["num_nodes"]))

    def piflow(self, student: nn.Module) -> PiFlow:
        return build_piflow(self.config, student, self.setup.teacher, **self.policy_override())

    def loss_fn(self, student: nn.Module) -> LossFn:
        setup = self.setup
        data_free = bool(self.config["distill"]["data_free"])

        def draw(generator: torch.Generator):
            if data_free:
                return None, setup.draw_cond(generator, setup.batch_size)
            return setup.draw_data(generator, setup.batch_size)

        return piid_loss_fn(self.piflow(student), draw, setup.batch_size, data_free, setup.shape)

    def sampler(self, student: nn.Module) -> PiFlow:
        return self.piflow(student)
