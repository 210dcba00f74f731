"""How close an image teacher is to its data: the targets of a teacher worth distilling.

    python benchmarks/teacher_quality.py --teacher-run runs/teacher_mnist --feature-dir runs/claims_mnist
    python benchmarks/teacher_quality.py --teacher-run runs/t --checkpoint   # the EMA of a run still training

Draws `--num-samples` (2,000) samples with 32 Euler steps, classes in turn, from the noise of the teacher's own data
check (`piflow train-teacher`'s ``eval.seed`` + 1) and reports, against the real test images:

* label accuracy of the samples under the claims benchmark's two feature classifiers (A and B, trained on the
  training split and cached in ``--feature-dir``, so a claims run there reuses them), and its ratio to the real
  test images' accuracy (target ≥ 0.95 in both);
* ``data_distance_ratio``: median nearest-neighbour pixel distance of the samples to the training set over that of
  held-out test images (target ≤ 1.1);
* pixel-space fine detail: high-frequency power share and isolated bright pixels per image, each for the samples
  and the real images.

`--checkpoint` scores the EMA weights in the run's checkpoint.safetensors (a run that has not finished) instead of
its teacher/ folder. Prints one JSON object and writes it to `--out` when given.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from piflow.config import load_config
from piflow.eval import data_distance_ratio, high_frequency_fraction, isolated_bright_pixels
from piflow.files import write_json
from piflow.recipes import image_benchmark, images
from piflow.train.checkpoint import load_checkpoint

TARGET_ACCURACY_RATIO = 0.95
TARGET_DATA_DISTANCE_RATIO = 1.1


def load_scored_teacher(run: Path, config: dict, from_checkpoint: bool, image_shape: tuple[int, ...],
                        num_classes: int) -> tuple[torch.nn.Module, int]:
    """(network, iteration) of a teacher run with its `config`: its teacher/ folder, or the EMA of its checkpoint."""
    if not from_checkpoint:
        return images.load_teacher(str(run))[0], int(config["train"]["iters"])
    state = load_checkpoint(run / "checkpoint.safetensors")
    model = images.build_teacher_model(config, image_shape, num_classes)
    model.load_state_dict(state["ema"]["model"])
    return model, int(state["step"])


def score_teacher(run: Path, feature_dir: Path, num_samples: int = 2000, feature_epochs: int = 5,
                  from_checkpoint: bool = False, grid: Optional[Path] = None, log=print) -> dict:
    """The JSON of this benchmark for one teacher run (`grid`: also a PNG of 10 samples per class there)."""
    start = time.perf_counter()
    config = load_config(images.IMAGE_TEACHER_DEFAULTS, run / "config.yaml")
    train_set, test_set = images.load_dataset(config, "train"), images.load_dataset(config, "test")
    train_x, train_y = train_set.tensors()
    test_x, test_y = test_set.tensors()
    num_classes = train_set.num_classes
    model, iteration = load_scored_teacher(run, config, from_checkpoint, tuple(train_x.shape[1:]), num_classes)
    nets, net_metrics = image_benchmark.feature_classifiers_for(feature_dir, train_x, train_y, test_x, test_y,
                                                                num_classes, feature_epochs, log=log)
    teacher = images.make_teacher(model, num_classes, config["eval"]["guidance_scale"],
                                  conversion=images.teacher_conversion(config))
    samples, labels = images.data_check_samples(teacher, config, num_samples, tuple(train_x.shape[1:]), num_classes)
    real, real_labels = test_x[:num_samples], test_y[:num_samples]
    result = {"teacher_run": str(run), "dataset": config["dataset"], "iteration": iteration,
              "num_samples": num_samples, "euler_steps": 32, "guidance_scale": config["eval"]["guidance_scale"],
              "parameters": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        for suffix, net in zip(("a", "b"), nets):
            sample_acc = float((net(samples).argmax(1) == labels).float().mean())
            real_acc = float((net(real).argmax(1) == real_labels).float().mean())
            result[f"label_accuracy_{suffix}"] = sample_acc
            result[f"real_label_accuracy_{suffix}"] = real_acc
            result[f"accuracy_ratio_{suffix}"] = sample_acc / real_acc
    result["data_distance_ratio"] = data_distance_ratio(samples, real, train_x)
    result["hf_fraction"] = high_frequency_fraction(samples)
    result["real_hf_fraction"] = high_frequency_fraction(real)
    result["isolated_bright_pixels"] = isolated_bright_pixels(samples)
    result["real_isolated_bright_pixels"] = isolated_bright_pixels(real)
    result["targets_met"] = bool(min(result["accuracy_ratio_a"], result["accuracy_ratio_b"]) >= TARGET_ACCURACY_RATIO
                                 and result["data_distance_ratio"] <= TARGET_DATA_DISTANCE_RATIO)
    if grid is not None:     # 10 samples per class, one labelled row per class, above one real image per class
        from piflow.recipes.plots import plot_image_rows

        names = getattr(test_set, "class_names", None) or [str(c) for c in range(num_classes)]
        rows = [(f"teacher, class {c} ({names[c]})", samples[labels == c][:10]) for c in range(num_classes)]
        rows.append(("real test images, classes 0, 1, 2, …", torch.cat([real[real_labels == c][:1]
                                                                        for c in range(num_classes)])))
        plot_image_rows(rows, Path(grid), ncol=10, title=f"{config['dataset']} teacher, iteration {iteration}: "
                                                          f"32 Euler steps, the first samples of each class")
    result["feature_nets"] = {"a": net_metrics[0], "b": net_metrics[1]}
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-run", required=True, help="a `piflow train-teacher` run directory (image data)")
    parser.add_argument("--feature-dir", default=None,
                        help="where the two feature classifiers are cached (default: runs/claims_<dataset>)")
    parser.add_argument("--feature-epochs", type=int, default=5, help="epochs of a feature classifier trained here")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--checkpoint", action="store_true", help="score the EMA of checkpoint.safetensors")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--grid", default=None, help="also draw 10 samples per class into this PNG")
    args = parser.parse_args()
    if args.num_samples < 10:
        parser.error(f"--num-samples must be >= 10, got {args.num_samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.teacher_run)
    dataset = load_config(images.IMAGE_TEACHER_DEFAULTS, run / "config.yaml")["dataset"]
    feature_dir = Path(args.feature_dir or f"runs/claims_{dataset}")
    result = score_teacher(run, feature_dir, args.num_samples, args.feature_epochs, args.checkpoint, args.grid)
    assert all(math.isfinite(v) for v in result.values() if isinstance(v, float))
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
