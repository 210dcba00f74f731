"""Tests for the feature-space image metrics (FD, KID, PRDC, class histograms) against closed forms and brute force."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from piflow.eval.image_metrics import (
    class_histogram,
    class_histogram_tv,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    precision_recall_density_coverage,
)

# Many small tensor ops: one intra-op thread avoids synchronisation overhead on a busy machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=_gen(seed))


def _random_spd(d: int, seed: int) -> torch.Tensor:
    a = _randn(d, d, seed)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(d, d, seed))
    return q


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------

def test_feature_statistics_match_numpy():
    f = _randn(50, 4, 0)
    mu, cov = feature_statistics(f)
    assert mu.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.numpy().mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(f.numpy(), rowvar=False), rtol=1e-12)
    mu32, _ = feature_statistics(f.float())
    assert mu32.dtype == torch.float64


def test_fd_diagonal_covariances_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_fd_commuting_covariances_closed_form():
    d = 6
    q = _random_orthogonal(d, 1)
    lam1 = torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    lam2 = torch.linspace(2.0, 0.05, d, dtype=torch.float64)
    cov1, cov2 = q @ torch.diag(lam1) @ q.T, q @ torch.diag(lam2) @ q.T
    mu1, mu2 = _randn(1, d, 2)[0], _randn(1, d, 3)[0]
    expected = float(((mu1 - mu2) ** 2).sum() + ((lam1.sqrt() - lam2.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-9)


def test_fd_non_commuting_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    d = 8
    cov1, cov2 = _random_spd(d, 4), _random_spd(d, 5)
    mu1, mu2 = _randn(1, d, 6)[0], _randn(1, d, 7)[0]
    root = linalg.sqrtm(cov1.numpy() @ cov2.numpy())
    expected = float(((mu1 - mu2) ** 2).sum()) + float(torch.trace(cov1) + torch.trace(cov2)) \
        - 2.0 * float(np.trace(root).real)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)


def test_fd_of_identical_and_translated_sets():
    f = _randn(300, 16, 8)
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    shift = torch.full((16,), 0.5, dtype=torch.float64)
    assert frechet_distance_from_features(f, f + shift) == pytest.approx(16 * 0.25, rel=1e-9)


def test_fd_is_symmetric_and_matches_statistics():
    f1, f2 = _randn(200, 10, 9), 1.5 * _randn(150, 10, 10) + 0.3
    forward, backward = frechet_distance_from_features(f1, f2), frechet_distance_from_features(f2, f1)
    assert forward > 0
    assert forward == pytest.approx(backward, rel=1e-9)
    assert forward == pytest.approx(frechet_distance(*feature_statistics(f1), *feature_statistics(f2)), rel=1e-12)


def test_fd_handles_rank_deficient_covariances():
    # Fewer samples than dimensions: singular covariances, still finite and non-negative.
    f1, f2 = _randn(5, 20, 11), _randn(6, 20, 12)
    value = frechet_distance_from_features(f1, f2)
    assert math.isfinite(value) and value >= 0


def test_fd_rejects_bad_inputs():
    mu, cov = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="cov1"):
        frechet_distance(mu, torch.eye(2), mu, cov)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(mu, cov, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(mu, torch.triu(torch.ones(3, 3)), mu, cov)
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(torch.tensor([0.0, float("nan"), 0.0]), cov, mu, cov)
    with pytest.raises(ValueError, match="f2"):
        frechet_distance_from_features(_randn(10, 3, 0), _randn(10, 4, 1))
    with pytest.raises(ValueError, match="f1"):
        frechet_distance_from_features(_randn(1, 3, 0), _randn(10, 3, 1))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(torch.zeros(4))


# ----------------------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------------------

def _brute_force_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased polynomial-kernel MMD^2 by explicit double loops."""
    m, d = x.shape

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** degree

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2.0 * xy


def test_kid_matches_brute_force_on_tiny_set():
    x, y = _randn(7, 3, 13), _randn(7, 3, 14) + 0.4
    expected = _brute_force_mmd2(x.numpy(), y.numpy())
    # subset_size >= N: every subset is the whole set (in some order), so each subset gives the same value.
    result = kernel_inception_distance(x, y, num_subsets=5, subset_size=100)
    assert result["mean"] == pytest.approx(expected, rel=1e-10)
    assert result["std"] == pytest.approx(0.0, abs=1e-12)
    quadratic = kernel_inception_distance(x, y, num_subsets=1, subset_size=7, degree=2)
    assert quadratic["mean"] == pytest.approx(_brute_force_mmd2(x.numpy(), y.numpy(), degree=2), rel=1e-10)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    x, y = _randn(600, 8, 15), _randn(600, 8, 16)
    same = kernel_inception_distance(x, y, num_subsets=20, subset_size=200, seed=1)
    shifted = kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=200, seed=1)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3
    assert shifted["mean"] > 0.5 and shifted["mean"] > 20 * same["std"]


