"""Tests for piflow.timewarp: the shift warp σ = m·τ/(1 + (m−1)·τ), its inverse, and the dynamic-shift rule."""
import math

import pytest
import torch

from piflow.timewarp import dynamic_shift, unwarp, warp

pytestmark = pytest.mark.usefixtures("single_thread")

SHIFTS = [0.25, 0.5, 1.0, 1.7, 3.0, 3.2, 10.0]


def _odds(p):
    return p / (1 - p)


@pytest.mark.parametrize("shift", SHIFTS)
def test_warp_matches_odds_scaling(shift):
    # Independent characterisation: the warp multiplies the odds σ/(1−σ) by m, i.e. σ/(1−σ) = m·τ/(1−τ).
    tau = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    sigma = warp(tau, shift)
    torch.testing.assert_close(_odds(sigma), shift * _odds(tau), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shift", SHIFTS)
def test_warp_unwarp_are_exact_inverses_tensor(shift):
    tau = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    torch.testing.assert_close(unwarp(warp(tau, shift), shift), tau, rtol=0, atol=1e-14)
    torch.testing.assert_close(warp(unwarp(tau, shift), shift), tau, rtol=0, atol=1e-14)
    # float32 tensors keep their dtype and are inverted to float32 precision
    tau32 = tau.float()
    out = unwarp(warp(tau32, shift), shift)
    assert out.dtype == torch.float32 and out.shape == tau32.shape
    # float32 round trip: error amplified by at most the warp's condition number max(m, 1/m)
    torch.testing.assert_close(out, tau32, rtol=0, atol=2.4e-7 * max(shift, 1 / shift))
    # broadcasting shapes are preserved
    tau_b = torch.rand(3, 1, 1, dtype=torch.float64)
    assert warp(tau_b, shift).shape == (3, 1, 1)


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("tau", [0.0, 0.1, 1 / 3.5, 0.5, 0.77, 1.0])
def test_warp_unwarp_floats(shift, tau):
    sigma = warp(tau, shift)
    assert isinstance(sigma, float)
    assert sigma == pytest.approx(shift * tau / (1 + (shift - 1) * tau), rel=1e-14, abs=1e-15)
    back = unwarp(sigma, shift)
    assert isinstance(back, float)
    assert back == pytest.approx(tau, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("shift", SHIFTS)
def test_endpoints_fixed_and_monotone(shift):
    for fn in (warp, unwarp):
        assert fn(0.0, shift) == 0.0
        assert fn(1.0, shift) == pytest.approx(1.0, abs=1e-15)
        ends = fn(torch.tensor([0.0, 1.0], dtype=torch.float64), shift)
        torch.testing.assert_close(ends, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-15)
        grid = fn(torch.linspace(0, 1, 2001, dtype=torch.float64), shift)
        assert bool((grid.diff() > 0).all())
        assert bool((grid >= 0).all()) and bool((grid <= 1 + 1e-15).all())


def test_shift_direction():
    # m > 1 pushes σ up (more noise at the same raw time), m < 1 down, m = 1 identity.
    assert warp(0.5, 3.2) == pytest.approx(3.2 * 0.5 / (1 + 2.2 * 0.5))
    assert warp(0.5, 3.2) > 0.5 > warp(0.5, 0.5)
    assert warp(0.37, 1.0) == 0.37 and unwarp(0.37, 1.0) == 0.37


def test_dynamic_shift_endpoints_and_linearity():
    assert dynamic_shift(256) == pytest.approx(math.exp(0.5), rel=1e-12)
    assert dynamic_shift(4096) == pytest.approx(math.exp(1.15), rel=1e-12)
    # log m is linear in L: the midpoint of the sequence lengths gives the mean log shift
    assert math.log(dynamic_shift((256 + 4096) // 2)) == pytest.approx((0.5 + 1.15) / 2, rel=1e-12)
    assert math.log(dynamic_shift(1024)) == pytest.approx(0.5 + (1024 - 256) * 0.65 / 3840, rel=1e-12)
    # custom parameters
    assert dynamic_shift(10, base_seq_len=10, max_seq_len=20, base_logshift=0.1,
                         max_logshift=0.3) == pytest.approx(math.exp(0.1))
    assert dynamic_shift(20, base_seq_len=10, max_seq_len=20, base_logshift=0.1,
                         max_logshift=0.3) == pytest.approx(math.exp(0.3))


def test_dynamic_shift_errors():
    with pytest.raises(ValueError):
        dynamic_shift(0)
    with pytest.raises(ValueError):
        dynamic_shift(100, base_seq_len=64, max_seq_len=64)


@pytest.mark.parametrize("bad", [0.0, -1.0, -3.2, float("nan"), float("inf"), float("-inf")])
def test_bad_shift_raises(bad):
    with pytest.raises(ValueError, match="shift"):
        warp(0.5, bad)
    with pytest.raises(ValueError, match="shift"):
        unwarp(0.5, bad)
    with pytest.raises(ValueError, match="shift"):
        warp(torch.tensor([0.5]), bad)
