"""Published ImageNet teacher layouts load into piflow's DiT as the same function (to float round-off), in piflow's
time and sign conventions; unsafe files are refused without running their code."""
import argparse

import pytest
import torch

from checkpoint_layouts import TINY, authors_reference, random_state, sit_reference, sit_shapes, write_files
from piflow.errors import CheckpointError
from piflow.models import DiT
from piflow.models.imported import detect_layout, import_teacher, read_checkpoint, select_weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("layouts"))


def _inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["channels"], TINY["side"], TINY["side"], generator=generator)
    sigma = torch.tensor([0.93, 0.41, 0.07])[:batch]
    y = torch.tensor([0, 7, TINY["classes"]])[:batch]          # the last one is the null class
    return x, sigma, y


def _ours(model: DiT, x, sigma, y):
    with torch.no_grad():
        return model(x, sigma * 1000.0, y).double()


def _max_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_sit_release_is_the_same_function_in_sigma_and_u(files):
    state = torch.load(files["sit_release"], weights_only=True)
    model = import_teacher(files["sit_release"], num_heads=TINY["heads"])
    x, sigma, y = _inputs()
    # SiT: t = 1 − σ (t = 1 is data) and it predicts x0 − ε, i.e. −u; the learn-sigma channels are dropped
    reference = -sit_reference(state, x, 1.0 - sigma, y, TINY)
    assert model.config.time_reversed and model.config.timestep_scale == 1.0
    assert model.out_channels == TINY["channels"]
    assert _max_error(_ours(model, x, sigma, y), reference) < 1e-5
    # a wrong mapping is caught: the same σ fed un-reversed differs
    assert _max_error(-sit_reference(state, x, sigma, y, TINY), reference) > 1e-2


def test_sit_training_checkpoint_loads_ema_by_default_and_model_on_request(files):
    stored = torch.load(files["sit_train"], weights_only=False)        # our own file: the test may unpickle it
    assert isinstance(stored["args"], argparse.Namespace)
    x, sigma, y = _inputs()
    for weights in ("ema", "model"):
        model = import_teacher(files["sit_train"], weights=weights, num_heads=TINY["heads"])
        reference = -sit_reference(stored[weights], x, 1.0 - sigma, y, TINY)
        assert _max_error(_ours(model, x, sigma, y), reference) < 1e-5


def test_repa_checkpoint_drops_the_projector_and_keeps_time_and_sign(files):
    stored = torch.load(files["repa_train"], weights_only=False)
    model = import_teacher(files["repa_train"], num_heads=TINY["heads"])
    assert not any(key.startswith("projectors") for key in model.state_dict())
    x, sigma, y = _inputs()
    reference = sit_reference(stored["ema"], x, sigma, y, TINY)            # REPA: t = σ, predicts ε − x0
    assert _max_error(_ours(model, x, sigma, y), reference) < 1e-5


@pytest.mark.parametrize("layout, scale", [("authors-repa", 1.0), ("authors-fm", 1000.0)])
def test_authors_layout_with_its_two_timestep_scales(files, layout, scale):
    stored = torch.load(files["authors"], weights_only=True)["state_dict"]
    model = import_teacher(files["authors"], layout=layout, num_heads=TINY["heads"], input_size=TINY["side"])
    x, sigma, y = _inputs()
    reference = authors_reference(stored, x, sigma * scale, y, TINY)
    assert _max_error(_ours(model, x, sigma, y), reference) < 1e-5
    assert model.config.mlp_norm_eps == 1e-5


def test_authors_layout_must_be_named_and_needs_the_input_size(files):
    with pytest.raises(CheckpointError, match="authors-repa .* authors-fm"):
        import_teacher(files["authors"], num_heads=TINY["heads"], input_size=TINY["side"])
    with pytest.raises(CheckpointError, match="input_size"):
        import_teacher(files["authors"], layout="authors-fm", num_heads=TINY["heads"])
    with pytest.raises(CheckpointError, match="keys are those of the 'sit' layout"):
        import_teacher(files["sit_release"], layout="authors-fm", num_heads=TINY["heads"])