def test_kid_is_seeded_and_clamps_subset_size():
    x, y = _randn(40, 4, 17), _randn(30, 4, 18)
    a = kernel_inception_distance(x, y, num_subsets=4, subset_size=1000, seed=3)
    b = kernel_inception_distance(x, y, num_subsets=4, subset_size=1000, seed=3)
    c = kernel_inception_distance(x, y, num_subsets=4, subset_size=1000, seed=4)
    assert a == b and a != c
    assert math.isfinite(a["mean"]) and a["std"] > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"num_subsets": 0}, "num_subsets"),
    ({"subset_size": 1}, "subset_size"),
    ({"degree": 0}, "degree"),
    ({"seed": 1.5}, "seed"),
])
def test_kid_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernel_inception_distance(_randn(10, 3, 0), _randn(10, 3, 1), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage
# ----------------------------------------------------------------------------------------------------------

def _brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    r, s = radii(real), radii(fake)
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # (N, M)
    return {
        "precision": float(np.mean([(d[:, j] <= r).any() for j in range(len(fake))])),
        "recall": float(np.mean([(d[i] <= s).any() for i in range(len(real))])),
        "density": float(sum((d[:, j] <= r).sum() for j in range(len(fake))) / (k * len(fake))),
        "coverage": float(np.mean([d[i].min() <= r[i] for i in range(len(real))])),
    }


def test_prdc_identical_sets():
    x = _randn(60, 5, 19)
    result = precision_recall_density_coverage(x, x.clone(), k=3)
    assert result["precision"] == result["recall"] == result["coverage"] == 1.0
    assert result["density"] == pytest.approx(_brute_force_prdc(x.numpy(), x.numpy(), 3)["density"])


def test_prdc_disjoint_far_sets():
    x = _randn(40, 4, 20)
    result = precision_recall_density_coverage(x, _randn(30, 4, 21) + 100.0, k=5)
    assert result == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_hand_built_line():
    # Reals at 0..9 (k=1 radius 1 each); fakes at 0.5 and 100 (k=1 radius 99.5 each).
    real = torch.arange(10, dtype=torch.float64)[:, None]
    fake = torch.tensor([[0.5], [100.0]], dtype=torch.float64)
    result = precision_recall_density_coverage(real, fake, k=1)
    assert result == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.2})


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_prdc_matches_brute_force(chunk_size):
    real, fake = _randn(45, 3, 22), 1.3 * _randn(35, 3, 23) + 0.5
    expected = _brute_force_prdc(real.numpy(), fake.numpy(), 4)
    result = precision_recall_density_coverage(real, fake, k=4, chunk_size=chunk_size)
    assert result == pytest.approx(expected, abs=1e-12)


def test_prdc_rejects_bad_inputs():
    x = _randn(10, 3, 0)
    with pytest.raises(ValueError, match="k"):
        precision_recall_density_coverage(x, x, k=0)
    with pytest.raises(ValueError, match="fake_features"):
        precision_recall_density_coverage(x, x[:5], k=5)
    with pytest.raises(ValueError, match="fake_features"):
        precision_recall_density_coverage(x, _randn(10, 4, 1))
    with pytest.raises(ValueError, match="real_features"):
        precision_recall_density_coverage(torch.zeros(10), x)
    with pytest.raises(ValueError, match="chunk_size"):
        precision_recall_density_coverage(x, x, chunk_size=0)


# ----------------------------------------------------------------------------------------------------------
# Class histograms
# ----------------------------------------------------------------------------------------------------------

def test_class_histogram_from_labels_and_logits():
    labels = torch.tensor([0, 2, 2, 3, 3, 3])
    hist = class_histogram(labels, 5)
    assert hist.dtype == torch.float64
    assert hist.tolist() == pytest.approx([1 / 6, 0.0, 2 / 6, 3 / 6, 0.0])
    logits = torch.nn.functional.one_hot(labels, 5).double() * 3.0 - 1.0
    assert torch.equal(class_histogram(logits, 5), hist)
    assert torch.equal(class_histogram(labels.double(), 5), hist)


