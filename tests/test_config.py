"""Config loading: YAML + key=value overrides against defaults, with clear errors."""
from pathlib import Path

import pytest

from piflow.config import ConfigError, load_config, parse_overrides

DEFAULTS = {"dataset": "ring8", "distill": {"nfe": 2, "gm_dropout": 0.05, "data_free": False},
            "eval": {"steps": [1, 2]}}


def test_overrides_are_parsed_as_yaml_scalars():
    assert parse_overrides(["distill.nfe=4", "dataset=moons", "eval.steps=[1,8]"]) == {
        "distill": {"nfe": 4}, "dataset": "moons", "eval": {"steps": [1, 8]}}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  nfe: 3\n  gm_dropout: 0\n")
    config = load_config(DEFAULTS, path, ["distill.data_free=true"])
    assert config["distill"] == {"nfe": 3, "gm_dropout": 0.0, "data_free": True}
    assert isinstance(config["distill"]["gm_dropout"], float)
    assert DEFAULTS["distill"]["nfe"] == 2  # defaults untouched


@pytest.mark.parametrize("override, word", [
    (["distill.nfee=4"], "distill.nfee"),
    (["bogus=1"], "bogus"),
    (["distill.nfe=four"], "distill.nfe"),
    (["distill.nfe=2.5"], "distill.nfe"),
    (["distill.data_free=1"], "distill.data_free"),
    (["distill=3"], "distill"),
    (["eval.steps=3"], "eval.steps"),
    (["novalue"], "key=value"),
])
def test_bad_overrides_name_the_key(override, word):
    with pytest.raises(ConfigError, match=word.replace(".", r"\.")):
        load_config(DEFAULTS, None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DEFAULTS, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DEFAULTS, bad)


def test_exponent_numbers_without_a_dot():
    """YAML 1.1 reads `1e-3` as a string; numeric keys accept it (and reject words)."""
    from piflow.config import ConfigError, load_config

    defaults = {"lr": 1.0, "iters": 10}
    assert load_config(defaults, None, ["lr=1e-3", "iters=1e3"]) == {"lr": 1e-3, "iters": 1000}
    for bad in ("lr=fast", "iters=1.5", "iters=inf", "iters=nan"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(defaults, None, [bad])


def test_a_quoted_number_is_a_string_not_a_number(tmp_path):
    """In a file and in an override, 1e-3 and 2E5 are numbers; "5" and '1e-3' (quoted) are strings, refused by
    numeric keys with a one-line error naming the key."""
    defaults = {"lr": 1.0, "iters": 10, "name": "x"}
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-3\niters: 2E5\nname: '5'\n")
    assert load_config(defaults, good) == {"lr": 1e-3, "iters": 200000, "name": "5"}
    for text in ('iters: "5"\n', "lr: '1e-3'\n"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match="must be a number, got the string") as error:
            load_config(defaults, bad)
        assert text.split(":")[0] in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="'iters' must be a number, got the string '5'"):
        load_config(defaults, None, ["iters='5'"])


@pytest.mark.parametrize("override,fragment", [
    ("distill.nfe=true", "must be a number"), ("distill.nfe=[1,2]", "single value"),
    ("distill.gm_dropout={a: 1}", "single value"), ("eval.steps=3", "must be a list"),
    ("dataset=5", "must be a string"), ("distill=5", "must be a mapping")])
