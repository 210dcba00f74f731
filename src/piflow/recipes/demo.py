"""`piflow demo`: the 2-D end-to-end run behind `make demo`.

Part 1 distils the *exact* Gaussian-mixture teacher of the ring8 dataset into MLP policy students (GM at 1, 2, 4 NFE,
data-free GM at 4 NFE, DX at 2 NFE); part 2 trains a flow-matching MLP teacher on checkerboard and distils it at
2 NFE. Each student is compared with the teacher's own Euler sampler on the same noise. Writes summary.json and
summary.md in the run directory and prints the tables.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from piflow.config import load_config
from piflow.data import make_toy_dataset
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


def _student_rows(metrics: dict) -> dict:
    return {name: row for name, row in metrics["rows"].items() if name.startswith("student")}


def run_demo(run_dir: Path, quick: bool = False, verbose: bool = True) -> dict:
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
                rows[f"{label} [{name}]"] = dict(row, train_seconds=round(metrics["train_seconds"], 1))
        summary["parts"][part] = rows
        table = toy2d.format_table(rows)
        tables.append(f"### {part}\n\n{table}\n")
        if verbose:
            print(f"\n### {part}\n{table}\n", flush=True)
    summary["seconds"] = time.perf_counter() - start
    summary["quick"] = quick
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "summary.md").write_text("\n".join(tables))
    if verbose:
        print(f"[demo] done in {summary['seconds']:.0f} s; figures and metrics under {run_dir}/")
    return summary
