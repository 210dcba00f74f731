"""The playground of `piflow ui`, without Gradio: bundled teachers and students, one generation, its figures.

A generation draws one batch of noise from the seed and runs, on that same noise, the teacher's own Euler sampler
(N steps) and the π-Flow student through the one sampling loop (`piflow.sampling.sample`, NFE steps), timing each.
A second, recorded pass of the student on the first few samples keeps every rollout substep: the state and the
policy's denoised estimate x̂0 (`Policy.x0`; for GMFlow the posterior mean of its x0 mixture). Images get an x̂0
strip (the estimate along the substeps of each step); 2-D models get the teacher's flow field with its ODE paths
and the policy rollout paths. Bad settings are `ValueError`s with a one-line message naming the control.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from piflow.checks import is_int
from piflow.model import PiFlow
from piflow.policies.base import Policy
from piflow.sampling import FlowMapSDESchedule, euler_sample, euler_trajectory, sample
from piflow.schedule import parse_temperature

ASSETS = Path(__file__).resolve().parent.parent / "assets"
STUDENT_ASSETS = ASSETS / "students"
TEACHER_ASSETS = ASSETS / "teachers"

# label → (bundled student folder, its teacher: "exact" or a bundled teacher folder)
BUNDLED = {
    "digits: DiT teacher → GM-DiT student (trained at 4 NFE)": ("digits_gm_nfe4", "digits_dit"),
    "ring8: exact GM teacher → GM student (trained at 2 NFE)": ("ring8_gm_nfe2", "exact"),
    "checkerboard: MLP teacher → GM student (trained at 2 NFE)": ("checkerboard_gm_nfe2", "checkerboard_mlp"),
    "MNIST: U-Net teacher → GM U-Net student (trained at 4 NFE)": ("mnist_gm_nfe4", "mnist_unet"),
    "Fashion-MNIST: U-Net teacher → GM U-Net student (trained at 4 NFE)": ("fashion_mnist_gm_nfe4",
                                                                          "fashion_mnist_unet"),
}

MAX_NFE = 8
MAX_BATCH = {"image": 256, "2d": 20000}
MAX_SUBSTEPS = 1024
MAX_TEACHER_STEPS = 256
MAX_SEED = 2 ** 32 - 1
STRIP_SAMPLES = 4          # samples in the x̂0 strip
STRIP_FRAMES = 6           # x̂0 frames shown per student step
PATH_SAMPLES = 24          # 2-D rollout / ODE paths drawn
IMAGE_SCALE = 8            # nearest-neighbour upscaling of the tiny images for the page


@dataclass
class PlaygroundModel:
    """A teacher and the π-Flow student distilled from it.

    kind: "image" (class-conditional DiT, samples (B, C, H, W)) or "2d" (points (B, 2)); shape: one sample's shape;
    num_classes: classes of the condition (0: unconditional); background: data points for the 2-D figures.
    """

    label: str
    kind: str
    pf: PiFlow
    teacher: Callable[[Tensor, Tensor, Any], Tensor]
    shape: tuple[int, ...]
    num_classes: int = 0
    background: Optional[np.ndarray] = None

    @property
    def default_batch(self) -> int:
        return 16 if self.kind == "image" else 2000


def load_run(run_dir: Union[str, Path], label: Optional[str] = None, teacher: Optional[str] = None) -> PlaygroundModel:
    """The student of a finished 2-D or image `piflow distill` run (and its teacher) through the recipes' own
    loaders; `teacher` replaces the run's teacher path (bundled students point at the bundled teachers)."""
    from piflow.files import read_yaml
    from piflow.recipes import images, toy2d

    run_dir = Path(run_dir)
    overrides = [] if teacher is None else [f"teacher={teacher}"]
    config_path = run_dir / "config.yaml"
    written = read_yaml(config_path, "the run's config") if config_path.is_file() else None
    dataset = written.get("dataset") if isinstance(written, dict) else None
    label = label or run_dir.name
    image_run = images.is_image_dataset(dataset)
    pf, config = (images if image_run else toy2d).load_student(run_dir, overrides)
    if not isinstance(pf, PiFlow):         # the controls (substeps, h, policy views) are those of policy students
        from piflow.config import ConfigError
        from piflow.methods import method_name

        raise ConfigError(f"--run-dir {run_dir}: the playground shows π-ID and x0 students; this is a "
                          f"method={method_name(config)} run (sample it with `piflow sample --run-dir {run_dir}`)")
    if image_run:
        shape, num_classes = images.sample_spec(config)
        return PlaygroundModel(label, "image", pf, pf.teacher, shape, max(num_classes, 0))
    background = toy2d.load_dataset(config["dataset"]).sample(3000, torch.Generator().manual_seed(3)).numpy()
    return PlaygroundModel(label, "2d", pf, pf.teacher, (2,), 0, background)


