"""piflow's own feature network for image metrics (no pretrained Inception weights are available offline).

`FeatureClassifier` is a small CNN classifier for images (N, C, H, W), H, W >= 8 (8x8 digits, 28x28
(Fashion-)MNIST, 32x32, ...): conv stages (3x3 conv, GroupNorm, SiLU; stride 2 between stages) -> global
average pool -> linear + SiLU giving the feature vector (N, feature_dim) -> linear logits (N, num_classes).
Its penultimate features feed FD / KID / precision-recall in `piflow.eval.image_metrics`; metrics computed with
it are "FD in the features of piflow's classifier", comparable only between runs sharing one checkpoint.

- `train_feature_classifier(images, labels, num_classes, ...)`: seeded AdamW training with random shifts.
- `extract_features(model, images)`: batched, no-grad features (and optionally logits).
- `save_feature_classifier(model, directory, metrics)` / `load_feature_classifier(directory)`:
  ``config.json`` + ``model.safetensors`` + ``metrics.json``, each written atomically.

The code lives in `feature_model` (network, `extract_features`), `feature_training` and `feature_files`;
this module re-exports it.
"""
from __future__ import annotations

from piflow.eval.feature_files import (
    CONFIG_NAME,
    FEATURE_CLASSIFIER_FORMAT,
    METRICS_NAME,
    WEIGHTS_NAME,
    load_feature_classifier,
    save_feature_classifier,
)
from piflow.eval.feature_model import MIN_IMAGE_SIZE, FeatureClassifier, extract_features  # noqa: F401
from piflow.eval.feature_training import random_shift, train_feature_classifier  # noqa: F401

__all__ = [
    "FeatureClassifier",
    "train_feature_classifier",
    "extract_features",
    "save_feature_classifier",
    "load_feature_classifier",
    "FEATURE_CLASSIFIER_FORMAT",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "METRICS_NAME",
]
