"""`FlowMapSDEScheduler` as a diffusers scheduler (`SchedulerMixin` + `ConfigMixin`), algorithm.md §5.1.

It accepts the stock `FlowMatchEulerDiscreteScheduler` config (``FlowMapSDEScheduler.from_config(pipe.scheduler.config,
final_step_size_scale=0.5)``), including its dynamic-shift settings, and delegates the math to
`piflow.sampling.FlowMapSDESchedule`. Unlike solver schedulers, `step` takes the policy-rolled-out state x_dst
(at ``sigmas_dst[i]``) as `model_output` and maps it to the next grid point; with h = 0 it is the identity.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from piflow.sampling import FlowMapSDESchedule
from piflow.timewarp import NUM_TIMESTEPS, dynamic_shift


class FlowMapSDEScheduler(SchedulerMixin, ConfigMixin):
    """Few-step policy sampler schedule for diffusers pipelines.

    Args (config): num_train_timesteps (S_t), shift, use_dynamic_shifting with base_shift / max_shift (log-shifts)
    and base_image_seq_len / max_image_seq_len (as in the stock flow-matching scheduler), h (0 = deterministic,
    'inf' = re-noising), final_step_size_scale (f; 0.5 for the FLUX/Qwen students).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = int(NUM_TIMESTEPS), shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, h: Union[float, str] = 0.0,
                 final_step_size_scale: float = 1.0):
        self._core: Optional[FlowMapSDESchedule] = None
        self._step_index = 0
        self.timesteps = None
        self.sigmas = None

    def shift_for(self, image_seq_len: Optional[int] = None) -> float:
        """The time warp used for a sequence length (dynamic shifting) or the fixed `shift`."""
        if not self.config.use_dynamic_shifting:
            return float(self.config.shift)
        if image_seq_len is None:
            raise ValueError("image_seq_len is required when use_dynamic_shifting=True")
        return dynamic_shift(image_seq_len, self.config.base_image_seq_len, self.config.max_image_seq_len,
                             self.config.base_shift, self.config.max_shift)

    def set_timesteps(self, num_inference_steps: Optional[int] = None,
                      device: Union[str, torch.device, None] = None, image_seq_len: Optional[int] = None,
                      sigmas: Optional[list] = None) -> None:
        """`num_inference_steps` steps, or an explicit list of raw times `sigmas` (warped by the shift in use)."""
        core = FlowMapSDESchedule(self.shift_for(image_seq_len), self.config.final_step_size_scale, self.config.h,
                                  self.config.num_train_timesteps)
        core.set_timesteps(num_inference_steps, device=device or "cpu", sigmas=sigmas)
        self._core = core
        self.num_inference_steps = core.num_inference_steps
        self.sigmas, self.sigmas_dst = core.sigmas, core.sigmas_dst
        self.timesteps, self.timesteps_dst = core.timesteps, core.timesteps_dst
        self._step_index = 0

    @property
    def step_index(self) -> int:
        return self._step_index

    @property
    def schedule(self) -> FlowMapSDESchedule:
        """The `piflow.sampling.FlowMapSDESchedule` of the last `set_timesteps` (what `piflow.sampling.sample`
        steps through)."""
        if self._core is None:
            raise RuntimeError("call set_timesteps first")
        return self._core

    @property
    def shift_in_use(self) -> float:
        return self.schedule.shift

    def step_done(self, step_index: int) -> None:
        """Record that step `step_index` ran outside `step` (the `piflow.sampling.sample` loop steps the schedule
        itself): `step_index` becomes step_index + 1, as after `step`."""
        self._step_index = step_index + 1

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _index_for(self, timestep) -> int:
        if timestep is None:
            return self._step_index
        value = float(timestep)
        matches = (self.timesteps - value).abs() < 1e-4 * max(self.config.num_train_timesteps, 1)
        if not bool(matches.any()):
            raise ValueError(f"timestep {value} is not one of this scheduler's timesteps {self.timesteps.tolist()}")
        return int(matches.nonzero()[0])

    def step(self, model_output: torch.Tensor, timestep=None, sample: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """model_output = x_dst, the policy rollout result at ``sigmas_dst[i]``; returns the state at sigmas[i+1]."""
        if self._core is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        index = self._index_for(timestep)
        prev_sample = self._core.step(model_output, index, generator)
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)
