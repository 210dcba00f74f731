"""benchmarks/teacher_quality.py: the teacher targets of issue 29, scored the way `train-teacher`'s own data check
and the claims benchmark's classifiers score them."""
import json

import pytest
import torch

pytest.importorskip("sklearn")

import teacher_quality  # noqa: E402
from piflow.cli import main  # noqa: E402
from piflow.eval import data_distance_ratio  # noqa: E402
from piflow.eval.features import FeatureClassifier, load_feature_classifier, save_feature_classifier  # noqa: E402
from piflow.recipes import images  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.slow        # trains a tiny teacher and two feature classifiers: seconds
def test_scores_match_the_data_check_and_the_checkpoint_ema_equals_the_teacher(tmp_path):
    run = tmp_path / "teacher"
    assert main(["train-teacher", "--run-dir", str(run), "dataset=digits", "model.type=unet", "model.channels=8",
                 "model.channel_mults=[1,2]", "model.num_res_blocks=1", "model.attention_levels=[1]",
                 "model.num_heads=2", "model.groups=4", "train.iters=6", "flow_matching.batch_size=8",
                 "train.ema_start=2", "eval.data_check_samples=40", "train.progress=false"]) == 0
    torch.manual_seed(0)                    # small untrained classifiers where the benchmark caches its own
    for name in ("feature_net", "feature_net_b"):
        save_feature_classifier(FeatureClassifier(1, 10, feature_dim=16, widths=(8, 16), groups=4),
                                tmp_path / "features" / name, {"val_accuracy": None})
    finished = teacher_quality.score_teacher(run, tmp_path / "features", num_samples=40, grid=tmp_path / "grid.png")
    from_checkpoint = teacher_quality.score_teacher(run, tmp_path / "features", num_samples=40,
                                                    from_checkpoint=True)
    metrics = images.load_teacher(str(run))[1]
    # the same ratio as train-teacher's own data check (metrics.json) on the same 40 samples
    assert finished["data_distance_ratio"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["data_distance_ratio"], rel=1e-5)
    for key in ("label_accuracy_a", "label_accuracy_b", "data_distance_ratio", "isolated_bright_pixels"):
        assert from_checkpoint[key] == pytest.approx(finished[key], rel=1e-5, abs=1e-6)
    assert finished["iteration"] == from_checkpoint["iteration"] == 6 and metrics["dataset"] == "digits"
    # label accuracy by hand with classifier A
    model, config = images.load_teacher(str(run))
    samples, labels = images.data_check_samples(images.make_teacher(model, 10), config, 40, (1, 8, 8), 10)
    net = load_feature_classifier(tmp_path / "features" / "feature_net")[0]
    with torch.no_grad():
        assert finished["label_accuracy_a"] == pytest.approx(float((net(samples).argmax(1) == labels).float().mean()))
    test_x = images.load_dataset(config, "test").tensors()[0][:40]
    train_x = images.load_dataset(config, "train").tensors()[0]
    assert finished["data_distance_ratio"] == pytest.approx(data_distance_ratio(samples, test_x, train_x), rel=1e-6)
    assert finished["targets_met"] is False          # six iterations are far from the data
    assert (tmp_path / "grid.png").stat().st_size > 0
