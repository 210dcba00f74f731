"""Network-free policies π(x_t, σ_t) → velocity, built once per network evaluation."""
from piflow.policies.base import Policy
from piflow.policies.dx import DXPolicy
from piflow.policies.gmflow import GMFlowPolicy

__all__ = ["Policy", "GMFlowPolicy", "DXPolicy", "make_policy"]


def make_policy(kind: str, **kwargs) -> Policy:
    """Build a policy by name: ``"gmflow"`` (alias ``"gm"``) or ``"dx"``."""
    name = kind.lower()
    if name in ("gmflow", "gm"):
        return GMFlowPolicy(**kwargs)
    if name == "dx":
        return DXPolicy(**kwargs)
    raise ValueError(f"unknown policy {kind!r}; expected one of 'gmflow', 'dx'")
