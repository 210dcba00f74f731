"""PiIDSettings: one typed object for the π-ID settings, with checks naming the field."""
import pytest

from piflow.settings import PiIDSettings, policy_kind


def test_defaults_and_policy_dependent_dropout():
    gm, dx = PiIDSettings(), PiIDSettings(policy="dx")
    assert gm.policy == "gmflow" and gm.policy_dropout == 0.05 and dx.policy_dropout == 0.0
    assert PiIDSettings(policy="gm").policy == "gmflow" and policy_kind("GMFlow") == "gmflow"
    assert PiIDSettings(policy="dx", policy_dropout=0.2).policy_dropout == 0.2      # DX dropout too (§14)
    assert gm.sampling == {"nfe": 4, "shift": 1.0, "final_step_size_scale": 1.0, "total_substeps": 128}


def test_from_mapping_takes_known_keys_and_the_old_alias():
    section = {"nfe": 2, "gm_dropout": 0.1, "batch_size": 64, "data_free": True, "shift": 3}
    settings = PiIDSettings.from_mapping(section, policy="gm")
    assert (settings.nfe, settings.policy_dropout, settings.shift, settings.policy) == (2, 0.1, 3.0, "gmflow")
    assert isinstance(settings.shift, float)
    assert PiIDSettings.from_mapping(settings.to_dict()) == settings


@pytest.mark.parametrize("field,value", [("nfe", 0), ("nfe", 1.5), ("nfe", True), ("shift", 0.0),
                                         ("final_step_size_scale", -1.0), ("num_intermediate_states", 0),
                                         ("window_substeps", -1), ("policy_dropout", 1.0), ("loss_scale", 0),
                                         ("total_substeps", 0), ("num_decay_iters", -1), ("policy", "flow"),
                                         ("shift", "3")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field if field != "policy" else "policy"):
        PiIDSettings(**{field: value})


def test_teacher_ratio_follows_the_schedule():
    settings = PiIDSettings(num_decay_iters=10)
    assert [settings.teacher_ratio(i) for i in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert PiIDSettings().teacher_ratio(0) == 0.0


def test_the_old_name_keeps_its_old_meaning():
    with pytest.raises(ValueError, match="only policy_dropout"):
        PiIDSettings.from_mapping({"gm_dropout": 0.1, "policy_dropout": 0.2})
    with pytest.raises(ValueError, match="GMFlow policies only"):
        PiIDSettings.from_mapping({"gm_dropout": 0.1}, policy="dx")
    assert PiIDSettings.from_mapping({"gm_dropout": 0.0}, policy="dx").policy_dropout == 0.0


def test_one_rule_for_the_old_dropout_name():
    """`rename_old_dropout` is what `PiIDSettings.from_mapping` (hence `PiFlow` keywords) and old config files use."""
    from piflow.config import upgrade_config
    from piflow.settings import rename_old_dropout

    assert rename_old_dropout({"gm_dropout": 0.2, "nfe": 2}, "gm") == {"policy_dropout": 0.2, "nfe": 2}
    assert rename_old_dropout({"gm_dropout": 0.2}, None) == {"policy_dropout": 0.2}
    assert rename_old_dropout({"gm_dropout": 0.05}, "x0", old_file=True) == {"policy_dropout": 0.0}
    assert rename_old_dropout({"gm_dropout": 0}, "DX") == {"policy_dropout": 0.0}
    with pytest.raises(ValueError, match="^gm_dropout applies to GMFlow policies only"):
        rename_old_dropout({"gm_dropout": 0.05}, "dx")
    template = {"distill": {"policy_dropout": None}}
    for section, policy in (({"gm_dropout": 0.2}, "gmflow"), ({"gm_dropout": 0.05}, "dx")):
        upgraded = upgrade_config({"student": {"policy": policy}, "distill": section}, template)["distill"]
        assert upgraded == rename_old_dropout(section, policy, old_file=True)
    assert PiIDSettings.from_mapping({}, gm_dropout=0.2).policy_dropout == pytest.approx(0.2)
    assert PiIDSettings.from_mapping({"gm_dropout": 0.2}, policy_dropout=0.3).policy_dropout == pytest.approx(0.3)


def test_policy_dropout_defaults_live_in_settings():
    """0.05: the authors' ImageNet / GM default; 0.1: their text-to-image configs (the recipe uses the same)."""
    from piflow.settings import DEFAULT_POLICY_DROPOUT, TEXT_TO_IMAGE_POLICY_DROPOUT

    assert DEFAULT_POLICY_DROPOUT == {"gmflow": 0.05, "dx": 0.0}
    assert TEXT_TO_IMAGE_POLICY_DROPOUT == {"gmflow": 0.1, "dx": 0.0}


def test_one_default_for_total_substeps():
    import importlib
    import inspect

    from piflow import sampling, schedule

    rollout_module = importlib.import_module("piflow.rollout")      # `piflow.rollout` is also the function's name

    assert schedule.DEFAULT_TOTAL_SUBSTEPS == rollout_module.DEFAULT_TOTAL_SUBSTEPS == 128
    assert PiIDSettings().total_substeps == schedule.DEFAULT_TOTAL_SUBSTEPS
    for function in (rollout_module.rollout, rollout_module.rollout_tau, sampling.sample):
        assert inspect.signature(function).parameters["total_substeps"].default == schedule.DEFAULT_TOTAL_SUBSTEPS
