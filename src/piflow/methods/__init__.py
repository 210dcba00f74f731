"""Distillation methods behind one interface (`piflow.methods.base.Method`) and one table, `METHODS`, which the
CLI (`piflow distill method=NAME`), the config defaults, the claims benchmark and the README's methods table read.

| name | class | settings section | file |
|---|---|---|---|
| piid | `PiID` — π-ID on a GM/DX policy student (the paper's method) | ``distill`` (`PiIDSettings`) | piid.py |
| x0 | `X0Regression` — one-node DX student regressed on the teacher's ODE endpoints | ``distill`` | x0.py |
| dmd2 | `DMD2` — distribution matching with a fake score (no GAN term) | ``dmd2`` (`DMD2Settings`) | dmd2.py |
| meanflow | `MeanFlow` — average-velocity net, MeanFlow identity | ``meanflow`` (`MeanFlowSettings`) | meanflow.py |

Every method samples through `piflow.sampling.sample` (its steps are policies rolled out to the step's end).
"""
from __future__ import annotations

from piflow.config import ConfigError, dataclass_defaults
from piflow.methods.base import DistillSetup, FewStepSampler, Method, method_name
from piflow.methods.dmd2 import DMD2, DMD2Settings
from piflow.methods.meanflow import MeanFlow, MeanFlowSettings
from piflow.methods.piid import PiID
from piflow.methods.x0 import X0Regression

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (PiID, X0Regression, DMD2, MeanFlow)}

__all__ = ["METHODS", "DistillSetup", "FewStepSampler", "Method", "DMD2Settings", "MeanFlowSettings",
           "make_method", "method_name", "method_sections", "student_name"]


def method_sections() -> dict:
    """The config keys every distillation recipe's defaults carry for the methods: ``method`` and one section per
    method with settings of its own (built from their dataclasses' defaults, the single source)."""
    sections: dict = {"method": "piid"}
    for cls in METHODS.values():
        if cls.section is not None:
            sections[cls.section] = dataclass_defaults(cls.settings_class)
    return sections


def make_method(setup: DistillSetup) -> Method:
    """The configured method on `setup`; an unknown name is a `ConfigError` listing the methods."""
    name = method_name(setup.config)
    if name not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {name!r}")
    return METHODS[name](setup)


def student_name(config: dict) -> str:
    """The short name of a run's student in evaluation rows: its policy for π-ID ("gmflow", "dx"), else the
    method's name ("x0", "dmd2", "meanflow")."""
    name = method_name(config)
    return config["student"]["policy"] if name == "piid" else name
