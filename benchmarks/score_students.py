"""Scores finished image student runs on a claims run's evaluation bank: the same noise, labels, seed and two
feature classifiers as that run's rows, so a student trained elsewhere (or a float16 copy of one) is compared
with the claims table directly.

    python benchmarks/score_students.py --claims-run runs/claims_fashion-mnist --dataset fashion-mnist \
        runs/claims_fashion-mnist/students/piid_nfe4_seed0 src/piflow/assets/students/fashion_mnist_gm_nfe4

Each student samples the bank's noise at its own NFE (or --nfe) with torch.Generator seeded --seed, as the claims
rows do for seed 0; prints one line per student and writes the rows as strict JSON (--out).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from piflow.data import IMAGE_DATASET_NAMES
from piflow.files import load_safetensors, write_json
from piflow.recipes import images
from piflow_bench.benches import ImageBench

SHOWN = ("fd_teacher", "fd_teacher_b", "fd_real", "fd_real_b", "class_vendi", "hf_ratio", "speckle")


def score_students(claims_run: Path, dataset: str, students: list, nfe: Optional[int] = None, seed: int = 0,
                   log=print) -> dict:
    """{student directory: its row} on the claims run's bank (`ImageBench` of that run, the bank's own size)."""
    bank = load_safetensors(claims_run / "eval_bank.safetensors", "the claims run's evaluation bank")
    bench = ImageBench(claims_run, dataset, num_samples=len(bank["noise_a"]), log=log)
    rows = {}
    for directory in students:
        sampler, config = images.load_student(Path(directory))
        if config["dataset"] != dataset:
            raise ValueError(f"{directory} is a dataset={config['dataset']} student, not {dataset}")
        steps = nfe or sampler.nfe
        with torch.no_grad():
            samples = sampler.sample(bench.noise, nfe=steps, cond=bench.labels,
                                     generator=torch.Generator().manual_seed(seed))
        rows[str(directory)] = row = dict(bench.score(samples), nfe=steps, seed=seed)
        log(f"{directory} " + " ".join(f"{key}={row[key]:.4f}" for key in SHOWN if key in row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("students", nargs="+", help="finished distill run directories (or bundled student folders)")
    parser.add_argument("--claims-run", required=True, help="a claims run directory of the students' dataset")
    parser.add_argument("--dataset", required=True, choices=sorted(IMAGE_DATASET_NAMES))
    parser.add_argument("--nfe", type=int, default=None, help="sampling NFE (default: each student's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the rows here as JSON")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.claims_run)
    if not (run / "eval_bank.safetensors").is_file():
        parser.error(f"--claims-run {run} holds no evaluation bank (eval_bank.safetensors); run claims.py first")
    try:
        rows = score_students(run, args.dataset, args.students, args.nfe, args.seed)
    except ValueError as error:
        parser.error(str(error))
    if args.out:
        write_json(args.out, {"claims_run": str(run), "dataset": args.dataset, "rows": rows})


if __name__ == "__main__":
    main()
