"""The image benchmark table (`benchmarks/images.py`): the teacher's Euler and diffusers solvers, x0-regression
and GM/DX π-Flow students with several K and NFE, and two ablations, on the same noise, scored in two feature spaces
(`piflow.recipes.image_benchmark`: the metrics that `piflow evaluate` uses too)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from torch import Tensor

from piflow.config import load_config
from piflow.files import write_json
from piflow.recipes import images
from piflow.recipes.image_benchmark import (build_contexts, feature_classifiers_for, format_markdown,
                                            metrics_in_both_spaces)
from piflow.sampling import euler_sample

STUDENTS = [
    # (name, overrides, sampling NFEs)
    ("x0_nfe1", ["method=x0", "distill.nfe=1"], [1]),
    ("x0_nfe2", ["method=x0", "distill.nfe=2"], [2]),
    ("x0_nfe4", ["method=x0", "distill.nfe=4"], [4]),
    ("gm_k8_nfe1", ["student.num_components=8", "distill.nfe=1"], [1]),
    ("gm_k8_nfe2", ["student.num_components=8", "distill.nfe=2"], [2]),
    ("gm_k8_nfe4", ["student.num_components=8", "distill.nfe=4"], [4, 2, 8]),
    ("gm_k32_nfe1", ["student.num_components=32", "distill.nfe=1"], [1]),
    ("gm_k32_nfe2", ["student.num_components=32", "distill.nfe=2"], [2]),
    ("gm_k32_nfe4", ["student.num_components=32", "distill.nfe=4"], [4]),
    ("dx_n10_nfe2", ["student.policy=dx", "distill.nfe=2", "distill.window_substeps=3"], [2]),
    ("dx_n10_nfe4", ["student.policy=dx", "distill.nfe=4", "distill.window_substeps=3"], [4]),
    ("ablation_gm_k8_nfe2_no_dropout", ["student.num_components=8", "distill.nfe=2", "distill.policy_dropout=0"], [2]),
    ("ablation_dx_n10_nfe2_window0", ["student.policy=dx", "distill.nfe=2", "distill.window_substeps=0"], [2]),
]


def run_benchmark(run_dir: Path, dataset: str = "digits", iters: int = 600, num_samples: int = 1000,
                  teacher_run: Optional[Path] = None, only: Optional[list[str]] = None,
                  feature_epochs: int = 30, feature_train_size: Optional[int] = None,
                  teacher_overrides: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict:
    start_time = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dataset": dataset, "iters": iters, "num_samples": num_samples, "rows": {}}
    teacher_run = teacher_run or run_dir / "teacher"
    if not (teacher_run / "teacher" / "config.json").is_file():
        log(f"[bench] training the teacher into {teacher_run}")
        cfg = load_config(images.IMAGE_TEACHER_DEFAULTS, None,
                          [f"dataset={dataset}", "train.progress=false", *teacher_overrides])
        images.train_teacher(cfg, teacher_run)
    teacher_model, teacher_cfg = images.load_teacher(str(teacher_run))
    train_set = images.load_dataset(teacher_cfg, "train")
    test_set = images.load_dataset(teacher_cfg, "test")
    (train_x, train_y), (test_x, test_y) = train_set.tensors(), test_set.tensors()
    num_classes = train_set.num_classes
    teacher = images.make_teacher(teacher_model, num_classes)

    feature_nets, feature_metrics = feature_classifiers_for(run_dir, train_x, train_y, test_x, test_y, num_classes,
                                                            feature_epochs, feature_train_size, log)
    results["feature_net"], results["feature_net_b"] = feature_metrics
    log("[bench] feature classifiers' validation accuracy: "
        + " / ".join(str(metrics.get("val_accuracy")) for metrics in feature_metrics))

    real = test_x if len(test_x) >= 100 else train_x
    contexts = build_contexts(teacher, feature_nets, real, train_x.shape[1:], num_classes, num_samples)
    context = contexts[0]
    rows = results["rows"]

    def add(name: str, samples: Tensor, nfe: int, family: str, extra: Optional[dict] = None,
            paired: bool = True) -> None:
        rows[name] = dict(metrics_in_both_spaces(contexts, samples, paired), nfe=nfe, family=family, **(extra or {}))
        log(f"[bench] {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[name].items()
                                            if isinstance(v, float)))

    add("real test images (reference)", real[:num_samples], 0, "reference", paired=False)
    for steps in (1, 2, 4, 8, 32):
        add(f"teacher Euler {steps}", euler_sample(teacher, context.noise_a, steps, context.labels_a), steps,
            "teacher Euler")
    try:
        from piflow.integrations.diffusers.solvers import diffusers_sample

        for solver in ("flow-euler", "dpm-solver++", "unipc"):
            for steps in (2, 4, 8):
                add(f"teacher {solver} {steps}", diffusers_sample(teacher, context.noise_a, steps, context.labels_a,
                                                                  solver=solver), steps, f"teacher {solver}")
    except ImportError:
        log("[bench] diffusers not installed: solver baselines skipped")

    for name, overrides, nfes in STUDENTS:
        if only and name not in only:
            continue
        student_dir = run_dir / name
        if not (student_dir / "student.safetensors").is_file():
            log(f"[bench] distilling {name} ({iters} iterations)")
            cfg = load_config(images.IMAGE_DISTILL_DEFAULTS, None, [
                f"dataset={dataset}", f"teacher={teacher_run}", f"train.iters={iters}", "train.progress=false",
                "train.checkpoint_every=0", *overrides])
            images.distill(cfg, student_dir)
        pf, cfg = images.load_student(student_dir)
        train_seconds = json.loads((student_dir / "metrics.json").read_text())["train_seconds"]
        family = {"x0": "x0 regression", "dx": "DX"}.get(cfg["student"]["policy"],
                                                         f"GM K={cfg['student']['num_components']}")
        if name.startswith("ablation"):
            family = "ablation"
        for nfe in nfes:
            samples = pf.sample(context.noise_a, nfe=nfe, cond=context.labels_a)
            label = f"{name} @ {nfe} NFE" + (" (elastic)" if nfe != pf.nfe else "")
            add(label, samples, nfe, family, {"train_seconds": train_seconds})

    results["seconds"] = time.perf_counter() - start_time
    results["goals"] = check_goals(rows)
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(format_markdown(results))
    plot_quality_vs_nfe(rows, run_dir / "fd_teacher_vs_nfe.png")
    return results



def check_goals(rows: dict) -> dict:
    """The issue's goals, evaluated honestly on whatever rows exist."""
    goals: dict[str, Any] = {}
    floor = rows.get("teacher Euler 32", {}).get("fd_teacher")
    gm4 = rows.get("gm_k8_nfe4 @ 4 NFE", {})
    if gm4 and floor:
        goals["gm4_fd_teacher_over_floor"] = gm4["fd_teacher"] / floor
        goals["gm4_within_1.5x_floor"] = gm4["fd_teacher"] <= 1.5 * floor
    dpm4 = rows.get("teacher dpm-solver++ 4", {})
    if gm4 and dpm4:
        goals["gm4_over_dpm4"] = gm4["fd_teacher"] / dpm4["fd_teacher"]
        goals["gm4_at_most_half_dpm4"] = gm4["fd_teacher"] <= 0.5 * dpm4["fd_teacher"]
    x04 = rows.get("x0_nfe4 @ 4 NFE", {})
    if gm4 and x04:
        goals["gm4_below_x0_4"] = gm4["fd_teacher"] < x04["fd_teacher"]
    teacher = rows.get("teacher Euler 32", {})
    if gm4 and teacher:
        goals["gm4_recall_ratio"] = gm4["recall"] / max(teacher["recall"], 1e-12)
        goals["gm4_coverage_ratio"] = gm4["coverage"] / max(teacher["coverage"], 1e-12)
        goals["gm4_recall_coverage_at_least_0.95x"] = min(goals["gm4_recall_ratio"],
                                                          goals["gm4_coverage_ratio"]) >= 0.95
    return goals


def plot_quality_vs_nfe(rows: dict, path: Path) -> None:
    from piflow.recipes.plots import plot_metric_vs_nfe

    series: dict[str, dict[int, float]] = {}
    for name, row in rows.items():
        if row["family"] in ("reference", "ablation") or "elastic" in name:
            continue
        series.setdefault(row["family"], {})[row["nfe"]] = row["fd_teacher"]
    plot_metric_vs_nfe(series, path, "FD-teacher (classifier features)")
