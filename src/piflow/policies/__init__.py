"""Network-free policies π(x_t, σ_t) → velocity, built once per network evaluation."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from torch import Tensor

from piflow.policies.base import Policy
from piflow.policies.dx import DXPolicy
from piflow.policies.gmflow import GMFlowPolicy
from piflow.schedule import dx_segment_size
from piflow.settings import policy_kind

__all__ = ["Policy", "GMFlowPolicy", "DXPolicy", "POLICY_CLASSES", "POLICY_OUTPUTS", "make_policy",
           "policy_from_outputs", "resolve_policy_kwargs"]

POLICY_CLASSES = {"gmflow": GMFlowPolicy, "dx": DXPolicy}
POLICY_OUTPUTS = {"gmflow": frozenset({"means", "logstds", "logweights"}), "dx": frozenset({"u_grid"})}


def make_policy(kind: str, **kwargs) -> Policy:
    """Build a policy by name: ``"gmflow"`` (alias ``"gm"``) or ``"dx"``, with that class's arguments."""
    return POLICY_CLASSES[policy_kind(kind)](**kwargs)


def resolve_policy_kwargs(kind: str, policy_kwargs: Optional[Mapping[str, Any]] = None, *, nfe: int = 1,
                          final_step_size_scale: float = 1.0, shift: float = 1.0) -> dict:
    """`policy_kwargs` completed with the defaults of the training schedule: a DX policy's ``segment_size`` (one
    segment, 1/(nfe − 1 + f); the whole [0, 1] for nfe = 1) and ``shift``; GMFlow has none."""
    kwargs = dict(policy_kwargs or {})
    if policy_kind(kind) == "dx":
        kwargs.setdefault("segment_size", dx_segment_size(nfe, final_step_size_scale))
        kwargs.setdefault("shift", float(shift))
    return kwargs


def policy_from_outputs(outputs: Union[Policy, Mapping[str, Tensor]], x_src: Tensor, sigma_src: Tensor, kind: str,
                        *, nfe: int = 1, final_step_size_scale: float = 1.0, shift: float = 1.0,
                        policy_kwargs: Optional[Mapping[str, Any]] = None) -> Policy:
    """The one place where a student's outputs become a policy (training, `PiFlow.sample` and the pipelines).

    Args:
        outputs: a `Policy` (checked to be of `kind`) or the student's dict: ``means``/``logweights``/``logstds``
            (GMFlow) or ``u_grid`` (DX); tensors of any float dtype (the policy computes in float32).
        x_src (B, C, *spatial), sigma_src (B,): where the student was evaluated.
        kind: "gmflow" (alias "gm") or "dx".
        nfe, final_step_size_scale, shift: the training schedule; a DX policy's defaults come from it (segment_size
            = one segment 1/(nfe − 1 + f), the whole [0, 1] for nfe = 1; shift = `shift`).
        policy_kwargs: extra policy settings (GM ``eps``; DX ``mode``, ``segment_size``, ``shift``, ``eps``).
    """
    kind = policy_kind(kind)
    if isinstance(outputs, Policy):
        if not isinstance(outputs, POLICY_CLASSES[kind]):
            raise TypeError(f"student returned a {type(outputs).__name__}, but the policy is {kind!r}")
        return outputs
    if not isinstance(outputs, Mapping):
        raise TypeError(f"student must return a Policy or a dict of policy parameters, got {type(outputs).__name__}")
    if not POLICY_OUTPUTS[kind] <= set(outputs):
        other = next((name for name, keys in POLICY_OUTPUTS.items() if keys <= set(outputs)), None)
        hint = (f"a {other} student: use policy={other!r}" if other is not None else
                f"expected {sorted(POLICY_OUTPUTS[kind])}")
        raise ValueError(f"policy={kind!r} got student outputs {sorted(outputs)}, i.e. {hint}")
    kwargs = resolve_policy_kwargs(kind, policy_kwargs, nfe=nfe, final_step_size_scale=final_step_size_scale,
                                   shift=shift)
    parameters = {key: outputs[key].float() for key in POLICY_OUTPUTS[kind]}
    return POLICY_CLASSES[kind](**parameters, x_src=x_src, sigma_src=sigma_src, **kwargs)
