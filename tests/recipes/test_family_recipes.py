"""Every base-model family through the command line on a tiny from-scratch pipeline saved to disk: `piflow distill`
(prompts, or an editing conditions file) → `piflow export` → a fresh `Pi*Pipeline.from_pretrained` +
`load_piflow_adapter` → 1- and 4-step outputs of the right size, reproduced bit for bit → `piflow sample` (PNGs;
GIF/MP4 for video)."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from piflow.cli import main  # noqa: E402
from piflow.integrations.diffusers.families import get_family  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.tiny import small_reference_area, tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
FAMILIES = ["zimage", "flux2", "flux2-klein", "wan", "qwen-edit", "qwen-edit-plus", "longcat"]
SIZE = {"zimage": 32, "longcat": 32}            # pixels; 64 for the 8× VAEs
TINY = ["max_sequence_length=32", "student.lora_rank=4", "student.logstd_hidden=16", "student.num_components=2",
        "student.num_nodes=3", "distill.total_substeps=16", "train.warmup_iters=0", "train.progress=false",
        "eval.nfe=[1,2]", "eval.prompts=[a cat]", "train.iters=2"]


def reference(path, seed, size=(64, 64)):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-bases")
    paths = {family: root / family for family in FAMILIES}
    for family in FAMILIES:
        tiny_pipeline(family).save_pretrained(paths[family])
    (root / "prompts.txt").write_text("a red cat\na blue bird on a wire\n")
    paths["prompts"] = root / "prompts.txt"
    refs = [reference(root / f"ref{i}.png", i, size) for i, size in enumerate([(64, 64), (96, 64), (64, 64)])]
    paths["refs"] = refs
    lines = [{"prompt": "make it red", "image": "ref0.png"}, {"prompt": "add a bird", "image": "ref2.png"}]
    (root / "edit.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    lines = [{"prompt": "combine them", "images": ["ref0.png", "ref1.png"]},
             {"prompt": "swap the colours", "images": ["ref2.png", "ref1.png"]}]
    (root / "edit-plus.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    paths["conditions"] = {"qwen-edit": root / "edit.jsonl", "qwen-edit-plus": root / "edit-plus.jsonl"}
    return paths


def family_arguments(bases, family):
    """The run's source of conditions, its size and frames."""
    size = SIZE.get(family, 64)
    arguments = [f"pipeline={bases[family]}", f"resolution=[{size},{size}]"]
    if get_family(family).references == "required":
        arguments.append(f"conditions={bases['conditions'][family]}")
    else:
        arguments.append(f"prompts={bases['prompts']}")
    if get_family(family).video:
        arguments.append("num_frames=5")
    return arguments


# DX: one family in the fast tier (make test), every family in make test-slow
@pytest.mark.parametrize("family, policy", [(x, "gmflow") for x in FAMILIES] + [
    pytest.param(x, "dx", marks=() if x == "flux2" else pytest.mark.slow) for x in FAMILIES])
def test_family_distills_exports_loads_and_samples(bases, family, policy, tmp_path, capsys):
    from PIL import Image

    spec = get_family(family)
    run_dir = tmp_path / "run"
    with small_reference_area(32 * 32):
        assert main(["distill", "--run-dir", str(run_dir), *family_arguments(bases, family), *TINY,
                     f"student.policy={policy}"]) == 0
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["architecture"] == family and metrics["iters"] == 2
        assert (run_dir / "samples.png").is_file()
        assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
        pipe = pipeline_class(family).from_pretrained(bases[family])
        pipe.set_progress_bar_config(disable=True)
        student = pipe.load_piflow_adapter(tmp_path / "exported")
        assert student.policy_kind == policy
        size = SIZE.get(family, 64)
        arguments = dict(height=size, width=size)
        if spec.video:
            arguments["num_frames"] = 5
        if spec.references == "required":
            arguments["image"] = [Image.open(path).convert("RGB") for path in bases["refs"][:2]] \
                if family == "qwen-edit-plus" else Image.open(bases["refs"][0]).convert("RGB")
        for steps in (1, 4):
            outputs = []
            for _ in range(2):
                out = pipe(prompt=["a red cat", "fog"], num_inference_steps=steps, output_type="np",
                           generator=torch.Generator().manual_seed(0), **arguments)
                outputs.append(out.frames if spec.video else out.images)
            assert outputs[0].shape == ((2, 5, size, size, 3) if spec.video else (2, size, size, 3))
            assert (outputs[0] == outputs[1]).all()                                  # bit for bit
        images = [arg for path in bases["refs"][:2 if family == "qwen-edit-plus" else 1]
                  for arg in ("--image", str(path))] if spec.references == "required" else []
        assert main(["sample", "--run-dir", str(run_dir), "--prompt", "a cat", "--nfe", "1", "--output",
                     str(tmp_path / "out"), *images]) == 0
    suffix = "*.gif" if spec.video else "*.png"
    assert [p.name for p in (tmp_path / "out").glob(suffix)] == ["000_00" + suffix[1:]]
    if spec.video:
        with Image.open(tmp_path / "out" / "000_00.gif") as gif:
            assert gif.n_frames == 5 and gif.size == (size, size)
    capsys.readouterr()


