"""`PiIDSettings`: the π-ID settings, one typed object from the YAML config through `PiFlow`, the losses, the
adapter's config and the pipelines (algorithm.md §4.3, §4.7)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from piflow.checks import check_int, check_number
from piflow.schedule import check_final_step_size_scale, check_nfe, teacher_ratio

POLICY_KINDS = ("gmflow", "dx")
POLICY_ALIASES = {"gm": "gmflow", "gmflow": "gmflow", "dx": "dx"}
DEFAULT_POLICY_DROPOUT = {"gmflow": 0.05, "dx": 0.0}
SETTING_ALIASES = {"gm_dropout": "policy_dropout"}     # the older name, GMFlow only (as it always was)


def policy_kind(name: Any) -> str:
    """The canonical policy name ("gmflow" or "dx") of `name` ("gm" is an alias), else a ValueError."""
    kind = POLICY_ALIASES.get(name.lower()) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown policy {name!r}; expected one of {list(POLICY_KINDS)} ('gm' = 'gmflow')")
    return kind


@dataclass(frozen=True)
class PiIDSettings:
    """π-ID and few-step schedule settings (defaults: the paper's ImageNet values, §4.7).

    policy: "gmflow" or "dx". nfe: training number of steps. final_step_size_scale: f, the last segment's raw length
    relative to the others. shift: time warp m. num_intermediate_states: M teacher queries per segment.
    window_substeps: w, micro-window length in substeps (0 = local velocity). policy_dropout: p on the detached
    rollout copy (None: 0.05 for GMFlow, 0 for DX; `gm_dropout` is an accepted alias). loss_scale: factor on ½·MSE.
    total_substeps: Euler substeps per unit of raw time. num_decay_iters: D of the trajectory-mixing schedule
    (teacher_ratio = 1 − iter/D; 0 = on-policy only).
    """

    policy: str = "gmflow"
    nfe: int = 4
    final_step_size_scale: float = 1.0
    shift: float = 1.0
    num_intermediate_states: int = 2
    window_substeps: int = 0
    policy_dropout: Optional[float] = None
    loss_scale: float = 3.0
    total_substeps: int = 128
    num_decay_iters: int = 0

    def __post_init__(self):
        kind = policy_kind(self.policy)
        dropout = DEFAULT_POLICY_DROPOUT[kind] if self.policy_dropout is None else self.policy_dropout
        values = dict(
            policy=kind, nfe=check_nfe(self.nfe),
            final_step_size_scale=check_final_step_size_scale(self.final_step_size_scale),
            shift=check_number(self.shift, "shift", 0.0, low_open=True),
            num_intermediate_states=check_int(self.num_intermediate_states, "num_intermediate_states", 1),
            window_substeps=check_int(self.window_substeps, "window_substeps", 0),
            policy_dropout=check_number(dropout, "policy_dropout", 0.0, 1.0, high_open=True),
            loss_scale=check_number(self.loss_scale, "loss_scale", 0.0, low_open=True),
            total_substeps=check_int(self.total_substeps, "total_substeps", 1),
            num_decay_iters=check_int(self.num_decay_iters, "num_decay_iters", 0))
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], **overrides) -> "PiIDSettings":
        """Settings from a config section (e.g. ``distill``): its keys that name a field (or an alias such as
        ``gm_dropout``) are used, other keys (batch size, data_free, …) are ignored; `overrides` win."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dict(mapping, **overrides).items():
            new_key = SETTING_ALIASES.get(key, key)
            if new_key != key and new_key in mapping:
                raise ValueError(f"{key} is the old name of {new_key}: give only {new_key}")
            if new_key in names:
                values[new_key] = value
        if "gm_dropout" in mapping and policy_kind(values.get("policy", cls.policy)) != "gmflow" \
                and values["policy_dropout"]:
            raise ValueError("gm_dropout applies to GMFlow policies only; use policy_dropout for a DX policy")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def teacher_ratio(self, iteration: int) -> float:
        """ρ at `iteration` of the trajectory-mixing schedule."""
        return teacher_ratio(iteration, self.num_decay_iters)

    @property
    def sampling(self) -> dict:
        """The schedule a pipeline needs to sample as trained: nfe, shift, final_step_size_scale, total_substeps."""
        return {"nfe": self.nfe, "shift": self.shift, "final_step_size_scale": self.final_step_size_scale,
                "total_substeps": self.total_substeps}
