"""Tests for the 2-D toy datasets: shapes, determinism, and agreement of samples with each dataset's spec."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from piflow.data import (
    TOY_DATASET_NAMES,
    GaussianMixture2D,
    ToyDataset2D,
    assign_modes,
    checkerboard_white_mask,
    make_toy_dataset,
)

# Many small tensor ops: one intra-op thread avoids synchronisation overhead on a busy machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _binomial_tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    """Tolerance on an empirical frequency with true value p out of n draws."""
    return sigmas * math.sqrt(p * (1.0 - p) / n)


# ----------------------------------------------------------------------------------------------------------
# Generic behaviour
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOY_DATASET_NAMES)
def test_sample_shape_dtype_and_determinism(name: str) -> None:
    dataset = make_toy_dataset(name)
    assert isinstance(dataset, ToyDataset2D)
    assert dataset.name == name
    first = dataset.sample(500, generator=_gen(3))
    second = dataset.sample(500, generator=_gen(3))
    other = dataset.sample(500, generator=_gen(4))
    assert first.shape == (500, 2) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert dataset.sample(0).shape == (0, 2)
    assert dataset.sample(7).shape == (7, 2)  # global RNG path
    assert dataset.sample(np.int64(3)).shape == (3, 2)  # numpy integers are accepted


def test_mixture_attribute_only_for_mixture_datasets() -> None:
    assert isinstance(make_toy_dataset("ring8").mixture, GaussianMixture2D)
    assert isinstance(make_toy_dataset("grid25").mixture, GaussianMixture2D)
    assert make_toy_dataset("checkerboard").mixture is None
    assert make_toy_dataset("moons").mixture is None


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        make_toy_dataset("spiral")
    for name in TOY_DATASET_NAMES:
        assert name in str(info.value)


def test_unknown_keyword_raises() -> None:
    with pytest.raises(ValueError, match="radius"):
        make_toy_dataset("grid25", radius=3.0)


@pytest.mark.parametrize("bad_n", [-1, 2.5, True, "10"])
def test_bad_sample_size_raises(bad_n) -> None:
    with pytest.raises(ValueError, match="n must"):
        make_toy_dataset("moons").sample(bad_n)


def test_bad_generator_raises() -> None:
    with pytest.raises(ValueError, match="generator"):
        make_toy_dataset("ring8").sample(5, generator=123)


@pytest.mark.parametrize("name, kwargs, argument", [
    ("ring8", {"radius": -1.0}, "radius"),
    ("ring8", {"std": 0.0}, "std"),
    ("ring8", {"num_modes": 0}, "num_modes"),
    ("ring8", {"weights": [1.0] * 7}, "weights"),
    ("ring8", {"weights": [-1.0] + [1.0] * 7}, "weights"),
    ("grid25", {"spacing": float("nan")}, "spacing"),
    ("grid25", {"grid_size": 2.5}, "grid_size"),
    ("checkerboard", {"scale": 0}, "scale"),
    ("moons", {"noise": -0.1}, "noise"),
])
def test_bad_dataset_kwargs_raise(name: str, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make_toy_dataset(name, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# GaussianMixture2D
# ----------------------------------------------------------------------------------------------------------

def test_mixture_validation() -> None:
    means = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="means"):
        GaussianMixture2D(means=torch.zeros(3, 3), std=1.0, weights=torch.ones(3) / 3)
    with pytest.raises(ValueError, match="means"):
        GaussianMixture2D(means=torch.zeros(0, 2), std=1.0, weights=torch.ones(0))
    with pytest.raises(ValueError, match="std"):
        GaussianMixture2D(means=means, std=-0.5, weights=torch.ones(3) / 3)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture2D(means=means, std=1.0, weights=torch.ones(3))  # sums to 3
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture2D(means=means, std=1.0, weights=torch.ones(2) / 2)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture2D(means=means, std=1.0, weights=torch.tensor([1.5, -0.5, 0.0]))


def test_mixture_log_prob_matches_explicit_density() -> None:
    means = np.array([[0.0, 0.0], [3.0, -1.0], [-2.0, 2.5]])
    weights = np.array([0.5, 0.3, 0.2])
    std = 0.7
    mixture = GaussianMixture2D(means=torch.tensor(means), std=std, weights=torch.tensor(weights))
    points = np.array([[0.1, -0.2], [3.0, -1.0], [-1.0, 1.0], [10.0, 10.0]])
    expected = []
    for p in points:
        density = sum(w * math.exp(-((p - mu) ** 2).sum() / (2 * std ** 2)) / (2 * math.pi * std ** 2)
                      for w, mu in zip(weights, means, strict=True))
        expected.append(math.log(density))
    got = mixture.log_prob(torch.tensor(points))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# ring8
# ----------------------------------------------------------------------------------------------------------

def test_ring8_mixture_matches_spec() -> None:
    mixture = make_toy_dataset("ring8").mixture
    angles = 2 * math.pi * np.arange(8) / 8
    expected = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    np.testing.assert_allclose(mixture.means.numpy(), expected, atol=1e-12)
    assert mixture.std == pytest.approx(0.2)
    np.testing.assert_allclose(mixture.weights.numpy(), np.full(8, 1 / 8), atol=1e-15)
    custom = make_toy_dataset("ring8", radius=2.5, std=0.1).mixture
    np.testing.assert_allclose(np.linalg.norm(custom.means.numpy(), axis=1), 2.5, atol=1e-12)
    assert custom.std == pytest.approx(0.1)


@pytest.mark.parametrize("weights", [None, [1, 2, 3, 4, 5, 6, 7, 8]])
def test_ring8_samples_match_spec(weights) -> None:
    kwargs = {} if weights is None else {"weights": weights}
    dataset = make_toy_dataset("ring8", **kwargs)
    true_weights = np.full(8, 1 / 8) if weights is None else np.array(weights, dtype=float) / sum(weights)
    np.testing.assert_allclose(dataset.mixture.weights.numpy(), true_weights, atol=1e-15)
    n = 40000
    x = dataset.sample(n, generator=_gen(0)).double().numpy()
    # Independent assignment by angular sector (modes sit at angles 2*pi*k/8).
    sector = np.round(np.arctan2(x[:, 1], x[:, 0]) / (2 * math.pi / 8)).astype(int) % 8
    angles = 2 * math.pi * np.arange(8) / 8
    true_means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    for k in range(8):
        members = x[sector == k]
        fraction = len(members) / n
        assert abs(fraction - true_weights[k]) < _binomial_tolerance(true_weights[k], n)
        # Mean of the mode within 5 standard errors, per-coordinate std within 5%.
        standard_error = 0.2 / math.sqrt(len(members))
        assert np.all(np.abs(members.mean(axis=0) - true_means[k]) < 5 * standard_error)
        np.testing.assert_allclose(members.std(axis=0), 0.2, rtol=0.05)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1).mean(), 4.0, atol=0.02)


# ----------------------------------------------------------------------------------------------------------
# grid25
# ----------------------------------------------------------------------------------------------------------

def test_grid25_mixture_and_samples_match_spec() -> None:
    dataset = make_toy_dataset("grid25")
    mixture = dataset.mixture
    assert mixture.num_modes == 25
    assert mixture.std == pytest.approx(0.15)
    expected = {(float(a), float(b)) for a in (-4, -2, 0, 2, 4) for b in (-4, -2, 0, 2, 4)}
    assert {tuple(row) for row in mixture.means.tolist()} == expected
    np.testing.assert_allclose(mixture.weights.numpy(), np.full(25, 1 / 25), atol=1e-15)

    n = 50000
    x = dataset.sample(n, generator=_gen(1)).double().numpy()
    centre = 2.0 * np.round(x / 2.0)  # nearest grid node, independent of assign_modes
    residual = x - centre
    np.testing.assert_allclose(residual.std(axis=0), 0.15, rtol=0.03)
    assert np.all(np.abs(residual.mean(axis=0)) < 0.01)
    keys, counts = np.unique(centre, axis=0, return_counts=True)
    assert {tuple(k) for k in keys.tolist()} == expected
    assert np.all(np.abs(counts / n - 1 / 25) < _binomial_tolerance(1 / 25, n))


# ----------------------------------------------------------------------------------------------------------
# checkerboard
# ----------------------------------------------------------------------------------------------------------

def test_checkerboard_samples_lie_in_white_squares_uniformly() -> None:
    n = 40000
    x = make_toy_dataset("checkerboard").sample(n, generator=_gen(2)).double().numpy()
    assert x.min() >= -4.0 and x.max() <= 4.0
    # Own check: 4x4 board of side-2 squares on [-4, 4]^2, square (i, j) white iff i + j even.
    cell = np.clip(np.floor((x + 4.0) / 2.0).astype(int), 0, 3)
    assert np.all((cell.sum(axis=1) % 2) == 0)
    assert checkerboard_white_mask(torch.from_numpy(x)).all()
    # Each of the 8 white squares gets 1/8 of the mass, and positions are uniform inside a square.
    keys, counts = np.unique(cell, axis=0, return_counts=True)
    assert len(keys) == 8
    assert np.all(np.abs(counts / n - 1 / 8) < _binomial_tolerance(1 / 8, n))
    offset = (x + 4.0) / 2.0 - cell  # in [0, 1]^2
    np.testing.assert_allclose(offset.mean(axis=0), 0.5, atol=0.01)
    np.testing.assert_allclose(offset.var(axis=0), 1 / 12, atol=0.003)
    # Custom scale.
    y = make_toy_dataset("checkerboard", scale=1.0).sample(1000, generator=_gen(2)).numpy()
    assert np.abs(y).max() <= 1.0


def test_checkerboard_mask_on_hand_built_points() -> None:
    points = torch.tensor([
        [-3.0, -3.0],  # square (0, 0): white
        [-1.0, -3.0],  # square (1, 0): black
        [1.0, -1.0],   # square (2, 1): black
        [3.0, 3.0],    # square (3, 3): white
        [-1.0, -1.0],  # square (1, 1): white
        [5.0, 0.0],    # off the board
        [0.0, 1.0],    # on an interior grid line: touches a white square
    ])
    expected = torch.tensor([True, False, False, True, True, False, True])
    assert torch.equal(checkerboard_white_mask(points), expected)
    with pytest.raises(ValueError, match="x"):
        checkerboard_white_mask(torch.zeros(4, 3))


# ----------------------------------------------------------------------------------------------------------
# moons
# ----------------------------------------------------------------------------------------------------------

def test_moons_without_noise_lie_on_the_two_half_circles() -> None:
    n = 20000
    x = make_toy_dataset("moons", noise=0.0).sample(n, generator=_gen(5)).double().numpy()
    p = x / 2.0 + np.array([0.5, 0.25])  # undo centring and scale 2
    on_upper = (np.abs(np.linalg.norm(p, axis=1) - 1.0) < 1e-5) & (p[:, 1] >= -1e-5)
    on_lower = (np.abs(np.linalg.norm(p - np.array([1.0, 0.5]), axis=1) - 1.0) < 1e-5) & (p[:, 1] <= 0.5 + 1e-5)
    assert np.all(on_upper | on_lower)
    assert abs(on_upper.mean() - 0.5) < _binomial_tolerance(0.5, n)
    assert x[:, 0].min() >= -3.0 - 1e-5 and x[:, 0].max() <= 3.0 + 1e-5
    assert x[:, 1].min() >= -1.5 - 1e-5 and x[:, 1].max() <= 1.5 + 1e-5


def test_moons_with_noise_are_roughly_in_range_and_centred() -> None:
    x = make_toy_dataset("moons").sample(20000, generator=_gen(6)).double().numpy()
    assert np.abs(x).max() < 3.7
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.05)


# ----------------------------------------------------------------------------------------------------------
# assign_modes
# ----------------------------------------------------------------------------------------------------------

def test_assign_modes_on_hand_built_points() -> None:
    mixture = GaussianMixture2D(means=torch.tensor([[0.0, 0.0], [10.0, 0.0]]), std=1.0,
                                weights=torch.tensor([0.5, 0.5]))
    points = torch.tensor([
        [0.5, 0.0],                 # mode 0
        [9.0, 1.0],                 # mode 1 (distance sqrt(2))
        [2.9, 0.0],                 # mode 0, inside 3 std
        [3.1, 0.0],                 # outlier
        [5.0, 0.0],                 # outlier (5 std from both)
        [0.0, -2.99],               # mode 0
        [float("nan"), 0.0],        # non-finite: outlier
    ])
    labels = assign_modes(points, mixture)
    assert labels.dtype == torch.long
    assert labels.tolist() == [0, 1, 0, -1, -1, 0, -1]
    assert assign_modes(points, mixture, max_sigmas=4.0).tolist() == [0, 1, 0, 0, -1, 0, -1]


def test_assign_modes_outlier_rate_of_exact_samples() -> None:
    dataset = make_toy_dataset("grid25")
    n = 50000
    labels = assign_modes(dataset.sample(n, generator=_gen(7)), dataset.mixture)
    # P(|N(0, s^2 I_2)| > 3 s) = exp(-9/2).
    expected = math.exp(-4.5)
    assert abs(float((labels == -1).double().mean()) - expected) < _binomial_tolerance(expected, n)


def test_assign_modes_bad_inputs() -> None:
    mixture = make_toy_dataset("ring8").mixture
    with pytest.raises(ValueError, match="x"):
        assign_modes(torch.zeros(5, 3), mixture)
    with pytest.raises(ValueError, match="x"):
        assign_modes(torch.zeros(5), mixture)
    with pytest.raises(ValueError, match="mixture"):
        assign_modes(torch.zeros(5, 2), None)
    with pytest.raises(ValueError, match="max_sigmas"):
        assign_modes(torch.zeros(5, 2), mixture, max_sigmas=0.0)
