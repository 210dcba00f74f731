"""What every distillation method implements, and what a recipe hands it.

A recipe (2-D, images) knows its data, teacher and backbones and describes them once as a `DistillSetup`; a
`Method` (π-ID, x0-regression, DMD2, MeanFlow) turns that setup into the module the training loop optimises
(`student`), the loop's loss function (`loss_fn`) and, from the trained module, a few-step sampler (`sampler`)
whose ``sample(noise, nfe, cond, …)`` runs `piflow.sampling.sample`, the one few-step loop: every method's steps
are a policy (network-free velocity field) rolled out to the step's end, then the schedule's step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from piflow.config import ConfigError
from piflow.policies import Policy
from piflow.rollout import DEFAULT_TOTAL_SUBSTEPS
from piflow.sampling import FlowMapSDESchedule, HLike, sample

# (generator, batch size) -> (x0 (B, *shape), cond) of the data / -> cond of a batch (None: unconditional)
DataDraw = Callable[[torch.Generator, int], tuple[Tensor, Any]]
CondDraw = Callable[[torch.Generator, int], Any]


@dataclasses.dataclass
class DistillSetup:
    """What a recipe provides to a method.

    config: the resolved run config (``method``, ``student``, ``distill``, ``train`` and the method's section).
    teacher: ``teacher(x_t, σ (B,), cond) -> u``. teacher_model: its network (students start from a copy), or None
    for a teacher without one (the exact Gaussian-mixture teacher). new_backbone(): a freshly initialised velocity
    network of the recipe's kind (``model(x, σ·S, cond, extra_condition=None)``, with ``features``/``proj_out``).
    policy_student(policy, num_nodes): the recipe's `PolicyStudent` for a GM/DX policy. shape: one sample's shape.
    draw_data / draw_cond: training batches of data / of conditions. num_timesteps: S, networks see σ·S.
    teacher_identity(): bytes that identify the teacher's weights, computed only by a method that caches teacher
    samples (the key of that cache; None: nothing is cached). teacher_conversion: the network-free
    `piflow.diffusion.DiffusionTeacher` of a teacher network trained as a diffusion model (its policy students
    convert the network's outputs with it), or None for a velocity network.
    """

    config: dict
    teacher: Callable[[Tensor, Tensor, Any], Tensor]
    teacher_model: Optional[nn.Module]
    new_backbone: Callable[[], nn.Module]
    policy_student: Callable[[str, int], nn.Module]
    shape: tuple[int, ...]
    draw_data: DataDraw
    draw_cond: CondDraw
    num_timesteps: float
    teacher_identity: Optional[Callable[[], bytes]] = None
    teacher_conversion: Optional[Any] = None

    @property
    def batch_size(self) -> int:
        return int(self.config["distill"]["batch_size"])

    @property
    def nfe(self) -> int:
        return int(self.config["distill"]["nfe"])

    @property
    def seed(self) -> int:
        return int(self.config["train"]["seed"])

    def base_network(self, method: str = "this method") -> nn.Module:
        """A trainable copy of the teacher's network, or a fresh backbone when the teacher has none. A diffusion
        teacher's network is not a velocity network: a one-line `ConfigError` naming `method`."""
        import copy

        if self.teacher_conversion is not None:
            raise ConfigError(f"{method} starts from a copy of the teacher's network as a velocity network, and this "
                              f"teacher was trained as a diffusion model (prediction_type "
                              f"{self.teacher_conversion.prediction_type!r}); use method=piid or method=x0 (their "
                              f"policy students convert its outputs) or a flow-matching teacher")
        if self.teacher_model is None:
            return self.new_backbone()
        return copy.deepcopy(self.teacher_model).requires_grad_(True)


class FewStepSampler:
    """A trained few-step generator as a sampler: each of its `nfe` steps evaluates the network once, turns the
    output into a policy (`policy_fn`) and runs `piflow.sampling.sample` on the schedule (``shift``,
    ``final_step_size_scale``, ``h``: 0 deterministic, 'inf' re-noise after each step).

    The same interface as `PiFlow` where the CLI, the evaluation and the UI use it: ``nfe``, ``teacher``,
    ``label``, ``sample(noise, nfe, cond, temperature=…, generator=…)``."""

    def __init__(self, policy_fn: Callable[..., Policy], nfe: int, teacher: Any, label: str, *, h: HLike = 0.0,
                 shift: float = 1.0, final_step_size_scale: float = 1.0,
                 total_substeps: int = DEFAULT_TOTAL_SUBSTEPS, needs_step_end: bool = False):
        self.policy_fn, self.nfe, self.teacher, self.label = policy_fn, int(nfe), teacher, label
        self.h, self.shift, self.final_step_size_scale = h, float(shift), float(final_step_size_scale)
        self.total_substeps = int(total_substeps)
        self.needs_step_end = needs_step_end

    @torch.no_grad()
    def sample(self, noise: Tensor, nfe: Optional[int] = None, cond: Any = None, *,
               sigmas: Optional[Sequence[float]] = None, temperature: Union[float, str] = 1.0,
               generator: Optional[torch.Generator] = None, on_step=None, return_trajectory: bool = False,
               progress: bool = False):
        """Samples from noise (B, *shape) in `nfe` steps (default: the trained NFE) or on raw times `sigmas`.
        A policy function that needs each step's end σ (MeanFlow's average velocity over [r, t]) is called as
        ``policy_fn(x, σ_src, cond, σ_dst)``."""
        if nfe is None and sigmas is None:
            nfe = self.nfe
        schedule = FlowMapSDESchedule(self.shift, self.final_step_size_scale, self.h)
        schedule.set_timesteps(nfe, device=noise.device, sigmas=sigmas)
        policy_fn = self.policy_fn
        if self.needs_step_end:
            ends = {float(s): d for s, d in zip(schedule.sigmas[:-1], schedule.sigmas_dst)}

            def policy_fn(x: Tensor, sigma: Tensor, cond: Any) -> Policy:
                return self.policy_fn(x, sigma, cond, ends[float(sigma[0])].expand_as(sigma))
        return sample(policy_fn, noise, cond=cond, schedule=schedule, temperature=temperature,
                      total_substeps=self.total_substeps, generator=generator, on_step=on_step,
                      return_trajectory=return_trajectory, progress=progress)


class Method:
    """One distillation method. Subclasses set `name`, `title`, `paper`, the settings class and its config
    section (None: the method has no settings of its own) and implement `student`, `loss_fn` and `sampler`."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]
    section: ClassVar[Optional[str]] = None
    settings_class: ClassVar[Optional[type]] = None
    loss_title: ClassVar[str] = "loss"

    def __init__(self, setup: DistillSetup):
        self.setup = setup
        self.config = setup.config
        self.settings = self.read_settings(setup.config)

    @classmethod
    def read_settings(cls, config: dict):
        """The method's typed settings from its config section; a bad value is a `ConfigError` naming it."""
        if cls.settings_class is None:
            return None
        try:
            return cls.settings_class(**config[cls.section])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{cls.section} settings: {error}") from None

    def config_as_run(self) -> dict:
        """The config as it is run and recorded in config.yaml (defaults that depend on others resolved)."""
        return self.config

    def loop_iterations(self, iters: int) -> int:
        """Optimiser iterations of the training loop for ``train.iters`` (the budget compared across methods)."""
        return int(iters)

    def student(self) -> nn.Module:
        """The freshly built module the training loop optimises (its state dict is student.safetensors)."""
        raise NotImplementedError

    def loss_fn(self, student: nn.Module):
        """The training loop's ``loss_fn(iteration, generator, backward) -> loss`` for `student`."""
        raise NotImplementedError

    def sampler(self, student: nn.Module):
        """The few-step sampler of a trained `student` (`PiFlow` or `FewStepSampler`)."""
        raise NotImplementedError


def method_name(config: dict) -> str:
    """The config's method; ``student.policy: x0`` (the spelling before methods existed) means ``method: x0``."""
    name = config.get("method", "piid")
    if config.get("student", {}).get("policy") == "x0":
        if name not in ("piid", "x0"):
            raise ConfigError(f"student.policy=x0 is the x0-regression method; it cannot be combined with "
                              f"method={name}")
        return "x0"
    return name
