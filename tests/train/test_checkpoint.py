"""The safe checkpoint format: exact round trips of training states, and clear errors for anything else."""
import json
import math

import pytest
import torch

from piflow.errors import CheckpointError
from piflow.train.checkpoint import decode_state, encode_state, load_checkpoint, save_checkpoint


def test_round_trip_keeps_every_type(tmp_path):
    weight = torch.randn(3, 4)
    state = {"step": 7, "lr": 1e-3, "flags": [True, False, None], "name": "x", "betas": (0.9, 0.95),
             "nan": math.nan, "inf": -math.inf, "int_keys": {0: {"step": torch.tensor(3.0)}, 12: "a"},
             "nested": {"a": [1, (2, 3.5)], "$odd": 1}, "model": {"w": weight, "tied": weight},
             "view": weight[1], "bytes": torch.arange(5, dtype=torch.uint8), "empty": torch.zeros(0)}
    save_checkpoint(tmp_path / "c.safetensors", state)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded["step"] == 7 and loaded["lr"] == 1e-3 and loaded["flags"] == [True, False, None]
    assert loaded["betas"] == (0.9, 0.95) and isinstance(loaded["betas"], tuple)
    assert math.isnan(loaded["nan"]) and loaded["inf"] == -math.inf
    assert list(loaded["int_keys"]) == [0, 12] and torch.equal(loaded["int_keys"][0]["step"], torch.tensor(3.0))
    assert loaded["nested"] == {"a": [1, (2, 3.5)], "$odd": 1}
    assert torch.equal(loaded["model"]["w"], weight) and torch.equal(loaded["model"]["tied"], weight)
    assert torch.equal(loaded["view"], weight[1]) and loaded["bytes"].dtype == torch.uint8
    assert loaded["empty"].shape == (0,)


def test_optimizer_and_rng_states_round_trip_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(5)
    state = {"step": 2, "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
    save_checkpoint(tmp_path / "c.safetensors", state)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, value in optimizer.state_dict()["state"].items():
        assert all(torch.equal(value[k], fresh.state_dict()["state"][key][k]) for k in value)
    generator.manual_seed(1)
    generator.set_state(loaded["generator"])
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(5)))


def test_the_header_is_plain_json(tmp_path):
    """A person (or another tool) can read the state without piflow: safetensors metadata holding strict JSON."""
    from safetensors import safe_open

    save_checkpoint(tmp_path / "c.safetensors", {"step": 1, "loss": math.nan, "w": torch.ones(2)})
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        assert sorted(handle.keys()) == ["w"]
    record = json.loads(metadata["piflow_checkpoint"], parse_constant=lambda token: pytest.fail(token))
    assert record == {"format": "piflow-checkpoint-v2",
                      "state": {"step": 1, "loss": {"$float": "nan"}, "w": {"$tensor": "w"}}}


def test_header_lengths_that_start_like_a_pickle_still_load(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length; 0x80 (a pickle's first byte)
    must not make a valid checkpoint look like a legacy pickle."""
    from safetensors.torch import load_file  # noqa: F401  (the format under test)

    found = 0
    for size in range(1, 400):
        path = tmp_path / "c.safetensors"
        save_checkpoint(path, {"step": 1, "note": "x" * size, "w": torch.zeros(1)})
        if path.read_bytes()[0] == 0x80:
            found += 1
            assert load_checkpoint(path)["note"] == "x" * size
    assert found >= 2


def test_same_state_same_bytes(tmp_path):
    """The metadata is one key, so the bytes do not depend on a hash-map order (checked across processes)."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch; from piflow.train.checkpoint import save_checkpoint; "
            "save_checkpoint(sys.argv[1], {'step': 1, 'w': torch.zeros(2), 'h': [{'loss': 0.5}]})")
    blobs = set()
    for i in range(2):                # two processes with different string-hash seeds
        env = dict(os.environ, PYTHONHASHSEED=str(i))
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True, env=env)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1


def test_unsupported_values_and_broken_references():
    with pytest.raises(TypeError, match="set"):
        encode_state({"step": 1, "bad": {1, 2}})
    with pytest.raises(CheckpointError, match="missing tensor"):
        decode_state({"w": {"$tensor": "nope"}}, {})


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoint.safetensors")
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="convert-checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.safetensors")
