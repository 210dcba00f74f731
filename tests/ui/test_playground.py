"""The playground logic against independent truths: the ring8 modes written out here, the exact ODE solved here
with RK4, the teacher's samples on the same noise and class, the policy's own x̂0 at the network's state, and the
checks' messages."""
import math

import pytest
import torch

from piflow.rollout import DEFAULT_TOTAL_SUBSTEPS
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


U_NET_STUDENTS = [label for label in pg.BUNDLED if "U-Net" in label]


@pytest.mark.parametrize("label", U_NET_STUDENTS)
def test_bundled_u_net_students_load_in_float32_with_their_teachers(label):
    """Stored in float16 within the size budget of a bundled model (10 MB), read back as float32."""
    from piflow.files import load_safetensors

    weights = pg.STUDENT_ASSETS / pg.BUNDLED[label][0] / "student.safetensors"
    assert weights.stat().st_size < 10e6
    assert {t.dtype for t in load_safetensors(weights).values()} == {torch.float16}
    model = pg.load_bundled(label)
    assert model.kind == "image" and model.shape == (1, 28, 28) and model.num_classes == 10
    assert model.pf.nfe == 4 and model.pf.policy_kind == "gmflow"
    assert {p.dtype for p in model.pf.student.parameters()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("label", U_NET_STUDENTS)
def test_bundled_u_net_students_follow_their_teachers_from_the_same_noise(label):
    """Through the UI at batch 16, each 4-NFE sample is close to the teacher's 32-step sample from the same noise and
    class: its mean RMSE to that one is below a quarter of its RMSE to the teacher's samples of other noises
    (measured 2026-12-06: MNIST 0.119 against 0.73–0.78, Fashion-MNIST 0.087 against 0.83–0.85; an untrained or
    mismatched student would not be)."""
    model = pg.load_bundled(label)
    settings = pg.check_settings(model, 4, 3, 16, None)
    noise, labels = pg.draw_inputs(model, settings)
    student = pg.student_sample(model.pf, noise, labels, settings)
    from piflow.sampling import euler_sample

    teacher = euler_sample(model.teacher, noise, 32, labels)
    paired = (student - teacher).pow(2).flatten(1).mean(1).sqrt()
    for shift in (1, 5, 11):
        others = (student - teacher.roll(shift, 0)).pow(2).flatten(1).mean(1).sqrt()
        assert float(paired.mean()) < 0.25 * float(others.mean()), (float(paired.mean()), float(others.mean()))


# the ring8 data set (piflow.data.toy2d's defaults): 8 equal Gaussians of std 0.2 on a circle of radius 4, the
# first on the +x axis. Written out here, so that the checks do not lean on the code under test.
RING_RADIUS, RING_STD, RING_MODES = 4.0, 0.2, 8


def ring8_modes() -> torch.Tensor:
    angles = 2 * math.pi * torch.arange(RING_MODES, dtype=torch.float64) / RING_MODES
    return RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def mode_report(points: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(fraction of points within 3 std of their nearest ring8 mode, each mode's share of those points)."""
    distance, nearest = torch.cdist(points.double(), ring8_modes()).min(dim=1)
    on_mode = distance < 3 * RING_STD
    shares = torch.bincount(nearest[on_mode], minlength=RING_MODES).double() / on_mode.sum().clamp(min=1)
    return float(on_mode.double().mean()), shares


def exact_ode_rk4(teacher, noise: torch.Tensor, steps: int = 64) -> torch.Tensor:
    """dx/dσ = u(x, σ) from σ = 1 to 0 with classical RK4 on a uniform σ grid (64 steps: converged to ~1e-4)."""
    x, grid = noise.double(), torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()

    def u(y: torch.Tensor, sigma: float) -> torch.Tensor:
        return teacher(y.float(), torch.full((y.shape[0],), sigma)).double()

    for a, b in zip(grid[:-1], grid[1:]):
        h = b - a
        k1 = u(x, a)
        k2 = u(x + h / 2 * k1, a + h / 2)
        k3 = u(x + h / 2 * k2, a + h / 2)
        k4 = u(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("seed, h", [(5, 0.0), (6, 0.0), (5, "inf")])
def test_ui_student_samples_land_on_the_ring8_modes(ring8, seed, h):
    """The bundled ring8 student at its trained 2 NFE, through the UI: ≥ 90 % of 2000 points within 3 std of a mode
    (measured 94 %), and every mode holds 1/8 ± 0.035 of them (± 4.6 binomial standard errors; measured ±0.01)."""
    settings = pg.check_settings(ring8, 2, seed, 2000, None, 1.0, None, h)
    noise, labels = pg.draw_inputs(ring8, settings)
    assert labels is None and noise.shape == (2000, 2)
    on_mode, shares = mode_report(pg.student_sample(ring8.pf, noise, labels, settings))
    assert on_mode > 0.9, on_mode
    torch.testing.assert_close(shares, torch.full((RING_MODES,), 1 / RING_MODES, dtype=torch.float64), rtol=0,
                               atol=0.035)


def test_generation_teacher_is_the_exact_flow_of_its_noise_and_the_student_shares_it(ring8):
    settings = pg.check_settings(ring8, 2, 3, 300, None, 1.0, None, 0, 32)
    generation = pg.generate(ring8, settings)
    assert generation.noise.shape == (300, 2) and generation.teacher_seconds > 0 and generation.student_seconds > 0
    # the teacher column: 32 Euler steps of the exact GM velocity, within Euler's error (measured mean 0.03) of the
    # exact ODE solution of the same noise, computed here with RK4
    error = (generation.teacher.double() - exact_ode_rk4(ring8.teacher, generation.noise)).norm(dim=1)
    assert float(error.mean()) < 0.1, float(error.mean())
    assert mode_report(generation.teacher)[0] > 0.95
    # the student column ran on the same noise: each point lies next to the teacher's point of its own noise
    # (measured median 0.06), not next to another noise's point (median distance 5.6 on this ring of radius 4)
    paired = (generation.student - generation.teacher).norm(dim=1).median()
    shuffled = (generation.student - generation.teacher.roll(1, dims=0)).norm(dim=1).median()
    assert float(paired) < 0.3 and float(shuffled) > 3.0, (float(paired), float(shuffled))
    other = pg.generate(ring8, pg.check_settings(ring8, 2, 4, 300, None, 1.0, None, 0, 32))
    assert float((other.student - generation.student).norm(dim=1).median()) > 1.0       # another seed, other points


def test_digits_student_follows_the_teacher_on_the_same_noise_and_class(digits):
    """The digits student at its trained 4 NFE: each image is close to the teacher's image of the same noise and
    class (measured mean squared difference 0.003), far from the same class on other noise (0.3) and from the
    same noise in another class."""
    generation = pg.generate(digits, pg.check_settings(digits, 4, 3, 20, None, 1.0, None, 0, 32))
    assert torch.equal(generation.labels, torch.arange(20) % 10)
    student, teacher = generation.student.flatten(1), generation.teacher.flatten(1)
    paired = (student - teacher).square().mean(dim=1)
    other_noise = (student - teacher.roll(10, dims=0)).square().mean(dim=1)      # same class, other noise
    assert float(paired.mean()) < 0.02 and bool((paired < 0.1 * other_noise).all()), (paired, other_noise)
    sevens = pg.generate(digits, pg.check_settings(digits, 4, 3, 5, "7", "auto", None, 0, 32))
    threes = pg.generate(digits, pg.check_settings(digits, 4, 3, 5, "3", "auto", None, 0, 32))
    assert torch.equal(sevens.labels, torch.full((5,), 7)) and torch.equal(sevens.noise, threes.noise)
    to_own = (sevens.student - sevens.teacher).square().flatten(1).mean(dim=1)
    to_other_class = (sevens.student - threes.teacher).square().flatten(1).mean(dim=1)
    assert bool((to_own < to_other_class).all()), (to_own, to_other_class)


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


def test_a_run_of_another_method_is_refused_in_one_line(tmp_path):
    """The playground's controls are a policy student's: a DMD2 run is named and sent to `piflow sample`."""
    from piflow.cli import main
    from piflow.config import ConfigError
    from piflow.ui.playground import load_run

    run = tmp_path / "dmd2"
    assert main(["distill", "--run-dir", str(run), "dataset=ring8", "method=dmd2", "train.iters=2",
                 "train.progress=false", "student.hidden_size=16", "student.num_layers=2", "eval.num_samples=50",
                 "eval.teacher_steps=[]"]) == 0
    with pytest.raises(ConfigError, match="method=dmd2 run") as error:
        load_run(run)
    assert "\n" not in str(error.value) and "piflow sample" in str(error.value)
