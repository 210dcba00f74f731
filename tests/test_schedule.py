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


def test_parse_temperature_is_the_one_rule():
    from piflow.schedule import is_auto, parse_temperature

    for given, want in ((" AUTO ", "auto"), ("Auto", "auto"), ("0.25", 0.25), (" 2 ", 2.0), (0, 0.0), (1.5, 1.5)):
        assert parse_temperature(given) == want
    assert resolve_temperature(" AUTO ", 4) == pytest.approx(0.3) and resolve_temperature("0.5", 4) == 0.5
    assert is_auto("aUtO") and not is_auto("automatic") and not is_auto(1.0)
    for bad in ("hot", "", "-0.1", "nan", "inf", -1, True, None, [1.0]):
        with pytest.raises(ValueError, match="^temperature must be a (finite )?number >= 0 or 'auto', got"):
            parse_temperature(bad)


@pytest.mark.parametrize("text", [" AUTO ", "auto", "0.5", "3", "-1", "hot", "nan", "1e400"])
def test_cli_ui_and_config_follow_parse_temperature(text):
    """The CLI option, the UI's fields and a config file accept and refuse exactly what `parse_temperature` does."""
    from types import SimpleNamespace

    from piflow.cli import _temperature
    from piflow.config import load_config
    from piflow.errors import ConfigError
    from piflow.recipes.common import check_settings
    from piflow.schedule import parse_temperature
    from piflow.ui import playground, text_to_image

    # the fields the UI checks read besides the temperature (a 2-D unconditional model; a text-to-image pipeline)
    model = SimpleNamespace(kind="2d", num_classes=0, label="ring8", pf=SimpleNamespace(
        settings=SimpleNamespace(total_substeps=16)))
    loaded = SimpleNamespace(multiple=16, takes_references=False, takes_negative_prompt=False,
                             family=SimpleNamespace(name="flux", references="none"))
    try:
        want = parse_temperature(text)
    except ValueError:
        want = None
    parsers = (_temperature,
               lambda value: playground.check_settings(model, 2, 0, 4, "all", value).temperature,
               lambda value: text_to_image.check_request(loaded, "a cat", 0, 64, 64, 2, value).temperature,
               lambda value: check_settings(load_config({"eval": {"temperature": 1.0}},
                                                        overrides=[f"eval.temperature={value}"])) or "checked")
    outcomes = []
    for parse in parsers:
        try:
            outcomes.append(parse(text))
        except (ValueError, ConfigError):
            outcomes.append(None)
    assert outcomes[:3] == [want, want, want]
    assert (outcomes[3] is None) == (want is None), outcomes[3]
