"""The bundled demo teachers load through the ordinary run-directory code paths and are real teachers."""
import pytest
import torch

from piflow.bundled import BUNDLED_TEACHERS, TEACHER_ASSETS
from piflow.data import checkerboard_white_mask
from piflow.recipes import toy2d
from piflow.recipes.demo import ASSETS
from piflow.sampling import euler_sample

pytestmark = pytest.mark.usefixtures("single_thread")


def test_checkerboard_teacher_puts_mass_on_white_squares():
    teacher, model = toy2d.load_teacher(str(ASSETS / "checkerboard_mlp"), "checkerboard")
    samples = euler_sample(teacher, torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)), 64)
    assert model is not None
    assert float(checkerboard_white_mask(samples).float().mean()) > 0.85     # data: 1.0, noise: ~0.4


def test_digits_teacher_loads_and_samples():
    pytest.importorskip("sklearn")
    from piflow.recipes import images

    model, config = images.load_teacher(str(ASSETS / "digits_dit"))
    assert config["dataset"] == "digits" and model.config.num_classes == 10
    teacher = images.make_teacher(model, 10)
    x = euler_sample(teacher, torch.randn(10, 1, 8, 8), 8, torch.arange(10))
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    assert float(x.std()) > 0.3          # not collapsed onto a constant image


