"""Text-to-image distillation end to end on tiny from-scratch pipelines saved to disk (the `from_pretrained` path):
`piflow distill pipeline=…` → adapter → `piflow export` / `piflow sample`, prompt caches, resume, config errors."""
import json

import pytest
import torch
import yaml

from safetensors.torch import load_file

from piflow.train import load_checkpoint

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow import PiFlow  # noqa: E402
from piflow.cli import main  # noqa: E402
from piflow.config import ConfigError, load_config  # noqa: E402
from piflow.integrations.diffusers.adapter import WEIGHTS  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersTeacher  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402
from piflow.recipes.text_to_image import (T2I_DISTILL_DEFAULTS, build_lora_student,  # noqa: E402
                                          distill_text_to_image, make_text_teacher)

pytestmark = pytest.mark.usefixtures("single_thread")
LR = 1e-4           # the paper's T2I learning rate
TINY = ["resolution=[32,32]", "max_sequence_length=32", "student.lora_rank=4", "student.logstd_hidden=16",
        "student.num_components=2", "student.num_nodes=3", "distill.total_substeps=16", "train.warmup_iters=0",
        "train.progress=false", "eval.nfe=[1,4]", "eval.prompts=[a cat]"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    paths = {}
    for architecture in ("flux", "sd3", "qwen"):
        paths[architecture] = root / architecture
        tiny_pipeline(architecture).save_pretrained(paths[architecture])
    prompts = root / "prompts.txt"
    prompts.write_text("# training prompts\na red cat\n\na blue bird on a wire\na green tree in fog\n")
    paths["prompts"] = prompts
    return paths


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def config_for(bases, architecture, *extra):
    return load_config(T2I_DISTILL_DEFAULTS, None, [f"pipeline={bases[architecture]}", f"prompts={bases['prompts']}",
                                                   *TINY, *extra])


@pytest.mark.parametrize("architecture, policy", [(x, "gmflow") for x in ("flux", "sd3", "qwen")] + [
    pytest.param(x, "dx", marks=() if x == "flux" else pytest.mark.slow) for x in ("flux", "sd3", "qwen")])
def test_pi_id_steps_lower_the_loss_and_leave_the_teacher_unchanged(bases, architecture, policy):
    config = config_for(bases, architecture, f"student.policy={policy}")
    pipe = diffusers.DiffusionPipeline.from_pretrained(bases[architecture])
    transformer = pipe.transformer.requires_grad_(False)
    items = encode_prompts(pipe, architecture, ["a red cat", "a blue bird"], max_sequence_length=32)
    cond = collate_text(items, architecture)
    if architecture == "flux":
        cond["guidance"] = torch.full((2,), 3.5)
    null = collate_text(encode_prompts(pipe, architecture, [""], max_sequence_length=32), architecture)
    teacher = make_text_teacher(transformer, architecture, config, null)
    x, sigma = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.8, 0.4])
    before = DiffusersTeacher(transformer, architecture)(x, sigma, cond)
    student = build_lora_student(config, transformer, architecture, latent_channels=4)
    d = config["distill"]
    pf = PiFlow(student, teacher, policy=policy, nfe=4, final_step_size_scale=0.5, shift=3.2,
                num_intermediate_states=d["num_intermediate_states"], window_substeps=3,
                gm_dropout=0.1 if policy == "gmflow" else 0.0, loss_scale=30.0, total_substeps=16)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=LR)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):      # the same batch and segment draws every step: the loss must go down
        optimizer.zero_grad()
        losses.append(float(pf.data_free_loss(noise, cond, generator=torch.Generator().manual_seed(2))))
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses
    after = DiffusersTeacher(transformer, architecture)(x, sigma, cond)
    assert torch.equal(before, after)      # LoRA never leaks into the teacher


