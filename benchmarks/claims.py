"""The paper's claims side by side: π-ID GM students vs DMD2 and MeanFlow (and the teacher's own few-step solvers,
the x0-regression student) on quality and diversity, several seeds per student.

    python benchmarks/claims.py --dataset ring8                      # exact Gaussian-mixture teacher, MLP students
    python benchmarks/claims.py --dataset digits                     # the bundled digits DiT teacher
    python benchmarks/claims.py --dataset fashion-mnist --feature-epochs 5   # trains its teacher first (hours on CPU)

Writes results.json (strict JSON), results.md (mean ± std over seeds), quality_vs_diversity.png and samples.png
into the run directory (default runs/claims_<dataset>). Everything finished is kept there: run the command again
after an interruption and it continues where it stopped. See piflow.recipes.claims for the metrics.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from piflow.data import IMAGE_DATASET_NAMES
from piflow.recipes import claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="ring8 or an image dataset (digits, fashion-mnist, mnist)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per student row (>= 1)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--iters", type=int, default=None,
                        help="optimiser steps per student (default: 300 for images, 800 for ring8)")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per row (default 1000 / 5000)")
    parser.add_argument("--teacher-run", default=None, help="an image teacher run directory to use")
    parser.add_argument("--meanflow-scratch-seeds", type=int, default=None,
                        help="seeds of the from-scratch MeanFlow student (default: --seeds)")
    parser.add_argument("--feature-epochs", type=int, default=30,
                        help="epochs of the two feature classifiers (cached in the run directory)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true", help="progress bars for each training run")
    parser.add_argument("--report", action="store_true",
                        help="only print the table of the rows finished so far (e.g. while a run is going on)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir or f"runs/claims_{args.dataset}")
    start = time.perf_counter()
    if args.report:
        columns = claims.IMAGE_COLUMNS if args.dataset in IMAGE_DATASET_NAMES else claims.TOY_COLUMNS
        print(claims.format_markdown(claims.ordered_summary(claims.RowStore(run_dir, print).all()), columns))
        return
    if args.dataset in IMAGE_DATASET_NAMES:
        results = claims.run_images(run_dir, args.dataset, args.seeds, args.iters or 300, args.num_samples or 1000,
                                    args.teacher_run, feature_epochs=args.feature_epochs,
                                    meanflow_scratch_seeds=args.meanflow_scratch_seeds,
                                    progress=args.progress)
        columns = claims.IMAGE_COLUMNS
    else:
        results = claims.run_toy(run_dir, args.dataset, args.seeds, args.iters, args.num_samples or 5000,
                                 progress=args.progress)
        columns = claims.TOY_COLUMNS
    print(claims.format_markdown(results["summary"], columns))
    print("goals:", results["goals"])
    print(f"this invocation: {time.perf_counter() - start:.0f} s; results in {run_dir}")


if __name__ == "__main__":
    main()