def test_a_bundled_teacher_is_selected_by_name(tmp_path):
    """``teacher=digits-bundled`` reads the bundled folder from any directory and is stored as the name."""
    pytest.importorskip("sklearn")
    import yaml

    from piflow.cli import main
    from piflow.recipes import images

    run = tmp_path / "student"
    assert main(["distill", "--run-dir", str(run), "dataset=digits", "teacher=digits-bundled", "train.iters=1",
                 "distill.batch_size=2", "distill.total_substeps=8", "train.progress=false",
                 "train.checkpoint_every=0"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"] == "digits-bundled"
    assert images.teacher_identity("digits-bundled") == images.teacher_identity(str(ASSETS / "digits_dit"))
    sampler, _ = images.load_student(run)
    assert sampler.sample(torch.randn(2, 1, 8, 8), cond=torch.tensor([0, 1])).shape == (2, 1, 8, 8)


@pytest.mark.slow        # a maintainer script, run as a subprocess: seconds
def test_bundle_run_script_stores_a_float16_teacher_that_loads_as_float32(tmp_path):
    """scripts/bundle_run.py: half the bytes, read back as float32, the same velocities up to float16 rounding."""
    pytest.importorskip("sklearn")
    import subprocess
    import sys
    from pathlib import Path

    from piflow.cli import main
    from piflow.files import load_safetensors
    from piflow.recipes import images

    run, dest = tmp_path / "teacher", tmp_path / "bundled"
    assert main(["train-teacher", "--run-dir", str(run), "dataset=digits", "model.hidden_size=32", "model.depth=1",
                 "model.num_heads=2", "train.iters=3", "flow_matching.batch_size=8", "eval.data_check_samples=16",
                 "train.progress=false"]) == 0
    model = images.load_teacher(str(run))[0]
    torch.manual_seed(0)
    with torch.no_grad():                  # three steps leave the zero-initialised layers near 0: make outputs O(1)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(run / "teacher")
    script = Path(__file__).resolve().parents[2] / "scripts" / "bundle_run.py"
    subprocess.run([sys.executable, str(script), str(run), str(dest)], check=True, capture_output=True)
    assert {t.dtype for t in load_safetensors(dest / "teacher" / "model.safetensors", "w").values()} == {torch.float16}
    assert (dest / "config.yaml").is_file() and (dest / "metrics.json").is_file()
    original, bundled = images.load_teacher(str(run))[0], images.load_teacher(str(dest))[0]
    assert next(bundled.parameters()).dtype == torch.float32
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([100.0, 300.0, 600.0, 900.0]), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        reference, half = original(x, t, y), bundled(x, t, y)
    assert float(reference.abs().max()) > 0.5
    assert float((half - reference).abs().max()) <= 1e-2 * float(reference.abs().max())
    result = subprocess.run([sys.executable, str(script), str(run), str(dest)], capture_output=True, text=True)
    assert result.returncode == 2 and "exists" in result.stderr          # never overwrites a bundled folder


@pytest.mark.slow        # a maintainer script, run as a subprocess: seconds
def test_bundle_run_script_stores_a_float16_student_that_names_its_bundled_teacher(tmp_path):
    """scripts/bundle_run.py on a distill run: float16 student weights that sample like the float32 ones, and a
    teacher given as the bundled folder's path is stored by its name (the copy samples from any directory)."""
    pytest.importorskip("sklearn")
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from piflow.cli import main
    from piflow.files import load_safetensors
    from piflow.recipes import images

    run, dest = tmp_path / "student", tmp_path / "bundled"
    assert main(["distill", "--run-dir", str(run), "dataset=digits", f"teacher={TEACHER_ASSETS / 'digits_dit'}",
                 "train.iters=2", "distill.batch_size=2", "distill.total_substeps=8", "train.progress=false",
                 "train.checkpoint_every=0"]) == 0
    script = Path(__file__).resolve().parents[2] / "scripts" / "bundle_run.py"
    subprocess.run([sys.executable, str(script), str(run), str(dest)], check=True, capture_output=True)
    weights = load_safetensors(dest / "student.safetensors", "w")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert 0.45 < (dest / "student.safetensors").stat().st_size / (run / "student.safetensors").stat().st_size < 0.55
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"] == str(TEACHER_ASSETS / "digits_dit")
    assert yaml.safe_load((dest / "config.yaml").read_text())["teacher"] == "digits-bundled"
    original, bundled = images.load_student(run)[0], images.load_student(dest)[0]
    assert next(bundled.student.parameters()).dtype == torch.float32
    noise, labels = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    reference, copy = original.sample(noise, cond=labels), bundled.sample(noise, cond=labels)
    assert float(reference.std()) > 0.1
    assert float((copy - reference).abs().max()) <= 2e-2 * float(reference.abs().max())


@pytest.mark.parametrize("name", sorted(BUNDLED_TEACHERS))
def test_every_bundled_teacher_is_a_small_half_precision_run_of_its_dataset(name):
    """Each name of `piflow.bundled.BUNDLED_TEACHERS` is a train-teacher run folder of the dataset it is named
    after, its weights stored in float16 within the ~10 MB budget, read back as float32."""
    from piflow.files import load_safetensors
    from piflow.recipes import images

    folder = TEACHER_ASSETS / BUNDLED_TEACHERS[name]
    weights = folder / "teacher" / "model.safetensors"
    assert weights.stat().st_size <= 10.5e6
    assert {t.dtype for t in load_safetensors(weights, "w").values()} <= {torch.float16, torch.float32}
    model, config = images.load_teacher(name)
    assert config["dataset"] == name.removesuffix("-bundled")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-bundled", "fashion-mnist-bundled"])
def test_bundled_28x28_teachers_draw_their_classes(name):
    """100 samples (10 per class, 16 Euler steps) of a bundled 28×28 teacher are labelled with their class by an
    independent nearest-class-mean classifier about as often as real test images are (an untrained or broken
    teacher: ~10 %)."""
    from piflow.data import load_idx_dataset
    from piflow.recipes import images

    if name not in BUNDLED_TEACHERS:
        pytest.skip(f"{name} is not bundled")
    kind = name.removesuffix("-bundled")
    try:
        train_set, test_set = (load_idx_dataset(split=split, kind=kind) for split in ("train", "test"))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    train_x, train_y = train_set.tensors()
    test_x, test_y = test_set.tensors()
    means = torch.stack([train_x[train_y == c].flatten(1).mean(0) for c in range(10)])

    def accuracy(x, y):
        return float((torch.cdist(x.flatten(1), means).argmin(1) == y).float().mean())

    model, _ = images.load_teacher(name)
    labels = torch.arange(10).repeat(10)
    samples = euler_sample(images.make_teacher(model, 10), torch.randn(100, 1, 28, 28,
                           generator=torch.Generator().manual_seed(0)), 16, labels)
    real = accuracy(test_x[:2000], test_y[:2000])
    assert real > 0.6                                # the classifier: MNIST 0.78, Fashion-MNIST 0.67
    assert accuracy(samples.clamp(-1, 1), labels) >= 0.85 * real