def test_values_are_checked_against_the_defaults_types(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(DEFAULTS, None, [override])


def test_file_values_do_not_change_the_type_an_override_is_checked_against(tmp_path):
    """A config file that (wrongly) sets a number key to true does not make `key=32` a type error."""
    path = tmp_path / "c.yaml"
    path.write_text("distill: {nfe: 3}\n")
    assert load_config(DEFAULTS, path, ["distill.nfe=4"])["distill"]["nfe"] == 4
    path.write_text("distill: {nfe: yes}\n")
    with pytest.raises(ConfigError, match="distill.nfe"):
        load_config(DEFAULTS, path, ["distill.nfe=4"])


def test_conflicting_and_deep_overrides():
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["train=5", "train.iters=3"])
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["train.iters=3", "train=5"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["train..iters=3"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["a=" + "[" * 3000 + "]" * 3000])


def test_number_or_auto_settings():
    defaults = {"t": 1.0, "u": "auto"}
    assert load_config(defaults, None, ["t=auto", "u=0.5"]) == {"t": "auto", "u": 0.5}


def test_config_files_are_safe_and_unambiguous(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: ring8\ndataset: moons\n")
    with pytest.raises(ConfigError, match="duplicate key 'dataset'"):
        load_config(DEFAULTS, path)
    path.write_text("dataset: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DEFAULTS, path)


def test_yaml_merge_keys_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {nfe: 3, gm_dropout: 0.1}\n")
    path.write_text("distill: {<<: {nfe: 3, gm_dropout: 0.1}, nfe: 5}\n")
    assert load_config(DEFAULTS, path)["distill"] == {"nfe": 5, "gm_dropout": 0.1, "data_free": False}


def test_typed_none_defaults_still_check_overrides():
    # a default of None that names its type (Optional_) takes null or that type, nothing else
    from piflow.config import Optional_, dataclass_defaults
    from piflow.train import TrainConfig

    defaults = {"data": {"root": Optional_(str), "image_size": Optional_(int)},
                "train": dataclass_defaults(TrainConfig)}
    assert isinstance(defaults["train"]["checkpoint_every"], Optional_)      # Optional[int] = None in TrainConfig
    config = load_config(defaults, overrides=["data.image_size=8", "train.checkpoint_every=5"])
    assert config["data"] == {"root": None, "image_size": 8} and config["train"]["checkpoint_every"] == 5
    assert load_config(defaults)["train"]["checkpoint_every"] is None
    for override, message in (("data.image_size=big", "must be a number"), ("data.image_size=2.5", "integer"),
                              ("data.root=[a, b]", "single value"), ("train.checkpoint_every=yes", "number")):
        with pytest.raises(ConfigError, match=message):
            load_config(defaults, overrides=[override])
    assert load_config(defaults, overrides=["data.root=null"])["data"]["root"] is None
    # the train section is TrainConfig's defaults (the single source), tuples as YAML lists
    assert defaults["train"]["betas"] == [0.9, 0.95] and defaults["train"]["lr"] == TrainConfig().lr


def test_old_key_names_are_accepted():
    from piflow.config import Optional_

    defaults = {"distill": {"nfe": 2, "policy_dropout": Optional_(float)}}
    assert load_config(defaults, overrides=["distill.gm_dropout=0.1"])["distill"]["policy_dropout"] == 0.1


def test_old_configs_are_upgraded_with_their_old_meaning():
    from piflow.config import Optional_, upgrade_config

    defaults = {"student": {"policy": "gmflow"}, "distill": {"nfe": 2, "policy_dropout": Optional_(float)},
                "data": {"root": Optional_(str)}}
    # the recipes never applied gm_dropout to DX/x0 students: an old DX config means no dropout
    assert upgrade_config({"student": {"policy": "dx"}, "distill": {"gm_dropout": 0.05}}, defaults)["distill"] == {
        "policy_dropout": 0.0}
    assert load_config(defaults, {"distill": {"gm_dropout": 0.1}})["distill"]["policy_dropout"] == 0.1
    with pytest.raises(ConfigError, match="old name"):
        load_config(defaults, {"distill": {"gm_dropout": 0.1, "policy_dropout": 0.2}})
    with pytest.raises(ConfigError, match="string or null"):        # data.root=yes is never a path
        load_config(defaults, overrides=["data.root=yes"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_shipped_config_resolves(path):
    """Each file in configs/ is a valid config of its recipe (unknown keys or bad types would be errors): the
    text-to-image ones (a ``pipeline`` key) with a pipeline given; the method configs name their method and carry
    its settings."""
    from piflow.cli import _resolve_training_config
    from piflow.cli_parser import build_parser
    from piflow.files import read_yaml

    written = read_yaml(path)
    command = "train-teacher" if path.name.startswith("teacher_") else "distill"
    extra = ["pipeline=org/model"] if "pipeline" in written else []
    recipe, config = _resolve_training_config(build_parser().parse_args(
        [command, "-c", str(path), "--run-dir", "unused", *extra]))
    assert recipe == ("t2i" if extra else "image" if written["dataset"] == "digits" else "2d")
    if command == "distill":
        assert config["method"] == written.get("method", "piid")
        section = written.get(written.get("method"))
        if section is not None:
            assert {key: config[written["method"]][key] for key in section} == section
