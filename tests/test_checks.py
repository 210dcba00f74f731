"""piflow.checks: the shared input checks and random draws."""
import math

import numpy as np
import pytest
import torch

from piflow.checks import (NonFiniteError, as_batch_sigma, check_finite, check_int, check_number, draw, is_int,
                           positive_float, positive_int)


def test_integer_checks():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert positive_int(np.int32(4), "n") == 4 and check_int(0, "w", 0) == 0
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="n must be a positive int"):
            positive_int(bad, "n")
    with pytest.raises(ValueError, match="w must be an integer >= 0"):
        check_int(-1, "w", 0)


def test_number_checks():
    assert check_number(0.5, "p", 0.0, 1.0, high_open=True) == 0.5 and positive_float(2, "s") == 2.0
    for bad in (1.0, math.nan, math.inf, True, "0.5"):
        with pytest.raises(ValueError, match=r"p must be a finite number in \[0.0, 1.0\)"):
            check_number(bad, "p", 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match="s must be a positive finite number"):
        positive_float(0.0, "s")


def test_check_finite_and_draw():
    check_finite(torch.ones(3), "x")
    with pytest.raises(NonFiniteError, match="x contains non-finite"):
        check_finite(torch.tensor([1.0, math.nan]), "x")
    a = draw("normal", (4, 2), torch.Generator().manual_seed(0), "cpu")
    b = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and draw("uniform", (3,), None, "cpu").shape == (3,)


def test_sigma_broadcasting():
    assert as_batch_sigma(0.5, 3, 4, "cpu").shape == (3, 1, 1, 1)
    assert torch.equal(as_batch_sigma(torch.tensor([0.2]), 3, 1, "cpu"), torch.full((3,), 0.2))
    with pytest.raises(ValueError, match="sigma_t must have shape"):
        as_batch_sigma(torch.rand(2), 3, 2, "cpu", name="sigma_t")
    with pytest.raises(ValueError, match=r"must lie in \[0.0, 1.0\]"):
        as_batch_sigma(1.5, 2, 2, "cpu")


def test_check_state_is_the_shared_state_check():
    """One check serves the policies, the rollout and the exact teacher: shape (None = any), finiteness, σ."""
    from piflow import GaussianMixtureTeacher, GMFlowPolicy, rollout
    from piflow.checks import NonFiniteError, check_state

    x = torch.zeros(3, 2)
    sigma = check_state(x, "x", (None, 2), 0.5, "sigma", dtype=torch.float64)
    assert sigma.shape == (3, 1) and sigma.dtype == torch.float64 and float(sigma[0, 0]) == 0.5
    with pytest.raises(ValueError, match=r"^x must have shape \(B, 3\), got \(3, 2\)$"):
        check_state(x, "x", (None, 3), 0.5, "sigma")
    with pytest.raises(ValueError, match=r"^x must have the state shape, got \(3, 2\)$"):
        check_state(x, "x", (3, 2, 1), 0.5, "sigma", expected="the state shape")
    with pytest.raises(NonFiniteError, match="^x contains non-finite"):
        check_state(torch.full((3, 2), float("nan")), "x", (3, 2), 0.5, "sigma")
    with pytest.raises(ValueError, match=r"^sigma must lie in \[0.0, 1.0\]"):
        check_state(x, "x", (3, 2), 1.5, "sigma")
    # the same rule, worded by each caller
    policy = GMFlowPolicy(torch.zeros(3, 2, 2), torch.zeros(3), torch.zeros(3, 2, 1), x, 1.0)
    teacher = GaussianMixtureTeacher(torch.zeros(2, 2), 0.5)
    for call, fragment in ((lambda: policy.x0(torch.zeros(2, 2), 0.5), "x_t must have the policy's state shape"),
                           (lambda: rollout(policy, torch.zeros(3, 3), 1.0, 0.0), "x_src must have the policy's"),
                           (lambda: teacher(torch.zeros(3, 3), 0.5), r"x_t must have shape \(B, 2\)"),
                           (lambda: GMFlowPolicy(torch.zeros(3, 2, 2), torch.zeros(3), torch.zeros(3, 2, 1),
                                                 torch.zeros(3, 2), 1.5), "sigma_src must lie in")):
        with pytest.raises(ValueError, match=fragment):
            call()
    with pytest.raises(NonFiniteError, match="x_t contains non-finite"):
        policy.velocity(torch.full((3, 2), float("inf")), 0.5)
