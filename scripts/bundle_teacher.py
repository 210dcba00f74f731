"""Copies a finished `piflow train-teacher` run into a bundled-teacher folder: its config.yaml, metrics.json and
teacher/ with the weights stored in float16 (half the size; `piflow.recipes.images.load_teacher` reads them back as
float32; train_seconds is null when the run was resumed from checkpoints of a piflow that did not sum the time over
invocations). Check the sampling quality of the copy with benchmarks/teacher_quality.py before shipping it.

    python scripts/bundle_teacher.py runs/teacher_mnist src/piflow/assets/teachers/mnist_unet
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from piflow.files import write_json
from piflow.models import load_image_network
from piflow.train.checkpoint import CHECKPOINT_NAME, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished train-teacher run directory")
    parser.add_argument("dest", help="the bundled folder to write (must not exist)")
    args = parser.parse_args()
    run, dest = Path(args.run), Path(args.dest)
    if not (run / "teacher" / "config.json").is_file():
        parser.error(f"{run} holds no finished teacher (teacher/config.json)")
    if dest.exists():
        parser.error(f"{dest} exists; remove it first")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copy2(run / "config.yaml", partial / "config.yaml")
    metrics = json.loads((run / "metrics.json").read_text())
    if (run / CHECKPOINT_NAME).is_file() and load_checkpoint(run / CHECKPOINT_NAME).get("train_seconds") is None:
        # trained (resumed) before piflow summed the loop time over invocations: the figure covers the last only
        metrics["train_seconds"] = None
    write_json(partial / "metrics.json", metrics)
    load_image_network(run / "teacher", dtype=torch.float16).save_pretrained(partial / "teacher")
    partial.rename(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"bundled {run} into {dest} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