def load_bundled(label: str) -> PlaygroundModel:
    """One of the `BUNDLED` students with its bundled teacher."""
    if label not in BUNDLED:
        raise ValueError(f"model must be one of {list(BUNDLED)}, got {label!r}")
    folder, teacher = BUNDLED[label]
    return load_run(STUDENT_ASSETS / folder, label, teacher if teacher == "exact" else str(TEACHER_ASSETS / teacher))


@dataclass(frozen=True)
class PlaygroundSettings:
    """Checked controls of one generation (see `check_settings`)."""

    nfe: int
    seed: int
    batch: int
    label: Optional[int]                 # None: classes 0, 1, 2, … in turn (or unconditional)
    temperature: Union[float, str]
    total_substeps: int
    h: Union[float, str]
    teacher_steps: int


def whole_number(value: Any, name: str, low: int, high: int) -> int:
    """An integer control (Gradio numbers arrive as floats) in [low, high], else a one-line ValueError."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not is_int(value) or not low <= int(value) <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return int(value)


def parse_h(value: Any) -> Union[float, str]:
    """Stochasticity h: a number >= 0 or 'inf' (checked by `FlowMapSDESchedule`)."""
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            value = "inf" if text in ("inf", "infinity") else float(text)
        except ValueError:
            raise ValueError(f"h must be a number >= 0 or 'inf', got {value!r}") from None
    if isinstance(value, float) and math.isinf(value) and value > 0:
        value = "inf"
    FlowMapSDESchedule(h=value)
    return value


def check_settings(model: PlaygroundModel, nfe: Any, seed: Any, batch: Any, label: Any = None,
                   temperature: Any = 1.0, total_substeps: Any = None, h: Any = 0.0,
                   teacher_steps: Any = 32) -> PlaygroundSettings:
    """The controls as a `PlaygroundSettings`, or a ValueError naming the first bad control and its range.
    `label`: None / "all" / "" for every class in turn, else a class index; `total_substeps`: None for the
    student's own setting."""
    nfe = whole_number(nfe, "NFE", 1, MAX_NFE)
    seed = whole_number(seed, "seed", 0, MAX_SEED)
    batch = whole_number(batch, "batch", 1, MAX_BATCH[model.kind])
    if label in (None, "", "all"):
        label = None
    elif model.num_classes == 0:
        raise ValueError(f"class: {model.label} is unconditional; choose 'all'")
    else:
        label = whole_number(label, "class", 0, model.num_classes - 1)
    total_substeps = model.pf.settings.total_substeps if total_substeps in (None, "") else \
        whole_number(total_substeps, "substeps", 1, MAX_SUBSTEPS)
    teacher_steps = whole_number(teacher_steps, "teacher steps", 1, MAX_TEACHER_STEPS)
    return PlaygroundSettings(nfe, seed, batch, label, parse_temperature(temperature), total_substeps, parse_h(h),
                              teacher_steps)


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def draw_inputs(model: PlaygroundModel, settings: PlaygroundSettings) -> tuple[Tensor, Optional[Tensor]]:
    """(noise (B, *shape), class labels (B,) or None) from the seed: the same for the teacher and the student."""
    gen = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn(settings.batch, *model.shape, generator=gen)
    if model.num_classes == 0:
        return noise, None
    if settings.label is not None:
        return noise, torch.full((settings.batch,), settings.label, dtype=torch.long)
    return noise, torch.arange(settings.batch) % model.num_classes


