"""Image recipe end to end on scikit-learn digits with a tiny DiT: teacher → GM / DX / data-free students."""
import json

import pytest
import torch

pytest.importorskip("sklearn")

from piflow.cli import main  # noqa: E402
from piflow.recipes import images  # noqa: E402
from tiny_runs import TINY_DIT_RUN  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--run-dir", str(run), "dataset=digits", "train.iters=20",
                 "flow_matching.batch_size=32", *TINY_DIT_RUN]) == 0
    return run


def test_teacher_run_writes_model_and_samples(teacher_run):
    assert (teacher_run / "teacher" / "model.safetensors").is_file()
    assert (teacher_run / "samples.png").is_file() and (teacher_run / "loss.png").is_file()
    model, config = images.load_teacher(str(teacher_run))
    assert config["dataset"] == "digits" and model.config.num_classes == 10


@pytest.mark.parametrize("extra", [
    ["student.policy=gmflow", "student.num_components=4"],
    ["student.policy=dx", "student.num_nodes=4", "distill.window_substeps=3"],
    ["distill.data_free=true", "distill.nfe=2", "guidance.scale=2.0", "guidance.interval=[0.0,0.6]"],
])
def test_distill_variants(tmp_path, teacher_run, extra):
    run = tmp_path / "student"
    args = ["distill", "--run-dir", str(run), "dataset=digits", f"teacher={teacher_run}", "train.iters=2",
            "distill.batch_size=4", "distill.total_substeps=16", "train.progress=false", "train.checkpoint_every=0",
            *extra]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    pf, _ = images.load_student(run)
    x = pf.sample(torch.randn(3, 1, 8, 8), nfe=3, cond=torch.tensor([0, 1, 2]))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    if "student.policy=gmflow" in extra:      # the CLI's sample and evaluate on image runs
        assert main(["sample", "--run-dir", str(run), "--nfe", "2", "--num-samples", "12", "--label", "7"]) == 0
        assert (run / "samples_nfe2.npy").is_file() and (run / "samples_nfe2.png").is_file()
        # a tiny (untrained) feature network where `evaluate` caches its own: metrics are plumbing here, and
        # training the real one takes most of a minute (tests/eval checks the trained network)
        from piflow.eval.features import FeatureClassifier, save_feature_classifier
        torch.manual_seed(0)
        save_feature_classifier(FeatureClassifier(1, 10, feature_dim=16, widths=(8, 16), groups=4),
                                run / "feature_net", {"val_accuracy": None})
        assert main(["evaluate", "--run-dir", str(run), "eval.num_samples=40", "eval.teacher_steps=[1]",
                     "eval.student_nfe=[1]"]) == 0
        evaluation = json.loads((run / "metrics.json").read_text())
        assert {"teacher Euler 1", "teacher Euler 32", "student gmflow 4", "student gmflow 1 (elastic)"} <= set(
            evaluation["rows"])


def test_image_config_errors(tmp_path, teacher_run, capsys):
    assert main(["distill", "--run-dir", str(tmp_path / "a"), "dataset=digits", "teacher=/nowhere"]) == 2
    assert "teacher" in capsys.readouterr().err
    assert main(["train-teacher", "--run-dir", str(tmp_path / "b"), "dataset=digits",
                 "flow_matching.class_dropout=1.5"]) == 2
    assert "class_dropout" in capsys.readouterr().err


def test_bad_image_inputs_give_clear_errors(tmp_path, capsys):
    # 7×7 images cannot be cut into 2×2 patches
    assert main(["train-teacher", "--run-dir", str(tmp_path / "a"), "dataset=digits", "data.image_size=7",
                 *TINY_DIT_RUN]) == 2
    assert "divisible by patch_size" in capsys.readouterr().err
    assert main(["train-teacher", "--run-dir", str(tmp_path / "b"), "dataset=image-folder",
                 f"data.root={tmp_path / 'nothing'}", "data.image_size=8", *TINY_DIT_RUN]) == 2
    assert "nothing" in capsys.readouterr().err            # the missing folder is named
    assert main(["train-teacher", "--run-dir", str(tmp_path / "b"), "dataset=image-folder", *TINY_DIT_RUN]) == 2
    assert "data.root" in capsys.readouterr().err
    assert main(["train-teacher", "--run-dir", str(tmp_path / "b"), "dataset=mnist", f"data.root={tmp_path}",
                 *TINY_DIT_RUN]) == 2
    assert "MNIST" in capsys.readouterr().err
    assert main(["train-teacher", "--run-dir", str(tmp_path / "c"), "dataset=digits", "model.preset=DiT-Q",
                 *TINY_DIT_RUN]) == 2
    assert "DiT-Q" in capsys.readouterr().err


