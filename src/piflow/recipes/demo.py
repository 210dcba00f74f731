"""`piflow demo`: the end-to-end run behind `make demo`.

Part 1 distils the *exact* Gaussian-mixture teacher of the ring8 dataset into MLP policy students (GM at 1, 2, 4 NFE,
data-free GM at 4 NFE, DX at 2 NFE); part 2 distils a flow-matching MLP teacher of the checkerboard at 2 NFE; part 3
distils a class-conditional DiT teacher of scikit-learn's digits into 1- and 4-NFE GM-DiT students. Each student is
compared with the teacher's own samplers on the same noise. The learned teachers are the small checkpoints bundled in
`piflow/assets/teachers` (``--train-teachers`` retrains them; their commands are in assets/teachers/README.md).
Writes summary.json and summary.md in the run directory and prints the tables.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from piflow.bundled import TEACHER_ASSETS
from piflow.config import load_config
from piflow.data import make_toy_dataset
from piflow.files import atomic_write, write_json
from piflow.recipes import toy2d

EXACT_STUDENTS = [
    ("gm_k8_nfe1", ["distill.nfe=1"]),
    ("gm_k8_nfe2", ["distill.nfe=2"]),
    ("gm_k8_nfe4", ["distill.nfe=4"]),
    ("gm_k8_nfe4_datafree", ["distill.nfe=4", "distill.data_free=true", "distill.batch_size=128"]),
    ("dx_n10_nfe2", ["distill.nfe=2", "student.policy=dx", "distill.window_substeps=3"]),
]
LEARNED_STUDENTS = [
    ("gm_k8_nfe2", ["distill.nfe=2"]),
]


def _rounded_seconds(metrics: dict) -> Optional[float]:
    """A run's training seconds to 0.1 s (None when a resumed old run did not record them)."""
    seconds = metrics.get("train_seconds")
    return None if seconds is None else round(seconds, 1)


def _student_rows(metrics: dict) -> dict:
    return {name: row for name, row in metrics["rows"].items() if name.startswith("student")}


ASSETS = TEACHER_ASSETS


def _digits_part(run_dir: Path, quick: bool, train_teachers: bool, verbose: bool) -> tuple[dict, str]:
    """GM-DiT students of a digits DiT teacher at 1 and 4 NFE: FD in piflow's classifier features + image grid."""
    from piflow.eval.features import train_feature_classifier
    from piflow.recipes import image_benchmark, images
    from piflow.sampling import euler_sample

    teacher_run = ASSETS / "digits_dit"
    if train_teachers or quick:
        teacher_run = run_dir / "teacher"
        if verbose:
            print("[demo] digits: training the DiT teacher", flush=True)
        images.train_teacher(load_config(images.IMAGE_TEACHER_DEFAULTS, None, [
            "dataset=digits", f"train.iters={30 if quick else 2000}", "train.progress=false",
            "train.checkpoint_every=0"]), teacher_run)
    teacher_model, teacher_cfg = images.load_teacher(str(teacher_run))
    teacher = images.make_teacher(teacher_model, 10)
    (train_x, train_y), (test_x, test_y) = (images.load_dataset(teacher_cfg, split).tensors()
                                            for split in ("train", "test"))
    feature_net, feature_metrics = train_feature_classifier(train_x, train_y, 10, epochs=2 if quick else 10,
                                                            seed=0, val_images=test_x, val_labels=test_y)
    context = image_benchmark.build_context(teacher, feature_net, test_x, train_x.shape[1:], 10,
                                            200 if quick else 1000)
    rows = {}
    for steps in (1, 4, 32):
        rows[f"teacher Euler {steps}"] = dict(
            context.metrics(euler_sample(teacher, context.noise_a, steps, context.labels_a)), nfe=steps)
    grid = [euler_sample(teacher, context.noise_a[:20], 32, context.labels_a[:20])]
    for nfe in (1, 4):
        if verbose:
            print(f"[demo] digits: distilling a GM-DiT student at {nfe} NFE", flush=True)
        cfg = load_config(images.IMAGE_DISTILL_DEFAULTS, None, [
            "dataset=digits", f"teacher={teacher_run}", f"distill.nfe={nfe}", f"train.iters={20 if quick else 300}",
            "train.progress=false", "train.checkpoint_every=0"])
        metrics = images.distill(cfg, run_dir / f"gm_k8_nfe{nfe}")
        pf, _ = images.load_student(run_dir / f"gm_k8_nfe{nfe}")
        samples = pf.sample(context.noise_a, nfe=nfe, cond=context.labels_a)
        rows[f"student gmflow {nfe} [gm_k8_nfe{nfe}]"] = dict(context.metrics(samples), nfe=nfe,
                                                              train_seconds=_rounded_seconds(metrics))
        grid.append(samples[:20])
    from piflow.recipes.plots import plot_image_rows

    plot_image_rows([(label, row) for label, row in zip(
        ("teacher Euler, 32 NFE", "GM student, 1 NFE", "GM student, 4 NFE"), grid)],
        run_dir / "teacher32_vs_student1_vs_student4.png", ncol=20, title="same noise and class in each column")
    header = ("| method | NFE | FD-teacher ↓ | FD-real ↓ | recall | coverage | label acc. | coupling RMSE ↓ |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [f"| {name} | {r['nfe']} | {r['fd_teacher']:.3f} | {r['fd_real']:.3f} | {r['recall']:.3f} | "
                        f"{r['coverage']:.3f} | {r['label_accuracy']:.3f} | {r['coupling_rmse']:.4f} |"
                        for name, r in rows.items()]
    note = (f"(features: piflow's digits classifier, validation accuracy {feature_metrics['val_accuracy']:.3f}; "
            f"FD-teacher is measured against the teacher's 32-step samples from other noise, so the 32-step row is "
            f"the noise floor; grid: {run_dir / 'teacher32_vs_student1_vs_student4.png'})")
    return rows, "\n".join(lines) + "\n\n" + note