@pytest.mark.parametrize("architecture", ["flux", "qwen"])
def test_cli_distill_export_sample_and_resume(bases, architecture, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    labels = {}
    save = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):       # the sample grid's axis labels, as drawn
        if str(path).endswith("samples.png"):
            axes = fig.axes[0]
            labels["x"] = [t.get_text() for t in axes.get_xticklabels()]
            labels["y"] = [t.get_text() for t in axes.get_yticklabels()]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    run_dir = tmp_path / "run"
    args = ["distill", "--run-dir", str(run_dir), f"pipeline={bases[architecture]}", f"prompts={bases['prompts']}",
            *TINY, "train.iters=4", "train.checkpoint_every=2"]
    assert main(args) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["architecture"] == architecture and metrics["iters"] == 4
    assert (run_dir / "samples.png").is_file() and (run_dir / "adapter" / "config.json").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [text.replace("\n", " ") for text in labels["x"]] == config["eval"]["prompts"]   # the prompts, legible
    assert labels["y"] == [f"{nfe} NFE" for nfe in config["eval"]["nfe"]]
    # the checkpoint holds no frozen base weight
    state = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert all("lora" in k or k.startswith(("head.", "norm_out.")) for k in state["model"])
    # resume: a finished run trains no further and gives the same adapter
    adapter = load_file(run_dir / "adapter" / WEIGHTS)
    assert main(args) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["iters"] == 4
    assert_same_tensors(load_file(run_dir / "adapter" / WEIGHTS), adapter)
    # export from the checkpoint equals the adapter the run wrote (both EMA)
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    assert_same_tensors(load_file(tmp_path / "exported" / WEIGHTS), adapter)
    # the authors' layout (their pipelines, ComfyUI-piFlow) samples what the piflow layout samples, to fp16 storage
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "theirs"), "--layout", "authors"]) == 0
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["_class_name"].startswith("GM")
    # without --out the authors' layout goes next to the run's adapter, never over it
    assert main(["export", "--run-dir", str(run_dir), "--layout", "authors"]) == 0
    assert (run_dir / "adapter-authors" / WEIGHTS).is_file()
    assert main(["export", "--run-dir", str(run_dir), "--out", str(run_dir / "adapter"), "--layout", "authors"]) == 2
    assert_same_tensors(load_file(run_dir / "adapter" / WEIGHTS), adapter)
    latents = []
    for folder in ("exported", "theirs"):
        pipe = pipeline_class(architecture).from_pretrained(bases[architecture])
        pipe.set_progress_bar_config(disable=True)
        pipe.load_piflow_adapter(tmp_path / folder)
        latents.append(pipe("a cat", height=32, width=32, num_inference_steps=2, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images)
    torch.testing.assert_close(latents[1], latents[0], rtol=0, atol=5e-3)
    # sampling through the π-Flow pipeline of the base model
    assert main(["sample", "--run-dir", str(run_dir), "--prompt", "a cat", "--prompt", "a dog", "--nfe", "2",
                 "--num-samples", "1", "--output", str(tmp_path / "images")]) == 0
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == ["000_00.png", "001_00.png"]
    capsys.readouterr()
    # never half-overwritten: the same folder is refused (nothing touched), --overwrite replaces every sample
    (tmp_path / "images" / "notes.txt").write_text("mine")
    before = (tmp_path / "images" / "001_00.png").read_bytes()
    one_prompt = ["sample", "--run-dir", str(run_dir), "--prompt", "a bird", "--nfe", "1", "--output",
                  str(tmp_path / "images")]
    assert main(one_prompt) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "images" / "001_00.png").read_bytes() == before
    assert main([*one_prompt, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000_00.png", "notes.txt", "prompts.json"]
    assert json.loads((tmp_path / "images" / "prompts.json").read_text())["prompts"] == ["a bird"]
    capsys.readouterr()


@pytest.mark.slow
def test_distillation_on_a_quantized_base(bases, tmp_path, capsys):
    """QLoRA-style: the frozen FLUX base loads int8 (TorchAO), the run trains, exports in both layouts, samples, and
    its adapter loads onto the float base."""
    pytest.importorskip("torchao")
    run_dir = tmp_path / "run"
    args = ["distill", "--run-dir", str(run_dir), f"pipeline={bases['flux']}", f"prompts={bases['prompts']}", *TINY,
            "train.iters=3", "quantize=torchao-int8"]
    assert main(args) == 0
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["quantize"] == "torchao-int8"
    state = load_checkpoint(run_dir / "checkpoint.safetensors")      # the float-base checkpoint format
    assert all("lora" in k or k.startswith(("head.", "norm_out.")) for k in state["model"])
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "theirs"), "--layout", "authors"]) == 0
    assert main(["sample", "--run-dir", str(run_dir), "--prompt", "a cat", "--nfe", "2", "--output",
                 str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "000_00.png").is_file()
    pipe = pipeline_class("flux").from_pretrained(bases["flux"])           # float base
    pipe.load_piflow_adapter(run_dir / "adapter")
    pipe.load_piflow_adapter(tmp_path / "theirs")
    capsys.readouterr()
    for bad, fragment in (("quantize=int4", "quantize must be null or one of"),
                          ("quantize=bnb-nf4", "quantize=bnb-nf4: cannot load the base transformer quantized")):
        assert main(["distill", "--run-dir", str(tmp_path / bad), f"pipeline={bases['flux']}",
                     f"prompts={bases['prompts']}", *TINY, bad]) == 2
        err = capsys.readouterr().err
        assert fragment in err.strip().splitlines()[-1], err              # a one-line error, nothing written
        assert not (tmp_path / bad).exists()


def test_prompt_cache_feeds_distillation_without_text_encoders(bases, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["encode-prompts", "--pipeline", str(bases["sd3"]), "--prompts", str(bases["prompts"]),
                 "--out", str(cache), "--shard-size", "2", "--max-sequence-length", "32"]) == 0
    index = json.loads((cache / "index.json").read_text())
    assert index["num_prompts"] == 3 and len(index["shards"]) == 2 and index["architecture"] == "sd3"
    metrics = distill_text_to_image(config_for(bases, "sd3", f"prompt_cache={cache}", "prompts=null",
                                               "train.iters=2", "student.policy=dx"), tmp_path / "run")
    assert metrics["iters"] == 2 and (tmp_path / "run" / "adapter" / "config.json").is_file()
    policy_config = json.loads((tmp_path / "run" / "adapter" / "config.json").read_text())["policy_config"]
    assert policy_config["type"] == "DX" and policy_config["segment_size"] == pytest.approx(1 / 3.5)
    fresh = pipeline_class("sd3").from_pretrained(bases["sd3"])
    fresh.load_piflow_adapter(tmp_path / "run" / "adapter")
    assert fresh.piflow_student.policy_kwargs["segment_size"] == pytest.approx(1 / 3.5)
    # a prompt-cache run samples through the whole pipeline (its text encoders encode the new prompts)
    assert main(["sample", "--run-dir", str(tmp_path / "run"), "--prompt", "a cat", "--nfe", "1",
                 "--output", str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "000_00.png").is_file()
    # the authors have no SD3 adapter class: a one-line error, nothing written
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "theirs"),
                 "--layout", "authors"]) == 2
    expected = "--layout authors: the authors' adapter layout exists for ['flux', 'flux2', 'qwen']"
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "theirs").exists()


