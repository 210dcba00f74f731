"""Tests for piflow's feature classifier: shapes, training on sklearn digits, determinism, save/load."""
from __future__ import annotations

import json
import time

import pytest
import torch

from piflow.eval.features import (
    CONFIG_NAME,
    METRICS_NAME,
    WEIGHTS_NAME,
    FeatureClassifier,
    random_shift,
    extract_features,
    load_feature_classifier,
    save_feature_classifier,
    train_feature_classifier,
)

# Many small tensor ops: one intra-op thread avoids synchronisation overhead on a busy machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """sklearn digits (1797, 1, 8, 8) scaled 0..16 -> [-1, 1], split 1400 train / 397 validation."""
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return {"x": images[train], "y": labels[train], "val_x": images[val], "val_y": labels[val]}


@pytest.fixture(scope="module")
def trained(digits):
    """(model, metrics, seconds) of one 10-epoch training run on digits."""
    start = time.perf_counter()
    model, metrics = train_feature_classifier(digits["x"], digits["y"], 10, epochs=10, batch_size=128, lr=3e-3,
                                              seed=0, val_images=digits["val_x"], val_labels=digits["val_y"])
    return model, metrics, time.perf_counter() - start


def _small_data(n: int = 64, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stem_stride", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 9, 13)])
def test_shapes_for_various_image_sizes(shape, stem_stride):
    model = FeatureClassifier(in_channels=shape[0], num_classes=7, feature_dim=16, widths=(8, 16),
                              stem_stride=stem_stride)
    x = torch.randn(3, *shape)
    assert model.features(x).shape == (3, 16)
    assert model(x).shape == (3, 7)


def test_default_feature_dim_is_128():
    model = FeatureClassifier()
    assert model.features(torch.zeros(2, 1, 8, 8)).shape == (2, 128)
    assert model.config() == {"in_channels": 1, "num_classes": 10, "feature_dim": 128, "widths": [32, 64, 128],
                              "groups": 8, "stem_stride": 1}


def test_forward_is_head_of_features():
    model = FeatureClassifier(num_classes=4, feature_dim=12, widths=(8,)).eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), model.head(model.features(x)))


@pytest.mark.parametrize("x, match", [
    (torch.zeros(2, 3, 8, 8), "channel"),
    (torch.zeros(2, 1, 7, 8), "at least 8x8"),
    (torch.zeros(1, 8, 8), r"\(N, C, H, W\)"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.int64), "floating-point"),
])
def test_features_rejects_bad_images(x, match):
    model = FeatureClassifier(feature_dim=8, widths=(8,))
    with pytest.raises(ValueError, match=match):
        model.features(x)


@pytest.mark.parametrize("kwargs, name", [
    ({"in_channels": 0}, "in_channels"),
    ({"num_classes": 1}, "num_classes"),
    ({"feature_dim": -3}, "feature_dim"),
    ({"widths": ()}, "widths"),
    ({"widths": (8, 0)}, "widths"),
    ({"groups": 1.5}, "groups"),
    ({"stem_stride": 3}, "stem_stride"),
    ({"stem_stride": True}, "stem_stride"),
])
def test_constructor_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FeatureClassifier(**kwargs)


def test_random_shift_is_a_per_image_translation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 8, 8)
    assert torch.equal(random_shift(x, 0, g), x)
    shifted = random_shift(x, 1, g)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for i in range(x.shape[0]):
        candidates = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(shifted[i], c) for c in candidates)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def test_digits_validation_accuracy_above_90_percent(trained):
    model, metrics, seconds = trained
    assert metrics["val_accuracy"] > 0.9
    assert metrics["train_accuracy"] > 0.9
    assert metrics["num_train"] == 1400 and metrics["num_val"] == 397 and metrics["epochs"] == 10
    assert seconds < 20.0
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_training_is_deterministic_given_seed():
    x, y = _small_data(48)
    kwargs = dict(epochs=2, batch_size=16, lr=1e-3, feature_dim=8, widths=(8,))
    a, metrics_a = train_feature_classifier(x, y, 3, seed=3, **kwargs)
    b, metrics_b = train_feature_classifier(x, y, 3, seed=3, **kwargs)
    c, _ = train_feature_classifier(x, y, 3, seed=4, **kwargs)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert metrics_a == metrics_b and metrics_a["val_accuracy"] is None
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


def test_training_picks_stem_stride_from_image_size(tmp_path):
    x, y = _small_data(8, size=16)
    model, metrics = train_feature_classifier(x, y, 3, epochs=1, feature_dim=8, widths=(8,))
    assert model.stem_stride == 2
    save_feature_classifier(model, tmp_path, metrics)
    loaded, _ = load_feature_classifier(tmp_path)
    assert loaded.stem_stride == 2 and torch.equal(loaded(x), model(x))
    small, _ = train_feature_classifier(*_small_data(8), 3, epochs=1, feature_dim=8, widths=(8,))
    assert small.stem_stride == 1


