"""Which π-ID setting puts fine grain ("grey speckle") into a 4-NFE GM student's images: one setting changed at a
time (training length, K, policy dropout, final_step_size_scale; GM temperature, substeps, the last step at
sampling), scored in two feature spaces and by high-frequency pixel power relative to the teacher.

    python benchmarks/settings_sweep.py --dataset fashion-mnist --run-dir runs/claims_fmnist --feature-epochs 5
    python benchmarks/settings_sweep.py --dataset digits          # the bundled digits teacher, minutes

Shares the run directory of `benchmarks/claims.py` (teacher, feature nets, evaluation bank, the default π-ID
students); writes sweep/results.md, sweep/results.json and sweep/samples.png. See piflow.recipes.settings_sweep.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from piflow.recipes import claims, settings_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", help="an image dataset (digits, fashion-mnist, mnist)")
    parser.add_argument("--run-dir", default=None, help="default runs/claims_<dataset> (shared with claims.py)")
    parser.add_argument("--nfe", type=int, default=4)
    parser.add_argument("--iters", type=int, default=300, help="the step budget of the default student")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the default student (>= 1)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--teacher-run", default=None)
    parser.add_argument("--feature-epochs", type=int, default=30,
                        help="epochs of the feature classifiers, if they are not cached in the run directory yet")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir or f"runs/claims_{args.dataset}")
    start = time.perf_counter()
    results = settings_sweep.run_settings_sweep(run_dir, args.dataset, args.nfe, args.iters, args.seeds,
                                                args.teacher_run, args.num_samples, args.feature_epochs,
                                                args.progress)
    print(claims.format_markdown(results["summary"], settings_sweep.COLUMNS))
    print(f"this invocation: {time.perf_counter() - start:.0f} s; results in {run_dir / 'sweep'}")


if __name__ == "__main__":
    main()
