"""DiT (facebook/DiT-XL-2-256's classes), the class-conditional diffusion family, on a tiny from-scratch DiTPipeline:
the wrapped ε-prediction teacher integrated with Euler on DDIM's σ grid is the stock pipeline with a DDIMScheduler
(η = 0) on the same noise — exactly, with and without CFG (diffusers 0.42's DiTPipeline guides every latent channel
against the null class 1000, as piflow's CFG teacher does); the student starts at the teacher; class-label dropout
never reaches training; an unknown class name is a one-line error; the command line distils from a prompt file of
class names, exports, reloads into PiDiTPipeline and samples."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from piflow.errors import DataError  # noqa: E402
from piflow.integrations.diffusers.prompts import collate_text, encode_prompts  # noqa: E402
from piflow.integrations.diffusers.students import DiffusersTeacher  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402
from piflow.teachers import ClassifierFreeGuidance  # noqa: E402

from diffusion_family_checks import (assert_matches_stock, assert_student_starts_at_teacher,  # noqa: E402
                                     cli_distil_export_reload, euler_on_ddim_grid)

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["golden retriever", "88"]          # a class name and a class id (macaw)


def classes(pipe, prompts):
    return collate_text(encode_prompts(pipe, "dit", prompts), "dit")


def test_prompts_are_class_names_ids_or_the_null_class():
    pipe = tiny_pipeline("dit")
    cond = classes(pipe, ["golden retriever", "Red Panda", "207", ""])
    assert cond["class_labels"].tolist() == [207, 387, 207, 1000] and cond["class_labels"].dtype == torch.long
    assert classes(pipe, ["macaw"])["class_labels"].tolist() == pipe.get_label_ids(["macaw"])


@pytest.mark.parametrize("prompt", ["golden retreiver", "1000", "a photo of a cat"])
def test_unknown_class_is_a_one_line_error(prompt):
    pipe = tiny_pipeline("dit")
    with pytest.raises(DataError, match="DiT: ") as error:
        classes(pipe, [prompt])
    assert "\n" not in str(error.value) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_teacher_euler_on_ddim_grid_is_the_stock_ddim_pipeline(guidance):
    pipe = tiny_pipeline("dit")
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    stock = diffusers.DiTPipeline(**dict(pipe.components, scheduler=scheduler), id2label=pipe.config["id2label"])
    stock.set_progress_bar_config(disable=True)
    seen, decode = {}, stock.vae.decode

    def grab(latents, *args, **kwargs):        # the stock pipeline returns images only: read the final latents
        seen["x0"] = latents * stock.vae.config.scaling_factor
        return decode(latents, *args, **kwargs)

    stock.vae.decode = grab
    steps = 20
    stock(class_labels=stock.get_label_ids(["golden retriever", "macaw"]), guidance_scale=guidance,
          num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
    expected = seen["x0"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))     # the stock pipeline's draw
    base = DiffusersTeacher(pipe.transformer, "dit", scheduler_config=pipe.scheduler.config)
    teacher = base if guidance == 1 else ClassifierFreeGuidance(base, guidance, classes(pipe, [""]), batched=False)
    x = euler_on_ddim_grid(teacher, base.diffusion.schedule, scheduler, noise, classes(pipe, PROMPTS), steps)
    assert_matches_stock(x, expected)


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_student_starts_at_the_teacher(policy):
    pipe = tiny_pipeline("dit")
    assert_student_starts_at_teacher(pipe.transformer, "dit", policy, classes(pipe, PROMPTS), 8)


def test_train_mode_never_drops_a_class():
    """DiT's label embedders drop 10 % of the labels in train mode; teachers and students switch that off."""
    pipe = tiny_pipeline("dit")
    cond = classes(pipe, ["golden retriever"] * 64)
    teacher = DiffusersTeacher(pipe.transformer, "dit")
    x, sigma = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.full((64,), 0.5)
    expected = teacher(x, sigma, cond)
    pipe.transformer.train()
    torch.manual_seed(0)
    torch.testing.assert_close(teacher(x, sigma, cond), expected)


def test_lora_targets_feed_forwards_and_timestep_mlps_never_attention():
    from piflow.integrations.diffusers.students import add_student_lora
    from piflow.integrations.diffusers.families import ARCHITECTURES

    transformer = tiny_pipeline("dit").transformer
    add_student_lora(transformer, rank=2, target_modules=ARCHITECTURES["dit"].lora_targets(transformer))
    adapted = {name.rsplit(".", 1)[0] for name, _ in transformer.named_parameters() if "lora_A" in name}
    adapted = {name.rsplit(".lora_A", 1)[0] for name in adapted}
    assert adapted and not any("attn" in name for name in adapted)
    assert {name.split(".", 2)[2] for name in adapted} == {
        "ff.net.0.proj", "ff.net.2", "norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2"}


