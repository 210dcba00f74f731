"""Diversity measures on constructed sets whose answers are known."""
import math

import pytest
import torch

from piflow.eval.diversity import mean_pairwise_distance, per_class_diversity, vendi_score


def _cloud(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_collapsed_set_has_no_diversity():
    collapsed = torch.tensor([[1.0, -2.0, 0.5]]).repeat(40, 1)
    assert mean_pairwise_distance(collapsed) == 0.0
    assert vendi_score(collapsed) == pytest.approx(1.0, abs=1e-9)


def test_orthogonal_features_count_as_distinct_samples():
    for n in (1, 5, 12):
        assert vendi_score(torch.eye(n) * 3.0) == pytest.approx(n, rel=1e-9)
    # two orthogonal directions, each taken by half the set: two effective samples
    half = torch.tensor([[1.0, 0.0]]).repeat(10, 1)
    assert vendi_score(torch.cat([half, half.flip(1)])) == pytest.approx(2.0, rel=1e-9)


def test_duplicating_every_sample():
    x = _cloud(30, 6)
    doubled = torch.cat([x, x])
    assert vendi_score(doubled) == pytest.approx(vendi_score(x), rel=1e-9)            # same spectrum of K/N
    # each distinct pair appears 4 times among the 2n(2n−1)/2 pairs of the doubled set; duplicates add zeros
    n = x.shape[0]
    expected = mean_pairwise_distance(x) * 4 * (n * (n - 1) / 2) / (2 * n * (2 * n - 1) / 2)
    assert mean_pairwise_distance(doubled) == pytest.approx(expected, rel=1e-9)


def test_brute_force_pairwise_distance_and_vendi():
    x = _cloud(17, 40, seed=3)          # D > N: the N×N branch of the Vendi spectrum
    brute = sum(float((x[i] - x[j]).norm()) for i in range(17) for j in range(i + 1, 17)) / (17 * 16 / 2)
    assert mean_pairwise_distance(x, chunk_size=5) == pytest.approx(brute, rel=1e-12)
    unit = x / x.norm(dim=1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(unit @ unit.T / 17).clamp(min=1e-300)
    assert vendi_score(x) == pytest.approx(math.exp(float(-(eigenvalues * eigenvalues.log()).sum())), rel=1e-9)
    y = _cloud(200, 5, seed=4)          # N > D: the D×D branch
    unit = y / y.norm(dim=1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(unit @ unit.T / 200).clamp(min=1e-300)
    assert vendi_score(y) == pytest.approx(math.exp(float(-(eigenvalues * eigenvalues.log()).sum())), rel=1e-7)


def test_iid_gaussian_samples_match_the_closed_form():
    """E‖x − y‖ for x, y ~ N(0, I_d) is 2·Γ((d+1)/2)/Γ(d/2); i.i.d. isotropic features have Vendi → d."""
    d = 8
    x = _cloud(4000, d, seed=5)
    expected = 2 * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    assert mean_pairwise_distance(x) == pytest.approx(expected, rel=0.01)
    assert vendi_score(x) == pytest.approx(d, rel=0.01)


def test_per_class_diversity_sees_a_collapsed_class():
    diverse = _cloud(20, 4, seed=6)
    collapsed = diverse[:1].repeat(20, 1)
    features = torch.cat([diverse, collapsed])
    labels = torch.tensor([0] * 20 + [1] * 20)
    result = per_class_diversity(features, labels)
    assert result["classes"] == 2 and result["per_class_pairwise_distance"][1] == 0.0
    assert result["per_class_vendi"][1] == pytest.approx(1.0, abs=1e-9)
    assert result["per_class_pairwise_distance"][0] == pytest.approx(mean_pairwise_distance(diverse), rel=1e-12)
    assert result["mean_pairwise_distance"] == pytest.approx(mean_pairwise_distance(diverse) / 2, rel=1e-12)
    # a class with one sample is left out, not counted as zero
    result = per_class_diversity(torch.cat([features, diverse[:1]]), torch.cat([labels, torch.tensor([2])]))
    assert result["classes"] == 2


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="features must have at least 2 row"):
        mean_pairwise_distance(torch.ones(1, 3))
    with pytest.raises(ValueError, match="all-zero rows"):
        vendi_score(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape \\(4,\\)"):
        per_class_diversity(torch.ones(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no class has 2 or more samples"):
        per_class_diversity(torch.ones(3, 2), torch.arange(3))
    with pytest.raises(ValueError, match="NaN"):
        vendi_score(torch.tensor([[1.0, float("nan")]]))
