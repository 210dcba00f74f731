"""The claims benchmark (benchmarks/piflow_bench): seed statistics, resumable rows, goals on crafted rows, the
rows-as-data plan, the equal-compute budget, and tiny end-to-end runs (slow)."""
import math

import pytest
import torch

from piflow_bench import goals, rows, students
from piflow_bench.driver import Claims, adopt_feature_nets, publish, run_claims


def test_summarise_gives_mean_and_sample_std_over_seeds():
    data = [{"method": "m", "nfe": 4, "seed": s, "family": "student", "fd": v, "note": "x"}
            for s, v in enumerate([1.0, 2.0, 4.0])]
    data.append({"method": "teacher Euler", "nfe": 4, "seed": None, "family": "teacher", "fd": 3.0})
    summary = rows.summarise(data)
    entry = rows.find(summary, "m", 4)
    assert entry["seeds"] == 3 and entry["fd"] == pytest.approx(7 / 3)
    assert entry["fd_std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    teacher = rows.find(summary, "teacher Euler", 4)
    assert teacher["fd"] == 3.0 and "fd_std" not in teacher
    table = rows.format_markdown(summary, [("fd", "FD", "{:.2f}")])
    assert "| m | 4 | 3 | 2.33 ± 1.53 |" in table and "| teacher Euler | 4 | 1 | 3.00 |" in table
    ordered = rows.ordered_summary(data + [{"method": "e", "nfe": 1, "seed": 0, "family": "equal-compute"}])
    assert [e["family"] for e in ordered] == ["teacher", "student", "equal-compute"]


def test_row_store_never_recomputes_a_stored_row(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"fd": 0.5}

    store = rows.RowStore(tmp_path, lambda message: None)
    first = store.get("π-ID GM K=8", 4, 0, compute, family="student")
    again = rows.RowStore(tmp_path, lambda message: None).get("π-ID GM K=8", 4, 0, compute, family="student")
    assert calls == [1] and first == again and again["fd"] == 0.5
    assert [row["seed"] for row in store.all()] == [0]


def _stored(directory, rows_data):
    store = rows.RowStore(directory, lambda message: None)
    for method, nfe, seed, family, values in rows_data:
        store.get(method, nfe, seed, lambda: dict(values), family=family)
    return store


def test_rows_are_imported_only_where_the_reference_rows_agree(tmp_path):
    """`import_rows` copies the other run's rows and figure samples it lacks, keeps its own, and refuses
    a run whose reference rows score differently (beyond round-off) or that shares none."""
    reference = [("teacher Euler", 4, None, "teacher", {"fd": 0.25, "recall": 0.9})]
    theirs = _stored(tmp_path / "theirs", reference + [("teacher Euler", 8, None, "teacher", {"fd": 0.2}),
                                                       ("π-ID GM K=8", 4, 0, "student", {"fd": 0.3}),
                                                       ("π-ID GM K=8", 4, 1, "student", {"fd": 0.4}),
                                                       ("DMD2", 4, 0, "student", {"fd": 0.9})])
    theirs.figure("π-ID GM K=8", 4, 0, lambda: torch.arange(6.0).reshape(3, 2))
    mine = _stored(tmp_path / "mine", [("teacher Euler", 4, None, "teacher", {"fd": 0.25 * (1 + 1e-6),
                                                                              "recall": 0.9}),
                                       ("DMD2", 4, 0, "student", {"fd": 0.8})])
    assert mine.import_rows(theirs.directory) == 3       # a teacher row only they hold comes too, not recomputed
    assert mine.read("teacher Euler", 8, None)["fd"] == 0.2
    assert mine.read("π-ID GM K=8", 4, 1)["fd"] == 0.4 and mine.read("DMD2", 4, 0)["fd"] == 0.8   # own row kept
    assert torch.equal(mine.figure("π-ID GM K=8", 4, 0, None), torch.arange(6.0).reshape(3, 2))
    assert mine.figure("π-ID GM K=8", 4, 1, None) is None
    other = _stored(tmp_path / "other", [("teacher Euler", 4, None, "teacher", {"fd": 0.26, "recall": 0.9})])
    with pytest.raises(ValueError, match="fd=0.25 there and 0.26 here"):
        other.import_rows(theirs.directory)
    assert other.read("π-ID GM K=8", 4, 0) is None
    unrelated = _stored(tmp_path / "unrelated", [("teacher Euler", 16, None, "teacher", {"fd": 0.25})])
    with pytest.raises(ValueError, match="shares no reference or teacher row"):
        unrelated.import_rows(theirs.directory)
    with pytest.raises(ValueError, match="holds no row files"):
        unrelated.import_rows(tmp_path / "empty")


def test_publish_copies_rows_classifiers_and_results_and_adopting_never_overwrites(tmp_path):
    run = tmp_path / "run"
    _stored(run, [("teacher Euler", 4, None, "teacher", {"fd": 0.25})]).figure("teacher Euler", 4, None,
                                                                               lambda: torch.ones(2))
    for name, text in (("feature_net", "a"), ("feature_net_b", "b")):
        (run / name).mkdir()
        (run / name / "config.json").write_text(text)
    (run / "results.md").write_text("table")
    publish(run, tmp_path / "published")
    published = tmp_path / "published"
    assert sorted(p.name for p in (published / "rows").iterdir()) == ["teacher_euler_nfe4.figure.safetensors",
                                                                       "teacher_euler_nfe4.json"]
    assert (published / "results.md").read_text() == "table" and not (published / "samples.png").exists()
    fresh, own = tmp_path / "fresh", tmp_path / "own"
    fresh.mkdir()
    (own / "feature_net").mkdir(parents=True)
    (own / "feature_net" / "config.json").write_text("mine")
    adopt_feature_nets(published, fresh, lambda message: None)
    adopt_feature_nets(published, own, lambda message: None)
    assert (fresh / "feature_net_b" / "config.json").read_text() == "b" and not list(fresh.glob("*.partial"))
    assert (own / "feature_net" / "config.json").read_text() == "mine"        # a run's own classifier is kept
    assert (own / "feature_net_b" / "config.json").read_text() == "b"


def _image_summary(piid: float, other: float) -> list[dict]:
    """Crafted rows: π-ID's every metric `piid`, every other method's and solver's `other` (HF ratios around 1)."""
    def row(method, nfe, value, hf):
        return {"method": method, "nfe": nfe, "fd_teacher": value, "fd_teacher_b": value, "class_distance": value,
                "class_vendi": value, "recall": value, "hf_ratio": hf}

    return [row(students.PIID.label, 4, piid, 1 + piid / 10), row(students.PIID.label, 1, piid, 1.0),
            row(students.DMD2.label, 4, other, 1.0), row(students.MEANFLOW_INIT.label, 1, other, 1.0),
            row(students.MEANFLOW_SCRATCH.label, 1, other, 1.0), row("teacher Euler", 4, other, 1 + other / 10),
            row("teacher DPM-Solver++", 4, other, 1 + other / 10)]


def test_image_goals_follow_each_comparison_on_crafted_rows():
    """Lower FD / higher diversity is better: each goal flips when the rows do (a flipped comparison fails)."""
    low, high = goals.check_image_goals(_image_summary(1.0, 2.0)), goals.check_image_goals(_image_summary(2.0, 1.0))
    fd_keys = [k for k in low if "fd_teacher" in k]
    diversity_keys = ["nfe4_piid_class_diversity_ge_dmd2", "nfe4_piid_recall_ge_dmd2"]
    hf_keys = [k for k in low if k.startswith("nfe4_piid_hf_closer")]
    assert len(fd_keys) == 10 and len(hf_keys) == 2 and set(low) == set(high) == {*fd_keys, *diversity_keys, *hf_keys}
    assert all(low[k] is True for k in fd_keys) and all(high[k] is False for k in fd_keys)
    # π-ID's values 1 (< others' 2): less diverse; its HF ratio 1.1 vs the solvers' 1.2 is closer to 1
    assert all(low[k] is False for k in diversity_keys) and all(high[k] is True for k in diversity_keys)
    assert all(low[k] is True for k in hf_keys) and all(high[k] is False for k in hf_keys)
    tie = goals.check_image_goals(_image_summary(1.0, 1.0))
    assert tie["nfe4_piid_fd_teacher_le_dmd2_A"] is True                      # ≤ against DMD2 and MeanFlow
    assert tie["nfe4_piid_fd_teacher_lt_teacher_euler_A"] is False            # strictly better than the solvers
    assert goals.check_image_goals([]) == {}                                  # only goals whose rows exist


def test_toy_goals_compare_means():
    summary = [{"method": students.PIID.label, "nfe": 4, "modes_covered": 8.0, "mode_mass_error": 0.02},
               {"method": "teacher Euler", "nfe": 8, "modes_covered": 8.0, "mode_mass_error": 0.03},
               {"method": students.DMD2.label, "nfe": 4, "mode_mass_error": 0.2}]
    result = goals.check_toy_goals(summary)
    assert result["nfe4_piid_mode_mass_error_le_teacher_euler8"] is True
    assert result["nfe4_dmd2_mode_mass_error"] == 0.2 and result["nfe4_piid_modes_covered"] == 8.0
    summary[0]["mode_mass_error"] = 0.04
    assert goals.check_toy_goals(summary)["nfe4_piid_mode_mass_error_le_teacher_euler8"] is False


def test_the_plan_trains_what_the_goals_compare_first_and_parses_row_keys():
    plan = [(spec.key, nfe) for spec, nfe in students.jobs(students.IMAGE_STUDENTS)]
    assert plan[:3] == [("piid", 4), ("dmd2", 4), ("piid", 1)] and len(plan) == len(set(plan)) == 9
    assert ("meanflow_init", None) in plan and ("x0", 1) in plan
    assert [key for key, _ in students.jobs(students.TOY_STUDENTS)].count("meanflow_init") == 0
    assert students.parse_row_keys(["dmd2:1", "meanflow_init", "piid:4"]) == [("dmd2", 1), ("meanflow_init", None),
                                                                             ("piid", 4)]
    with pytest.raises(ValueError, match="known: piid:4"):
        students.parse_row_keys(["dmd2:3"])
    assert students.parse_row_keys(["piid:4@dmd2"]) == [students.equal_compute_key("piid", 4, "dmd2")]
    with pytest.raises(ValueError, match="dmd2:4@piid"):
        students.parse_row_keys(["dmd2:1@piid"])
    assert students.override("train.betas", [0.9, 0.95]) == "train.betas=[0.9, 0.95]"
    assert students.override("x", None) == "x=null" and students.override("y", True) == "y=true"


def test_equal_compute_budget_is_the_ratio_of_measured_train_times(tmp_path):
    """π-ID gets DMD2's seed-0 training time in steps (and DMD2 π-ID's): iters × T_other / T_own, the times read
    from the scored seed-0 rows (so rows imported without their students still set the budget)."""
    store = rows.RowStore(tmp_path, lambda message: None)
    for key, seconds in (("piid", 20.0), ("dmd2", 200.0)):
        store.get(students.STUDENTS_BY_KEY[key].label, 4, 0, lambda: {"train_seconds": seconds}, family="student")
    calls = []

    class Recorder(Claims):
        def student_rows(self, spec, train_nfe, seed, iters=None, tag="", label=None, family="student"):
            calls.append((spec.key, train_nfe, seed, iters, tag, family))
            return []

    bench = type("Bench", (), {"students": students.IMAGE_STUDENTS})()
    Recorder(bench, tmp_path, 300, False, lambda message: None).equal_compute_rows(seeds=2)
    assert calls == [("piid", 4, 0, 3000, "_time_of_dmd2", "equal-compute"),
                     ("piid", 4, 1, 3000, "_time_of_dmd2", "equal-compute"),
                     ("dmd2", 4, 0, 30, "_time_of_piid", "equal-compute"),
                     ("dmd2", 4, 1, 30, "_time_of_piid", "equal-compute")]
    # --only selects one direction (DMD2 given π-ID's time); plain rows in `only` select none
    calls.clear()
    Recorder(bench, tmp_path, 300, False, lambda message: None).equal_compute_rows(
        seeds=1, only=students.parse_row_keys(["dmd2:4@piid", "piid:4"]))
    assert calls == [("dmd2", 4, 0, 30, "_time_of_piid", "equal-compute")]


@pytest.mark.slow
def test_tiny_toy_claims_run_finishes_and_resumes(tmp_path):
    messages = []
    results = run_claims(tmp_path, "ring8", seeds=1, iters=4, num_samples=300, log=messages.append)
    methods = {(e["method"], e["nfe"]) for e in results["summary"]}
    assert {(students.PIID.label, 4), (students.DMD2.label, 4), (students.MEANFLOW_SCRATCH.label, 1),
            (students.X0.label, 1), ("teacher Euler", 8)} <= methods
    equal = [e for e in results["summary"] if e["family"] == "equal-compute"]
    assert {e["method"] for e in equal} == {f"{students.PIID.label} at DMD2's train time",
                                            f"DMD2 at {students.PIID.label}'s train time"}
    for name in ("students/piid_nfe4_seed0", "students/dmd2_nfe4_seed0", "students/meanflow_scratch_seed0"):
        assert (tmp_path / name / "config.yaml").is_file() and (tmp_path / name / "run.json").is_file()
    assert (tmp_path / "results.md").is_file() and (tmp_path / "quality_vs_diversity.png").is_file()
    messages.clear()
    again = run_claims(tmp_path, "ring8", seeds=1, iters=4, num_samples=300, log=messages.append)
    assert not any("training" in m or "distilling" in m for m in messages)      # everything came from the run dir
    assert again["summary"] == results["summary"]
    # a new run directory continued from the rows alone (no students): nothing trained, the same table and a figure
    messages.clear()
    publish(tmp_path, tmp_path / "published")
    moved = run_claims(tmp_path / "moved", "ring8", seeds=1, iters=4, num_samples=300,
                       rows_from=tmp_path / "published", log=messages.append)
    assert not any("distilling" in m for m in messages) and not (tmp_path / "moved" / "students").exists()
    assert moved["summary"] == results["summary"] and (tmp_path / "moved" / "samples.png").is_file()
    assert not any("not drawn" in m for m in messages)       # seed-0 figure samples travelled with the rows
    # train=False tabulates only the stored rows: with DMD2's 4-NFE row gone, nothing is trained to replace it
    rows.RowStore(tmp_path / "moved", print).path(students.DMD2.label, 4, 0).unlink()
    messages.clear()
    partial = run_claims(tmp_path / "moved", "ring8", seeds=1, iters=4, num_samples=300, train=False,
                         log=messages.append)
    assert rows.find(partial["summary"], students.DMD2.label, 4) is None
    piid = students.PIID.label
    assert rows.find(partial["summary"], piid, 4) == rows.find(results["summary"], piid, 4)
    assert not any("distilling" in m for m in messages) and not (tmp_path / "moved" / "students").exists()


@pytest.mark.slow
def test_tiny_image_claims_and_settings_sweep_share_a_run(tmp_path, monkeypatch):
    """A tiny digits run (bundled teacher; one NFE per method, no x0 student, whose 4096-trajectory bank dominates
    the time): every method's row, the HF reference identity, a resume that trains nothing, and the settings sweep
    reusing the claims run's π-ID student (identical scores for the same student on the same noise)."""
    import dataclasses

    from piflow_bench import benches, settings_sweep

    small = tuple(dataclasses.replace(spec, nfes=spec.nfes[:1] if spec.key != "piid" else (4,))
                  for spec in students.IMAGE_STUDENTS if spec.key != "x0")
    monkeypatch.setattr(benches.ImageBench, "students", small)
    monkeypatch.setattr(benches, "TEACHER_EULER_STEPS", (4, 32))
    monkeypatch.setattr(benches, "TEACHER_DPM_STEPS", (4,))
    kwargs = dict(seeds=1, iters=2, num_samples=60, feature_epochs=1, meanflow_scratch_seeds=0, equal_compute=False)
    messages = []
    results = run_claims(tmp_path, "digits", log=messages.append, **kwargs)
    summary = {(e["method"], e["nfe"]): e for e in results["summary"]}
    for spec, nfe in ((students.PIID, 4), (students.DMD2, 1), (students.MEANFLOW_INIT, 1)):
        assert (spec.label, nfe) in summary
    assert summary["teacher Euler", 32]["hf_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 <= summary["real test images", 0]["label_accuracy_b"] <= 1.0
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "quality_vs_diversity.png").is_file()
    from score_students import score_students      # a student scored on the run's bank scores as its row
    rescored = score_students(tmp_path, "digits", [students.PIID.directory(tmp_path / "students", 4, 0)],
                              log=messages.append)
    assert list(rescored.values())[0]["fd_teacher"] == pytest.approx(summary[students.PIID.label, 4]["fd_teacher"],
                                                                      rel=1e-6)
    messages.clear()
    assert run_claims(tmp_path, "digits", log=messages.append, **kwargs)["summary"] == results["summary"]
    assert not any("training" in m or "distilling" in m for m in messages)
    # continued elsewhere from the published rows: the classifiers come along (none trained), only the cheap
    # reference rows are computed (to check), the teacher's other rows and the students' are taken
    publish(tmp_path, tmp_path / "published")
    messages.clear()
    moved = run_claims(tmp_path / "moved", "digits", rows_from=tmp_path / "published", log=messages.append, **kwargs)
    assert not any("training" in m or "distilling" in m or "DPM" in m for m in messages)
    assert [(e["method"], e["nfe"]) for e in moved["summary"]] == [(e["method"], e["nfe"]) for e in results["summary"]]
    assert [e["fd_teacher"] for e in moved["summary"]] == pytest.approx([e["fd_teacher"] for e in results["summary"]])

    sweep = settings_sweep.run_settings_sweep(tmp_path, "digits", nfe=4, iters=2, seeds=1, num_samples=60,
                                              log=messages.append)
    table = {e["method"]: e for e in sweep["summary"]}
    assert len(table) == 2 + len(settings_sweep.TRAINING_VARIANTS) + len(settings_sweep.SAMPLING_VARIANTS) + 1
    assert table[settings_sweep.DEFAULT_LABEL]["fd_teacher"] == summary[students.PIID.label, 4]["fd_teacher"]
    assert (tmp_path / "sweep" / "samples.png").is_file() and (tmp_path / "sweep" / "results.md").is_file()

    # at 1 NFE: its own directory, its own default student, no temperature rows (the last step has none)
    one = settings_sweep.run_settings_sweep(tmp_path, "digits", nfe=1, iters=2, seeds=1, num_samples=60,
                                            variants=[], log=messages.append)
    methods = [e["method"] for e in one["summary"]]
    assert {e["nfe"] for e in one["summary"]} == {1} and not any("temperature" in m for m in methods)
    assert len(methods) == 2 + 1 + len(settings_sweep.sampling_variants(1)) + 1
    assert (tmp_path / "sweep_nfe1" / "results.md").is_file() and (tmp_path / "students" / "piid_nfe1_seed0").is_dir()
    assert [e["nfe"] for e in settings_sweep.ordered_summary(rows.RowStore(tmp_path / "sweep", print).all())
            ] == [4] * len(table)                                # the 4-NFE sweep's rows are untouched

    # the scorer's speckle is piflow.eval.isolated_bright_pixels of the (clamped) samples
    from piflow.eval import isolated_bright_pixels
    from piflow_bench.image_setup import prepare_images

    setup = prepare_images(tmp_path, "digits", num_samples=60, feature_epochs=1, log=messages.append)
    speckled = setup.real.clone()
    speckled[:, :, 0, 0], speckled[:, :, 0, 1:3], speckled[:, :, 1, 0:3] = 1.0, -1.0, -1.0   # a stray corner pixel
    for images_ in (setup.real, speckled):
        assert setup.scorer(images_, setup.real_labels, paired=False)["speckle"] == pytest.approx(
            isolated_bright_pixels(images_.clamp(-1, 1)), abs=1e-12)
    assert isolated_bright_pixels(speckled) >= isolated_bright_pixels(setup.real) + 1 - 1e-9
