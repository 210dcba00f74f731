"""The paper's two claims, measured side by side (`benchmarks/claims.py`): π-ID GM students against DMD2 and
MeanFlow on the same teacher, backbone, data and optimiser-step budget, scored on quality *and* diversity.

Image datasets (class-conditional DiT teacher; every method samples the same noise and labels, set A):
* quality in two independently trained feature spaces — A, piflow's classifier (`image_benchmark`), and B, another
  architecture from another seed (``SECOND_FEATURE_NET``): FD to the teacher's 32-step samples (set B noise), FD to
  the real test images, recall/coverage (A), label accuracy;
* diversity: the mean over classes of the within-class mean pairwise feature distance and Vendi score;
* a pixel-space artefact measure: the share of spectral power above half the Nyquist frequency, divided by the
  teacher's 32-step samples' share (1 = the teacher's level of fine detail; speckle shows as > 1).
ring8 (exact Gaussian-mixture teacher, MLP students): sliced W2 / energy distance to the data, modes covered and
mode-mass error.

Methods: the teacher's Euler (1–32 steps) and DPM-Solver++ (2–8) samplers, the x0-regression student, π-ID GM
K = 8 at 1, 2, 4 NFE, DMD2 at 1 and 4 NFE (`piflow.baselines.dmd2`, generator and fake score copied from the
teacher, 5 fake-score updates per generator update, no GAN term), MeanFlow sampled at 1 and 2 NFE
(`piflow.baselines.meanflow`) trained from scratch with the teacher's + the student's optimiser steps, and
initialised from the teacher with the student's steps. Student rows are repeated over seeds (mean ± std).

Every finished piece is kept in the run directory — each training run (resumable from its checkpoint), each scored
row (``rows/*.json``), the evaluation bank (``eval_bank.safetensors``: noise, labels and the teacher's reference
samples, computed once per teacher) — so a killed run continues where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from piflow.baselines import dmd2, meanflow
from piflow.config import load_config
from piflow.eval.diversity import per_class_diversity
from piflow.files import load_safetensors, read_json, save_safetensors, write_json
from piflow.recipes import image_benchmark, images, toy2d
from piflow.sampling import euler_sample
from piflow.train import TrainConfig
from piflow.train.loop import train

BUNDLED_TEACHERS = {"digits": Path(__file__).resolve().parent.parent / "assets" / "teachers" / "digits_dit"}
IMAGE_NFES = {"piid": (1, 2, 4), "x0": (1, 4), "dmd2": (1, 4)}
MEANFLOW_NFES = (1, 2)
# the order in which the image students of one seed are trained: those the goals compare first
IMAGE_ROW_PRIORITY = [("piid", 4), ("dmd2", 4), ("piid", 1), ("meanflow_init", None), ("meanflow_scratch", None),
                      ("piid", 2), ("x0", 4), ("x0", 1), ("dmd2", 1)]
TEACHER_EULER_STEPS = (1, 2, 4, 8, 32)
TEACHER_DPM_STEPS = (2, 4, 8)
METHOD_LABELS = {"piid": "π-ID GM K=8", "x0": "x0-regression", "dmd2": "DMD2",
                 "meanflow_scratch": "MeanFlow (scratch)", "meanflow_init": "MeanFlow (teacher init)"}


def slug(text: str) -> str:
    """A file-name form of a row label: runs of other characters become one underscore, lower case."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_").lower()


class RowStore:
    """Scored rows, one strict-JSON file each under ``run_dir/rows`` (written atomically): a row that exists is
    never recomputed."""

    def __init__(self, run_dir: Path, log: Callable[[str], None]):
        self.directory = run_dir / "rows"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = log

    def get(self, method: str, nfe: int, seed: Optional[int], compute: Callable[[], dict], **info) -> dict:
        path = self.directory / f"{slug(method)}_nfe{nfe}" f"{'' if seed is None else f'_seed{seed}'}.json"
        if path.is_file():
            return read_json(path)
        row = dict(compute(), method=method, nfe=nfe, seed=seed, **info)
        write_json(path, row)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k in SHOWN_IN_LOG)
        self.log(f"[claims] {method} @ {nfe} NFE" + ("" if seed is None else f" seed {seed}") + f": {shown}")
        return row

    def all(self) -> list[dict]:
        return [read_json(path) for path in sorted(self.directory.glob("*.json"))]


SHOWN_IN_LOG = ("fd_teacher", "fd_teacher_b", "class_vendi", "recall", "hf_ratio", "mode_mass_error",
                "energy_distance")


