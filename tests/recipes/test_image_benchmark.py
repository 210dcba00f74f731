"""The image benchmark table (benchmarks/piflow_bench/image_table.py) and the toy-trajectory recipe, end to end on a
tiny digits teacher."""
import json

import pytest

pytest.importorskip("sklearn")

from piflow.cli import main  # noqa: E402
from piflow_bench import image_table  # noqa: E402
from tiny_runs import TINY_DIT_RUN  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--run-dir", str(run), "dataset=digits", "train.iters=15",
                 "flow_matching.batch_size=32", *TINY_DIT_RUN]) == 0
    return run


def test_benchmark_rows_and_goals(tmp_path, tiny_teacher, monkeypatch):
    monkeypatch.setattr(image_table, "STUDENTS", [
        ("x0_nfe2", ["method=x0", "distill.nfe=2", "distill.x0_bank_size=64", "distill.batch_size=8"], [2]),
        ("gm_k8_nfe4", ["distill.nfe=4", "distill.batch_size=8", "distill.total_substeps=16"], [4, 2]),
    ])
    results = image_table.run_benchmark(tmp_path / "bench", iters=2, num_samples=60, teacher_run=tiny_teacher,
                                        feature_epochs=1, log=lambda message: None)
    rows = results["rows"]
    assert {"teacher Euler 1", "teacher Euler 32", "x0_nfe2 @ 2 NFE", "gm_k8_nfe4 @ 4 NFE",
            "gm_k8_nfe4 @ 2 NFE (elastic)"} <= set(rows)
    # the teacher's own 32-step samples are the coupling reference: zero error by construction
    assert rows["teacher Euler 32"]["coupling_rmse"] == 0.0
    assert rows["teacher Euler 1"]["coupling_rmse"] > 0.0
    # ... and the reference of the high-frequency measure: ratio 1 by construction
    assert rows["teacher Euler 32"]["hf_ratio"] == pytest.approx(1.0, abs=1e-12)
    for row in rows.values():
        assert row["fd_teacher"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["coverage"] <= 1
        assert row["fd_teacher_b"] >= 0 and 0 <= row["recall_b"] <= 1     # the second feature space
    assert results["feature_net_b"]["val_accuracy"] >= 0
    assert "gm4_fd_teacher_over_floor" in results["goals"]
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["rows"].keys() == rows.keys()
    assert (tmp_path / "bench" / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "bench" / "fd_teacher_vs_nfe.png").is_file()


def test_toy_trajectory_fits_a_static_policy(tmp_path, tiny_teacher):
    assert main(["toy-trajectory", "--teacher", str(tiny_teacher), "--run-dir", str(tmp_path / "toy"),
                 "--iters", "60", "--components", "8", "--snapshot-every", "30"]) == 0
    metrics = json.loads((tmp_path / "toy" / "metrics.json").read_text())
    errors = metrics["rmse_vs_teacher_ode_by_iteration"]
    assert errors["60"] < errors["0"]                 # fitting moves the policy's endpoint towards the teacher ODE
    assert (tmp_path / "toy" / "snapshots.png").is_file()
    assert main(["toy-trajectory", "--teacher", str(tiny_teacher), "--run-dir", str(tmp_path / "bad"),
                 "--label", "12"]) == 2
