"""The settings sweep's sampling variant "end on x̂0 at the last step's start", against exact identities."""
import pytest
import torch

import piflow
from piflow.data.toy2d import make_toy_dataset
from piflow.models import MLPVelocityModel2D
from piflow.models.students import PolicyStudent
from piflow_bench.settings_sweep import last_step_x0

pytestmark = pytest.mark.usefixtures("single_thread")


def _pf(policy: str, nfe: int, **kwargs) -> piflow.PiFlow:
    mixture = make_toy_dataset("ring8").mixture
    teacher = piflow.GaussianMixtureTeacher(mixture.means, mixture.std, mixture.weights)
    student = PolicyStudent(MLPVelocityModel2D(hidden_size=16, num_layers=2), policy, init_from_teacher=False,
                            logstd_hidden=8, generator=torch.Generator().manual_seed(0), **kwargs)
    return piflow.PiFlow(student, teacher, policy=policy, nfe=nfe)


@pytest.mark.parametrize("nfe", [1, 3])
def test_constant_x0_policy_lands_on_its_last_x0(nfe):
    """A one-node DX (x0-regression) policy rolls out exactly onto its x̂0, so stopping at the last step's x̂0
    changes nothing."""
    pf = _pf("dx", nfe, num_nodes=1)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(last_step_x0(pf, noise, nfe, None), pf.sample(noise, nfe=nfe), atol=1e-5)


def test_one_step_x0_is_the_policy_mean_at_the_noise():
    pf = _pf("gmflow", 1, num_components=4)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    sigma = torch.ones(32)
    with torch.no_grad():
        expected = pf.policy(noise, sigma).x0(noise, sigma)
        got = last_step_x0(pf, noise, 1, None)
        assert torch.allclose(got, expected, atol=1e-6)
        assert not torch.allclose(got, pf.sample(noise, nfe=1), atol=1e-3)   # a GM rollout does differ


def test_training_variants_keep_the_default_first_and_reject_unknown_names():
    from piflow_bench.settings_sweep import DEFAULT_LABEL, TRAINING_VARIANTS, training_variants

    assert training_variants(None) == TRAINING_VARIANTS
    chosen = training_variants(["k_32", "3x_training_steps"])
    assert [label for label, _, _ in chosen] == [DEFAULT_LABEL, "3x training steps", "K=32"]   # table order
    assert chosen[1][2] == 3 and chosen[2][1] == ("student.num_components=32",)
    assert [label for label, _, _ in training_variants([])] == [DEFAULT_LABEL]
    with pytest.raises(ValueError, match=r"unknown settings \['k_3'\]; known: .*k_32"):
        training_variants(["k_3"])


def test_sampling_variants_at_one_nfe_drop_the_temperature_and_each_nfe_has_its_directory(tmp_path):
    from piflow_bench.settings_sweep import SAMPLING_VARIANTS, sampling_variants, sweep_dir

    assert sampling_variants(4) == sampling_variants(2) == SAMPLING_VARIANTS
    kept = sampling_variants(1)
    assert kept and all("temperature" not in kwargs for _, kwargs in kept)
    assert len(kept) == len([v for v in SAMPLING_VARIANTS if "temperature" not in v[1]])
    assert sweep_dir(tmp_path) == tmp_path / "sweep" and sweep_dir(tmp_path, 1) == tmp_path / "sweep_nfe1"
