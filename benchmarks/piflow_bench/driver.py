"""The one claims driver: rows = (dataset, method, NFE, seed), each student trained by `piflow distill` and scored
by its bench (`benches.ToyBench`, `benches.ImageBench`); then the equal-compute rows, the tables, the goals and
the figures. Everything finished is kept in the run directory (student runs resume from their checkpoints, scored
rows are never recomputed), so a killed run continues where it stopped."""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from piflow.data import IMAGE_DATASET_NAMES
from piflow.files import write_json
from piflow_bench.benches import ImageBench, ToyBench
from piflow_bench.goals import goals_text
from piflow_bench.rows import RowStore, format_markdown, ordered_summary, train_seconds
from piflow_bench.students import (EQUAL_COMPUTE, STUDENTS_BY_KEY, StudentSpec, distill_student, equal_compute_key,
                                   jobs)


class _Once:
    """A zero-argument function evaluated at most once (its value kept)."""

    def __init__(self, function: Callable[[], Any]):
        self.function, self.done, self.value = function, False, None

    def __call__(self) -> Any:
        if not self.done:
            self.value, self.done = self.function(), True
        return self.value


def make_bench(run_dir: Path, dataset: str, num_samples: Optional[int] = None, **options):
    """The bench of `dataset`: `ImageBench` for image datasets, `ToyBench` for 2-D ones."""
    kind = ImageBench if dataset in IMAGE_DATASET_NAMES else ToyBench
    return kind(run_dir, dataset, num_samples or kind.default_samples, **options)


class Claims:
    """One claims run of a bench in `run_dir`: `student_row` trains (or loads) one student and scores it."""

    def __init__(self, bench, run_dir: Path, iters: int, progress: bool, log: Callable[[str], None],
                 train: bool = True):
        self.bench, self.run_dir, self.iters, self.progress, self.log = bench, run_dir, iters, progress, log
        self.train = train       # False: only the rows already stored (nothing trained or scored)
        self.store = RowStore(run_dir, log)

    def overrides(self, spec: StudentSpec, nfe: int, seed: int, iters: int) -> list[str]:
        extra: list[str] = []
        if spec.scratch_budget:
            iters, extra = self.bench.scratch_overrides(iters)
        return [*self.bench.base_overrides, f"method={spec.method}", f"distill.nfe={nfe}", f"train.iters={iters}",
                f"train.seed={seed}", f"train.progress={str(self.progress).lower()}", *spec.overrides, *extra]

    def student_rows(self, spec: StudentSpec, train_nfe: Optional[int], seed: int, iters: Optional[int] = None,
                     tag: str = "", label: Optional[str] = None, family: str = "student") -> list[dict]:
        """Train (or resume, or load) one student and score it at each of its NFEs with the bench's noise."""
        iters = self.iters if iters is None else iters
        directory = spec.directory(self.run_dir / "students", train_nfe or spec.nfes[0], seed, tag)
        overrides = self.overrides(spec, train_nfe or spec.nfes[0], seed, iters)
        sampler = _Once(lambda: distill_student(self.bench.recipe, self.bench.defaults, directory, overrides,
                                                        self.log))
        rows = []
        for nfe in (train_nfe,) if spec.per_nfe else spec.nfes:
            if not self.train and self.store.read(label or spec.label, nfe, seed) is None:
                continue
            samples = _Once(lambda nfe=nfe: sampler().sample(self.bench.noise, nfe=nfe, cond=self.bench.labels,
                                                             generator=torch.Generator().manual_seed(seed)))
            rows.append(self.store.get(label or spec.label, nfe, seed, lambda: dict(
                self.bench.score(samples()), train_seconds=train_seconds(directory), iters=iters), family=family))
            if seed == 0 and family == "student":
                # a row imported without its student keeps its figure samples, or is left out of the figure
                trained = samples.done or (directory / "student.safetensors").is_file()
                figure = self.store.figure(label or spec.label, nfe, seed,
                                           (lambda: self.bench.figure_samples(samples())) if trained else None)
                if figure is None:
                    self.log(f"[claims] {spec.label} @ {nfe} NFE: no student or figure samples here, not drawn")
                else:
                    self.bench.add_to_figure(spec.label, nfe, figure)
        return rows

    def equal_compute_rows(self, seeds: int, only: Optional[list] = None) -> None:
        """Each `EQUAL_COMPUTE` student (`only`: those whose `equal_compute_key` it holds) again with the step count
        that takes the other student's training time (the ratio of the train seconds recorded in the two seed-0
        rows)."""
        for key, nfe, other_key in EQUAL_COMPUTE:
            if only is not None and equal_compute_key(key, nfe, other_key) not in only:
                continue
            spec, other = STUDENTS_BY_KEY[key], STUDENTS_BY_KEY[other_key]
            mine, theirs = ((self.store.read(s.label, nfe, 0) or {}).get("train_seconds") for s in (spec, other))
            if mine is None or theirs is None or spec not in self.bench.students:
                continue
            iters = max(1, int(round(self.iters * theirs / mine)))
            for seed in range(seeds):
                self.student_rows(spec, nfe, seed, iters, tag=f"_time_of_{other_key}",
                                  label=f"{spec.label} at {other.label}'s train time", family="equal-compute")


RESULT_FILES = ("results.json", "results.md", "samples.png", "quality_vs_diversity.png")


