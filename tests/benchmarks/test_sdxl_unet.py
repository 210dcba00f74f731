"""benchmarks/sdxl_unet.py: its quick mode (tiny text-time UNet, latents 8×8, batch 1) builds the LoRA student and
CFG teacher as the SDXL recipe does and writes every field of the report."""
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import sdxl_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.slow          # ~12 s: builds a LoRA UNet student and runs a π-ID step and a sample
def test_quick_mode_writes_the_report(tmp_path):
    path = tmp_path / "quick.json"
    sdxl_unet.main(["--quick", "--json", str(path)])
    result = json.loads(path.read_text())
    assert (tmp_path / "quick.md").read_text().startswith("# tiny text-time UNet (--quick)")
    assert result["quick"] and result["benchmark"] == "sdxl_unet"
    for key in ("cpu_model", "logical_cpus", "torch", "torch_threads", "date"):
        assert key in result["machine"]
    params = result["params"]
    assert params["base"] > 0 and params["lora"] > 0 and params["gm_head"] > 0 and params["lora_layers"] > 0
    assert params["trainable"] == params["lora"] + params["gm_head"] + params["norm_out"]
    setup = result["setup"]
    assert setup["num_components"] == 8 and setup["guidance_scale"] == 5.0 and setup["gradient_checkpointing"]
    assert setup["settings"]["nfe"] == 2 and setup["settings"]["shift"] == 3.2     # quick override; config's shift
    assert setup["unet_config"]["addition_embed_type"] == "text_time"
    assert sdxl_unet.SDXL_UNET["block_out_channels"] == (320, 640, 1280)
    (run,) = result["runs"]
    assert (run["latent"], run["image"], run["batch"]) == (8, 64, 1)
    for stage, repeats in (("sample_4step", 2), ("piid_step", 1)):
        timing = run[stage]
        assert len(timing["times_s"]) == timing["repeats"] == repeats and len(timing["warmup_times_s"]) == 1
        assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]
        assert timing["memory"]["peak_rss_GiB"] > 0
    split = run["piid_step"]["split_median_s"]
    assert set(split) == {"teacher calls (CFG, 2 UNet calls each)", "backward", "optimizer (clip + AdamW)",
                          "other (student forwards, rollouts, loss)"}
    assert all(value >= 0 for value in split.values())