def train_baseline(run_dir: Path, model: nn.Module, loss_fn, train_settings: dict,
                   log: Callable[[str], None] = print) -> nn.Module:
    """Train `model` (a baseline student) with the training loop into `run_dir` (checkpoints, resume) and keep
    its EMA weights as ``student.safetensors``; a finished run's weights are loaded instead. Returns the EMA
    model in eval mode."""
    weights = run_dir / "student.safetensors"
    if weights.is_file():
        model.load_state_dict(load_safetensors(weights, "baseline student weights"))
        return model.eval().requires_grad_(False)
    log(f"[claims] training {run_dir.name} ({train_settings['iters']} iterations)")
    start = time.perf_counter()
    result = train(model, loss_fn, TrainConfig(**train_settings), run_dir, desc=run_dir.name)
    save_safetensors(weights, result.ema.model.state_dict())
    write_json(run_dir / "metrics.json", {"train_seconds": time.perf_counter() - start,
                                          "final_loss": result.history[-1]["loss"] if result.history else None})
    return result.ema.model.eval().requires_grad_(False)


class _Once:
    """A zero-argument function evaluated at most once (its value kept)."""

    def __init__(self, function: Callable[[], Any]):
        self.function, self.done, self.value = function, False, None

    def __call__(self) -> Any:
        if not self.done:
            self.value, self.done = self.function(), True
        return self.value


def train_seconds(run_dir: Path) -> Optional[float]:
    """The ``train_seconds`` recorded in a training run's metrics.json (None before it finished)."""
    path = run_dir / "metrics.json"
    return read_json(path).get("train_seconds") if path.is_file() else None


def summarise(rows: list[dict]) -> list[dict]:
    """Rows grouped by (method, nfe) in first-seen order: mean and std (over seeds, ddof = 1) of every number."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["nfe"]), []).append(row)
    summary = []
    for (method, nfe), members in groups.items():
        entry: dict[str, Any] = {"method": method, "nfe": nfe, "seeds": len(members),
                                 "family": members[0].get("family", "")}
        for key in members[0]:
            values = [m[key] for m in members if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
            if key in ("nfe", "seed") or len(values) != len(members):
                continue
            finite = [v for v in values if math.isfinite(v)]
            if len(finite) != len(values):
                entry[key] = float("nan")
                continue
            mean = sum(values) / len(values)
            entry[key] = mean
            if len(values) > 1:
                entry[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        summary.append(entry)
    return summary


def ordered_summary(rows: list[dict]) -> list[dict]:
    """`summarise`d rows in table order: the reference, then the teacher's samplers, then students, by NFE."""
    order = {"reference": 0, "teacher": 1}
    return sorted(summarise(rows), key=lambda e: (order.get(e["family"], 2), e["nfe"], e["method"]))


def _cell(entry: dict, key: str, fmt: str) -> str:
    value = entry.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = fmt.format(value)
    std = entry.get(f"{key}_std")
    return text + (f" ± {fmt.format(std)}" if std is not None else "")


IMAGE_COLUMNS = [("fd_teacher", "FD-teacher A ↓", "{:.3f}"), ("fd_teacher_b", "FD-teacher B ↓", "{:.3f}"),
                 ("fd_real", "FD-real A ↓", "{:.3f}"), ("recall", "recall A", "{:.3f}"),
                 ("coverage", "coverage A", "{:.3f}"), ("class_distance", "class dist. A", "{:.3f}"),
                 ("class_vendi", "class Vendi A", "{:.2f}"), ("class_vendi_b", "class Vendi B", "{:.2f}"),
                 ("label_accuracy", "label acc. A", "{:.3f}"), ("label_accuracy_b", "label acc. B", "{:.3f}"),
                 ("hf_ratio", "HF power / teacher", "{:.2f}"), ("train_seconds", "train s", "{:.0f}")]
TOY_COLUMNS = [("energy_distance", "energy dist. ↓", "{:.4f}"), ("sliced_w2", "sliced W2 ↓", "{:.4f}"),
               ("modes_covered", "modes covered", "{:.1f}"), ("mode_mass_error", "mode-mass error ↓", "{:.4f}"),
               ("outlier_fraction", "outliers", "{:.4f}"), ("coupling_error", "coupling err. ↓", "{:.4f}"),
               ("train_seconds", "train s", "{:.0f}")]


