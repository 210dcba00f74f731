"""The two kinds of claims benchmark as data for the one driver: what is distilled (the recipe and its base
overrides), the reference rows, the scorer, the table columns, the goals and the sample figure."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from piflow.recipes import images, toy2d
from piflow.recipes.image_benchmark import TEACHER_REFERENCE_STEPS
from piflow.sampling import euler_sample
from piflow_bench.goals import check_image_goals, check_toy_goals
from piflow_bench.rows import RowStore
from piflow_bench.students import IMAGE_STUDENTS, TOY_STUDENTS, override

IMAGE_COLUMNS = [("fd_teacher", "FD-teacher A ↓", "{:.3f}"), ("fd_teacher_b", "FD-teacher B ↓", "{:.3f}"),
                 ("fd_real", "FD-real A ↓", "{:.3f}"), ("recall", "recall A", "{:.3f}"),
                 ("coverage", "coverage A", "{:.3f}"), ("class_distance", "class dist. A", "{:.3f}"),
                 ("class_vendi", "class Vendi A", "{:.2f}"), ("class_vendi_b", "class Vendi B", "{:.2f}"),
                 ("label_accuracy", "label acc. A", "{:.3f}"), ("label_accuracy_b", "label acc. B", "{:.3f}"),
                 ("hf_ratio", "HF power / teacher", "{:.2f}"), ("speckle", "speckle / image", "{:.3f}"),
                 ("iters", "steps", "{:.0f}"),
                 ("train_seconds", "train s", "{:.0f}")]
TOY_COLUMNS = [("energy_distance", "energy dist. ↓", "{:.4f}"), ("sliced_w2", "sliced W2 ↓", "{:.4f}"),
               ("modes_covered", "modes covered", "{:.1f}"), ("mode_mass_error", "mode-mass error ↓", "{:.4f}"),
               ("outlier_fraction", "outliers", "{:.4f}"), ("coupling_error", "coupling err. ↓", "{:.4f}"),
               ("iters", "steps", "{:.0f}"), ("train_seconds", "train s", "{:.0f}")]
TEACHER_EULER_STEPS = (1, 2, 4, 8, 32)
TEACHER_DPM_STEPS = (2, 4, 8)


class ToyBench:
    """ring8-like datasets: the exact Gaussian-mixture teacher, MLP students (2-D recipe), scored against data
    samples and the teacher's RK4 ODE solution from the same noise."""

    recipe, defaults = toy2d, toy2d.DISTILL_DEFAULTS
    students = TOY_STUDENTS
    columns = TOY_COLUMNS
    default_iters = int(toy2d.DISTILL_DEFAULTS["train"]["iters"])
    default_samples = 5000
    quality = ("energy_distance", "energy distance to the data (lower is better)")
    diversity = ("mode_mass_error", "mode-mass error (lower is better)")

    def __init__(self, run_dir: Path, dataset: str, num_samples: int, log: Callable[[str], None] = print, **_):
        self.dataset_name = dataset
        self.dataset = toy2d.load_dataset(dataset)
        self.teacher, _ = toy2d.load_teacher("exact", dataset)
        gen = torch.Generator().manual_seed(1234)
        self.reference = self.dataset.sample(num_samples, gen)
        self.noise, self.labels = torch.randn(num_samples, 2, generator=gen), None
        self.ode = toy2d.reference_ode(self.teacher, self.noise)
        self.base_overrides = [f"dataset={dataset}", "teacher=exact"]
        self.panels: list = [("data", self.reference), ("teacher ODE", self.ode)]
        self.info: dict = {}

    def score(self, samples: Tensor) -> dict:
        return toy2d.sample_metrics(samples, self.reference, self.ode, self.dataset)

    def reference_rows(self, store: RowStore, cheap_only: bool = False) -> None:
        """The teacher rows (all cheap here: `cheap_only` changes nothing)."""
        store.get("teacher ODE (RK4)", 256, None, lambda: self.score(self.ode), family="teacher")
        for steps in (1, 2, 4, 8):
            store.get("teacher Euler", steps, None,
                      lambda: self.score(euler_sample(self.teacher, self.noise, steps)), family="teacher")

    def scratch_overrides(self, iters: int) -> tuple[int, list[str]]:
        return iters, []

    def figure_samples(self, samples: Tensor) -> Tensor:
        """What the figure draws of a row's samples: all its points."""
        return samples

    def add_to_figure(self, label: str, nfe: int, samples: Tensor) -> None:
        if not any(title.startswith(label) for title, _ in self.panels):
            self.panels.append((f"{label}, {nfe} NFE", samples))

    def save_figure(self, path: Path) -> None:
        from piflow.recipes import plots

        plots.plot_sample_panels([(title, points.numpy()) for title, points in self.panels], path)

    goals = staticmethod(check_toy_goals)


