"""The students of the claims benchmark as data: which method, at which NFE, with which config overrides and step
budget. Every student is trained by `piflow distill` (the recipes' `distill`, one run skeleton: config.yaml, lock,
checkpoints, resume) into its own run directory and sampled through its method's sampler."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """One student kind of the table.

    key: its row key (``--only KEY[:NFE]``). label: its table label. method: the `piflow.methods` name. nfes: the
    NFEs it is scored at. per_nfe: True when each NFE is a student of its own (trained with distill.nfe = NFE);
    False when one student is sampled at every NFE (MeanFlow). overrides: config overrides of its runs.
    scratch_budget: trained from scratch with the teacher's steps added to the student budget and the teacher's
    training settings (the image teacher's own flow-matching budget, as a from-scratch model needs).
    """

    key: str
    label: str
    method: str
    nfes: tuple[int, ...]
    per_nfe: bool = True
    overrides: tuple[str, ...] = ()
    scratch_budget: bool = False

    def directory(self, students: Path, nfe: int, seed: int, tag: str = "") -> Path:
        name = f"{self.key}{tag}_nfe{nfe}_seed{seed}" if self.per_nfe else f"{self.key}{tag}_seed{seed}"
        return students / name


PIID = StudentSpec("piid", "π-ID GM K=8", "piid", (1, 2, 4), overrides=("student.policy=gmflow",))
X0 = StudentSpec("x0", "x0-regression", "x0", (1, 4))
DMD2 = StudentSpec("dmd2", "DMD2", "dmd2", (1, 4))
MEANFLOW_INIT = StudentSpec("meanflow_init", "MeanFlow (teacher init)", "meanflow", (1, 2), per_nfe=False,
                            overrides=("meanflow.init=teacher",))
MEANFLOW_SCRATCH = StudentSpec("meanflow_scratch", "MeanFlow (scratch)", "meanflow", (1, 2), per_nfe=False,
                               overrides=("meanflow.init=scratch",), scratch_budget=True)

IMAGE_STUDENTS = (PIID, X0, DMD2, MEANFLOW_INIT, MEANFLOW_SCRATCH)
TOY_STUDENTS = (PIID, X0, DMD2, MEANFLOW_SCRATCH)       # the exact teacher has no network to start from
# the order in which one seed's students are trained: those the goals compare first, so a run cut short has them
PRIORITY = [("piid", 4), ("dmd2", 4), ("piid", 1), ("meanflow_init", None), ("meanflow_scratch", None),
            ("piid", 2), ("x0", 4), ("x0", 1), ("dmd2", 1)]
# equal compute: (student, NFE, the other student whose measured training time it is given)
EQUAL_COMPUTE = (("piid", 4, "dmd2"), ("dmd2", 4, "piid"))
STUDENTS_BY_KEY = {spec.key: spec for spec in IMAGE_STUDENTS}


def jobs(specs) -> list[tuple[StudentSpec, Optional[int]]]:
    """(spec, training NFE — None for one run sampled at every NFE) of every student, in `PRIORITY` order."""
    found = [(spec, nfe) for spec in specs for nfe in (spec.nfes if spec.per_nfe else (None,))]
    return sorted(found, key=lambda job: PRIORITY.index((job[0].key, job[1])) if (job[0].key, job[1]) in PRIORITY
                  else len(PRIORITY))


def equal_compute_key(key: str, nfe: int, other_key: str) -> tuple[str, int]:
    """The `parse_row_keys` key of an `EQUAL_COMPUTE` row (``piid:4@dmd2``: π-ID given DMD2's train time)."""
    return f"{key}@{other_key}", nfe


def parse_row_keys(texts: list[str]) -> list[tuple[str, Optional[int]]]:
    """``key:nfe`` (or ``key`` for MeanFlow) strings as `PRIORITY` keys, ``key:nfe@other`` as `equal_compute_key`s;
    an unknown one is a one-line ValueError listing the known keys."""
    known = {f"{key}:{nfe}" if nfe is not None else key: (key, nfe) for key, nfe in PRIORITY}
    known.update({f"{key}:{nfe}@{other}": equal_compute_key(key, nfe, other) for key, nfe, other in EQUAL_COMPUTE})
    unknown = [text for text in texts if text not in known]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {', '.join(known)}")
    return [known[text] for text in texts]


def override(key: str, value: Any) -> str:
    """A ``key=value`` override of any config value (JSON is YAML: lists, null, booleans, numbers)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def distill_student(recipe, defaults: dict, directory: Path, overrides: list[str],
                    log: Callable[[str], None]):
    """Train (or resume, or just load) the student of `directory` with the recipe's `distill` on its distillation
    `defaults` and `overrides`; returns its sampler."""
    from piflow.config import load_config

    if not (directory / "student.safetensors").is_file():
        log(f"[claims] distilling {directory.name}")
        recipe.distill(load_config(defaults, None, overrides), directory)
    return recipe.load_student(directory)[0]
