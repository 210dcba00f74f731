"""The claims the benchmark checks, on the means over seeds of a summary (only those whose rows exist)."""
from __future__ import annotations

from typing import Any

from piflow_bench.rows import find, slug
from piflow_bench.students import DMD2, MEANFLOW_INIT, MEANFLOW_SCRATCH, PIID


def check_image_goals(summary: list[dict]) -> dict:
    """π-ID GM at 4 NFE vs DMD2 (quality in features A and B, within-class diversity, recall) and vs the teacher's
    own 4-step Euler and DPM-Solver++ (quality, HF power closer to the teacher's); π-ID at 1 NFE vs MeanFlow."""
    goals: dict[str, Any] = {}
    piid4, dmd4 = find(summary, PIID.label, 4), find(summary, DMD2.label, 4)
    if piid4 and dmd4:
        goals["nfe4_piid_fd_teacher_le_dmd2_A"] = piid4["fd_teacher"] <= dmd4["fd_teacher"]
        goals["nfe4_piid_fd_teacher_le_dmd2_B"] = piid4["fd_teacher_b"] <= dmd4["fd_teacher_b"]
        goals["nfe4_piid_class_diversity_ge_dmd2"] = (piid4["class_distance"] >= dmd4["class_distance"]
                                                      and piid4["class_vendi"] >= dmd4["class_vendi"])
        goals["nfe4_piid_recall_ge_dmd2"] = piid4["recall"] >= dmd4["recall"]
    piid1 = find(summary, PIID.label, 1)
    for spec in (MEANFLOW_SCRATCH, MEANFLOW_INIT):
        mf1 = find(summary, spec.label, 1)
        if piid1 and mf1:
            goals[f"nfe1_piid_fd_teacher_le_{spec.key}_A"] = piid1["fd_teacher"] <= mf1["fd_teacher"]
            goals[f"nfe1_piid_fd_teacher_le_{spec.key}_B"] = piid1["fd_teacher_b"] <= mf1["fd_teacher_b"]
    for solver in ("teacher Euler", "teacher DPM-Solver++"):
        other = find(summary, solver, 4)
        if piid4 and other:
            name = slug(solver)
            goals[f"nfe4_piid_fd_teacher_lt_{name}_A"] = piid4["fd_teacher"] < other["fd_teacher"]
            goals[f"nfe4_piid_fd_teacher_lt_{name}_B"] = piid4["fd_teacher_b"] < other["fd_teacher_b"]
            goals[f"nfe4_piid_hf_closer_to_teacher_than_{name}"] = (abs(piid4["hf_ratio"] - 1)
                                                                     < abs(other["hf_ratio"] - 1))
    return goals


def check_toy_goals(summary: list[dict]) -> dict:
    """2-D (exact teacher): π-ID at 4 NFE covers the modes and matches their masses at least as well as the
    teacher's 8-step Euler; DMD2's mode-mass errors are reported next to it."""
    goals: dict[str, Any] = {}
    piid4, euler8 = find(summary, PIID.label, 4), find(summary, "teacher Euler", 8)
    if piid4:
        goals["nfe4_piid_modes_covered"] = piid4["modes_covered"]
        if euler8:
            goals["nfe4_piid_mode_mass_error_le_teacher_euler8"] = (piid4["mode_mass_error"]
                                                                    <= euler8["mode_mass_error"])
    for nfe in DMD2.nfes:
        dmd = find(summary, DMD2.label, nfe)
        if dmd:
            goals[f"nfe{nfe}_dmd2_mode_mass_error"] = dmd["mode_mass_error"]
    return goals


def goals_text(goals: dict) -> str:
    return "\nGoals (means over seeds): " + ", ".join(f"{k} = {v}" for k, v in goals.items()) + "\n"
