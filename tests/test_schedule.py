"""piflow.schedule: segment grids, explicit step lists and the temperature rule shared by training and sampling."""
import pytest

from piflow.schedule import (auto_temperature, check_nfe, check_raw_times, dx_segment_size, resolve_temperature,
                             segment_grid)


def test_segment_grid_known_values():
    assert segment_grid(4, 0.5) == pytest.approx([1.0, 1 - 1 / 3.5, 1 - 2 / 3.5, 1 - 3 / 3.5])
    assert segment_grid(1) == [1.0] and dx_segment_size(1) == 1.0 and dx_segment_size(4, 0.5) == pytest.approx(1 / 3.5)
    assert check_nfe(3.0) == 3
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="nfe"):
            check_nfe(bad)


def test_explicit_raw_times():
    assert check_raw_times([1.0, 0.5, 0.1]) == [1.0, 0.5, 0.1]
    for bad in ([], [0.5, 0.7], [1.0, 0.0], [1.5], [1.0, 1.0]):
        with pytest.raises(ValueError, match="sigmas"):
            check_raw_times(bad)


def test_temperature_rule():
    assert [auto_temperature(n) for n in (1, 4, 8, 20)] == pytest.approx([0.0, 0.3, 0.7, 1.0])
    assert resolve_temperature("auto", 4) == pytest.approx(0.3) and resolve_temperature(0, 4) == 0.0
    for bad in (-0.1, float("nan"), float("inf"), "hot", True, None):
        with pytest.raises(ValueError, match="temperature"):
            resolve_temperature(bad, 4)