def test_text_to_image_config_errors(bases, tmp_path, capsys):
    with pytest.raises(ConfigError, match="prompts="):
        distill_text_to_image(config_for(bases, "flux", "prompts=null"), tmp_path / "a")
    with pytest.raises(ConfigError, match="divisible"):
        distill_text_to_image(config_for(bases, "flux", "resolution=[30,32]"), tmp_path / "b")
    with pytest.raises(ConfigError, match="gmflow' or 'dx"):
        distill_text_to_image(config_for(bases, "flux", "student.policy=x0"), tmp_path / "c")
    with pytest.raises(ConfigError, match="does not match the pipeline"):
        distill_text_to_image(config_for(bases, "flux", "architecture=qwen"), tmp_path / "d")
    with pytest.raises(ConfigError, match="method=dmd2 is not available for text-to-image"):
        distill_text_to_image(config_for(bases, "flux", "method=dmd2"), tmp_path / "f")
    assert not (tmp_path / "f").exists()
    assert main(["distill", "--run-dir", str(tmp_path / "e"), f"pipeline={bases['flux']}", "student.bogus=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["export", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    for bad, fragment in (("eval.nfe=[0]", "eval.nfe"), ("eval.temperature=-1", "eval.temperature"),
                          ("max_sequence_length=0", "max_sequence_length"), ("resolution=[32]", "resolution"),
                          ("student.lora_rank=0", "lora_rank")):
        with pytest.raises(ConfigError, match=fragment):     # checked before the base pipeline is loaded
            distill_text_to_image(config_for(bases, "flux", bad), tmp_path / "f")
        assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_torchrun_fsdp_equals_ddp(bases, tmp_path, free_port):
    """`piflow distill` under torchrun (2 CPU processes, gloo): FSDP2 (frozen base sharded) takes the same steps as
    DDP (replicated base) — same data on each rank, same adapter up to float reassociation."""
    import subprocess
    import sys

    adapters = {}
    for offset, parallel in enumerate(["ddp", "fsdp"]):
        run_dir = tmp_path / parallel
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port + offset), "-m", "piflow.cli", "distill",
                        "--run-dir", str(run_dir), f"pipeline={bases['flux']}", f"prompts={bases['prompts']}", *TINY,
                        "train.iters=2", "distill.batch_size=1", "eval.prompts=[]", "student.lora_dropout=0.0",
                        f"parallel={parallel}"], check=True, timeout=300, capture_output=True)
        state = load_checkpoint(run_dir / "checkpoint.safetensors")
        assert all("lora" in k or k.startswith(("head.", "norm_out.")) for k in state["model"])   # no base weights
        adapters[parallel] = load_file(run_dir / "adapter" / WEIGHTS)
    assert sorted(adapters["ddp"]) == sorted(adapters["fsdp"]) and any("lora_B" in k for k in adapters["ddp"])
    for key, value in adapters["ddp"].items():
        torch.testing.assert_close(adapters["fsdp"][key], value, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name,architecture", [("gmflux_k8_4step", "flux"), ("dxflux_n10_4step", "flux"),
                                               ("gmqwen_k8_4step", "qwen"), ("gmsd3_k8_4step", "sd3")])
