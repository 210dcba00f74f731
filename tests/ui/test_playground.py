"""The playground logic against independent truths: `PiFlow.sample`, the teacher's Euler sampler, the policy's own
x̂0 at the network's state, and the checks' messages."""
import pytest
import torch

from piflow.rollout import DEFAULT_TOTAL_SUBSTEPS
from piflow.sampling import euler_sample
from piflow.ui import playground as pg

pytestmark = pytest.mark.usefixtures("single_thread")
DIGITS, RING8 = list(pg.BUNDLED)[0], list(pg.BUNDLED)[1]


@pytest.fixture(scope="module")
def digits():
    return pg.load_bundled(DIGITS)


@pytest.fixture(scope="module")
def ring8():
    return pg.load_bundled(RING8)


def test_bundled_students_load_with_their_teachers(digits, ring8):
    assert digits.kind == "image" and digits.shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.pf.nfe == 4 and digits.pf.policy_kind == "gmflow"
    assert ring8.kind == "2d" and ring8.shape == (2,) and ring8.num_classes == 0 and ring8.pf.nfe == 2
    checker = pg.load_bundled(list(pg.BUNDLED)[2])
    assert checker.kind == "2d" and checker.background.shape == (3000, 2)


@pytest.mark.parametrize("nfe, h", [(1, 0.0), (4, 0.0), (3, 0.7)])
def test_student_through_the_ui_equals_piflow_sample(digits, nfe, h):
    settings = pg.check_settings(digits, nfe, 5, 6, None, 1.0, None, h)
    noise, labels = pg.draw_inputs(digits, settings)
    assert torch.equal(labels, torch.arange(6) % 10)
    expected = digits.pf.sample(noise, nfe=nfe, cond=labels, h=h, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(pg.student_sample(digits.pf, noise, labels, settings), expected, rtol=0, atol=0)


def test_generation_runs_teacher_and_student_on_the_same_noise(digits):
    settings = pg.check_settings(digits, 2, 3, 5, "7", "auto", 64, 0, 8)
    generation = pg.generate(digits, settings)
    assert torch.equal(generation.labels, torch.full((5,), 7))
    assert torch.equal(generation.teacher, euler_sample(digits.teacher, generation.noise, 8, generation.labels))
    assert generation.teacher_seconds > 0 and generation.student_seconds > 0
    other = pg.generate(digits, pg.check_settings(digits, 2, 4, 5, "7", "auto", 64, 0, 8))
    assert not torch.allclose(other.student, generation.student)          # another seed, other samples


def test_recorded_rollout_ends_at_the_samples_and_starts_each_step_at_the_policy_x0(digits):
    settings = pg.check_settings(digits, 4, 0, 3, None)
    noise, labels = pg.draw_inputs(digits, settings)
    record = []
    samples = pg.student_sample(digits.pf, noise, labels, settings, record)
    torch.testing.assert_close(samples, pg.student_sample(digits.pf, noise, labels, settings), rtol=0, atol=1e-6)
    assert len(record) == 4 and all(step["x0"].shape[0] == DEFAULT_TOTAL_SUBSTEPS // 4 for step in record)
    paths, points = pg.rollout_paths(record)
    assert paths.shape == (1 + DEFAULT_TOTAL_SUBSTEPS, 3, 1, 8, 8)
    torch.testing.assert_close(paths[-1], samples, rtol=0, atol=1e-6)
    assert torch.equal(points[0], noise)
    for step in record:            # first frame: the GM's own x̂0 at the state the network saw (its mixture mean)
        state, sigma = step["states"][0], step["sigmas"][0].expand(3)
        policy = digits.pf.policy(state, sigma, labels)
        torch.testing.assert_close(step["x0"][0], policy.mixture_mean(), rtol=1e-5, atol=1e-5)
    frames, labels_ = pg.strip_frames(record)
    assert frames.shape[0] == 4 * pg.STRIP_FRAMES and labels_[0] == (0, 1.0)


def test_2d_paths_and_figures(ring8):
    settings = pg.check_settings(ring8, 2, 1, 300)
    generation = pg.generate(ring8, settings)
    paths, points = pg.rollout_paths(generation.record)
    torch.testing.assert_close(paths[-1], generation.student[:pg.PATH_SAMPLES], rtol=0, atol=1e-6)
    assert torch.equal(generation.teacher_paths[-1], generation.teacher[:pg.PATH_SAMPLES])
    shown = pg.render(ring8, generation)
    for image in (shown.teacher, shown.student, shown.detail):
        assert image.dtype.name == "uint8" and image.ndim == 3 and image.std() > 5        # not blank
    assert "student 2 NFE" in shown.timing and "batch 300" in shown.timing


def test_image_render_shapes(digits):
    shown = pg.render(digits, pg.generate(digits, pg.check_settings(digits, 2, 0, 16, None)))
    scale = pg.IMAGE_SCALE          # 8×8 digits with 1-pixel gaps, 8 per row, upscaled
    assert shown.student.shape == (2 * 9 * scale + scale, 8 * 9 * scale + scale, 3)
    assert shown.detail.shape[0] == pg.STRIP_SAMPLES * (9 * pg.IMAGE_SCALE + pg.IMAGE_SCALE)
    assert "step 2: σ" in shown.detail_caption


@pytest.mark.parametrize("field, value, message", [
    ("nfe", 0, "NFE must be a whole number in [1, 8], got 0"),
    ("nfe", 9, "NFE must be a whole number in [1, 8], got 9"),
    ("nfe", 2.5, "NFE must be a whole number in [1, 8], got 2.5"),
    ("batch", 0, "batch must be a whole number in [1, 256]"),
    ("seed", -1, "seed must be a whole number in [0, 4294967295]"),
    ("label", "10", "class must be a whole number in [0, 9]"),
    ("temperature", "hot", "temperature must be a number >= 0 or 'auto', got 'hot'"),
    ("temperature", "-1", "temperature must be a finite number >= 0 or 'auto'"),
    ("total_substeps", 0, "substeps must be a whole number in [1, 1024]"),
    ("h", "-1", "h must be a number >= 0 or 'inf'"),
    ("h", "lots", "h must be a number >= 0 or 'inf', got 'lots'"),
    ("teacher_steps", 0, "teacher steps must be a whole number in [1, 256]"),
])
def test_bad_settings_are_one_line_messages(digits, field, value, message):
    arguments = dict(nfe=4, seed=0, batch=4, label=None, temperature=1.0, total_substeps=None, h=0.0,
                     teacher_steps=32)
    arguments[field] = value
    with pytest.raises(ValueError) as error:
        pg.check_settings(digits, **arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_page_values_are_parsed(ring8):
    settings = pg.check_settings(ring8, 3.0, "12", 10.0, "all", " AUTO ", 64.0, "inf", "16")
    assert (settings.nfe, settings.seed, settings.batch, settings.label) == (3, 12, 10, None)
    assert settings.temperature == "auto" and settings.h == "inf" and settings.total_substeps == 64
    with pytest.raises(ValueError, match="unconditional"):
        pg.check_settings(ring8, 2, 0, 10, "3")


def test_importing_the_ui_logic_imports_no_gradio():
    import subprocess
    import sys

    code = ("import sys, piflow, piflow.ui, piflow.ui.playground, piflow.ui.text_to_image; "
            "print('gradio' in sys.modules, 'selenium' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
