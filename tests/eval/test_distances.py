"""Tests for the sample-based metrics, checked against brute force and closed forms."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from piflow.data import GaussianMixture2D, make_toy_dataset
from piflow.eval import (
    coupling_error,
    energy_distance,
    mmd_rbf,
    mode_statistics,
    sliced_wasserstein2,
    wasserstein2_1d,
)

# Many small tensor ops: one intra-op thread avoids synchronisation overhead on a busy machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=_gen(seed))


# ----------------------------------------------------------------------------------------------------------
# Wasserstein
# ----------------------------------------------------------------------------------------------------------

def _brute_force_w2(x: list[float], y: list[float]) -> float:
    """W2 between uniform empirical measures by optimal matching over all permutations.

    Unequal sizes are handled exactly by repeating each point of x lcm/N times and each point of y lcm/M times
    (this leaves both measures unchanged), then matching the equal-size lists.
    """
    lcm = len(x) * len(y) // math.gcd(len(x), len(y))
    xs = [v for v in x for _ in range(lcm // len(x))]
    ys = [v for v in y for _ in range(lcm // len(y))]
    best = min(sum((a - b) ** 2 for a, b in zip(xs, perm, strict=True)) for perm in itertools.permutations(ys))
    return math.sqrt(best / lcm)


@pytest.mark.parametrize("n, m, seed", [(6, 6, 0), (5, 5, 1), (2, 3, 2), (3, 6, 3), (1, 5, 4), (2, 4, 5)])
def test_w2_1d_matches_brute_force_matching(n: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).tolist()
    y = (rng.normal(size=m) * 2.0 + 0.5).tolist()
    expected = _brute_force_w2(x, y)
    x_t, y_t = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    assert wasserstein2_1d(x_t, y_t) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # In 1-D the only unit directions are +-1, so the sliced distance is the exact 1-D W2.
    sliced = sliced_wasserstein2(x_t[:, None], y_t[:, None], num_projections=3,
                                 generator=_gen(seed))
    assert sliced == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_w2_1d_gaussians_closed_form_with_unequal_sizes() -> None:
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2 = 1 + 1.
    x = _randn(6000, 1, 0)[:, 0]
    y = 1.0 + 2.0 * _randn(9000, 1, 1)[:, 0]
    assert wasserstein2_1d(x, y) == pytest.approx(math.sqrt(2.0), rel=0.03)


def test_sliced_w2_of_set_with_itself_is_zero() -> None:
    x = _randn(500, 3, 0)
    assert sliced_wasserstein2(x, x, generator=_gen(1)) == 0.0
    assert sliced_wasserstein2(x, x[torch.randperm(500, generator=_gen(2))], generator=_gen(1)) == 0.0


def test_sliced_w2_exact_shift_in_one_dimension() -> None:
    x = _randn(300, 1, 0)
    assert sliced_wasserstein2(x, x + 1.7, num_projections=5, generator=_gen(0)) == pytest.approx(1.7, rel=1e-12)


@pytest.mark.parametrize("dim, shift", [(2, (3.0, 0.0)), (3, (2.0, -1.0, 2.0))])
def test_sliced_w2_shifted_gaussians_closed_form(dim: int, shift: tuple[float, ...]) -> None:
    # For a unit direction theta, W2(theta#N(0, I), theta#N(m, I)) = |theta . m|, so SW2^2 = |m|^2 / D.
    m = torch.tensor(shift, dtype=torch.float64)
    expected = math.sqrt(float(m @ m) / dim)
    x = _randn(4000, dim, 10)
    y = _randn(4000, dim, 11) + m
    got = sliced_wasserstein2(x, y, num_projections=2000, generator=_gen(12))
    assert got == pytest.approx(expected, rel=0.04)
    # Unequal sample sizes go through the merged quantile grid.
    got_unequal = sliced_wasserstein2(x[:2500], y, num_projections=2000, generator=_gen(12))
    assert got_unequal == pytest.approx(expected, rel=0.04)


def test_sliced_w2_is_deterministic_given_generator_and_accepts_float32() -> None:
    x = _randn(200, 2, 0).float()
    y = _randn(300, 2, 1).float() + 1.0
    first = sliced_wasserstein2(x, y, num_projections=64, generator=_gen(5))
    assert first == sliced_wasserstein2(x, y, num_projections=64, generator=_gen(5))
    assert first != sliced_wasserstein2(x, y, num_projections=64, generator=_gen(6))


def test_sliced_w2_bad_inputs() -> None:
    x = _randn(10, 2, 0)
    with pytest.raises(ValueError, match="x"):
        sliced_wasserstein2(x[:, 0], x)
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein2(x, _randn(10, 3, 1))
    with pytest.raises(ValueError, match="y"):
        sliced_wasserstein2(x, x[:0])
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein2(x, x, num_projections=0)
    with pytest.raises(ValueError, match="generator"):
        sliced_wasserstein2(x, x, generator=0)
    with pytest.raises(ValueError, match="x"):
        wasserstein2_1d(x, x[:, 0])


# ----------------------------------------------------------------------------------------------------------
# Energy distance
# ----------------------------------------------------------------------------------------------------------

def _brute_force_energy(x: np.ndarray, y: np.ndarray) -> float:
    n, m = len(x), len(y)
    cross = sum(np.linalg.norm(a - b) for a in x for b in y) / (n * m)
    within_x = sum(np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    within_y = sum(np.linalg.norm(y[i] - y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return 2 * cross - within_x - within_y


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_energy_distance_matches_brute_force(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    y = rng.normal(size=(5, 3)) + 0.7
    expected = _brute_force_energy(x, y)
    got = energy_distance(torch.from_numpy(x), torch.from_numpy(y), chunk_size=chunk_size)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def _folded_normal_mean(mu: float, s: float) -> float:
    """E|Z| for Z ~ N(mu, s^2)."""
    return (s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s))
            + mu * math.erf(mu / (s * math.sqrt(2))))


def _rice_mean(nu: float, s: float) -> float:
    """E|Z| for Z ~ N(mu, s^2 I_2) with |mu| = nu (mean of the Rice distribution)."""
    t = -nu * nu / (2 * s * s)
    half = torch.tensor(-t / 2, dtype=torch.float64)
    laguerre = math.exp(t / 2) * ((1 - t) * float(torch.special.i0(half)) - t * float(torch.special.i1(half)))
    return s * math.sqrt(math.pi / 2) * laguerre


def _normal_grid_1d(n: int) -> torch.Tensor:
    """(n, 1) quantile grid of N(0, 1): a deterministic sample whose empirical law converges at rate O(1/n)."""
    return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]


def _normal_grid_2d(num_radii: int, num_angles: int, angle_offset: float = 0.0) -> torch.Tensor:
    """(num_radii * num_angles, 2) polar quantile grid of N(0, I_2) (Rayleigh radius quantiles x even angles)."""
    u = (torch.arange(num_radii, dtype=torch.float64) + 0.5) / num_radii
    radius = torch.sqrt(-2.0 * torch.log1p(-u))
    angle = 2 * math.pi * (torch.arange(num_angles, dtype=torch.float64) + 0.5 + angle_offset) / num_angles
    return torch.stack([(radius[:, None] * torch.cos(angle)[None, :]).reshape(-1),
                        (radius[:, None] * torch.sin(angle)[None, :]).reshape(-1)], dim=1)


# Closed-form checks use quadrature grids instead of random samples: the estimators then converge at O(1/N)
# with no Monte-Carlo noise, so tolerances can be tight.

def test_energy_distance_shifted_gaussians_1d_closed_form() -> None:
    # X - Y ~ N(-m, 2), X - X' ~ N(0, 2): ED = 2 E|N(m, 2)| - 2 E|N(0, 2)|.
    m = 1.0
    expected = 2 * _folded_normal_mean(m, math.sqrt(2)) - 2 * _folded_normal_mean(0.0, math.sqrt(2))
    x = _normal_grid_1d(2000)
    assert energy_distance(x, x + m) == pytest.approx(expected, abs=5e-3)  # expected ~= 0.542


def test_energy_distance_shifted_gaussians_2d_closed_form() -> None:
    m = 1.5
    expected = 2 * _rice_mean(m, math.sqrt(2)) - 2 * _rice_mean(0.0, math.sqrt(2))
    assert _rice_mean(0.0, math.sqrt(2)) == pytest.approx(math.sqrt(math.pi))  # Rayleigh mean sanity check
    x = _normal_grid_2d(40, 40)
    y = _normal_grid_2d(40, 40, angle_offset=0.5) + torch.tensor([m, 0.0], dtype=torch.float64)
    assert energy_distance(x, y) == pytest.approx(expected, abs=6e-3)  # expected ~= 0.933
    # Random samples agree within their (larger) statistical error.
    got = energy_distance(_randn(3000, 2, 2), _randn(3000, 2, 3) + torch.tensor([m, 0.0], dtype=torch.float64))
    assert got == pytest.approx(expected, abs=0.12)


def test_energy_distance_identical_distributions_near_zero() -> None:
    got = energy_distance(_randn(3000, 2, 4), _randn(2000, 2, 5))
    assert abs(got) < 0.01


def test_energy_distance_bad_inputs() -> None:
    with pytest.raises(ValueError, match="x"):
        energy_distance(_randn(1, 2, 0), _randn(5, 2, 1))
    with pytest.raises(ValueError, match="dimension"):
        energy_distance(_randn(4, 2, 0), _randn(5, 1, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        energy_distance(_randn(4, 2, 0), _randn(5, 2, 1), chunk_size=0)


# ----------------------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------------------

def _brute_force_mmd(x: np.ndarray, y: np.ndarray, bandwidths: tuple[float, ...]) -> float:
    def k(a, b):
        return sum(math.exp(-((a - b) ** 2).sum() / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    k_xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    k_yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    k_xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return k_xx + k_yy - 2 * k_xy


@pytest.mark.parametrize("chunk_size", [2, 4, 1024])
@pytest.mark.parametrize("bandwidths", [(1.0,), (0.3, 1.0, 3.0)])
def test_mmd_matches_brute_force(chunk_size: int, bandwidths: tuple[float, ...]) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 2))
    y = rng.normal(size=(9, 2)) * 1.5
    expected = _brute_force_mmd(x, y, bandwidths)
    got = mmd_rbf(torch.from_numpy(x), torch.from_numpy(y), bandwidths=bandwidths, chunk_size=chunk_size)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("dim", [1, 2])
def test_mmd_shifted_gaussians_closed_form(dim: int) -> None:
    # For Z ~ N(mu, t^2 I_D): E exp(-|Z|^2 / (2 s^2)) = (s^2 / (s^2 + t^2))^(D/2) exp(-|mu|^2 / (2 (s^2 + t^2))).
    # Both X - X' and X - Y have covariance 2 I, so MMD^2 = sum_s 2 c_s (1 - exp(-|m|^2 / (2 (s^2 + 2)))).
    shift, bandwidths = 1.0, (0.5, 1.0, 2.0)
    expected = sum(2 * (s * s / (s * s + 2)) ** (dim / 2) * (1 - math.exp(-shift ** 2 / (2 * (s * s + 2))))
                   for s in bandwidths)
    if dim == 1:
        x = _normal_grid_1d(1000)
        y = x + shift
    else:
        x = _normal_grid_2d(60, 60)
        y = _normal_grid_2d(60, 60, angle_offset=0.5) + torch.tensor([shift, 0.0], dtype=torch.float64)
    assert mmd_rbf(x, y, bandwidths=bandwidths) == pytest.approx(expected, rel=0.02)


def test_mmd_identical_distributions_near_zero_and_default_bandwidths() -> None:
    x, y = _randn(2000, 2, 8), _randn(2000, 2, 9)
    same = mmd_rbf(x, y)
    shifted = mmd_rbf(x, y + 0.5)
    assert abs(same) < 5e-3
    assert shifted > 20 * max(abs(same), 1e-4)


def test_mmd_bad_inputs() -> None:
    x = _randn(5, 2, 0)
    for bad in [(), (1.0, -1.0), (0.0,), "abc", None]:
        with pytest.raises(ValueError, match="bandwidths"):
            mmd_rbf(x, x, bandwidths=bad)
    with pytest.raises(ValueError, match="y"):
        mmd_rbf(x, x[:1])


# ----------------------------------------------------------------------------------------------------------
# Mode statistics
# ----------------------------------------------------------------------------------------------------------

def _four_mode_mixture() -> GaussianMixture2D:
    means = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]])
    return GaussianMixture2D(means=means, std=0.5, weights=torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))


def test_mode_statistics_on_hand_built_points() -> None:
    mixture = _four_mode_mixture()
    points = ([[5.1, 4.9]] * 10          # mode 0
              + [[-5.0, 5.5]] * 5        # mode 1
              + [[5.0, -5.0]] * 1        # mode 3 (mode 2 is empty)
              + [[0.0, 0.0], [5.0, 7.5], [100.0, 0.0], [-5.0, -6.6]])  # 4 outliers (> 1.5 from every mean)
    x = torch.tensor(points, dtype=torch.float64)
    stats = mode_statistics(x, mixture)
    assert set(stats) == {"modes_covered", "num_modes", "mode_mass_error", "outlier_fraction"}
    assert stats["num_modes"] == 4
    # Covered: count_k >= 0.1 * w_k * 20 -> thresholds (0.8, 0.6, 0.4, 0.2) vs counts (10, 5, 0, 1).
    assert stats["modes_covered"] == 3
    # Histogram over the 16 in-mode points: (10, 5, 0, 1) / 16.
    expected_tv = 0.5 * (abs(10 / 16 - 0.4) + abs(5 / 16 - 0.3) + abs(0 - 0.2) + abs(1 / 16 - 0.1))
    assert stats["mode_mass_error"] == pytest.approx(expected_tv, abs=1e-12)
    assert stats["outlier_fraction"] == pytest.approx(4 / 20)
    # Stricter threshold: 0.6 * w_k * 20 = (4.8, 3.6, 2.4, 1.2) -> only modes 0 and 1 covered.
    assert mode_statistics(x, mixture, min_fraction=0.6)["modes_covered"] == 2
    # Larger radius: (-5, -6.6) is 1.6 from mode 2 -> joins it at max_sigmas = 4 (radius 2).
    wide = mode_statistics(x, mixture, max_sigmas=4.0)
    assert wide["outlier_fraction"] == pytest.approx(3 / 20)
    assert wide["modes_covered"] == 4


def test_mode_statistics_all_outliers() -> None:
    stats = mode_statistics(torch.zeros(10, 2), _four_mode_mixture())
    assert stats == {"modes_covered": 0, "num_modes": 4, "mode_mass_error": 1.0, "outlier_fraction": 1.0}


def test_mode_statistics_of_exact_samples() -> None:
    dataset = make_toy_dataset("ring8", weights=[1, 1, 2, 2, 3, 3, 4, 4])
    n = 40000
    x = dataset.sample(n, generator=_gen(0))
    stats = mode_statistics(x, dataset.mixture)
    assert stats["modes_covered"] == 8 and stats["num_modes"] == 8
    assert stats["mode_mass_error"] < 0.02
    assert stats["outlier_fraction"] == pytest.approx(math.exp(-4.5), abs=5 * math.sqrt(0.011 / n))
    # Dropping every sample of mode 0 (at angle 0, weight 1/20) uncovers it; the in-mode histogram then puts
    # 0 on mode 0 and w_k / (1 - 1/20) elsewhere, a total variation of 0.5 * (1/20 + 1/20) = 1/20.
    kept = x[torch.atan2(x[:, 1], x[:, 0]).abs() > math.pi / 8]
    dropped = mode_statistics(kept, dataset.mixture)
    assert dropped["modes_covered"] == 7
    assert dropped["mode_mass_error"] == pytest.approx(1 / 20, abs=0.02)


def test_mode_statistics_bad_inputs() -> None:
    mixture = _four_mode_mixture()
    with pytest.raises(ValueError, match="x"):
        mode_statistics(torch.zeros(3, 3), mixture)
    with pytest.raises(ValueError, match="x"):
        mode_statistics(torch.zeros(0, 2), mixture)
    with pytest.raises(ValueError, match="mixture"):
        mode_statistics(torch.zeros(3, 2), make_toy_dataset("moons").mixture)
    with pytest.raises(ValueError, match="min_fraction"):
        mode_statistics(torch.zeros(3, 2), mixture, min_fraction=1.5)


# ----------------------------------------------------------------------------------------------------------
# Coupling error
# ----------------------------------------------------------------------------------------------------------

def test_coupling_error_hand_computed() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    y = torch.tensor([[3.0, 4.0], [1.0, 1.0], [2.0, 1.0]])
    assert coupling_error(x, y) == pytest.approx((5.0 + 0.0 + 2.0) / 3)
    assert coupling_error(x, x) == 0.0
    assert coupling_error(np.ones((4, 3)), np.zeros((4, 3))) == pytest.approx(math.sqrt(3))


def test_coupling_error_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same shape"):
        coupling_error(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="same shape"):
        coupling_error(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="y"):
        coupling_error(torch.zeros(4, 2), torch.zeros(4))
