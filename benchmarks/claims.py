"""The paper's claims side by side: π-ID GM students vs DMD2 and MeanFlow (and the teacher's own few-step solvers,
the x0-regression student) on quality and diversity, several seeds per student.

    python benchmarks/claims.py --dataset ring8                      # exact Gaussian-mixture teacher, MLP students
    python benchmarks/claims.py --dataset digits                     # the bundled digits DiT teacher
    python benchmarks/claims.py --dataset fashion-mnist --feature-epochs 5   # the bundled U-Net teacher (hours on CPU)
    python benchmarks/claims.py --dataset digits --settings-sweep    # which π-ID setting changes fine detail

Writes results.json (strict JSON), results.md (mean ± std over seeds), quality_vs_diversity.png and samples.png
into the run directory (default runs/claims_<dataset>). Everything finished is kept there: run the command again
after an interruption and it continues where it stopped. The scored rows (rows/*.json, with the figure's samples
beside them) are portable: --publish DIR copies them with the feature classifiers, and --rows-from DIR continues
from such a copy (or another run directory) once this run's reference rows agree with its. The students are rows
as data (benchmarks/piflow_bench/students.py), each trained by `piflow distill method=…` into
runs/…/students/<row>; the driver (piflow_bench/driver.py) also measures the equal-compute rows: π-ID trained for
DMD2's measured training time and DMD2 for π-ID's, at 4 NFE.

--settings-sweep (image datasets) instead trains one 4-NFE GM student per π-ID setting changed from the default
(training length, K, policy dropout, final_step_size_scale; GM temperature, substeps and the last step at
sampling; piflow_bench/settings_sweep.py) and writes sweep/results.md, sweep/results.json and sweep/samples.png; its
default student is the claims run's π-ID 4-NFE student, with --seeds seeds. With --sweep-nfe N the students are
N-NFE ones and everything goes to sweep_nfe<N>/ (the default student is the claims run's N-NFE π-ID student).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from piflow.data import IMAGE_DATASET_NAMES
from piflow_bench import settings_sweep
from piflow_bench.benches import IMAGE_COLUMNS, TOY_COLUMNS
from piflow_bench.driver import publish, run_claims
from piflow_bench.rows import RowStore, format_markdown, ordered_summary
from piflow_bench.students import parse_row_keys


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
    parser.add_argument("--only", nargs="+", default=None, metavar="KIND[:NFE]",
                        help="image students to train and score in this invocation, e.g. dmd2:1 meanflow_init, "
                             "or equal-compute rows, e.g. dmd2:4@piid (DMD2 given π-ID's train time); another "
                             "process can work on other rows of the same run directory")
    parser.add_argument("--rows-from", default=None, metavar="DIR",
                        help="continue from another run's scored rows: DIR is its run directory or a --publish "
                             "copy (e.g. benchmarks/results/claims_mnist_unet); its feature classifiers are used "
                             "if this run has none, and once this run's reference rows agree with its, its student "
                             "rows are taken instead of trained")
    parser.add_argument("--no-train", action="store_true",
                        help="tables, figures (and --publish) of the rows scored so far, training nothing (e.g. "
                             "while another process is still training students of the same run)")
    parser.add_argument("--publish", default=None, metavar="DIR",
                        help="afterwards copy the rows (with figure samples), the feature classifiers and the "
                             "tables and figures into DIR, for --rows-from elsewhere")
    parser.add_argument("--settings-sweep", action="store_true",
                        help="the π-ID settings sweep at 4 NFE instead of the claims table (image datasets)")
    parser.add_argument("--sweep-nfe", type=int, default=4,
                        help="with --settings-sweep: the students' NFE (default 4; another NFE keeps its own "
                             "run_dir/sweep_nfe<N>)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="SETTING",
                        help="with --settings-sweep: train only these settings besides the default, e.g. "
                             "3x_training_steps k_2 (the sampling settings always run on the default)")
    parser.add_argument("--no-equal-compute", action="store_true",
                        help="skip the equal-compute rows (π-ID at DMD2's training time and DMD2 at π-ID's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true", help="progress bars for each training run")
    parser.add_argument("--report", action="store_true",
                        help="only print the table of the rows finished so far (e.g. while a run is going on)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    image = args.dataset in IMAGE_DATASET_NAMES
    if args.settings_sweep and not image:
        parser.error(f"--settings-sweep needs an image dataset ({', '.join(IMAGE_DATASET_NAMES)})")
    for flag, value in (("--rows-from", args.rows_from), ("--no-train", args.no_train), ("--publish", args.publish)):
        if value and (args.settings_sweep or args.report):
            parser.error(f"{flag} goes with a claims run (not --settings-sweep or --report)")
    if args.rows_from and not (Path(args.rows_from) / "rows").is_dir():
        parser.error(f"--rows-from: {args.rows_from} holds no rows/ directory (a claims run or a --publish copy)")
    if args.variants and not args.settings_sweep:
        parser.error("--variants needs --settings-sweep")
    if args.sweep_nfe != 4 and not args.settings_sweep:
        parser.error("--sweep-nfe needs --settings-sweep")
    if not 1 <= args.sweep_nfe <= 8:
        parser.error(f"--sweep-nfe must be in [1, 8], got {args.sweep_nfe}")
    try:
        only = parse_row_keys(args.only) if args.only else None
    except ValueError as error:
        parser.error(f"--only: {error}")
    try:
        settings_sweep.training_variants(args.variants)
    except ValueError as error:
        parser.error(f"--variants: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir or f"runs/claims_{args.dataset}")
    start = time.perf_counter()
    if args.report:
        if args.settings_sweep:
            summary = settings_sweep.ordered_summary(RowStore(settings_sweep.sweep_dir(run_dir, args.sweep_nfe),
                                                                    print).all())
            columns = settings_sweep.COLUMNS
        else:
            summary = ordered_summary(RowStore(run_dir, print).all())
            columns = IMAGE_COLUMNS if image else TOY_COLUMNS
        print(format_markdown(summary, columns))
        return
    if args.settings_sweep:
        results = settings_sweep.run_settings_sweep(run_dir, args.dataset, args.sweep_nfe, args.iters or 300,
                                                    args.seeds, args.teacher_run, args.num_samples or 1000,
                                                    args.feature_epochs, args.progress, variants=args.variants)
        columns = settings_sweep.COLUMNS
    else:
        options = dict(teacher_run=args.teacher_run, feature_epochs=args.feature_epochs) if image else {}
        results = run_claims(run_dir, args.dataset, args.seeds, args.iters, args.num_samples, only=only,
                             meanflow_scratch_seeds=args.meanflow_scratch_seeds,
                             equal_compute=not args.no_equal_compute, progress=args.progress,
                             rows_from=args.rows_from, train=not args.no_train, **options)
        columns = IMAGE_COLUMNS if image else TOY_COLUMNS
    if args.publish:
        publish(run_dir, Path(args.publish))
    print(format_markdown(results["summary"], columns))
    if "goals" in results:
        print("goals:", results["goals"])
    print(f"this invocation: {time.perf_counter() - start:.0f} s; results in {run_dir}")


if __name__ == "__main__":
    main()