@pytest.mark.parametrize("policy", ["gmflow", "dx"])
def test_dit_distills_exports_loads_and_samples(policy, tmp_path, capsys):
    pipe, student, saved, outputs = cli_distil_export_reload(
        "dit", policy, tmp_path, "golden retriever\nmacaw\n360\n", size=16, eval_prompt="otter",
        call_prompts=("golden retriever", "207"), call_kwargs={}, sample_prompt="volcano")
    assert saved["scheduler_config"]["prediction_type"] == "epsilon" and saved["base_class"] == "DiTTransformer2DModel"
    assert student.scheduler_config == saved["scheduler_config"]
    for steps, images in outputs.items():      # name, id string and stock-style class_labels agree
        by_id = pipe(class_labels=[207, 207], num_inference_steps=steps, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert (by_id == images).all()
    capsys.readouterr()


def test_cli_unknown_class_in_the_prompt_file_is_one_line(tmp_path, capsys):
    from piflow.cli import main

    tiny_pipeline("dit").save_pretrained(tmp_path / "tiny-dit")
    (tmp_path / "classes.txt").write_text("golden retriever\ngolden retreiver\n")
    assert main(["distill", "--run-dir", str(tmp_path / "run"), f"pipeline={tmp_path / 'tiny-dit'}", "train.iters=1",
                 "resolution=[16,16]", "eval.prompts=[]", f"prompts={tmp_path / 'classes.txt'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("piflow distill:")]
    assert len(errors) == 1 and "unknown ImageNet class 'golden retreiver'" in errors[0], errors


def test_every_stock_argument_is_accepted_and_square_sizes_are_checked():
    import inspect

    from piflow.integrations.diffusers.pipelines import pipeline_class

    ours = pipeline_class("dit")
    assert set(inspect.signature(diffusers.DiTPipeline.__call__).parameters) <= set(
        inspect.signature(ours.__call__).parameters)
    pipe = tiny_pipeline("dit", ours)
    with pytest.raises(ValueError, match="square images only"):
        ours.__call__(pipe, prompt=["otter"], height=16, width=32)
    with pytest.raises(ValueError, match="either prompt"):
        ours.__call__(pipe, prompt=["otter"], class_labels=[360])


def test_class_labels_cache_like_prompt_embeddings(tmp_path):
    """`piflow encode-prompts`' cache holds each class as a (1,) long tensor and the null class as the negative."""
    from piflow.integrations.diffusers.prompts import PromptEmbeddingCache, write_prompt_cache

    pipe = tiny_pipeline("dit")
    write_prompt_cache(pipe, "dit", ["golden retriever", "980", "otter"], tmp_path / "cache", progress=False)
    cache = PromptEmbeddingCache(tmp_path / "cache", "dit")
    cond = collate_text([cache[i] for i in range(len(cache))], "dit", dtype=torch.bfloat16)
    assert cond["class_labels"].tolist() == [207, 980, 360] and cond["class_labels"].dtype == torch.long
    assert collate_text([cache.null()], "dit")["class_labels"].tolist() == [1000]


def test_the_published_layout_with_a_transformer2dmodel_loads_as_dit(tmp_path):
    """facebook/DiT-XL-2-256 names its transformer `Transformer2DModel` (model_index.json and config.json): the family
    is found from the pipeline class and diffusers loads the transformer as a DiTTransformer2DModel."""
    from piflow.integrations.diffusers.loading import load_base, pipeline_family

    tiny_pipeline("dit").save_pretrained(tmp_path)
    for path, key in ((tmp_path / "model_index.json", "transformer"), (tmp_path / "transformer/config.json", None)):
        config = json.loads(path.read_text())
        config.update({key: ["diffusers", "Transformer2DModel"]} if key else {"_class_name": "Transformer2DModel"})
        path.write_text(json.dumps(config))
    assert pipeline_family(str(tmp_path)).name == "dit"
    for cache in (None, "cached"):           # whole pipeline / transformer only (a prompt cache)
        pipe, transformer = load_base({"pipeline": str(tmp_path), "prompt_cache": cache, "quantize": None},
                                      torch.device("cpu"), torch.float32)
        assert type(transformer).__name__ == "DiTTransformer2DModel"
        assert pipe is None or pipe.labels["golden retriever"] == 207