@pytest.mark.parametrize("family", ["qwen-edit-plus", "flux2"])
def test_conditions_cache_holds_reference_latents_and_feeds_distillation(bases, family, tmp_path, capsys):
    """`piflow encode-prompts --conditions` caches per condition the text embeddings, the VAE-encoded reference
    latents and (Qwen-Image-Edit: the negative prompt sees the images) the negative's embeddings — the same tensors
    the in-memory encoding gives — and a run distils from the cache."""
    from piflow.integrations.diffusers.prompts import EncodedPrompts, PromptEmbeddingCache, read_conditions_file

    conditions = bases["conditions"]["qwen-edit-plus"]
    with small_reference_area(32 * 32):
        assert main(["encode-prompts", "--pipeline", str(bases[family]), "--conditions", str(conditions),
                     "--out", str(tmp_path / "cache"), "--max-sequence-length", "32", "--negative-prompt", " "]) == 0
        cache = PromptEmbeddingCache(tmp_path / "cache", family)
        pipe = diffusers.DiffusionPipeline.from_pretrained(bases[family])
        prompts, images = read_conditions_file(conditions)
        encoded = EncodedPrompts(pipe, family, prompts, " ", 32, images=images)
        assert len(cache) == 2 and cache.images == [[str(p) for p in refs] for refs in images]
        for index in range(2):
            item = cache[index]
            assert {"reference_latents.0", "reference_latents.1"} <= set(item)
            assert ("null.encoder_hidden_states" in item) == (family == "qwen-edit-plus")
            assert sorted(item) == sorted(encoded[index])
            assert all(torch.equal(item[k], encoded[index][k]) for k in item)
        assert (cache.null() is None) == (family == "qwen-edit-plus")
        run_dir = tmp_path / "run"
        assert main(["distill", "--run-dir", str(run_dir), f"pipeline={bases[family]}", "resolution=[64,64]",
                     f"prompt_cache={tmp_path / 'cache'}", *TINY, "train.iters=1"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["iters"] == 1
    capsys.readouterr()


@pytest.mark.parametrize("name,family", [("gmflux2_k8_4step", "flux2"), ("gmflux2_klein_k8_4step", "flux2-klein"),
                                         ("gmqwen_edit_k8_4step", "qwen-edit"),
                                         ("gmqwen_edit_k8_4step", "qwen-edit-plus"),
                                         ("gmzimage_k8_4step", "zimage"), ("gmwan_k8_4step", "wan")])
def test_shipped_family_configs_run(bases, tmp_path, name, family):
    from pathlib import Path

    from piflow.config import load_config
    from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS, distill_text_to_image

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    extra = ["num_frames=5"] if get_family(family).video else []
    config = load_config(T2I_DISTILL_DEFAULTS, path, [*family_arguments(bases, family), *TINY, *extra,
                                                      "train.iters=1", "eval.prompts=[]"])
    with small_reference_area(32 * 32):
        metrics = distill_text_to_image(config, tmp_path / name)
    assert metrics["iters"] == 1 and metrics["architecture"] == family
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))


def test_step_distilled_klein_defaults_to_no_cfg(bases, tmp_path):
    """A FLUX.2 [klein] checkpoint whose pipeline config says is_distilled takes no CFG (its stock pipeline skips
    it): the run's default guidance scale is 1 there and 4 for the base model; an explicit scale wins."""
    from piflow.config import load_config
    from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS, guidance_scale

    pipe = tiny_pipeline("flux2-klein")
    diffusers.Flux2KleinPipeline(**pipe.components, is_distilled=True).save_pretrained(tmp_path / "distilled")
    for path, expected in ((tmp_path / "distilled", 1.0), (bases["flux2-klein"], 4.0)):
        config = load_config(T2I_DISTILL_DEFAULTS, None, [f"pipeline={path}"])
        assert guidance_scale(config, "flux2-klein") == expected
    config = load_config(T2I_DISTILL_DEFAULTS, None, [f"pipeline={tmp_path / 'distilled'}", "guidance.scale=2.5"])
    assert guidance_scale(config, "flux2-klein") == 2.5