def test_shipped_configs_run(bases, tmp_path, name, architecture):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    config = load_config(T2I_DISTILL_DEFAULTS, path, [f"pipeline={bases[architecture]}",
                                                      f"prompts={bases['prompts']}", *TINY, "train.iters=1",
                                                      "eval.prompts=[]"])   # configs enable gradient checkpointing
    metrics = distill_text_to_image(config, tmp_path / name)
    assert metrics["iters"] == 1 and torch.isfinite(torch.tensor(metrics["final_loss"]))


@pytest.mark.parametrize("architecture, policy", [(x, "gmflow") for x in ("flux", "sd3", "qwen")] + [
    pytest.param(x, "dx", marks=() if x == "flux" else pytest.mark.slow) for x in ("flux", "sd3", "qwen")])
def test_distilled_adapter_samples_in_a_fresh_pipeline(bases, tmp_path, architecture, policy):
    distill_text_to_image(config_for(bases, architecture, f"student.policy={policy}", "train.iters=2",
                                     "eval.prompts=[]"), tmp_path / "run")
    pipe = pipeline_class(architecture).from_pretrained(bases[architecture])
    pipe.set_progress_bar_config(disable=True)
    student = pipe.load_piflow_adapter(tmp_path / "run" / "adapter")
    assert student.policy_kind == policy and student.sampling["nfe"] == 4
    for steps in (1, 4):
        images = pipe(["a red cat", "fog"], height=32, width=32, num_inference_steps=steps, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


@pytest.mark.parametrize("content,fragment", [(b"", "holds no prompts"), (b"  \n\t\n", "holds no prompts"),
                                              (b"\xff\xfe\x00\x81binary", "is not UTF-8 text")])
def test_bad_prompt_files_are_one_line_errors_before_the_pipeline_loads(bases, tmp_path, capsys, monkeypatch,
                                                                       content, fragment):
    from piflow.recipes import text_to_image

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the prompt file was checked")

    monkeypatch.setattr(text_to_image, "load_base", no_loading)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    for argv in (["distill", "--run-dir", str(tmp_path / "r"), f"pipeline={bases['flux']}", f"prompts={prompts}",
                  *TINY],
                 ["encode-prompts", "--pipeline", str(bases["flux"]), "--prompts", str(prompts), "--out",
                  str(tmp_path / "cache")]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert fragment in lines[-1] and str(prompts) in lines[-1]
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


def test_a_prompt_cache_of_another_family_is_a_one_line_error(bases, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["encode-prompts", "--pipeline", str(bases["sd3"]), "--prompts", str(bases["prompts"]), "--out",
                 str(cache), "--max-sequence-length", "16"]) == 0
    capsys.readouterr()
    assert main(["distill", "--run-dir", str(tmp_path / "r"), f"pipeline={bases['flux']}", f"prompt_cache={cache}",
                 *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was encoded for 'sd3'" in err[0] and not (tmp_path / "r").exists()


def test_reference_images_of_different_sizes_are_refused_when_the_file_is_read(tmp_path):
    from PIL import Image

    from piflow.errors import DataError
    from piflow.integrations.diffusers.prompts import read_conditions_file

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "b.png")
    conditions = tmp_path / "conditions.jsonl"
    conditions.write_text('{"prompt": "red", "images": ["a.png", "b.png"]}\n{"prompt": "blue", "images": ["a.png", '
                          '"b.png"]}\n')                  # a condition's own references may differ in size
    assert read_conditions_file(conditions)[0] == ["red", "blue"]
    conditions.write_text('{"prompt": "red", "images": ["a.png"]}\n{"prompt": "blue", "images": ["b.png"]}\n')
    with pytest.raises(DataError, match=r"b.png is 48x32 but .*a.png \(reference 1 of an earlier condition\) is 32x32"):
        read_conditions_file(conditions)