def test_image_folder_and_latents_train(tmp_path):
    import numpy as np
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(4):
            pixels = (np.random.default_rng(i).random((10, 12, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "folder" / label / f"{i}.png")
    assert main(["train-teacher", "--run-dir", str(tmp_path / "t_folder"), "dataset=image-folder",
                 f"data.root={tmp_path / 'folder'}", "data.image_size=8", "train.iters=3",
                 "flow_matching.batch_size=4", *TINY_DIT_RUN]) == 0
    model, _ = images.load_teacher(str(tmp_path / "t_folder"))
    assert model.config.in_channels == 3 and model.config.num_classes == 2

    latents = np.random.default_rng(0).standard_normal((12, 4, 8, 8)).astype("float32")
    np.save(tmp_path / "lat.npy", latents)
    np.save(tmp_path / "lat_labels.npy", np.arange(12) % 3)
    common = ["dataset=latents", f"data.root={tmp_path / 'lat.npy'}"]
    assert main(["train-teacher", "--run-dir", str(tmp_path / "t_lat"), *common, "train.iters=3",
                 "flow_matching.batch_size=4", *TINY_DIT_RUN]) == 0
    assert main(["distill", "--run-dir", str(tmp_path / "s_lat"), *common, f"teacher={tmp_path / 't_lat'}",
                 "train.iters=2", "distill.batch_size=2", "distill.total_substeps=16", "train.progress=false",
                 "train.checkpoint_every=0"]) == 0
    pf, _ = images.load_student(tmp_path / "s_lat")
    assert pf.sample(torch.randn(2, 4, 8, 8), nfe=2, cond=torch.tensor([0, 2])).shape == (2, 4, 8, 8)


def test_x0_baseline_bank_is_cached_per_teacher(tmp_path, teacher_run, monkeypatch):
    """The x0-regression baseline's teacher trajectories are computed once per teacher and settings: a second run
    reads them from the cache (it never calls the teacher sampler) and trains identically, and so does a student
    whose grid is a subset of the first one's."""
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path / "cache"))
    from piflow.methods import x0

    args = ["dataset=digits", f"teacher={teacher_run}", "method=x0", "distill.nfe=4", "train.iters=3",
            "distill.batch_size=4", "distill.x0_bank_size=16", "distill.total_substeps=16", "train.progress=false",
            "train.checkpoint_every=0"]
    assert main(["distill", "--run-dir", str(tmp_path / "a"), *args]) == 0
    cached = list((tmp_path / "cache" / "x0_bank").glob("*.safetensors"))
    assert len(cached) == 1

    def no_trajectories(*args, **kwargs):
        raise AssertionError("the bank should come from the cache")

    monkeypatch.setattr(x0, "euler_trajectory", no_trajectories)
    assert main(["distill", "--run-dir", str(tmp_path / "b"), *args]) == 0
    first = [json.loads(line)["loss"] for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    second = [json.loads(line)["loss"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert first == second
    # a student of fewer steps on the same trajectories (its grid a subset) reads the same entry
    one = main(["distill", "--run-dir", str(tmp_path / "b1"), *args, "distill.nfe=1"])
    assert one == 0 and len(list((tmp_path / "cache" / "x0_bank").glob("*.safetensors"))) == 1
    # other settings (bank size) make another cache entry
    monkeypatch.undo()
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["distill", "--run-dir", str(tmp_path / "c"), *args, "distill.x0_bank_size=8"]) == 0
    assert len(list((tmp_path / "cache" / "x0_bank").glob("*.safetensors"))) == 2


def _sigma_like(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return sigma.reshape(-1, *[1] * (x.dim() - 1)) if sigma.dim() else sigma


def test_teacher_data_check_warns_only_for_samples_far_from_the_data(capsys):
    """A teacher whose ODE ends exactly on held-out test images measures ratio 1 and stays quiet; one that leaves
    the noise unchanged (zero velocity) measures far above eval.data_distance_warn and warns."""
    from piflow.config import load_config

    config = load_config(images.IMAGE_TEACHER_DEFAULTS, None, ["dataset=digits", "eval.data_check_samples=64"])
    train_data = images.load_dataset(config, "train")
    target = images.load_dataset(config, "test").tensors()[0][:64]

    def onto_test_images(x, sigma, cond):
        return (x - target) / _sigma_like(sigma, x)

    assert images.check_samples_near_data(onto_test_images, config, train_data)["data_distance_ratio"] == \
        pytest.approx(1.0, abs=1e-5)
    assert "warning" not in capsys.readouterr().err
    ratio = images.check_samples_near_data(lambda x, sigma, cond: torch.zeros_like(x), config,
                                           train_data)["data_distance_ratio"]
    printed = capsys.readouterr()
    assert ratio > 2.0 and "far from the data" in printed.err and printed.out == ""    # stdout: the JSON only


def test_teacher_metrics_record_the_data_check(teacher_run):
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    assert metrics["data_distance_ratio"] > 0.0


UNET = ["model.type=unet", "model.channels=8", "model.channel_mults=[1,2]", "model.num_res_blocks=1",
        "model.attention_levels=[1]", "model.num_heads=2", "model.groups=4", "train.progress=false",
        "train.checkpoint_every=0"]


def test_unet_teacher_trains_and_every_method_distils_it(tmp_path):
    """`model.type=unet`: the teacher is a U-Net, π-ID's student, DMD2's and MeanFlow's networks are copies of it."""
    from piflow.models import UNet

    teacher = tmp_path / "teacher"
    assert main(["train-teacher", "--run-dir", str(teacher), "dataset=digits", "train.iters=4",
                 "flow_matching.batch_size=8", "eval.data_check_samples=16", *UNET]) == 0
    model, _ = images.load_teacher(str(teacher))
    assert isinstance(model, UNet) and model.config.channel_mults == (1, 2)
    for method in ("piid", "dmd2", "meanflow"):
        run = tmp_path / method
        assert main(["distill", "--run-dir", str(run), "dataset=digits", f"teacher={teacher}", f"method={method}",
                     "train.iters=2", "distill.batch_size=4", "distill.total_substeps=16", "distill.nfe=2",
                     "train.progress=false", "train.checkpoint_every=0"]) == 0
        sampler, _ = images.load_student(run)
        x = sampler.sample(torch.randn(2, 1, 8, 8), cond=torch.tensor([3, 4]))
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_unknown_model_type_is_a_one_line_error(tmp_path, capsys):
    assert main(["train-teacher", "--run-dir", str(tmp_path / "t"), "dataset=digits", "model.type=mlp",
                 "train.iters=1"]) == 2
    assert "model.type must be one of ('dit', 'unet'), got 'mlp'" in capsys.readouterr().err


def test_image_teacher_runs_from_before_model_type_resume_as_dits():
    """A teacher run saved before ``model.type`` (and the U-Net keys) was a DiT run: equal to the same config with the
    default type, unequal to a U-Net one."""
    from piflow.config import load_config
    from piflow.train.run_dir import config_differences

    saved = load_config(images.IMAGE_TEACHER_DEFAULTS, None, ["dataset=digits", "model.hidden_size=64"])
    saved["model"] = {key: saved["model"][key] for key in ("preset", "patch_size", "hidden_size", "depth", "num_heads")}
    assert config_differences(saved, load_config(images.IMAGE_TEACHER_DEFAULTS, None,
                                                 ["dataset=digits", "model.hidden_size=64"])) == {}
    changed = config_differences(saved, load_config(images.IMAGE_TEACHER_DEFAULTS, None,
                                                    ["dataset=digits", "model.hidden_size=64", "model.type=unet"]))
    assert changed == {"model.type": ("dit", "unet")}