def test_class_histogram_rejects_bad_inputs():
    with pytest.raises(ValueError, match="labels_or_logits"):
        class_histogram(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="labels_or_logits"):
        class_histogram(torch.tensor([-1, 0]), 5)
    with pytest.raises(ValueError, match="labels_or_logits"):
        class_histogram(torch.zeros(4, 3), 5)
    with pytest.raises(ValueError, match="labels_or_logits"):
        class_histogram(torch.tensor([0.5, 1.0]), 5)
    with pytest.raises(ValueError, match="labels_or_logits"):
        class_histogram(torch.zeros(0, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="num_classes"):
        class_histogram(torch.tensor([0]), 0)


def test_class_histogram_tv():
    hist = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert class_histogram_tv(hist, hist) == 0.0
    assert class_histogram_tv(hist, torch.tensor([0.0, 0.0, 0.5, 0.5])) == pytest.approx(1.0)
    assert class_histogram_tv(hist) == pytest.approx(0.5)  # against uniform
    assert class_histogram_tv(torch.tensor([2.0, 2.0, 0.0, 0.0]), torch.tensor([1, 1, 1, 1])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="target"):
        class_histogram_tv(hist, torch.ones(3))
    with pytest.raises(ValueError, match="hist"):
        class_histogram_tv(torch.tensor([-0.1, 1.1]))
    with pytest.raises(ValueError, match="hist"):
        class_histogram_tv(torch.zeros(3))


def test_high_frequency_fraction_known_cases():
    from piflow.eval.image_metrics import high_frequency_fraction

    size, cutoff = 16, 0.5
    assert high_frequency_fraction(torch.ones(3, 1, size, size), cutoff) == 0.0
    # white noise: its power spreads evenly over the frequency grid, so the share is the grid's share beyond cutoff
    freq = torch.fft.fftfreq(size).abs() * 2
    radius = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt()
    expected = float((radius > cutoff).sum()) / (size * size - 1)          # the DC term is removed with the mean
    noise = torch.randn(400, 1, size, size, generator=torch.Generator().manual_seed(0))
    assert abs(high_frequency_fraction(noise, cutoff) - expected) < 0.01
    grid = torch.arange(size, dtype=torch.float64)
    checkerboard = ((-1.0) ** (grid[:, None] + grid[None, :])).reshape(1, 1, size, size)   # the Nyquist corner
    assert high_frequency_fraction(checkerboard, cutoff) == pytest.approx(1.0)
    smooth = torch.cos(2 * torch.pi * grid / size)[None, :].expand(size, size).reshape(1, 1, size, size)
    assert high_frequency_fraction(smooth, cutoff) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_fraction(noise, 1.5)
    with pytest.raises(ValueError, match="images must have shape"):
        high_frequency_fraction(torch.zeros(4, 16))


def test_nearest_neighbour_distances_match_brute_force():
    from piflow.eval.image_metrics import nearest_neighbour_distances

    queries, reference = torch.randn(7, 1, 3, 3, generator=_gen(5)), torch.randn(11, 1, 3, 3, generator=_gen(6))
    brute = torch.tensor([min(float((q - r).double().norm()) for r in reference) for q in queries],
                         dtype=torch.float64)
    got = nearest_neighbour_distances(queries, reference, chunk_size=3)
    assert torch.allclose(got, brute, atol=1e-10)
    assert torch.equal(nearest_neighbour_distances(reference[:4], reference), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="queries and reference"):
        nearest_neighbour_distances(queries, reference[:, :, :2])


def test_data_distance_ratio_known_cases():
    """Copies of the training set measure 0; held-out draws from the training distribution about 1; a point set
    scaled away from the data (distances doubled) exactly 2."""
    from piflow.eval.image_metrics import data_distance_ratio

    train, held_out, fresh = (torch.randn(n, 4, generator=_gen(seed)) for n, seed in ((400, 1), (200, 2), (200, 3)))
    assert data_distance_ratio(train[:50], held_out, train) == 0.0
    assert 0.85 < data_distance_ratio(fresh, held_out, train) < 1.15
    # one training point as the whole reference set: distances scale with the offset exactly
    origin = torch.zeros(1, 4)
    assert data_distance_ratio(2 * held_out, held_out, origin) == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match="held_out"):
        data_distance_ratio(fresh, train[:5], train)


def test_isolated_bright_pixels_counts_lone_dots_only():
    from piflow.eval import isolated_bright_pixels

    images = -torch.ones(3, 1, 6, 6)
    images[0, 0, 0, 0] = 1.0            # a lone dot in the corner (outside counts as dark)
    images[0, 0, 3, 3] = 0.5            # another lone dot
    images[1, 0, 1:5, 2] = 1.0          # a stroke: no pixel is alone
    images[2, 0, 2, 2] = images[2, 0, 3, 3] = 1.0      # diagonal neighbours: not isolated
    assert isolated_bright_pixels(images) == pytest.approx(2 / 3)
    assert isolated_bright_pixels(images, threshold=0.7) == pytest.approx((1 + 0 + 0) / 3)
    assert isolated_bright_pixels(torch.rand(4, 1, 6, 6) * 0 - 1) == 0.0
