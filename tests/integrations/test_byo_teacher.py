"""The bring-your-own-teacher protocol on a fourth family (examples/byo_teacher_auraflow.py: AuraFlow)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from piflow.integrations.diffusers.adapter import load_piflow_adapter  # noqa: E402
from piflow.integrations.diffusers.students import (Architecture, DiffusersPolicyStudent,  # noqa: E402
                                                    DiffusersTeacher, register_architecture)

pytestmark = pytest.mark.usefixtures("single_thread")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "byo_teacher_auraflow.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("byo_teacher_auraflow", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_declared_student_starts_at_the_teacher(example, policy):
    transformer = example.tiny_auraflow()
    teacher = DiffusersTeacher(transformer, example.AURAFLOW)
    student = DiffusersPolicyStudent(transformer, policy, num_components=3, num_nodes=4, latent_channels=4,
                                     head_noise_std=0.0, logstd_hidden=16, architecture="auraflow").eval()
    x, sigma = torch.randn(2, 4, 16, 16), torch.tensor([0.9, 0.2])
    cond = {"encoder_hidden_states": torch.randn(2, 6, 16)}
    u = teacher(x, sigma, cond)
    with torch.no_grad():
        out = student(x, sigma, cond)
    first = out["u_grid"][:, 0] if policy == "dx" else out["means"][:, 1]
    torch.testing.assert_close(first, u, atol=1e-5, rtol=1e-5)   # replicated teacher projection, no noise


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_worked_example_trains_and_round_trips(example, policy, tmp_path, capsys):
    result = example.main(["--iters", "10", "--out", str(tmp_path / "adapter"), "--policy", policy])
    assert result["last_loss"] < result["first_loss"]
    assert result["round_trip_max_abs_diff"] == 0.0
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert config["base_class"] == "AuraFlowTransformer2DModel" and config["architecture"] == "auraflow"
    capsys.readouterr()
    with pytest.raises(ValueError, match="is for a AuraFlowTransformer2DModel"):
        load_piflow_adapter(torch.nn.Linear(2, 2), tmp_path / "adapter")


def test_register_architecture_validates():
    with pytest.raises(ValueError, match="layout"):
        register_architecture(Architecture("bad", lambda *a: {}, lambda *a: None, "xy", True, lambda t: [],
                                           base_class="X"))
    with pytest.raises(ValueError, match="base_class"):
        register_architecture(Architecture("bad", lambda *a: {}, lambda *a: None, "cp", True, lambda t: []))
    with pytest.raises(ValueError, match="register_architecture"):
        DiffusersTeacher(torch.nn.Linear(2, 2), "not-registered")
