"""Image benchmark (algorithm.md §8 style, offline): teacher samplers, diffusers solvers, x0-regression baseline and
GM/DX π-Flow students on the same noise, scored in two independently trained classifiers' features (A, B) and by
high-frequency pixel power relative to the teacher.

    python benchmarks/images.py --dataset digits --run-dir runs/bench_digits            # ~20 min, 2 CPU cores
    python benchmarks/images.py --dataset fashion-mnist --iters 3000 --num-samples 5000 --run-dir runs/bench_fmnist \
        --feature-epochs 5 --teacher-override train.iters=20000 model.hidden_size=256 model.depth=8        # GPU-sized

Writes results.json, results.md and fd_teacher_vs_nfe.png into the run directory. Finished pieces (teacher, feature
classifier, students) are reused when the command is run again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from piflow.recipes.image_benchmark import format_markdown
from piflow_bench.image_table import run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--run-dir", default="runs/bench_digits")
    parser.add_argument("--teacher-run", default=None, help="reuse a `piflow train-teacher` run")
    parser.add_argument("--iters", type=int, default=600, help="distillation iterations per student")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=None, help="student names to run (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--feature-epochs", type=int, default=30, help="epochs of the feature classifier")
    parser.add_argument("--feature-train-size", type=int, default=None, help="subsample its training set")
    parser.add_argument("--teacher-override", nargs="*", default=[], help="key=value for a teacher trained here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(Path(args.run_dir), args.dataset, args.iters, args.num_samples,
                            Path(args.teacher_run) if args.teacher_run else None, args.only,
                            feature_epochs=args.feature_epochs, feature_train_size=args.feature_train_size,
                            teacher_overrides=tuple(args.teacher_override))
    print(format_markdown(results))
    print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
