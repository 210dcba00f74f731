"""What every image measurement shares: the teacher (bundled, given or trained), the two feature classifiers,
the evaluation bank (noise, labels, the teacher's reference samples; cached) and the scorer."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from torch import Tensor, nn

from piflow import bundled
from piflow.bundled import teacher_source
from piflow.config import load_config
from piflow.eval import isolated_bright_pixels
from piflow.eval.diversity import per_class_diversity
from piflow.files import load_safetensors, save_safetensors
from piflow.recipes import image_benchmark, images

# dataset → its bundled teacher (piflow.bundled), the claims benchmark's default teacher for that dataset
BUNDLED_TEACHERS = {name.removesuffix("-bundled"): Path(teacher_source(name)) for name in bundled.BUNDLED_TEACHERS}


class ImageScorer:
    """Scores a sample set (N, C, H, W) generated from the bank's noise and labels in both feature spaces
    (`image_benchmark.metrics_in_both_spaces`), with the within-class diversity in each and the isolated bright
    pixels per image (``speckle``, `piflow.eval.isolated_bright_pixels`)."""

    def __init__(self, contexts: list):
        self.a, self.b = contexts

    def __call__(self, samples: Tensor, labels: Optional[Tensor] = None, paired: bool = True) -> dict:
        samples = samples.float().clamp(-1, 1)
        labels = self.a.labels_a if labels is None else labels
        row = image_benchmark.metrics_in_both_spaces([self.a, self.b], samples, paired)
        row["speckle"] = isolated_bright_pixels(samples)      # stray bright pixels per image (pixel space)
        for suffix, context in (("", self.a), ("_b", self.b)):
            features, logits = context.features_and_logits(samples)
            diversity = per_class_diversity(features, labels)
            row[f"class_distance{suffix}"] = diversity["mean_pairwise_distance"]
            row[f"class_vendi{suffix}"] = diversity["vendi"]
            if not paired:   # real images: the classifier's accuracy on their own labels
                row[f"label_accuracy{suffix}"] = float((logits.argmax(1) == labels).float().mean())
        return row


@dataclasses.dataclass
class ImageSetup:
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
    bank_path = run_dir / "eval_bank.safetensors"
    if bank_path.is_file():
        bank = load_safetensors(bank_path, "evaluation bank")
    else:
        bank = image_benchmark.evaluation_bank(teacher, shape, num_classes, num_samples)
        save_safetensors(bank_path, bank)
    contexts = image_benchmark.contexts_from_bank(nets, bank, real, num_classes)
    return ImageSetup(teacher_run, teacher_model, teacher_cfg, teacher, train_x, train_y, shape, num_classes,
                      (metrics_a, metrics_b), ImageScorer(contexts), real, real_labels)