def test_converted_teacher_round_trips_through_save_pretrained(files, tmp_path):
    model = import_teacher(files["repa_train"], num_heads=TINY["heads"])
    model.save_pretrained(tmp_path / "teacher")
    again = DiT.from_pretrained(tmp_path / "teacher")
    x, sigma, y = _inputs()
    assert torch.equal(_ours(model, x, sigma, y), _ours(again, x, sigma, y))


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _RunsCode.ran = True
    return {}


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"x_embedder.proj.weight": torch.zeros(1)}, "hook": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused") as error:
        read_checkpoint(path)
    assert "\n" not in str(error.value)
    assert not _RunsCode.ran


def test_bad_contents_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        select_weights({"model": {"a": torch.zeros(1)}, "opt": {}})
    with pytest.raises(CheckpointError, match="expected tensors only"):
        select_weights({"a": torch.zeros(1), "b": 3})
    with pytest.raises(CheckpointError, match="none of the known DiT layouts"):
        detect_layout({"foo.weight": torch.zeros(1)})
    state = random_state(sit_shapes(**TINY), 0, TINY)
    state["pos_embed"] = state["pos_embed"] + 0.5                          # not the fixed sin-cos table
    path = tmp_path / "bad_pos.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="pos_embed"):
        import_teacher(path, num_heads=TINY["heads"])
    state = random_state(sit_shapes(**TINY), 0, TINY)
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not define"):
        import_teacher(path, num_heads=TINY["heads"])
    with pytest.raises(CheckpointError, match="num_heads"):
        import_teacher(tmp_path / "bad_pos.pt")


def test_real_xl_keys_need_no_extra_arguments():
    """The SiT-XL/2 table (675M parameters, meta tensors: no memory) converts with heads and size inferred."""
    from piflow.models.imported import to_piflow_state

    spec = dict(channels=4, side=32, patch=2, hidden=1152, depth=28, mlp=4, classes=1000, freq=256)
    table = sit_shapes(**spec)
    assert len(table) == 292 and len(sit_shapes(**spec, repa=True, z_dim=768, projector_dim=2048)) == 298
    state = {key: torch.empty(shape, device="meta") for key, shape in table.items()}
    state["pos_embed"] = torch.from_numpy(__import__("checkpoint_layouts").mae_position_table(1152, 16)).float()[None]
    config, converted = to_piflow_state(state, "sit")
    assert (config.num_heads, config.depth, config.input_size, config.num_classes) == (16, 28, (32, 32), 1000)
    with torch.device("meta"):
        model = DiT(config)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in converted.values())
    assert converted["proj_out.weight"].shape == (16, 1152)                # learn-sigma rows dropped


def test_convert_checkpoint_cli_writes_a_teacher_folder(files, tmp_path, capsys, monkeypatch):
    from piflow.cli import main
    from piflow.models import imported

    monkeypatch.setitem(imported._HEADS_BY_WIDTH, TINY["hidden"], TINY["heads"])
    out = tmp_path / "teacher"
    assert main(["convert-checkpoint", str(files["authors"]), "--out", str(out), "--layout", "authors-fm",
                 "--input-size", str(TINY["side"])]) == 0
    assert "use it as teacher=" in capsys.readouterr().out
    stored = torch.load(files["authors"], weights_only=True)["state_dict"]
    x, sigma, y = _inputs()
    from checkpoint_layouts import authors_reference

    assert _max_error(_ours(DiT.from_pretrained(out), x, sigma, y),
                      authors_reference(stored, x, sigma * 1000.0, y, TINY)) < 1e-5
    assert main(["convert-checkpoint", str(files["authors"]), "--out", str(out)]) == 2        # not empty
    assert main(["convert-checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "does not exist" in err