def publish(run_dir: Path, destination: Path) -> None:
    """Copies into `destination` what continues this run elsewhere with ``rows_from`` (its rows with their figure
    samples, and an image run's two feature classifiers, which another machine would train to slightly different
    weights) and the run's tables and figures."""
    from piflow.recipes.image_benchmark import FEATURE_NET_NAMES

    destination.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run_dir / "rows", destination / "rows", dirs_exist_ok=True)
    for name in FEATURE_NET_NAMES:
        if (run_dir / name).is_dir():
            shutil.copytree(run_dir / name, destination / name, dirs_exist_ok=True)
    for name in RESULT_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, destination / name)


def adopt_feature_nets(source: Path, run_dir: Path, log: Callable[[str], None]) -> None:
    """The feature classifiers of `source` (a run or a `publish`ed copy) for a run directory that has none yet, so
    both score with the same classifiers (copied to a temporary name, then renamed: never half there)."""
    from piflow.recipes.image_benchmark import FEATURE_NET_NAMES

    for name in FEATURE_NET_NAMES:
        if (source / name / "config.json").is_file() and not (run_dir / name).exists():
            partial = run_dir / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source / name, partial)
            partial.rename(run_dir / name)
            log(f"[claims] feature classifier {name} from {source}")


def run_claims(run_dir: Path, dataset: str = "ring8", seeds: int = 3, iters: Optional[int] = None,
               num_samples: Optional[int] = None, only: Optional[list] = None,
               meanflow_scratch_seeds: Optional[int] = None, equal_compute: bool = True, progress: bool = False,
               rows_from: Optional[Path] = None, train: bool = True, log: Callable[[str], None] = print,
               **bench_options) -> dict:
    """The claims benchmark on `dataset`: the bench's reference rows, the student rows of `rows_from` (another
    run directory or a `publish`ed copy: its feature classifiers if `run_dir` has none, then its rows, checked by
    `RowStore.import_rows`), every student of every seed, the equal-compute rows (`only`: just these (key, NFE) jobs
    and `equal_compute_key`s; `train` False: only those already scored); writes results.json, results.md,
    samples.png and quality_vs_diversity.png into `run_dir` and returns the results."""
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    if rows_from is not None:
        adopt_feature_nets(Path(rows_from), run_dir, log)
    bench = make_bench(run_dir, dataset, num_samples, progress=progress, log=log, **bench_options)
    iters = int(iters or bench.default_iters)
    claims = Claims(bench, run_dir, iters, progress, log, train)
    if rows_from is not None:      # checked on the cheap reference rows, then the rest imported, not recomputed
        bench.reference_rows(claims.store, cheap_only=True)
        claims.store.import_rows(Path(rows_from) / "rows")
    bench.reference_rows(claims.store)
    scratch_seeds = seeds if meanflow_scratch_seeds is None else meanflow_scratch_seeds
    for seed in range(seeds):
        for spec, train_nfe in jobs(bench.students):
            if (only is not None and (spec.key, train_nfe) not in only) or (spec.scratch_budget
                                                                           and seed >= scratch_seeds):
                continue
            claims.student_rows(spec, train_nfe, seed)
    if equal_compute:
        claims.equal_compute_rows(seeds, only)
    rows = claims.store.all()
    summary = ordered_summary(rows)
    results = {"dataset": dataset, "seeds": seeds, "iters": iters, "num_samples": len(bench.noise), **bench.info,
               "summary": summary, "goals": bench.goals(summary),
               "seconds_this_invocation": time.perf_counter() - start}
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(format_markdown(summary, bench.columns) + goals_text(results["goals"]))
    bench.save_figure(run_dir / "samples.png")
    plot_quality_vs_diversity(rows, run_dir / "quality_vs_diversity.png", bench.quality, bench.diversity)
    return results


def plot_quality_vs_diversity(rows: list[dict], path: Path, x: tuple[str, str], y: tuple[str, str]) -> None:
    """One panel per student NFE: every seed a small dot, the mean a large marker, one colour per method; the
    teacher's most accurate sampler row as a dashed line of the y metric."""
    from piflow.recipes.plots import pyplot

    (x_key, x_label), (y_key, y_label) = x, y
    plt = pyplot()
    shown = ("student", "teacher", "equal-compute")
    nfes = sorted({r["nfe"] for r in rows if r.get("family") == "student"})
    fig, axes = plt.subplots(1, max(len(nfes), 1), figsize=(4.2 * max(len(nfes), 1), 3.6), squeeze=False)
    teachers = [r for r in rows if r.get("family") == "teacher"]
    reference = max(teachers, key=lambda r: r["nfe"]) if teachers else None
    colours = {method: f"C{index % 10}" for index, method in enumerate(sorted(
        {r["method"] for r in rows if r.get("family") in shown}))}
    for ax, nfe in zip(axes[0], nfes):
        for method in sorted({r["method"] for r in rows if r["nfe"] == nfe and r.get("family") in shown}):
            members = [r for r in rows if r["method"] == method and r["nfe"] == nfe
                       and math.isfinite(r.get(x_key, math.nan)) and math.isfinite(r.get(y_key, math.nan))]
            if not members:
                continue
            xs, ys = [r[x_key] for r in members], [r[y_key] for r in members]
            ax.scatter(xs, ys, s=12, color=colours[method], alpha=0.5)
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=70, color=colours[method], edgecolor="black",
                       label=method)
        if reference is not None:
            ax.axhline(reference[y_key], color="gray", linestyle="--", linewidth=1,
                       label=f"{reference['method']} {reference['nfe']}")
        ax.set_title(f"{nfe} NFE")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