def format_markdown(summary: list[dict], columns) -> str:
    lines = ["| method | NFE | seeds | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for entry in summary:
        lines.append(f"| {entry['method']} | {entry['nfe']} | {entry['seeds']} | "
                     + " | ".join(_cell(entry, key, fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def _find(summary: list[dict], method: str, nfe: int) -> Optional[dict]:
    return next((e for e in summary if e["method"] == method and e["nfe"] == nfe), None)


def check_image_goals(summary: list[dict]) -> dict:
    """The issue's goals on the means over seeds (only those whose rows exist)."""
    goals: dict[str, Any] = {}
    piid4, dmd4 = _find(summary, METHOD_LABELS["piid"], 4), _find(summary, METHOD_LABELS["dmd2"], 4)
    if piid4 and dmd4:
        goals["nfe4_piid_fd_teacher_le_dmd2_A"] = piid4["fd_teacher"] <= dmd4["fd_teacher"]
        goals["nfe4_piid_fd_teacher_le_dmd2_B"] = piid4["fd_teacher_b"] <= dmd4["fd_teacher_b"]
        goals["nfe4_piid_class_diversity_ge_dmd2"] = (piid4["class_distance"] >= dmd4["class_distance"]
                                                      and piid4["class_vendi"] >= dmd4["class_vendi"])
        goals["nfe4_piid_recall_ge_dmd2"] = piid4["recall"] >= dmd4["recall"]
    piid1 = _find(summary, METHOD_LABELS["piid"], 1)
    for key in ("meanflow_scratch", "meanflow_init"):
        mf1 = _find(summary, METHOD_LABELS[key], 1)
        if piid1 and mf1:
            goals[f"nfe1_piid_fd_teacher_le_{key}_A"] = piid1["fd_teacher"] <= mf1["fd_teacher"]
            goals[f"nfe1_piid_fd_teacher_le_{key}_B"] = piid1["fd_teacher_b"] <= mf1["fd_teacher_b"]
    for solver in ("teacher Euler", "teacher DPM-Solver++"):
        other = _find(summary, solver, 4)
        if piid4 and other:
            name = slug(solver)
            goals[f"nfe4_piid_fd_teacher_lt_{name}_A"] = piid4["fd_teacher"] < other["fd_teacher"]
            goals[f"nfe4_piid_fd_teacher_lt_{name}_B"] = piid4["fd_teacher_b"] < other["fd_teacher_b"]
            goals[f"nfe4_piid_hf_closer_to_teacher_than_{name}"] = (abs(piid4["hf_ratio"] - 1)
                                                                     < abs(other["hf_ratio"] - 1))
    return goals


def check_toy_goals(summary: list[dict]) -> dict:
    goals: dict[str, Any] = {}
    piid4, euler8 = _find(summary, METHOD_LABELS["piid"], 4), _find(summary, "teacher Euler", 8)
    if piid4:
        goals["nfe4_piid_modes_covered"] = piid4["modes_covered"]
        if euler8:
            goals["nfe4_piid_mode_mass_error_le_teacher_euler8"] = (piid4["mode_mass_error"]
                                                                    <= euler8["mode_mass_error"])
    for nfe in IMAGE_NFES["dmd2"]:
        dmd = _find(summary, METHOD_LABELS["dmd2"], nfe)
        if dmd:
            goals[f"nfe{nfe}_dmd2_mode_mass_error"] = dmd["mode_mass_error"]
    return goals


# --------------------------------------------------------------------------------------------- images
class ImageScorer:
    """Scores a sample set (N, C, H, W) generated from the bank's noise and labels in both feature spaces
    (`image_benchmark.metrics_in_both_spaces`), with the within-class diversity in each."""

    def __init__(self, contexts: list):
        self.a, self.b = contexts

    def __call__(self, samples: Tensor, labels: Optional[Tensor] = None, paired: bool = True) -> dict:
        samples = samples.float().clamp(-1, 1)
        labels = self.a.labels_a if labels is None else labels
        row = image_benchmark.metrics_in_both_spaces([self.a, self.b], samples, paired)
        for suffix, context in (("", self.a), ("_b", self.b)):
            features, logits = context.features_and_logits(samples)
            diversity = per_class_diversity(features, labels)
            row[f"class_distance{suffix}"] = diversity["mean_pairwise_distance"]
            row[f"class_vendi{suffix}"] = diversity["vendi"]
            if not paired:   # real images: the classifier's accuracy on their own labels
                row[f"label_accuracy{suffix}"] = float((logits.argmax(1) == labels).float().mean())
        return row


def _eval_bank(run_dir: Path, teacher, feature_nets: list, real: Tensor, shape, num_classes: int,
               num_samples: int) -> list:
    """The two evaluation contexts; their noise, labels and teacher samples are cached in eval_bank.safetensors."""
    path = run_dir / "eval_bank.safetensors"
    if path.is_file():
        bank = load_safetensors(path, "evaluation bank")
    else:
        bank = image_benchmark.evaluation_bank(teacher, shape, num_classes, num_samples)
        save_safetensors(path, bank)
    return image_benchmark.contexts_from_bank(feature_nets, bank, real, num_classes)


def _train_settings(config: dict, iters: int, seed: int, progress: bool) -> dict:
    """The ``train`` section of a resolved config, with the run's steps and seed."""
    return dict(config["train"], iters=int(iters), seed=int(seed), progress=progress)


def _resolved_defaults(defaults: dict) -> dict:
    return load_config(defaults, None, [])


def _image_dmd2(run_dir: Path, teacher_model: nn.Module, teacher, labels: Tensor, shape, nfe: int, seed: int,
                steps: int, batch: int, progress: bool, log) -> dmd2.DMD2Student:
    torch.manual_seed(seed)
    student = dmd2.DMD2Student(copy.deepcopy(teacher_model).requires_grad_(True), num_timesteps=images.NUM_TIMESTEPS)
    settings = dmd2.DMD2Settings()
    ratio = settings.fake_updates_per_generator_update

    def loss_fn(iteration: int, generator: torch.Generator, backward) -> Tensor:
        noise = torch.randn(batch, *shape, generator=generator)
        y = labels[torch.randint(len(labels), (batch,), generator=generator)]
        return dmd2.training_loss(student, teacher, noise, y, iteration, nfe, settings, generator)

    settings_ = _train_settings(_resolved_defaults(images.IMAGE_DISTILL_DEFAULTS), ratio * steps, seed, progress)
    return train_baseline(run_dir, student, loss_fn, settings_, log)


def _image_meanflow(run_dir: Path, base: nn.Module, data: tuple[Tensor, Tensor], settings_source: dict, iters: int,
                    seed: int, batch: int, progress: bool, log) -> meanflow.AverageVelocityNet:
    net = meanflow.AverageVelocityNet(base.requires_grad_(True), images.NUM_TIMESTEPS)
    x, y = data

    def loss_fn(iteration: int, generator: torch.Generator, backward) -> Tensor:
        index = torch.randint(len(x), (batch,), generator=generator)
        return meanflow.meanflow_loss(net, x[index], y[index], generator=generator)

    return train_baseline(run_dir, net, loss_fn, _train_settings(settings_source, iters, seed, progress), log)


@dataclasses.dataclass
class ImageSetup:
    """What every image measurement shares: the teacher, the data, the two feature nets and the scorer."""
    teacher_run: Path
    teacher_model: nn.Module
    teacher_cfg: dict
    teacher: Callable
    train_x: Tensor
    train_y: Tensor
    shape: tuple
    num_classes: int
    feature_metrics: tuple[dict, dict]
    scorer: ImageScorer
    real: Tensor
    real_labels: Tensor

    @property
    def noise(self) -> Tensor:
        return self.scorer.a.noise_a

    @property
    def labels(self) -> Tensor:
        return self.scorer.a.labels_a


def resolve_teacher(run_dir: Path, dataset: str, teacher_run: Optional[Path] = None, progress: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """The teacher run directory: the given one, the bundled teacher of `dataset`, or run_dir/teacher, which is
    trained with the image recipe's defaults first when it holds no finished teacher."""
    teacher_run = Path(teacher_run) if teacher_run else BUNDLED_TEACHERS.get(dataset, run_dir / "teacher")
    if not (teacher_run / "teacher" / "config.json").is_file():
        log(f"[claims] training the teacher into {teacher_run}")
        images.train_teacher(load_config(images.IMAGE_TEACHER_DEFAULTS, None,
                                         [f"dataset={dataset}", f"train.progress={str(progress).lower()}"]),
                             teacher_run)
    return teacher_run


def prepare_images(run_dir: Path, dataset: str, teacher_run: Optional[Path] = None, num_samples: int = 1000,
                   feature_epochs: int = 30, progress: bool = False, log: Callable[[str], None] = print) -> ImageSetup:
    """The teacher (`resolve_teacher`), the two feature nets and the evaluation bank, each cached in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher_run = resolve_teacher(run_dir, dataset, teacher_run, progress, log)
    teacher_model, teacher_cfg = images.load_teacher(str(teacher_run))
    if teacher_cfg["dataset"] != dataset:
        raise ValueError(f"teacher_run was trained on {teacher_cfg['dataset']!r}, not dataset={dataset!r}")
    train_x, train_y = images.load_dataset(teacher_cfg, "train").tensors()
    test_x, test_y = images.load_dataset(teacher_cfg, "test").tensors()
    num_classes = int(teacher_model.config.num_classes)
    shape = tuple(train_x.shape[1:])
    teacher = images.make_teacher(teacher_model, num_classes)
    nets, (metrics_a, metrics_b) = image_benchmark.feature_classifiers_for(
        run_dir, train_x, train_y, test_x, test_y, num_classes, feature_epochs, log=log)
    real, real_labels = (test_x, test_y) if len(test_x) >= 100 else (train_x, train_y)
    real, real_labels = real[:num_samples], real_labels[:num_samples]
    contexts = _eval_bank(run_dir, teacher, nets, real, shape, num_classes, num_samples)
    return ImageSetup(teacher_run, teacher_model, teacher_cfg, teacher, train_x, train_y, shape, num_classes,
                      (metrics_a, metrics_b), ImageScorer(contexts), real, real_labels)


def distill_piid(directory: Path, teacher_run: Path, dataset: str, policy: str, nfe: int, iters: int, seed: int,
                 overrides: tuple[str, ...] = (), progress: bool = False, log: Callable[[str], None] = print):
    """A π-ID student (`policy` gmflow, dx or x0) of the teacher in `teacher_run`, distilled into `directory` with
    the image recipe's defaults and `overrides` (skipped when its weights are there; resumed from a checkpoint);
    returns the loaded `PiFlow`."""
    if not (directory / "student.safetensors").is_file():
        log(f"[claims] distilling {directory.name} ({iters} iterations)")
        images.distill(load_config(images.IMAGE_DISTILL_DEFAULTS, None, [
            f"dataset={dataset}", f"teacher={teacher_run}", f"student.policy={policy}", f"distill.nfe={nfe}",
            f"train.iters={iters}", f"train.seed={seed}", f"train.progress={str(progress).lower()}", *overrides]),
            directory)
    return images.load_student(directory)[0]


def parse_row_keys(texts: list[str]) -> list[tuple[str, Optional[int]]]:
    """``kind:nfe`` (or ``kind`` for MeanFlow) strings as `IMAGE_ROW_PRIORITY` keys; an unknown one is a one-line
    ValueError listing the known keys."""
    known = {f"{kind}:{nfe}" if nfe is not None else kind: (kind, nfe) for kind, nfe in IMAGE_ROW_PRIORITY}
    unknown = [text for text in texts if text not in known]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {', '.join(known)}")
    return [known[text] for text in texts]


def run_images(run_dir: Path, dataset: str = "digits", seeds: int = 3, iters: int = 300, num_samples: int = 1000,
               teacher_run: Optional[Path] = None, feature_epochs: int = 30,
               meanflow_scratch_seeds: Optional[int] = None, progress: bool = False,
               only: Optional[list[tuple[str, Optional[int]]]] = None,
               log: Callable[[str], None] = print) -> dict:
    """The image claims benchmark (see the module docstring); returns and writes results.json / results.md.
    `only` limits the students trained and scored in this invocation to those keys of `IMAGE_ROW_PRIORITY`
    (e.g. [("dmd2", 1)]; MeanFlow keys have NFE None), so that two processes can share one run directory on
    different rows; the tables always show every row finished so far."""
    start = time.perf_counter()
    setup = prepare_images(run_dir, dataset, teacher_run, num_samples, feature_epochs, progress, log)
    teacher, teacher_model, teacher_cfg, teacher_run = (setup.teacher, setup.teacher_model, setup.teacher_cfg,
                                                        setup.teacher_run)
    train_x, train_y, shape, scorer = setup.train_x, setup.train_y, setup.shape, setup.scorer
    noise, labels = setup.noise, setup.labels
    store = RowStore(run_dir, log)
    grid: dict[str, Tensor] = {}

    store.get("real test images", 0, None, lambda: scorer(setup.real, setup.real_labels, paired=False),
              family="reference")
    for steps in TEACHER_EULER_STEPS:
        store.get("teacher Euler", steps, None, lambda: scorer(euler_sample(teacher, noise, steps, labels)),
                  family="teacher")
    grid["teacher Euler 32"] = scorer.a.teacher_samples_a[:20]
    grid_order = {"teacher Euler 32": (-1, 0)}     # the figure's rows: teacher, then by method and NFE
    try:
        from piflow.integrations.diffusers.solvers import diffusers_sample

        for steps in TEACHER_DPM_STEPS:
            store.get("teacher DPM-Solver++", steps, None, lambda: scorer(diffusers_sample(
                teacher, noise, steps, labels, solver="dpm-solver++")), family="teacher")
    except ImportError:
        log("[claims] diffusers is not installed: the DPM-Solver++ rows are skipped")

    students = run_dir / "students"
    batch = int(images.IMAGE_DISTILL_DEFAULTS["distill"]["batch_size"])
    teacher_iters = int(teacher_cfg["train"]["iters"])

    def student(kind: str, nfe: int, seed: int, directory: Path, samples_fn: Callable[[], Tensor]) -> None:
        samples = _Once(samples_fn)
        store.get(METHOD_LABELS[kind], nfe, seed, lambda: dict(scorer(samples()),
                                                               train_seconds=train_seconds(directory)),
                  family="student")
        if seed == 0:
            grid[f"{METHOD_LABELS[kind]}, {nfe} NFE"] = samples()[:20]
            grid_order[f"{METHOD_LABELS[kind]}, {nfe} NFE"] = (list(METHOD_LABELS).index(kind), nfe)

    for seed in range(seeds):
        jobs: dict[tuple[str, Optional[int]], Callable[[], None]] = {}
        for kind in ("piid", "x0"):
            for nfe in IMAGE_NFES[kind]:
                directory = students / f"{kind}_nfe{nfe}_seed{seed}"

                def piid_samples(directory=directory, nfe=nfe, kind=kind) -> Tensor:
                    pf = distill_piid(directory, teacher_run, dataset, "x0" if kind == "x0" else "gmflow", nfe,
                                      iters, seed, progress=progress, log=log)
                    with torch.no_grad():
                        return pf.sample(noise, nfe=nfe, cond=labels)

                jobs[kind, nfe] = lambda kind=kind, nfe=nfe, directory=directory, fn=piid_samples: student(
                    kind, nfe, seed, directory, fn)
        for nfe in IMAGE_NFES["dmd2"]:
            directory = students / f"dmd2_nfe{nfe}_seed{seed}"

            def dmd2_samples(directory=directory, nfe=nfe) -> Tensor:
                generator_net = _image_dmd2(directory, teacher_model, teacher, train_y, shape, nfe, seed, iters,
                                            batch, progress, log)
                return generator_net.sample(noise, nfe, labels, torch.Generator().manual_seed(seed))

            jobs["dmd2", nfe] = lambda nfe=nfe, directory=directory, fn=dmd2_samples: student(
                "dmd2", nfe, seed, directory, fn)
        variants = [("meanflow_init", iters, _resolved_defaults(images.IMAGE_DISTILL_DEFAULTS))]
        if seed < (seeds if meanflow_scratch_seeds is None else meanflow_scratch_seeds):
            variants.append(("meanflow_scratch", teacher_iters + iters, teacher_cfg))
        for kind, budget, source in variants:
            directory = students / f"{kind}_seed{seed}"

            def meanflow_net(directory=directory, kind=kind, budget=budget, source=source):
                torch.manual_seed(seed)
                base = (copy.deepcopy(teacher_model) if kind == "meanflow_init"
                        else images.build_teacher_model(teacher_cfg, shape, setup.num_classes))
                return _image_meanflow(directory, base, (train_x, train_y), source, budget, seed, batch, progress,
                                       log)

            def meanflow_rows(kind=kind, directory=directory, net=_Once(meanflow_net)) -> None:
                for nfe in MEANFLOW_NFES:
                    student(kind, nfe, seed, directory,
                            lambda nfe=nfe: meanflow.meanflow_sample(net(), noise, nfe, labels))

            jobs[kind, None] = meanflow_rows
        # the rows the paper's claims rest on first, so that a run cut short (Fashion-MNIST on a CPU) has them
        for key in sorted(jobs, key=lambda key: IMAGE_ROW_PRIORITY.index(key) if key in IMAGE_ROW_PRIORITY
                          else len(IMAGE_ROW_PRIORITY)):
            if only is None or key in only:
                jobs[key]()

    summary = ordered_summary(store.all())
    results = {"dataset": dataset, "seeds": seeds, "iters": iters, "num_samples": num_samples,
               "teacher_run": str(teacher_run), "feature_net_a": setup.feature_metrics[0],
               "feature_net_b": setup.feature_metrics[1],
               "feature_net_b_architecture": dict(image_benchmark.SECOND_FEATURE_NET), "summary": summary,
               "goals": check_image_goals(summary),
               "seconds_this_invocation": time.perf_counter() - start}
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(format_markdown(summary, IMAGE_COLUMNS) + _goals_text(results["goals"]))
    from piflow.recipes.plots import plot_image_rows

    plot_image_rows(sorted(grid.items(), key=lambda item: grid_order[item[0]]), run_dir / "samples.png", ncol=20,
                    title="same noise and class in each column (classes 0–9, twice); seed 0 of each student")
    plot_quality_vs_diversity(store.all(), run_dir / "quality_vs_diversity.png", "fd_teacher", "class_vendi",
                              "FD to teacher, features A (lower is better)", "within-class Vendi score, features A")
    return results


def _goals_text(goals: dict) -> str:
    return "\nGoals (means over seeds): " + ", ".join(f"{k} = {v}" for k, v in goals.items()) + "\n"


def plot_quality_vs_diversity(rows: list[dict], path: Path, x_key: str, y_key: str, x_label: str,
                              y_label: str) -> None:
    """One panel per student NFE: every seed a small dot, the mean a large marker, per method; the teacher's
    32-step samples (or its reference) as a dashed line of the y metric."""
    from piflow.recipes.plots import pyplot

    plt = pyplot()
    nfes = sorted({r["nfe"] for r in rows if r.get("family") == "student"})
    fig, axes = plt.subplots(1, len(nfes), figsize=(4.2 * len(nfes), 3.6), squeeze=False)
    reference = [r for r in rows if r.get("family") == "teacher" and r["nfe"] == max(TEACHER_EULER_STEPS)]
    # one colour per method in every panel
    colours = {method: f"C{index % 10}" for index, method in enumerate(sorted(
        {r["method"] for r in rows if r.get("family") in ("student", "teacher")}))}
    for ax, nfe in zip(axes[0], nfes):
        methods = sorted({r["method"] for r in rows if r["nfe"] == nfe and r.get("family") in ("student", "teacher")})
        for method in methods:
            members = [r for r in rows if r["method"] == method and r["nfe"] == nfe
                       and math.isfinite(r.get(x_key, math.nan)) and math.isfinite(r.get(y_key, math.nan))]
            if not members:
                continue
            xs, ys = [r[x_key] for r in members], [r[y_key] for r in members]
            color = colours[method]
            ax.scatter(xs, ys, s=12, color=color, alpha=0.5)
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=70, color=color, edgecolor="black",
                       label=method)
        if reference:
            ax.axhline(reference[0][y_key], color="gray", linestyle="--", linewidth=1,
                       label=f"teacher Euler {max(TEACHER_EULER_STEPS)}")
        ax.set_title(f"{nfe} NFE")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- 2-D
def _toy_dmd2(run_dir: Path, teacher, nfe: int, seed: int, steps: int, spec: dict, batch: int, progress: bool,
              log) -> dmd2.DMD2Student:
    from piflow.models import MLPVelocityModel2D

    torch.manual_seed(seed)
    student = dmd2.DMD2Student(MLPVelocityModel2D(hidden_size=spec["hidden_size"], num_layers=spec["num_layers"]),
                               MLPVelocityModel2D(hidden_size=spec["hidden_size"], num_layers=spec["num_layers"]),
                               num_timesteps=toy2d.NUM_TIMESTEPS)
    settings = dmd2.DMD2Settings()

    def loss_fn(iteration: int, generator: torch.Generator, backward) -> Tensor:
        noise = torch.randn(batch, 2, generator=generator)
        return dmd2.training_loss(student, teacher, noise, None, iteration, nfe, settings, generator)

    steps_total = settings.fake_updates_per_generator_update * steps
    return train_baseline(run_dir, student, loss_fn, _train_settings(_resolved_defaults(toy2d.DISTILL_DEFAULTS),
                                                                     steps_total, seed, progress), log)


def _toy_meanflow(run_dir: Path, dataset, seed: int, iters: int, spec: dict, batch: int, progress: bool,
                  log) -> meanflow.AverageVelocityNet:
    from piflow.models import MLPVelocityModel2D

    torch.manual_seed(seed)
    net = meanflow.AverageVelocityNet(MLPVelocityModel2D(hidden_size=spec["hidden_size"],
                                                         num_layers=spec["num_layers"]), toy2d.NUM_TIMESTEPS)

    def loss_fn(iteration: int, generator: torch.Generator, backward) -> Tensor:
        return meanflow.meanflow_loss(net, dataset.sample(batch, generator), None, generator=generator)

    return train_baseline(run_dir, net, loss_fn, _train_settings(_resolved_defaults(toy2d.DISTILL_DEFAULTS), iters,
                                                                 seed, progress), log)


def run_toy(run_dir: Path, dataset_name: str = "ring8", seeds: int = 3, iters: Optional[int] = None,
            num_samples: int = 5000, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """The 2-D claims benchmark on an exact Gaussian-mixture teacher (MLP students, same steps and batch)."""
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = toy2d.load_dataset(dataset_name)
    teacher, _ = toy2d.load_teacher("exact", dataset_name)
    iters = int(iters or toy2d.DISTILL_DEFAULTS["train"]["iters"])
    spec = toy2d.DISTILL_DEFAULTS["student"]
    batch = int(toy2d.DISTILL_DEFAULTS["distill"]["batch_size"])
    gen = torch.Generator().manual_seed(1234)
    reference = dataset.sample(num_samples, gen)
    noise = torch.randn(num_samples, 2, generator=gen)
    ode = toy2d.reference_ode(teacher, noise)
    store = RowStore(run_dir, log)

    def score(samples: Tensor) -> dict:
        return toy2d.sample_metrics(samples, reference, ode, dataset)

    store.get("teacher ODE (RK4)", 256, None, lambda: score(ode), family="teacher")
    for steps in (1, 2, 4, 8):
        store.get("teacher Euler", steps, None, lambda: score(euler_sample(teacher, noise, steps)), family="teacher")
    panels = [("data", reference), ("teacher ODE", ode)]
    students = run_dir / "students"

    def student(kind: str, nfe: int, seed: int, directory: Path, samples_fn: Callable[[], Tensor]) -> None:
        samples = _Once(samples_fn)
        store.get(METHOD_LABELS[kind], nfe, seed, lambda: dict(score(samples()),
                                                               train_seconds=train_seconds(directory)),
                  family="student")
        if seed == 0 and nfe == max(IMAGE_NFES[kind] if kind in IMAGE_NFES else MEANFLOW_NFES):
            panels.append((f"{METHOD_LABELS[kind]}, {nfe} NFE", samples()))

    for seed in range(seeds):
        for nfe in IMAGE_NFES["piid"]:
            directory = students / f"piid_nfe{nfe}_seed{seed}"

            def piid_samples(directory=directory, nfe=nfe) -> Tensor:
                if not (directory / "student.safetensors").is_file():
                    log(f"[claims] distilling {directory.name} ({iters} iterations)")
                    toy2d.distill(load_config(toy2d.DISTILL_DEFAULTS, None, [
                        f"dataset={dataset_name}", "teacher=exact", f"distill.nfe={nfe}", f"train.iters={iters}",
                        f"train.seed={seed}", f"train.progress={str(progress).lower()}"]), directory)
                pf, _ = toy2d.load_student(directory)
                with torch.no_grad():
                    return pf.sample(noise, nfe=nfe)

            student("piid", nfe, seed, directory, piid_samples)
        for nfe in IMAGE_NFES["dmd2"]:
            directory = students / f"dmd2_nfe{nfe}_seed{seed}"

            def dmd2_samples(directory=directory, nfe=nfe) -> Tensor:
                generator_net = _toy_dmd2(directory, teacher, nfe, seed, iters, spec, batch, progress, log)
                return generator_net.sample(noise, nfe, None, torch.Generator().manual_seed(seed))

            student("dmd2", nfe, seed, directory, dmd2_samples)
        directory = students / f"meanflow_scratch_seed{seed}"
        net = _Once(lambda directory=directory: _toy_meanflow(directory, dataset, seed, iters, spec, batch, progress,
                                                              log))
        for nfe in MEANFLOW_NFES:
            student("meanflow_scratch", nfe, seed, directory,
                    lambda nfe=nfe: meanflow.meanflow_sample(net(), noise, nfe))

    summary = ordered_summary(store.all())
    results = {"dataset": dataset_name, "seeds": seeds, "iters": iters, "num_samples": num_samples,
               "summary": summary, "goals": check_toy_goals(summary),
               "seconds_this_invocation": time.perf_counter() - start}
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(format_markdown(summary, TOY_COLUMNS) + _goals_text(results["goals"]))
    from piflow.recipes import plots

    if len(panels) > 2:
        plots.plot_sample_panels([(title, points.numpy()) for title, points in panels], run_dir / "samples.png")
    plot_quality_vs_diversity(store.all(), run_dir / "quality_vs_diversity.png", "energy_distance",
                              "mode_mass_error", "energy distance to the data (lower is better)",
                              "mode-mass error (lower is better)")
    return results
