"""`PiIDSettings`: the π-ID settings, one typed object from the YAML config through `PiFlow`, the losses, the
adapter's config and the pipelines (algorithm.md §4.3, §4.7)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from piflow.checks import check_int, check_number
from piflow.schedule import DEFAULT_TOTAL_SUBSTEPS, check_final_step_size_scale, check_nfe, teacher_ratio

POLICY_KINDS = ("gmflow", "dx")
POLICY_ALIASES = {"gm": "gmflow", "gmflow": "gmflow", "dx": "dx"}
# Policy dropout p (algorithm.md §4.7), the one place its defaults are documented. The authors use two values:
# * 0.05 in their ImageNet / GM configs (class-conditional DiT students): `DEFAULT_POLICY_DROPOUT`, what
#   `PiIDSettings(policy_dropout=None)` resolves to and what the 2-D and image recipes run;
# * 0.1 in their text-to-image configs (FLUX, Qwen-Image, … LoRA students, which see far fewer distinct
#   trajectories per parameter): `TEXT_TO_IMAGE_POLICY_DROPOUT`, the default of the text-to-image recipe.
# DX policies have no dropout by default (it acts on GM components; a DX grid has none to drop).
DEFAULT_POLICY_DROPOUT = {"gmflow": 0.05, "dx": 0.0}
TEXT_TO_IMAGE_POLICY_DROPOUT = {"gmflow": 0.1, "dx": 0.0}
OLD_DROPOUT_NAME = "gm_dropout"           # the older name of `policy_dropout`; it applied to GMFlow policies only


def rename_old_dropout(section: Mapping[str, Any], policy: Any, old_file: bool = False) -> dict:
    """The one rule for ``gm_dropout``, the older name of ``policy_dropout`` (settings, `PiFlow` keywords and old
    config files): `section` with it renamed. Giving both names is a ValueError; for a GMFlow policy (or none
    named) the value is kept; for a DX (or x0) policy, where the old name never applied, a zero stays zero and a
    non-zero value is a ValueError, except in an old file (`old_file`, e.g. a saved run config whose template
    default was 0.05), which keeps its old meaning: no dropout."""
    section = dict(section)
    if OLD_DROPOUT_NAME not in section:
        return section
    if "policy_dropout" in section:
        raise ValueError(f"{OLD_DROPOUT_NAME} is the old name of policy_dropout: give only policy_dropout")
    value = section.pop(OLD_DROPOUT_NAME)
    kind = POLICY_ALIASES.get(policy.lower(), policy.lower()) if isinstance(policy, str) else policy
    if kind not in ("dx", "x0"):
        section["policy_dropout"] = value
    elif old_file or not value:
        section["policy_dropout"] = 0.0
    else:
        raise ValueError(f"{OLD_DROPOUT_NAME} applies to GMFlow policies only; use policy_dropout for a DX policy")
    return section


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
    rollout copy (None: `DEFAULT_POLICY_DROPOUT`; ``gm_dropout`` is accepted, see `rename_old_dropout`).
    loss_scale: factor on ½·MSE.
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
    total_substeps: int = DEFAULT_TOTAL_SUBSTEPS
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
        policy = dict(mapping, **overrides).get("policy", cls.policy)
        section = dict(rename_old_dropout(mapping, policy), **rename_old_dropout(overrides, policy))
        values = {key: value for key, value in section.items() if key in names}
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
