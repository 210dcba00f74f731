"""Which π-ID setting puts fine grain ("grey speckle") into a few-step student's images, measured
(`benchmarks/claims.py --settings-sweep`).

One GM student per training setting — the recipe's default (K = 8, policy dropout 0.05, f = 1, the claims
benchmark's step budget) with one setting changed at a time: training length, K, policy dropout,
final_step_size_scale — and, on the default student, the sampling-time settings: GM temperature, policy substeps
per unit time, and ending on the policy's x̂0 at the start of the last step instead of rolling the last step out.
Every row is scored like the claims benchmark (`image_setup.ImageScorer`: FD to the teacher in two independently trained
feature spaces, A and B, and the pixel-space high-frequency power relative to the teacher's 32-step samples), next
to the teacher's own 4-step Euler and DPM-Solver++ samplers. The default student and its second seed are the
claims benchmark's own π-ID rows (same directories), so a run directory serves both commands.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from piflow.files import write_json
from piflow.recipes import images
from piflow.sampling import euler_sample
from piflow_bench.image_setup import prepare_images, resolve_teacher
from piflow_bench.rows import RowStore, format_markdown, slug, summarise, train_seconds
from piflow_bench.students import PIID, distill_student

DEFAULT_LABEL = "default (K=8, dropout 0.05, f=1)"
# (label, config overrides, multiple of the step budget); the default comes first
TRAINING_VARIANTS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    (DEFAULT_LABEL, (), 1),
    ("3x training steps", (), 3),
    ("10x training steps", (), 10),                # hours on a CPU core; --variants runs a subset without it
    ("K=2", ("student.num_components=2",), 1),
    ("K=32", ("student.num_components=32",), 1),
    ("policy dropout 0", ("distill.policy_dropout=0.0",), 1),
    ("policy dropout 0.2", ("distill.policy_dropout=0.2",), 1),
    ("final_step_size_scale 0.5", ("distill.final_step_size_scale=0.5",), 1),
    ("lr 1e-4", ("train.lr=1e-4",), 1),            # the default lr (2e-4) was chosen for head-only students
    ("lr 5e-5", ("train.lr=5e-5",), 1),            # the paper's ImageNet lr
    # scheduled trajectory mixing: teacher-trajectory states decaying to none over the first 2/3 of 300 steps
    ("trajectory mixing over 200 steps", ("distill.num_decay_iters=200",), 1),
)
# (label, keyword arguments of PiFlow.sample) on the default student
SAMPLING_VARIANTS: tuple[tuple[str, dict], ...] = (
    ("temperature 0.8", {"temperature": 0.8}),
    ("temperature 0.5", {"temperature": 0.5}),
    ("8 substeps per unit time", {"total_substeps": 8}),
    ("32 substeps per unit time", {"total_substeps": 32}),
    ("512 substeps per unit time", {"total_substeps": 512}),
)
LAST_STEP_X0_LABEL = "end on x̂0 at the last step's start"
COLUMNS = [("fd_teacher", "FD-teacher A ↓", "{:.3f}"), ("fd_teacher_b", "FD-teacher B ↓", "{:.3f}"),
           ("label_accuracy", "label acc. A", "{:.3f}"), ("label_accuracy_b", "label acc. B", "{:.3f}"),
           ("class_vendi", "class Vendi A", "{:.2f}"), ("hf_ratio", "HF power / teacher", "{:.3f}"),
           ("speckle", "speckle / image", "{:.3f}"), ("train_seconds", "train s", "{:.0f}")]


def sweep_dir(run_dir: Path, nfe: int = 4) -> Path:
    """Where the sweep at `nfe` keeps its students, rows and tables: run_dir/sweep at 4 NFE, else sweep_nfe<N>."""
    return run_dir / ("sweep" if nfe == 4 else f"sweep_nfe{nfe}")


def _directory(run_dir: Path, label: str, nfe: int, seed: int) -> Path:
    if label == DEFAULT_LABEL:   # the claims benchmark's π-ID row
        return run_dir / "students" / f"piid_nfe{nfe}_seed{seed}"
    return sweep_dir(run_dir, nfe) / "students" / f"{slug(label)}_nfe{nfe}_seed{seed}"


def sampling_variants(nfe: int) -> tuple[tuple[str, dict], ...]:
    """The `SAMPLING_VARIANTS` that change anything at `nfe`: the GM temperature acts on every step but the last,
    so at 1 NFE it does not."""
    return tuple((label, kwargs) for label, kwargs in SAMPLING_VARIANTS if nfe > 1 or "temperature" not in kwargs)


def last_step_x0(pf, noise: Tensor, nfe: int, labels: Tensor) -> Tensor:
    """Samples that stop at the policy's x̂0 at the start of the last step (the same `nfe` evaluations: the last
    one is only read at its source state, not rolled out)."""
    from piflow.sampling import FlowMapSDESchedule

    _, trajectory = pf.sample(noise, nfe=nfe, cond=labels, return_trajectory=True)
    schedule = FlowMapSDESchedule(pf.settings.shift, pf.settings.final_step_size_scale)
    schedule.set_timesteps(nfe)
    x_last, sigma = trajectory[nfe - 1], schedule.sigmas[nfe - 1].expand(noise.shape[0])
    return pf.policy(x_last, sigma, labels).x0(x_last, sigma)


def ordered_summary(rows: list[dict]) -> list[dict]:
    """`rows.summarise`d rows in table order: the teacher's solvers, the training settings, then the sampling
    settings, each in the order of its list above."""
    order = ["teacher Euler", "teacher DPM-Solver++", *(label for label, _, _ in TRAINING_VARIANTS),
             *(f"default, {label}" for label, _ in SAMPLING_VARIANTS), f"default, {LAST_STEP_X0_LABEL}"]
    return sorted(summarise(rows), key=lambda e: order.index(e["method"]) if e["method"] in order
                  else len(order))


def training_variants(names: Optional[Sequence[str]] = None) -> tuple[tuple[str, tuple[str, ...], int], ...]:
    """The `TRAINING_VARIANTS` named by `names` (slugs of their labels, e.g. ``3x_training_steps``), always with the
    default first (the sampling variants run on it); None: all. An unknown name is a one-line ValueError listing
    the known ones."""
    if names is None:
        return TRAINING_VARIANTS
    known = {slug(label): (label, overrides, budget) for label, overrides, budget in TRAINING_VARIANTS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {', '.join(known)}")
    return tuple(variant for variant in TRAINING_VARIANTS
                 if variant[0] == DEFAULT_LABEL or slug(variant[0]) in names)


def run_settings_sweep(run_dir: Path, dataset: str = "fashion-mnist", nfe: int = 4, iters: int = 300,
                       seeds: int = 2, teacher_run: Optional[Path] = None, num_samples: int = 1000,
                       feature_epochs: int = 30, progress: bool = False,
                       log: Callable[[str], None] = print, variants: Optional[Sequence[str]] = None) -> dict:
    """Train every `TRAINING_VARIANTS` student at `nfe` (`variants`: only these, see `training_variants`; the default
    with `seeds` seeds, the others with seed 0), then score all rows; writes results.json, results.md and samples.png
    into `sweep_dir(run_dir, nfe)` (rows scored by earlier invocations stay in the tables). Resumable like the claims
    benchmark (finished students and scored rows are kept)."""
    chosen = training_variants(variants)
    teacher_run = resolve_teacher(run_dir, dataset, teacher_run, progress, log)
    students = {}
    for label, overrides, budget in chosen:
        for seed in range(seeds if label == DEFAULT_LABEL else 1):
            # the default's overrides are the claims benchmark's π-ID student's: one run directory serves both
            students[label, seed] = distill_student(images, images.IMAGE_DISTILL_DEFAULTS,
                                                    _directory(run_dir, label, nfe, seed), [
                f"dataset={dataset}", f"teacher={teacher_run}", f"method={PIID.method}", f"distill.nfe={nfe}",
                f"train.iters={iters * budget}", f"train.seed={seed}", f"train.progress={str(progress).lower()}",
                *PIID.overrides, *overrides], log)
    setup = prepare_images(run_dir, dataset, teacher_run, num_samples, feature_epochs, progress, log)
    noise, labels, scorer = setup.noise, setup.labels, setup.scorer
    out = sweep_dir(run_dir, nfe)
    store = RowStore(out, log)
    grid: dict[str, Tensor] = {"teacher Euler 32": scorer.a.teacher_samples_a[:20]}

    def row(label: str, seed: Optional[int], make: Callable[[], Tensor], family: str, **info) -> None:
        samples: list[Tensor] = []

        def compute() -> dict:
            samples.append(make())
            return scorer(samples[0])

        store.get(label, nfe, seed, compute, family=family, **info)
        if seed in (None, 0):
            grid[f"{label}, {nfe} steps" if family == "teacher" else label] = (samples[0] if samples else make())[:20]

    row("teacher Euler", None, lambda: euler_sample(setup.teacher, noise, nfe, labels), "teacher")
    try:
        from piflow.integrations.diffusers.solvers import diffusers_sample

        row("teacher DPM-Solver++", None, lambda: diffusers_sample(setup.teacher, noise, nfe, labels,
                                                                   solver="dpm-solver++"), "teacher")
    except ImportError:
        log("[sweep] diffusers is not installed: the DPM-Solver++ row is skipped")
    with torch.no_grad():
        for (label, seed), pf in students.items():
            row(label, seed, lambda pf=pf: pf.sample(noise, nfe=nfe, cond=labels), "student",
                train_seconds=train_seconds(_directory(run_dir, label, nfe, seed)))
        default = students[DEFAULT_LABEL, 0]
        for label, kwargs in sampling_variants(nfe):
            row(f"default, {label}", 0, lambda kwargs=kwargs: default.sample(noise, nfe=nfe, cond=labels, **kwargs),
                "sampling")
        row(f"default, {LAST_STEP_X0_LABEL}", 0, lambda: last_step_x0(default, noise, nfe, labels), "sampling")

    summary = ordered_summary(store.all())
    results = {"dataset": dataset, "nfe": nfe, "iters": iters, "seeds": seeds, "num_samples": num_samples,
               "teacher_run": str(teacher_run), "summary": summary}
    write_json(out / "results.json", results)
    (out / "results.md").write_text(format_markdown(summary, COLUMNS))
    from piflow.recipes.plots import plot_image_rows

    plot_image_rows(list(grid.items()), out / "samples.png", ncol=20,
                    title=f"{nfe} NFE; same noise and class in each column; one setting changed per row")
    return results