def test_training_leaves_global_rng_alone():
    x, y = _small_data(16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_feature_classifier(x, y, 3, epochs=1, batch_size=8, feature_dim=8, widths=(8,))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("override, match", [
    ({"images": torch.full((8, 1, 8, 8), 2.0)}, r"\[-1, 1\]"),
    ({"images": torch.zeros(8, 1, 4, 4)}, "images"),
    ({"labels": torch.zeros(7, dtype=torch.int64)}, "labels"),
    ({"labels": torch.full((8,), 3)}, "labels"),
    ({"labels": torch.zeros(8)}, "labels"),
    ({"num_classes": 0}, "num_classes"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": -1.0}, "lr"),
    ({"seed": "x"}, "seed"),
    ({"val_images": torch.zeros(4, 1, 8, 8)}, "val_labels"),
    ({"val_images": torch.zeros(4, 2, 8, 8), "val_labels": torch.zeros(4, dtype=torch.int64)}, "val_images"),
    ({"val_images": torch.zeros(4, 1, 8, 8), "val_labels": torch.zeros(3, dtype=torch.int64)}, "val_labels"),
])
def test_training_rejects_bad_inputs(override, match):
    x, y = _small_data(8)
    kwargs = {"images": x, "labels": y, "num_classes": 3, "epochs": 1}
    kwargs.update(override)
    with pytest.raises(ValueError, match=match):
        train_feature_classifier(**kwargs)


def test_extract_features_matches_model(trained, digits):
    model = trained[0]
    x = digits["val_x"][:70]
    features, logits = extract_features(model, x, batch_size=32, return_logits=True)
    assert features.shape == (70, 128) and logits.shape == (70, 10)
    torch.testing.assert_close(features, model.features(x))
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(extract_features(model, x, batch_size=1000), features)
    with pytest.raises(ValueError, match="model"):
        extract_features(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, x, batch_size=0)


# ----------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------

def test_save_load_round_trip_is_bit_exact(trained, digits, tmp_path):
    model, metrics, _ = trained
    save_feature_classifier(model, tmp_path / "clf", metrics)
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME])
    loaded, loaded_metrics = load_feature_classifier(tmp_path / "clf")
    assert loaded_metrics == json.loads(json.dumps(metrics))
    assert loaded_metrics["val_accuracy"] == metrics["val_accuracy"]
    assert loaded.config() == model.config() and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = digits["val_x"][:50]
    assert torch.equal(loaded.features(x), model.features(x))
    assert torch.equal(loaded(x), model(x))


def test_save_overwrites_atomically(tmp_path):
    model = FeatureClassifier(feature_dim=8, widths=(8,))
    save_feature_classifier(model, tmp_path, {"val_accuracy": 0.5})
    save_feature_classifier(model, tmp_path, {"val_accuracy": 0.75})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME])
    assert load_feature_classifier(tmp_path)[1] == {"val_accuracy": 0.75}


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME])
def test_load_reports_missing_files(tmp_path, missing):
    save_feature_classifier(FeatureClassifier(feature_dim=8, widths=(8,)), tmp_path, {"val_accuracy": 0.5})
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_feature_classifier(tmp_path)


def test_load_reports_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_feature_classifier(tmp_path / "nope")


def test_load_reports_mismatched_files(tmp_path):
    save_feature_classifier(FeatureClassifier(feature_dim=8, widths=(8,)), tmp_path, {"val_accuracy": 0.5})
    config = json.loads((tmp_path / CONFIG_NAME).read_text())

    config_bad = dict(config, feature_dim=16)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config_bad))
    with pytest.raises(ValueError, match="does not match"):
        load_feature_classifier(tmp_path)

    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(config, format="something-else")))
    with pytest.raises(ValueError, match="not a piflow feature classifier"):
        load_feature_classifier(tmp_path)

    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(config, widths=[])))
    with pytest.raises(ValueError, match="invalid model settings"):
        load_feature_classifier(tmp_path)

    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_feature_classifier(tmp_path)

    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_feature_classifier(tmp_path)


def test_save_rejects_bad_arguments(tmp_path):
    model = FeatureClassifier(feature_dim=8, widths=(8,))
    with pytest.raises(ValueError, match="model"):
        save_feature_classifier(torch.nn.Linear(2, 2), tmp_path, {})
    with pytest.raises(ValueError, match="metrics"):
        save_feature_classifier(model, tmp_path, [0.9])
    with pytest.raises(ValueError, match="metrics"):
        save_feature_classifier(model, tmp_path, {"val_accuracy": object()})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="directory"):
        save_feature_classifier(model, tmp_path / "file", {})
