"""`PiFlow`: the one-object API — ``loss = pf(x0, cond)``, ``pf.data_free_loss(noise, cond)``, ``pf.sample(noise)``.

The student is any module ``student(x, sigma (B,), cond)`` returning either a `Policy` or a dict of policy
parameters (``means``/``logweights``/``logstds`` for GMFlow, ``u_grid`` for DX) that `policy_from_outputs` turns
into the configured policy. The teacher is any ``teacher(x_t, sigma_t, cond) -> u``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from piflow.piid import piid_data_free_loss, piid_loss
from piflow.policies import Policy, policy_from_outputs
from piflow.sampling import HLike, sample
from piflow.settings import PiIDSettings


class PiFlow(nn.Module):
    """π-Flow distillation and sampling around a policy student.

    Args:
        student: module ``(x, sigma, cond) -> Policy | dict``.
        teacher: ``(x_t, sigma_t, cond) -> u`` (frozen; queried under no_grad); None for a sampling-only PiFlow.
        settings: the π-ID settings (`PiIDSettings`); or give its fields as keywords instead
            (``PiFlow(student, teacher, policy="dx", nfe=2)``; ``gm_dropout`` is accepted for ``policy_dropout``).
        policy_kwargs: extra policy settings (GM ``eps``; DX ``mode``, ``segment_size``, ``shift``, ``eps``).
            DX defaults: segment_size = one segment (1/(nfe − 1 + f)), shift = the settings' shift.
    """

    def __init__(self, student: nn.Module, teacher: Callable[..., Tensor], settings: Optional[PiIDSettings] = None,
                 *, policy_kwargs: Optional[dict] = None, **setting_fields):
        super().__init__()
        if settings is None:
            settings = PiIDSettings.from_mapping(setting_fields)
        elif setting_fields:
            raise TypeError(f"give either settings or setting keywords, not both (got {sorted(setting_fields)})")
        if not isinstance(settings, PiIDSettings):
            raise TypeError(f"settings must be a PiIDSettings, got {type(settings).__name__}")
        if teacher is not None and not callable(teacher):
            raise TypeError("teacher must be a callable teacher(x_t, sigma_t, cond) -> u, or None (sampling only)")
        self.student = student
        self.teacher = teacher
        self.settings = settings
        self.policy_kwargs = dict(policy_kwargs or {})

    @property
    def policy_kind(self) -> str:
        return self.settings.policy

    @property
    def nfe(self) -> int:
        return self.settings.nfe

    def policy(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Policy:
        """Evaluate the student once at (x, σ) and return its policy."""
        s = self.settings
        return policy_from_outputs(self.student(x, sigma, cond), x, sigma, s.policy, nfe=s.nfe,
                                   final_step_size_scale=s.final_step_size_scale, shift=s.shift,
                                   policy_kwargs=self.policy_kwargs)

    def _require_teacher(self) -> Callable[..., Tensor]:
        if self.teacher is None:
            raise RuntimeError("this PiFlow was built without a teacher (sampling only); pass one to train")
        return self.teacher

    def forward(self, x0: Tensor, cond: Any = None, iteration: int = 0,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Data-dependent π-ID loss on a batch of data x0 (B, C, *spatial)."""
        return piid_loss(self.policy, self._require_teacher(), x0, cond, self.settings, iteration=iteration,
                         generator=generator).loss

    def data_free_loss(self, noise: Tensor, cond: Any = None, iteration: int = 0,
                       backward: Optional[Callable[[Tensor], None]] = Tensor.backward,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """Data-free multistep π-ID from pure noise (B, C, *spatial): each step is back-propagated at once with
        `backward` (default ``Tensor.backward``; the training loop passes its own) and the detached total is
        returned; ``backward=None`` returns the graph-carrying total instead."""
        return piid_data_free_loss(self.policy, self._require_teacher(), noise, cond, self.settings,
                                   iteration=iteration, backward=backward, generator=generator)

    @torch.no_grad()
    def sample(self, noise: Tensor, nfe: Optional[int] = None, cond: Any = None, *,
               sigmas: Optional[Sequence[float]] = None, temperature: Union[float, str] = 1.0, h: HLike = 0.0,
               total_substeps: Optional[int] = None, generator: Optional[torch.Generator] = None,
               on_step=None, return_trajectory: bool = False, progress: bool = False):
        """Generate from noise (B, C, *spatial) with `nfe` student evaluations (default: the training NFE), or on
        an explicit list of raw times `sigmas`; `total_substeps` (policy Euler substeps per unit of raw time)
        defaults to the training value; `on_step` as in `piflow.sampling.sample`."""
        s = self.settings
        if nfe is None and sigmas is None:
            nfe = s.nfe
        return sample(self.policy, noise, nfe, cond, sigmas=sigmas, shift=s.shift,
                      final_step_size_scale=s.final_step_size_scale, h=h, temperature=temperature,
                      total_substeps=s.total_substeps if total_substeps is None else total_substeps,
                      generator=generator, on_step=on_step, return_trajectory=return_trajectory, progress=progress)