class _RecordingPolicy(Policy):
    """A policy that rolls out like the one it wraps, one substep at a time, and appends every substep's state
    and x̂0 to `record` (one entry per rollout). Temperature and batching are the wrapped policy's."""

    def __init__(self, inner: Policy, record: list):
        self.inner, self.record = inner, record
        self.x_src, self.sigma_src, self.eps = inner.x_src, inner.sigma_src, inner.eps

    def _x0(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        return self.inner.x0(x_t, sigma_t)

    def temperature(self, temperature: float) -> "_RecordingPolicy":
        return _RecordingPolicy(self.inner.temperature(temperature), self.record)

    @property
    def fixed_batch(self) -> bool:
        return True          # sampling: every sample has the same substep count

    def substeps(self, x: Tensor, sigmas: Tensor) -> Tensor:
        states, estimates = [x], []
        for j in range(sigmas.shape[0] - 1):
            estimates.append(self.inner.x0(x, sigmas[j]))
            x = self.inner.substeps(x, sigmas[j:j + 2])
            states.append(x)
        self.record.append({"sigmas": sigmas.reshape(sigmas.shape[0], -1)[:, 0].clone(),
                            "states": torch.stack(states), "x0": torch.stack(estimates)})
        return x


@torch.no_grad()
def student_sample(pf: PiFlow, noise: Tensor, cond: Any, settings: PlaygroundSettings,
                   record: Optional[list] = None) -> Tensor:
    """The student's samples (B, *shape) at `settings.nfe` steps through `piflow.sampling.sample` (what
    `PiFlow.sample` runs, with the playground's substeps); with `record` (a list), one dict per step is appended:
    ``sigmas`` (n+1,), ``states`` (n+1, B, *shape) and ``x0`` (n, B, *shape) along its rollout substeps."""
    s = pf.settings
    policy_fn = pf.policy if record is None else (lambda x, sigma, c: _RecordingPolicy(pf.policy(x, sigma, c), record))
    generator = torch.Generator().manual_seed(settings.seed + 1)      # re-noising for h > 0
    return sample(policy_fn, noise, settings.nfe, cond, shift=s.shift, final_step_size_scale=s.final_step_size_scale,
                  h=settings.h, temperature=settings.temperature, total_substeps=settings.total_substeps,
                  generator=generator)


@dataclass
class Generation:
    """One playground generation: teacher and student samples on the same noise, their wall times, the recorded
    student rollout of the first samples (`student_sample` with `record`) and, for 2-D, the teacher's ODE paths."""

    settings: PlaygroundSettings
    noise: Tensor
    labels: Optional[Tensor]
    teacher: Tensor
    student: Tensor
    teacher_seconds: float
    student_seconds: float
    record: list = field(default_factory=list)
    teacher_paths: Optional[Tensor] = None          # (teacher_steps + 1, P, 2), 2-D only


def generate(model: PlaygroundModel, settings: PlaygroundSettings,
             progress: Optional[Callable[[float, str], None]] = None) -> Generation:
    """Run the teacher (Euler, `teacher_steps`) and the student (`nfe`) on the same noise and record the student's
    substeps for the first `STRIP_SAMPLES` images (2-D: `PATH_SAMPLES` points). `progress(fraction, text)`."""
    report = progress or (lambda fraction, text: None)
    noise, labels = draw_inputs(model, settings)
    report(0.0, f"teacher: {settings.teacher_steps} Euler steps")
    start = time.perf_counter()
    teacher = euler_sample(model.teacher, noise, settings.teacher_steps, labels)
    teacher_seconds = time.perf_counter() - start
    report(0.4, f"student: {settings.nfe} NFE")
    start = time.perf_counter()
    student = student_sample(model.pf, noise, labels, settings)
    student_seconds = time.perf_counter() - start
    report(0.6, "recording the policy rollout")
    count = min(settings.batch, STRIP_SAMPLES if model.kind == "image" else PATH_SAMPLES)
    record: list = []
    student_sample(model.pf, noise[:count], None if labels is None else labels[:count], settings, record)
    paths = euler_trajectory(model.teacher, noise[:count], settings.teacher_steps) if model.kind == "2d" else None
    report(1.0, "done")
    return Generation(settings, noise, labels, teacher, student, teacher_seconds, student_seconds, record, paths)


def rollout_paths(record: list) -> tuple[Tensor, Tensor]:
    """(every substep state (T, P, *shape), the states where the network was evaluated plus the end
    (nfe + 1, P, *shape)) of a recorded student rollout."""
    states = [record[0]["states"][:1]] + [step["states"][1:] for step in record]
    points = [step["states"][0] for step in record] + [record[-1]["states"][-1]]
    return torch.cat(states), torch.stack(points)


def strip_frames(record: list, frames_per_step: int = STRIP_FRAMES) -> tuple[Tensor, list[tuple[int, float]]]:
    """x̂0 frames (F, P, *shape): `frames_per_step` substeps of each step, evenly spaced from its first substep
    (x̂0 at the network's own state) to its last, and their (step, σ) labels."""
    frames, labels = [], []
    for i, step in enumerate(record):
        count = step["x0"].shape[0]
        picks = sorted({round(j * (count - 1) / max(frames_per_step - 1, 1)) for j in range(frames_per_step)})
        for j in picks:
            frames.append(step["x0"][j])
            labels.append((i, float(step["sigmas"][j])))
    return torch.stack(frames), labels


def image_grid(images: Tensor, ncol: int, scale: int = IMAGE_SCALE) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] → uint8 RGB (rows, cols, 3): a grid with 1-pixel gaps, upscaled ×`scale`."""
    from piflow.recipes.plots import image_canvas

    canvas = image_canvas(images, ncol)
    if canvas.shape[2] == 1:
        canvas = np.repeat(canvas, 3, axis=2)
    canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    return (canvas * 255).round().astype(np.uint8)


def x0_strip(record: list, frames_per_step: int = STRIP_FRAMES) -> tuple[np.ndarray, str]:
    """The x̂0 strip as one uint8 RGB image (a row per sample, a column per frame, a gap between steps) and its
    caption (σ of each column, step by step)."""
    frames, labels = strip_frames(record, frames_per_step)          # (F, P, C, H, W)
    rows = []
    for p in range(frames.shape[1]):
        blocks = [image_grid(frames[[k for k, (s, _) in enumerate(labels) if s == i], p], frames_per_step)
                  for i in range(len(record))]
        gap = np.full((blocks[0].shape[0], IMAGE_SCALE * 2, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([b for block in blocks for b in (block, gap)][:-1], axis=1))
    strip = np.concatenate(rows, axis=0)
    caption = "; ".join(f"step {i + 1}: σ " + ", ".join(f"{sigma:.2f}" for s, sigma in labels if s == i)
                        for i in range(len(record)))
    return strip, caption


def _figure_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _limit(*point_sets: np.ndarray) -> float:
    points = np.concatenate([p.reshape(-1, 2) for p in point_sets])
    return float(np.quantile(np.abs(points), 0.995)) * 1.15 + 0.1


def scatter_panel(points: Tensor, title: str, limit: float) -> np.ndarray:
    """2-D samples (N, 2) as a uint8 RGB scatter plot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=90)
    ax = fig.add_subplot()
    values = points.numpy()
    ax.scatter(values[:, 0], values[:, 1], s=2, alpha=0.5, c="tab:blue", edgecolors="none")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _figure_array(fig)


