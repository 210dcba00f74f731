"""Image evaluation: the metrics of `piflow evaluate` for image runs and of the image benchmarks
(`benchmarks/piflow_bench`: the image table and the claims benchmark).

Every method samples from the same noise/labels (seed set A). Metrics in the features of piflow's own classifier
(trained on the dataset's training split — never called FID), feature space A; the ``_b`` columns (FD, recall,
coverage, label accuracy) repeat them in a second classifier of another architecture and seed
(`SECOND_FEATURE_NET`), so that a conclusion can be checked in two independent feature spaces:
* ``fd_real``: Fréchet distance to the real test images; ``fd_teacher``: to the teacher's 32-step Euler samples from
  an independent seed set B (so the teacher's own 32-step row is the *noise floor*);
* ``kid``: kernel distance to real test images (×1000); ``precision``/``recall``/``density``/``coverage`` (k = 5) vs
  the real test images; ``label_accuracy``: fraction the classifier assigns to the conditioning class;
  ``class_tv``: total variation of the predicted class histogram to the uniform label histogram;
* ``coupling_rmse``: per-pixel RMSE to the teacher's 32-step sample from the same noise;
* ``hf_ratio``: pixel space, the share of spectral power above half the Nyquist frequency relative to the teacher's
  32-step samples (speckle and grain that small feature networks miss show as > 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from piflow.eval.image_metrics import (class_histogram, class_histogram_tv, frechet_distance_from_features,
                                       high_frequency_fraction, kernel_inception_distance,
                                       precision_recall_density_coverage)
from piflow.progress import progress_bar
from piflow.recipes import images
from piflow.sampling import euler_sample

TEACHER_REFERENCE_STEPS = 32


@dataclass
class EvalContext:
    feature_net: torch.nn.Module
    real_features: Tensor
    teacher_features_b: Tensor
    teacher_samples_a: Tensor
    noise_a: Tensor
    labels_a: Tensor
    num_classes: int
    _hf_teacher: Optional[float] = field(default=None, init=False, repr=False)

    @torch.no_grad()
    def features_and_logits(self, samples: Tensor, batch: int = 1000) -> tuple[Tensor, Tensor]:
        feats, logits = [], []
        for start in range(0, len(samples), batch):
            chunk = samples[start: start + batch].float().clamp(-1, 1)
            feats.append(self.feature_net.features(chunk))
            logits.append(self.feature_net(chunk))
        return torch.cat(feats), torch.cat(logits)

    def hf_ratio(self, samples: Tensor) -> float:
        """`high_frequency_fraction` of `samples` over that of the teacher's 32-step samples (1 = the teacher's
        level of fine detail; speckle and grain show as > 1)."""
        if self._hf_teacher is None:
            self._hf_teacher = high_frequency_fraction(self.teacher_samples_a.float().clamp(-1, 1))
        return high_frequency_fraction(samples.float().clamp(-1, 1)) / self._hf_teacher

    def metrics(self, samples: Tensor, paired: bool = True) -> dict[str, float]:
        """All metrics of `samples`; with ``paired=False`` (e.g. real images) the label and coupling metrics,
        which need samples generated from (noise_a, labels_a), are NaN."""
        feats, logits = self.features_and_logits(samples)
        hf_ratio = self.hf_ratio(samples)
        prdc = precision_recall_density_coverage(self.real_features, feats, k=5)
        predicted = logits.argmax(1)
        kid = kernel_inception_distance(feats, self.real_features, num_subsets=20, subset_size=500)
        nan = float("nan")
        if not paired:
            return {"fd_real": frechet_distance_from_features(feats, self.real_features),
                    "fd_teacher": frechet_distance_from_features(feats, self.teacher_features_b),
                    "kid_x1000": 1000 * kid["mean"], "kid_std_x1000": 1000 * kid["std"],
                    **{key: float(value) for key, value in prdc.items()},
                    "label_accuracy": nan, "class_tv": nan, "coupling_rmse": nan, "hf_ratio": hf_ratio}
        return {
            "fd_real": frechet_distance_from_features(feats, self.real_features),
            "fd_teacher": frechet_distance_from_features(feats, self.teacher_features_b),
            "kid_x1000": 1000 * kid["mean"], "kid_std_x1000": 1000 * kid["std"],
            **{key: float(value) for key, value in prdc.items()},
            "label_accuracy": float((predicted == self.labels_a).float().mean()),
            "class_tv": class_histogram_tv(class_histogram(predicted, self.num_classes),
                                           class_histogram(self.labels_a, self.num_classes)),
            "coupling_rmse": float((samples.float() - self.teacher_samples_a).square().mean().sqrt()),
            "hf_ratio": hf_ratio,
        }


# the metrics of the second feature space that go into a row, as <key>_b
SECOND_SPACE_KEYS = ("fd_teacher", "fd_real", "recall", "coverage", "label_accuracy")


def metrics_in_both_spaces(contexts: list[EvalContext], samples: Tensor, paired: bool = True) -> dict[str, float]:
    """`EvalContext.metrics` in the first feature space, plus the `SECOND_SPACE_KEYS` of the second one
    (``fd_teacher_b`` …), so that no conclusion rests on one feature network."""
    row = contexts[0].metrics(samples, paired)
    for suffix, context in zip(("_b",), contexts[1:]):
        other = context.metrics(samples, paired)
        row.update({f"{key}{suffix}": other[key] for key in SECOND_SPACE_KEYS})
    return row


def balanced_labels(num: int, num_classes: int) -> Tensor:
    return torch.arange(num) % num_classes


def build_context(teacher: Callable, feature_net: torch.nn.Module, real_test: Tensor, image_shape, num_classes: int,
                  num_samples: int, seed: int = 1234) -> EvalContext:
    return build_contexts(teacher, [feature_net], real_test, image_shape, num_classes, num_samples, seed)[0]


def build_contexts(teacher: Callable, feature_nets: list, real_test: Tensor, image_shape, num_classes: int,
                   num_samples: int, seed: int = 1234) -> list[EvalContext]:
    """One `EvalContext` per feature network, all on the same noise sets A, B and teacher reference samples (the
    teacher's 32-step Euler samples are computed once)."""
    return contexts_from_bank(feature_nets, evaluation_bank(teacher, image_shape, num_classes, num_samples, seed),
                              real_test, num_classes)


def evaluation_bank(teacher: Callable, image_shape, num_classes: int, num_samples: int,
                    seed: int = 1234) -> dict[str, Tensor]:
    """Noise sets A and B, balanced labels and the teacher's 32-step Euler samples from each."""
    gen = torch.Generator().manual_seed(seed)
    noise_a = torch.randn(num_samples, *image_shape, generator=gen)
    noise_b = torch.randn(num_samples, *image_shape, generator=gen)
    labels = balanced_labels(num_samples, num_classes)
    return {"noise_a": noise_a, "labels_a": labels,
            "teacher_a": euler_sample(teacher, noise_a, TEACHER_REFERENCE_STEPS, labels),
            "teacher_b": euler_sample(teacher, noise_b, TEACHER_REFERENCE_STEPS, labels)}


def contexts_from_bank(feature_nets: list, bank: dict[str, Tensor], real_test: Tensor,
                       num_classes: int) -> list[EvalContext]:
    """One `EvalContext` per feature network on an `evaluation_bank`."""
    contexts = []
    for feature_net in feature_nets:
        context = EvalContext(feature_net.eval(), torch.empty(0), torch.empty(0), bank["teacher_a"],
                              bank["noise_a"], bank["labels_a"], num_classes)
        context.real_features = context.features_and_logits(real_test)[0]
        context.teacher_features_b = context.features_and_logits(bank["teacher_b"])[0]
        contexts.append(context)
    return contexts


COLUMNS = [("nfe", "NFE", "{}"), ("fd_teacher", "FD-teacher A ↓", "{:.3f}"),
           ("fd_teacher_b", "FD-teacher B ↓", "{:.3f}"), ("fd_real", "FD-real A ↓", "{:.3f}"),
           ("fd_real_b", "FD-real B ↓", "{:.3f}"), ("kid_x1000", "KID×1e3 ↓", "{:.1f}"),
           ("precision", "prec.", "{:.3f}"), ("recall", "recall", "{:.3f}"), ("density", "dens.", "{:.3f}"),
           ("coverage", "cov.", "{:.3f}"), ("label_accuracy", "label acc.", "{:.3f}"),
           ("coupling_rmse", "coupling RMSE ↓", "{:.4f}"), ("hf_ratio", "HF power / teacher", "{:.3f}")]


def format_markdown(results: dict) -> str:
    lines = ["| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    goals = results.get("goals", {})
    if goals:
        lines += ["", "Goals: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                              for k, v in goals.items())]
    return "\n".join(lines) + "\n"


# the second, independent feature space of `benchmarks/claims.py`: another architecture (two narrower conv stages,
# a 64-wide feature layer) trained from another seed
SECOND_FEATURE_NET = {"widths": (24, 48), "feature_dim": 64, "seed": 1}


def feature_classifier_for(run_dir: Path, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                           num_classes: int, epochs: int = 30, train_size: Optional[int] = None,
                           log: Callable[[str], None] = lambda message: None, name: str = "feature_net",
                           seed: int = 0, **architecture):
    """Load the classifier cached in ``run_dir/<name>`` or train (and cache) it on the training split (or a
    seeded subset of `train_size` images); `architecture` goes to `train_feature_classifier` (widths,
    feature_dim)."""
    from piflow.eval.features import load_feature_classifier, save_feature_classifier, train_feature_classifier

    feature_dir = run_dir / name
    if (feature_dir / "config.json").is_file():
        return load_feature_classifier(feature_dir)
    log(f"[bench] training the feature classifier {name}")
    count = len(train_x) if train_size is None else min(train_size, len(train_x))
    subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:count]
    net, metrics = train_feature_classifier(train_x[subset], train_y[subset], num_classes, epochs=epochs,
                                            batch_size=128, lr=2e-3, seed=seed, val_images=test_x, val_labels=test_y,
                                            **architecture)
    save_feature_classifier(net, feature_dir, metrics)
    return net, metrics


FEATURE_NET_NAMES = ("feature_net", "feature_net_b")     # the two classifiers' directories in a run directory


def feature_classifiers_for(run_dir: Path, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                            num_classes: int, epochs: int = 30, train_size: Optional[int] = None,
                            log: Callable[[str], None] = lambda message: None) -> tuple[list, list[dict]]:
    """The two independently trained feature classifiers (A: ``feature_net``, B: ``feature_net_b`` with
    `SECOND_FEATURE_NET`), cached in `run_dir`: ([net_a, net_b], [metrics_a, metrics_b])."""
    nets, metrics = [], []
    for name, architecture in zip(FEATURE_NET_NAMES, ({}, SECOND_FEATURE_NET)):
        net, net_metrics = feature_classifier_for(run_dir, train_x, train_y, test_x, test_y, num_classes, epochs,
                                                  train_size, log, name=name, **architecture)
        nets.append(net)
        metrics.append(net_metrics)
    return nets, metrics


def evaluate_student_run(run_dir: Path, overrides=()) -> dict:
    """`piflow evaluate` for an image run: the student at its NFE (+ eval.student_nfe) and the teacher's Euler
    sampler at eval.teacher_steps, all from the same noise, with the metrics of this module."""
    from piflow.methods import student_name

    pf, config = images.load_student(run_dir, overrides)
    train_x, train_y = images.load_dataset(config, "train").tensors()
    test_x, test_y = images.load_dataset(config, "test").tensors()
    num_classes = images.sample_spec(config)[1]
    feature_nets, feature_metrics = feature_classifiers_for(run_dir, train_x, train_y, test_x, test_y, num_classes)
    eval_cfg = config["eval"]
    contexts = build_contexts(pf.teacher, feature_nets, test_x, train_x.shape[1:], num_classes,
                              int(eval_cfg["num_samples"]), int(eval_cfg["seed"]))
    noise, labels = contexts[0].noise_a, contexts[0].labels_a
    rows = {}
    teacher_steps = sorted({*map(int, eval_cfg["teacher_steps"]), TEACHER_REFERENCE_STEPS})
    student_nfes = sorted({pf.nfe, *map(int, eval_cfg["student_nfe"])})
    bar = progress_bar(len(teacher_steps) + len(student_nfes), "evaluating")       # one tick per row
    for steps in teacher_steps:
        rows[f"teacher Euler {steps}"] = dict(
            metrics_in_both_spaces(contexts, euler_sample(pf.teacher, noise, steps, labels)), nfe=steps,
            family="teacher Euler")
        bar.update(1)
    for nfe in student_nfes:
        samples = pf.sample(noise, nfe=nfe, cond=labels, temperature=eval_cfg["temperature"],
                            generator=torch.Generator().manual_seed(int(eval_cfg["seed"])))
        rows[f"student {student_name(config)} {nfe}" + ("" if nfe == pf.nfe else " (elastic)")] = dict(
            metrics_in_both_spaces(contexts, samples), nfe=nfe, family="student")
        bar.update(1)
    bar.close()
    return {"rows": rows, "feature_net": feature_metrics[0], "feature_net_b": feature_metrics[1]}
