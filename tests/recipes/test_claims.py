"""The claims benchmark's bookkeeping (seed statistics, resumable rows, goals) and a tiny end-to-end run."""
import math

import pytest

from piflow.recipes import claims


def test_summarise_gives_mean_and_sample_std_over_seeds():
    rows = [{"method": "m", "nfe": 4, "seed": s, "family": "student", "fd": v, "note": "x"}
            for s, v in enumerate([1.0, 2.0, 4.0])]
    rows.append({"method": "teacher Euler", "nfe": 4, "seed": None, "family": "teacher", "fd": 3.0})
    summary = claims.summarise(rows)
    entry = claims._find(summary, "m", 4)
    assert entry["seeds"] == 3 and entry["fd"] == pytest.approx(7 / 3)
    assert entry["fd_std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    teacher = claims._find(summary, "teacher Euler", 4)
    assert teacher["fd"] == 3.0 and "fd_std" not in teacher
    table = claims.format_markdown(summary, [("fd", "FD", "{:.2f}")])
    assert "| m | 4 | 3 | 2.33 ± 1.53 |" in table and "| teacher Euler | 4 | 1 | 3.00 |" in table


def test_row_store_never_recomputes_a_stored_row(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"fd": 0.5}

    store = claims.RowStore(tmp_path, lambda message: None)
    first = store.get("π-ID GM K=8", 4, 0, compute, family="student")
    again = claims.RowStore(tmp_path, lambda message: None).get("π-ID GM K=8", 4, 0, compute, family="student")
    assert calls == [1] and first == again and again["fd"] == 0.5
    assert [row["seed"] for row in store.all()] == [0]


def test_goals_compare_means():
    summary = [{"method": claims.METHOD_LABELS["piid"], "nfe": 4, "modes_covered": 8.0, "mode_mass_error": 0.02},
               {"method": "teacher Euler", "nfe": 8, "modes_covered": 8.0, "mode_mass_error": 0.03},
               {"method": claims.METHOD_LABELS["dmd2"], "nfe": 4, "mode_mass_error": 0.2}]
    goals = claims.check_toy_goals(summary)
    assert goals["nfe4_piid_mode_mass_error_le_teacher_euler8"] is True
    assert goals["nfe4_dmd2_mode_mass_error"] == 0.2 and goals["nfe4_piid_modes_covered"] == 8.0


@pytest.mark.slow
def test_tiny_toy_claims_run_finishes_and_resumes(tmp_path):
    messages = []
    results = claims.run_toy(tmp_path, "ring8", seeds=1, iters=4, num_samples=300, log=messages.append)
    methods = {(e["method"], e["nfe"]) for e in results["summary"]}
    assert {(claims.METHOD_LABELS["piid"], 4), (claims.METHOD_LABELS["dmd2"], 4),
            (claims.METHOD_LABELS["meanflow_scratch"], 1), ("teacher Euler", 8)} <= methods
    assert (tmp_path / "results.md").is_file() and (tmp_path / "quality_vs_diversity.png").is_file()
    messages.clear()
    again = claims.run_toy(tmp_path, "ring8", seeds=1, iters=4, num_samples=300, log=messages.append)
    assert not any("training" in m or "distilling" in m for m in messages)      # everything came from the run dir
    assert again["summary"] == results["summary"]


@pytest.mark.slow
def test_tiny_image_claims_and_settings_sweep_share_a_run(tmp_path, monkeypatch):
    """A tiny digits run (bundled teacher; one NFE per method, no x0 student, whose 4096-trajectory bank dominates
    the time): every method's row, the HF reference identity, a resume that trains nothing, and the settings sweep
    reusing the claims run's π-ID student (identical scores for the same student on the same noise)."""
    from piflow.recipes import settings_sweep

    monkeypatch.setattr(claims, "IMAGE_NFES", {"piid": (4,), "x0": (), "dmd2": (4,)})
    monkeypatch.setattr(claims, "MEANFLOW_NFES", (1,))
    monkeypatch.setattr(claims, "TEACHER_EULER_STEPS", (4, 32))
    monkeypatch.setattr(claims, "TEACHER_DPM_STEPS", (4,))
    kwargs = dict(seeds=1, iters=2, num_samples=60, feature_epochs=1, meanflow_scratch_seeds=0)
    messages = []
    results = claims.run_images(tmp_path, "digits", log=messages.append, **kwargs)
    summary = {(e["method"], e["nfe"]): e for e in results["summary"]}
    for kind, nfe in (("piid", 4), ("dmd2", 4), ("meanflow_init", 1)):
        assert (claims.METHOD_LABELS[kind], nfe) in summary
    assert summary["teacher Euler", 32]["hf_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 <= summary["real test images", 0]["label_accuracy_b"] <= 1.0
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "quality_vs_diversity.png").is_file()
    messages.clear()
    assert claims.run_images(tmp_path, "digits", log=messages.append, **kwargs)["summary"] == results["summary"]
    assert not any("training" in m or "distilling" in m for m in messages)

    sweep = settings_sweep.run_settings_sweep(tmp_path, "digits", nfe=4, iters=2, seeds=1, num_samples=60,
                                              log=messages.append)
    rows = {e["method"]: e for e in sweep["summary"]}
    assert len(rows) == 2 + len(settings_sweep.TRAINING_VARIANTS) + len(settings_sweep.SAMPLING_VARIANTS) + 1
    assert rows[settings_sweep.DEFAULT_LABEL]["fd_teacher"] == summary[claims.METHOD_LABELS["piid"], 4]["fd_teacher"]
    assert (tmp_path / "sweep" / "samples.png").is_file() and (tmp_path / "sweep" / "results.md").is_file()


def test_row_keys_parse_and_name_the_known_ones():
    assert claims.parse_row_keys(["dmd2:1", "meanflow_init", "piid:4"]) == [("dmd2", 1), ("meanflow_init", None),
                                                                           ("piid", 4)]
    with pytest.raises(ValueError, match="known: piid:4"):
        claims.parse_row_keys(["dmd2:3"])