@torch.no_grad()
def flow_figure(model: PlaygroundModel, generation: Generation, sigma: float = 0.5) -> np.ndarray:
    """2-D: the teacher's velocity field at σ = `sigma` with its Euler ODE paths (left) beside the student's policy
    rollout paths with its network evaluations (right), on the same noise; uint8 RGB."""
    from matplotlib.figure import Figure

    paths, points = rollout_paths(generation.record)
    teacher_paths = generation.teacher_paths
    limit = _limit(teacher_paths.numpy(), paths.numpy(), generation.teacher.numpy())
    axis = torch.linspace(-limit, limit, 21)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    velocity = model.teacher(grid, torch.full((grid.shape[0],), sigma), None)
    direction = -velocity                     # the flow runs towards σ = 0: dx = u·dσ with dσ < 0
    fig = Figure(figsize=(8, 4), dpi=90)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ax in (left, right):
        if model.background is not None:
            ax.scatter(model.background[:, 0], model.background[:, 1], s=1, c="0.85", edgecolors="none")
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
    left.quiver(grid[:, 0].numpy(), grid[:, 1].numpy(), direction[:, 0].numpy(), direction[:, 1].numpy(),
                color="0.55", angles="xy", width=0.003)
    for i in range(teacher_paths.shape[1]):
        left.plot(teacher_paths[:, i, 0], teacher_paths[:, i, 1], c="tab:blue", lw=1.0)
        right.plot(paths[:, i, 0], paths[:, i, 1], c="tab:red", lw=1.0)
    right.scatter(points[:-1, :, 0].ravel(), points[:-1, :, 1].ravel(), c="k", s=8, zorder=3)
    right.scatter(points[-1, :, 0], points[-1, :, 1], c="tab:red", s=10, zorder=3)
    s = generation.settings
    left.set_title(f"teacher flow field at σ={sigma:g} and {s.teacher_steps}-step ODE paths", fontsize=9)
    right.set_title(f"student policy rollouts, {s.nfe} NFE (black: network evaluations)", fontsize=9)
    fig.tight_layout()
    return _figure_array(fig)


