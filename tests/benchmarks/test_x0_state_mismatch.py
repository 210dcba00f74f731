"""benchmarks/x0_state_mismatch.py: the x0 student's error from the teacher-ODE state against the straight-line state
of the same endpoint, checked against the teacher's Euler trajectories computed here."""
import pytest
import torch

pytest.importorskip("sklearn")

import x0_state_mismatch  # noqa: E402
from piflow.cli import main  # noqa: E402
from piflow.recipes import images  # noqa: E402
from piflow.sampling import euler_trajectory  # noqa: E402
from tiny_runs import TINY_DIT_RUN  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("x0_mismatch")
    assert main(["train-teacher", "--run-dir", str(root / "teacher"), "dataset=digits", "train.iters=10",
                 "flow_matching.batch_size=16", *TINY_DIT_RUN]) == 0
    common = ["dataset=digits", f"teacher={root / 'teacher'}", "train.iters=2", "distill.batch_size=4",
              "distill.total_substeps=16", *TINY_DIT_RUN[3:]]
    assert main(["distill", "--run-dir", str(root / "x0"), *common, "method=x0", "distill.nfe=4",
                 "distill.x0_bank_size=12"]) == 0
    assert main(["distill", "--run-dir", str(root / "piid"), *common, "distill.nfe=2"]) == 0
    return root


def test_errors_match_the_teachers_own_trajectories(runs, monkeypatch):
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(runs / "cache"))
    result = x0_state_mismatch.state_mismatch(runs / "x0", rows=5)
    assert result["sigma"] == [1.0, 0.75, 0.5, 0.25]
    # at σ = 1 both states are the noise itself
    assert result["state_distance"][0] == 0.0
    assert result["x0_rmse_ode_state"][0] == pytest.approx(result["x0_rmse_line_state"][0], rel=1e-6)
    assert min(result["state_distance"][1:]) > 0          # a learned teacher's ODE is not a straight line

    # by hand: the bank's noise and labels, the teacher's 32-step Euler trajectories, the student's x̂0
    student, config = images.load_student(runs / "x0")
    setup = images.distill_setup(config)
    gen = torch.Generator().manual_seed(int(config["train"]["seed"]) + 99)
    noise = torch.randn(12, *setup.shape, generator=gen)
    labels = setup.draw_cond(gen, 12)[7:]
    trajectory = euler_trajectory(setup.teacher, noise[7:], 32, labels)
    for point, index in enumerate([0, 8, 16, 24]):
        sigma = torch.full((5,), 1 - index / 32)
        endpoint = trajectory[-1]
        line = (1 - sigma[0]) * endpoint + sigma[0] * noise[7:]
        for key, x in (("x0_rmse_ode_state", trajectory[index]), ("x0_rmse_line_state", line)):
            with torch.no_grad():
                error = student.policy(x, sigma, labels).x0(x, sigma) - endpoint
            expected = error.flatten(1).square().mean(1).sqrt().mean()
            assert result[key][point] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
        assert result["state_distance"][point] == pytest.approx(
            float((trajectory[index] - line).flatten(1).square().mean(1).sqrt().mean()), rel=1e-4, abs=1e-6)


def test_bad_arguments_name_the_option(runs, monkeypatch, capsys):
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(runs / "cache"))
    with pytest.raises(SystemExit, match="--run-dir: .* expected an x0-regression run"):
        x0_state_mismatch.main(["--run-dir", str(runs / "piid")])
    with pytest.raises(SystemExit, match=r"--rows: expected 1 to 12"):
        x0_state_mismatch.main(["--run-dir", str(runs / "x0"), "--rows", "13"])
    assert x0_state_mismatch.main(["--run-dir", str(runs / "x0"), "--rows", "3", "--out",
                                   str(runs / "out.json")]) == 0
    assert '"x0_rmse_line_state"' in capsys.readouterr().out and (runs / "out.json").is_file()