def run_demo(run_dir: Path, quick: bool = False, verbose: bool = True, train_teachers: bool = False) -> dict:
    torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP overhead on small CPUs
    start = time.perf_counter()
    iters = 60 if quick else 500
    teacher_iters = 100 if quick else 2000
    num_samples = 1000 if quick else 5000
    common = [f"train.iters={iters}", "train.progress=false", "train.checkpoint_every=0",
              f"eval.num_samples={num_samples}", "eval.teacher_steps=[]"]
    summary: dict = {"parts": {}}
    tables = []
    for part, dataset, students in (("exact teacher (ring8)", "ring8", EXACT_STUDENTS),
                                     ("learned teacher (checkerboard)", "checkerboard", LEARNED_STUDENTS)):
        part_dir = run_dir / dataset
        if dataset == "ring8":
            teacher_spec = "exact"
            teacher, _ = toy2d.load_teacher("exact", dataset)
            teacher_rows = toy2d.evaluate_methods(teacher, None, make_toy_dataset(dataset),
                                                  {"num_samples": num_samples, "teacher_steps": [1, 2, 4, 8, 128],
                                                   "seed": 1234}, part_dir / "teacher")["rows"]
        elif not (train_teachers or quick):
            teacher_spec = str(ASSETS / "checkerboard_mlp")
            teacher, _ = toy2d.load_teacher(teacher_spec, dataset)
            teacher_rows = toy2d.evaluate_methods(teacher, None, make_toy_dataset(dataset),
                                                  {"num_samples": num_samples, "teacher_steps": [1, 2, 4, 8, 128],
                                                   "seed": 1234}, part_dir / "teacher")["rows"]
        else:
            teacher_spec = str(part_dir / "teacher")
            if verbose:
                print(f"[demo] training the checkerboard teacher ({teacher_iters} iterations)", flush=True)
            teacher_cfg = load_config(toy2d.TEACHER_DEFAULTS, None, [
                "dataset=checkerboard", f"train.iters={teacher_iters}", "train.progress=false",
                "train.checkpoint_every=0", f"eval.num_samples={num_samples}"])
            teacher_rows = toy2d.train_teacher(teacher_cfg, Path(teacher_spec))["rows"]
        rows = dict(teacher_rows)
        for name, overrides in students:
            if verbose:
                print(f"[demo] {dataset}: distilling {name} ({iters} iterations)", flush=True)
            cfg = load_config(toy2d.DISTILL_DEFAULTS, None,
                              [f"dataset={dataset}", f"teacher={teacher_spec}", *common, *overrides])
            metrics = toy2d.distill(cfg, part_dir / name)
            for label, row in _student_rows(metrics).items():
                rows[f"{label} [{name}]"] = dict(row, train_seconds=_rounded_seconds(metrics))
        summary["parts"][part] = rows
        table = toy2d.format_table(rows)
        tables.append(f"### {part}\n\n{table}\n")
        if verbose:
            print(f"\n### {part}\n{table}\n", flush=True)
    part = "class-conditional DiT teacher (digits)"
    summary["parts"][part], table = _digits_part(run_dir / "digits", quick, train_teachers, verbose)
    tables.append(f"### {part}\n\n{table}\n")
    if verbose:
        print(f"\n### {part}\n{table}\n", flush=True)
    summary["seconds"] = time.perf_counter() - start
    summary["quick"] = quick
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "summary.json", summary)
    atomic_write(run_dir / "summary.md", "\n".join(tables).encode("utf-8"))
    if verbose:
        print(f"[demo] done in {summary['seconds']:.0f} s; figures and metrics under {run_dir}/")
    return summary
