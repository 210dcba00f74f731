"""benchmarks/imagenet_xl.py: its quick mode (tiny DiT, batch 1) writes every field, its FLOP count of DiT-XL/2 and
its GPU-hours arithmetic agree with hand computations."""
import json

import pytest

import imagenet_xl

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_mode_writes_the_report(tmp_path):
    path = tmp_path / "quick.json"
    imagenet_xl.main(["--quick", "--json", str(path)])
    result = json.loads(path.read_text())
    assert (tmp_path / "quick.md").read_text().startswith("# tiny DiT (--quick)")
    assert result["quick"] and result["setup"]["settings"]["nfe"] == 1
    assert result["setup"]["settings"]["num_intermediate_states"] == 2
    assert result["setup"]["settings"]["policy_dropout"] == 0.05
    assert result["setup"]["settings"]["total_substeps"] == 128
    for key in ("cpu_model", "logical_cpus", "torch", "torch_threads", "date"):
        assert key in result["machine"]
    (run,) = result["runs"]
    assert run["batch"] == 1 and run["dtype"] == "float32"
    assert run["params"]["student_trainable"] == run["params"]["student"]       # the whole student is trained
    for stage in ("teacher_forward", "sample_1nfe", "piid_step"):
        timing = run[stage]
        assert len(timing["times_s"]) == 3
        assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]
        assert timing["memory"]["peak_rss_GiB"] > 0
        assert 0 < timing["achieved_GFLOPs_per_s"] <= timing["achieved_GFLOPs_per_s_fastest"]
    assert len(run["gemm_probe_per_repeat_GFLOPs_per_s"]) == 3
    assert set(run["piid_step"]["split_median_s"]) == {
        "student forward", "teacher calls (CFG)", "detached rollouts", "backward", "optimizer (clip + AdamW)", "other"}
    assert set(run["sample_1nfe"]["split_median_s"]) == {"student forward", "rollout", "other"}
    # FlopCounterMode on the warm-up step agrees with the analytic count (the latter also counts the input
    # gradients of the first layers, which autograd skips)
    assert run["piid_step"]["flops"] == pytest.approx(run["analytic_step_flops"], rel=0.02)
    flops = run["flops_per_image_forward"]
    assert flops["teacher_counted"] == pytest.approx(flops["teacher_analytic"], rel=1e-9)
    assert run["process_peak_rss_GiB_ru_maxrss"] > 0
    estimate = result["gpu_hours_estimate"]
    assert set(estimate["runs"]) == {"1-NFE", "2-NFE"}
    assert estimate["runs"]["1-NFE"]["gpu_hours"] > estimate["runs"]["2-NFE"]["gpu_hours"] > 0


def test_xl2_forward_flops_match_the_dit_paper():
    count = imagenet_xl.dit_forward_flops(imagenet_xl.model_config(False))
    # the DiT paper's 118.6 "Gflops" of XL/2 at 256² are multiply-adds
    assert count["multiply_adds"] == pytest.approx(118.6e9, rel=1e-3)
    assert count["total"] == 2 * count["multiply_adds"]
    assert count["tokens"] == 256
    # 256 tokens: per block 12·d² multiply-adds per token and 2·L²·d for attention, d = 1152, 28 blocks
    assert count["token_matmuls"] + count["attention"] == pytest.approx(
        2 * 28 * (256 * 12 * 1152 ** 2 + 2 * 256 ** 2 * 1152), rel=2e-3)


def test_estimate_gpu_hours_by_hand():
    out = imagenet_xl.estimate_gpu_hours(1e11, 8, 100, recompute=False, teacher_calls=2, cfg_factor=2,
                                         peak_flops=1e15, utilization=0.5, num_gpus=4)
    # per sample: student 3 × 1e11 (forward + 2× backward) + teacher 2 calls × 2 (CFG) × 1e11 = 7e11
    assert out["flops_per_sample"] == pytest.approx(7e11)
    assert out["total_flops"] == pytest.approx(7e11 * 8 * 100)
    assert out["gpu_hours"] == pytest.approx(7e11 * 8 * 100 / 5e14 / 3600)
    assert out["wall_hours"] == pytest.approx(out["gpu_hours"] / 4)
    with_recompute = imagenet_xl.estimate_gpu_hours(1e11, 8, 100, student_forward_flops=2e11, recompute=True,
                                                    peak_flops=1e15, utilization=0.5)
    assert with_recompute["flops_per_sample"] == pytest.approx(4 * 2e11 + 4 * 1e11)
    # the paper's 1-NFE run at the defaults (H100 989 TFLOP/s, 40 %, checkpointing on)
    paper = imagenet_xl.estimate_gpu_hours(237e9, 4096, 140_000)
    assert paper["gpu_hours"] == pytest.approx(8 * 237e9 * 4096 * 140_000 / (0.4 * 989e12) / 3600)