@dataclass
class Rendered:
    """What the page shows for one generation: uint8 RGB arrays and Markdown texts."""

    teacher: np.ndarray
    student: np.ndarray
    detail: np.ndarray               # images: x̂0 strip; 2-D: flow field + rollout paths
    detail_caption: str
    timing: str


def render(model: PlaygroundModel, generation: Generation) -> Rendered:
    s = generation.settings
    if model.kind == "image":
        ncol = min(s.batch, 8)
        teacher, student = image_grid(generation.teacher, ncol), image_grid(generation.student, ncol)
        detail, strip_caption = x0_strip(generation.record)
        caption = (f"policy x̂0 along the substeps of each of the {s.nfe} steps (first "
                   f"{generation.record[0]['x0'].shape[1]} samples, one row each) — {strip_caption}")
    else:
        limit = _limit(generation.teacher.numpy(), generation.student.numpy())
        teacher = scatter_panel(generation.teacher, f"teacher Euler, {s.teacher_steps} steps", limit)
        student = scatter_panel(generation.student, f"π-Flow student, {s.nfe} NFE", limit)
        detail = flow_figure(model, generation)
        caption = (f"left: the teacher's velocity field and its ODE paths; right: the student's policy rollouts "
                   f"({s.total_substeps} substeps per unit time) from the same {generation.record[0]['x0'].shape[1]} "
                   f"noise points")
    timing = (f"teacher {s.teacher_steps} steps: {generation.teacher_seconds * 1000:.0f} ms · "
              f"student {s.nfe} NFE: {generation.student_seconds * 1000:.0f} ms (batch {s.batch}, seed {s.seed})")
    return Rendered(teacher, student, detail, caption, timing)