class ImageBench:
    """Class-conditional image datasets: a DiT teacher (bundled, given or trained first), DiT students (image
    recipe), scored in two feature spaces (`image_setup.ImageScorer`) against the teacher's 32-step samples and
    the real test images."""

    recipe, defaults = images, images.IMAGE_DISTILL_DEFAULTS
    students = IMAGE_STUDENTS
    columns = IMAGE_COLUMNS
    default_iters = 300
    default_samples = 1000
    quality = ("fd_teacher", "FD to teacher, features A (lower is better)")
    diversity = ("class_vendi", "within-class Vendi score, features A")

    def __init__(self, run_dir: Path, dataset: str, num_samples: int, teacher_run: Optional[Path] = None,
                 feature_epochs: int = 30, progress: bool = False, log: Callable[[str], None] = print):
        from piflow_bench.image_setup import prepare_images

        self.setup = prepare_images(run_dir, dataset, teacher_run, num_samples, feature_epochs, progress, log)
        self.teacher, self.noise, self.labels = self.setup.teacher, self.setup.noise, self.setup.labels
        self.base_overrides = [f"dataset={dataset}", f"teacher={self.setup.teacher_run}"]
        self.grid: dict[str, Tensor] = {"teacher Euler, 32 NFE": self.setup.scorer.a.teacher_samples_a[:20]}
        self.order: dict[str, tuple[int, int]] = {}
        self.log = log
        self.info = {"teacher_run": str(self.setup.teacher_run), "feature_net_a": self.setup.feature_metrics[0],
                     "feature_net_b": self.setup.feature_metrics[1]}

    def score(self, samples: Tensor) -> dict:
        return self.setup.scorer(samples)

    def reference_rows(self, store: RowStore, cheap_only: bool = False) -> None:
        """The real images' row and the teacher's Euler and DPM-Solver++ rows; `cheap_only`: only the real images and
        the teacher's 1-step Euler (enough to check rows imported from another run against)."""
        setup = self.setup
        store.get("real test images", 0, None, lambda: setup.scorer(setup.real, setup.real_labels, paired=False),
                  family="reference")
        for steps in TEACHER_EULER_STEPS[:1] if cheap_only else TEACHER_EULER_STEPS:
            store.get("teacher Euler", steps, None, lambda: self.score(self.teacher_euler(steps)), family="teacher")
        if cheap_only:
            return
        try:
            from piflow.integrations.diffusers.solvers import diffusers_sample
        except ImportError:
            self.log("[claims] diffusers is not installed: the DPM-Solver++ rows are skipped")
            return
        for steps in TEACHER_DPM_STEPS:
            store.get("teacher DPM-Solver++", steps, None, lambda: self.score(diffusers_sample(
                self.teacher, self.noise, steps, self.labels, solver="dpm-solver++")), family="teacher")

    def teacher_euler(self, steps: int) -> Tensor:
        """The teacher's Euler samples of the bench's noise and labels; at the bank's reference step count they are
        the bank's own samples (the same computation), not computed again."""
        if steps == TEACHER_REFERENCE_STEPS:
            return self.setup.scorer.a.teacher_samples_a
        return euler_sample(self.teacher, self.noise, steps, self.labels)

    def scratch_overrides(self, iters: int) -> tuple[int, list[str]]:
        """A from-scratch student gets the teacher's own training budget on top, with its training settings."""
        teacher_train = self.setup.teacher_cfg["train"]
        kept = {k: v for k, v in teacher_train.items() if k not in ("iters", "seed", "progress")}
        return int(teacher_train["iters"]) + iters, [override(f"train.{k}", v) for k, v in kept.items()]

    def figure_samples(self, samples: Tensor) -> Tensor:
        """What the figure draws of a row's samples: its first 20 images (classes 0–9, twice)."""
        return samples[:20]

    def add_to_figure(self, label: str, nfe: int, samples: Tensor) -> None:
        self.grid[f"{label}, {nfe} NFE"] = self.figure_samples(samples)
        self.order[f"{label}, {nfe} NFE"] = ([spec.label for spec in self.students].index(label), nfe)

    def save_figure(self, path: Path) -> None:
        """The teacher's row, then the students by method (the table's order) and NFE."""
        from piflow.recipes.plots import plot_image_rows

        rows = sorted(self.grid.items(), key=lambda item: self.order.get(item[0], (-1, 0)))
        plot_image_rows(rows, path, ncol=20,
                        title="same noise and class in each column (classes 0–9, twice); seed 0 of each student")

    goals = staticmethod(check_image_goals)
