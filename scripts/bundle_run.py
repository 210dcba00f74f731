"""Copies a finished piflow run into a bundled folder (`src/piflow/assets/teachers/` or `…/students/`), storing
its weights in float16 (half the size; piflow's loaders read them back as float32):

- a `piflow train-teacher` run: its config.yaml, metrics.json and teacher/;
- a `piflow distill` run: its config.yaml, metrics.json and student.safetensors (the EMA weights). A ``teacher``
  entry that points at a bundled teacher's folder is rewritten to that teacher's name (``mnist-bundled``, …), so
  the copy samples wherever piflow is installed.

train_seconds is null when the run was resumed from checkpoints of a piflow that did not sum the time over
invocations. Check the sampling quality of the copy (benchmarks/teacher_quality.py for a teacher,
benchmarks/score_students.py for a student) before shipping it.

    python scripts/bundle_run.py runs/teacher_mnist src/piflow/assets/teachers/mnist_unet
    python scripts/bundle_run.py runs/claims_fashion-mnist/students/piid_nfe4_seed0 \
        src/piflow/assets/students/fashion_mnist_gm_nfe4
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from piflow.bundled import BUNDLED_TEACHERS, TEACHER_ASSETS
from piflow.config import save_config
from piflow.files import load_safetensors, read_json, read_yaml, save_safetensors, write_json
from piflow.models import load_image_network
from piflow.train.checkpoint import CHECKPOINT_NAME, load_checkpoint


def bundled_teacher_name(source: str) -> str:
    """The name of `BUNDLED_TEACHERS` whose folder `source` is, else `source` unchanged."""
    for name, folder in BUNDLED_TEACHERS.items():
        if source == name or Path(source).resolve() == (TEACHER_ASSETS / folder).resolve():
            return name
    return source


def half(tensors: dict) -> dict:
    """Floating-point tensors in float16, the others (integer buffers) as they are."""
    return {key: value.half() if value.is_floating_point() else value for key, value in tensors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished train-teacher or distill run directory")
    parser.add_argument("dest", help="the bundled folder to write (must not exist)")
    args = parser.parse_args()
    run, dest = Path(args.run), Path(args.dest)
    is_teacher = (run / "teacher" / "config.json").is_file()
    if not is_teacher and not (run / "student.safetensors").is_file():
        parser.error(f"{run} holds neither a finished teacher (teacher/config.json) nor a finished student "
                     f"(student.safetensors)")
    if dest.exists():
        parser.error(f"{dest} exists; remove it first")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = read_yaml(run / "config.yaml", "the run's config")
    if not is_teacher and isinstance(config.get("teacher"), str):
        config["teacher"] = bundled_teacher_name(config["teacher"])
    save_config(config, partial / "config.yaml")
    metrics = read_json(run / "metrics.json", "the run's metrics")
    if (run / CHECKPOINT_NAME).is_file() and load_checkpoint(run / CHECKPOINT_NAME).get("train_seconds") is None:
        # trained (resumed) before piflow summed the loop time over invocations: the figure covers the last only
        metrics["train_seconds"] = None
    write_json(partial / "metrics.json", metrics)
    if is_teacher:
        load_image_network(run / "teacher", dtype=torch.float16).save_pretrained(partial / "teacher")
    else:
        save_safetensors(partial / "student.safetensors",
                         half(load_safetensors(run / "student.safetensors", "student weights")))
    partial.rename(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"bundled {run} into {dest} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
