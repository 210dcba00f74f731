"""Strict adapter loading (issue 25, item 1): every tensor the student owns must be in the file with its shape,
nothing unknown may be, config.json and the metadata must agree with the tensors — in both layouts, each failure a
one-line `DataError` naming the file and the first offending key, with no half-loaded adapter left behind;
``strict=False`` opts out with a warning. `unload_piflow_adapter` gives back the stock transformer and pipeline."""
import json
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from piflow.errors import DataError  # noqa: E402
from piflow.integrations import diffusers as piflow_diffusers  # noqa: E402
from piflow.integrations.diffusers.adapter import WEIGHTS, load_piflow_adapter, save_piflow_adapter  # noqa: E402
from piflow.integrations.diffusers.pipelines import pipeline_class  # noqa: E402
from piflow.integrations.diffusers.tiny import tiny_pipeline  # noqa: E402

from family_cases import stock_arguments  # noqa: E402
from test_authors_layout import base_transformer, inputs, student_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
FIRST_LORA = {"piflow": "lora.single_transformer_blocks.0.proj_mlp.lora_A.weight",
              "authors": "single_transformer_blocks.0.proj_mlp.lora_A.weight"}
HEAD = {"piflow": "head.proj_means.bias", "authors": "proj_out_means.bias"}


def saved_adapter(directory, layout, policy="gmflow"):
    save_piflow_adapter(student_on(base_transformer("flux"), "flux", policy), directory, layout=layout)
    with safe_open(str(directory / WEIGHTS), "pt") as handle:
        metadata = handle.metadata()
    return load_file(directory / WEIGHTS), json.loads((directory / "config.json").read_text()), metadata


def rewrite(directory, tensors, config, metadata):
    save_file(tensors, directory / WEIGHTS, metadata=metadata)
    (directory / "config.json").write_text(json.dumps(config))


def saved_without(directory, layout, key):
    """A saved adapter folder with tensor `key` deleted (config.json and metadata kept)."""
    tensors, config, metadata = saved_adapter(directory, layout)
    del tensors[key]
    rewrite(directory, tensors, config, metadata)
    return directory


def set_policy_metadata(metadata, **changes):
    metadata["policy_config"] = json.dumps(dict(json.loads(metadata["policy_config"]), **changes))


def refused(directory, file, match):
    """Loading fails with one DataError line naming `file` and matching `match`; no LoRA stays on the base."""
    transformer = base_transformer("flux")
    with pytest.raises(DataError) as caught:
        load_piflow_adapter(transformer, directory)
    message = str(caught.value)
    assert "\n" not in message and str(directory / file) in message, message
    assert re.search(match, message), message
    assert "piflow" not in (getattr(transformer, "peft_config", None) or {})
    assert not any("lora" in name for name, _ in transformer.named_parameters())


@pytest.mark.parametrize("layout", ["piflow", "authors"])
def test_a_missing_lora_or_head_tensor_is_refused(layout, tmp_path):
    for key in (FIRST_LORA[layout], HEAD[layout]):
        refused(saved_without(tmp_path / "a", layout, key), WEIGHTS, rf"missing tensors \(first: '{key}'\)")


@pytest.mark.parametrize("layout", ["piflow", "authors"])
def test_an_unknown_tensor_is_refused(layout, tmp_path):
    for extra in ("evil.weight", "transformer_blocks.0.evil.lora_A.weight"):
        tensors, config, metadata = saved_adapter(tmp_path / "a", layout)
        if layout == "piflow" and "lora" in extra:
            extra = f"lora.{extra}"
        tensors[extra] = torch.zeros(4, 8, dtype=tensors[HEAD[layout]].dtype)
        rewrite(tmp_path / "a", tensors, config, metadata)
        refused(tmp_path / "a", WEIGHTS, extra.replace(".", r"\."))


def test_config_and_metadata_must_agree_with_the_tensors(tmp_path):
    directory = tmp_path / "a"
    cases = [  # (change to config / metadata, file named, message)
        (lambda c, m: c["lora_config"].update(rank=8), WEIGHTS,
         rf"tensor '{FIRST_LORA['piflow']}' has LoRA rank 4, but config.json says lora_config.rank = 8"),
        (lambda c, m: c.update(_class_name="os.system"), "config.json",
         r"_class_name is 'os.system', expected 'GMFluxTransformer2DModel'"),
        (lambda c, m: c["policy_config"].update(num_components=8), "config.json",
         r"policy_config\['num_components'\] is 8 but the policy_config metadata .* says 2"),
        (lambda c, m: (c["policy_config"].update(num_components=8), set_policy_metadata(m, num_components=8)),
         WEIGHTS, r"tensor 'head\.proj_logweights\.bias' has shape \[8\], expected \[32\]"),
        (lambda c, m: (c["policy_config"].update(temperature=0.3), set_policy_metadata(m, temperature=0.3)),
         WEIGHTS, r"unknown keys \['temperature'\]"),
        (lambda c, m: c["lora_config"].update(target_modules=["ff.net.2", "norm1.linear"]), WEIGHTS,
         r"2 missing tensors \(first: 'lora\.transformer_blocks\.0\.norm1\.linear\.lora_A\.weight'\) and \d+ "
         r"unknown tensors"),
        (lambda c, m: c["lora_config"].update(target_modules=["no_such_layer"]), "config.json",
         r"lora_config.target_modules \['no_such_layer'\] do not fit this FluxTransformer2DModel"),
    ]
    for change, file, match in cases:
        tensors, config, metadata = saved_adapter(directory, "piflow")
        change(config, metadata)
        rewrite(directory, tensors, config, metadata)
        refused(directory, file, match)
    # DX: the node count in the metadata must fit the head's tensors; the authors' class must fit the kind
    tensors, config, metadata = saved_adapter(directory, "piflow", policy="dx")
    config["policy_config"]["num_nodes"] = 5
    set_policy_metadata(metadata, num_nodes=5)
    rewrite(directory, tensors, config, metadata)
    refused(directory, WEIGHTS, r"tensor 'head\.proj\.bias' has shape \[48\], expected \[80\]")
    tensors, config, metadata = saved_adapter(directory, "authors")
    config["_class_name"] = "os.system"
    rewrite(directory, tensors, config, metadata)
    refused(directory, "", r"config.json: _class_name must be one of \[")


@pytest.mark.parametrize("layout", ["piflow", "authors"])
def test_strict_false_loads_an_incomplete_adapter_with_a_warning(layout, tmp_path):
    tensors, config, metadata = saved_adapter(tmp_path / "a", layout)
    complete = load_piflow_adapter(base_transformer("flux"), tmp_path / "a")
    del tensors[FIRST_LORA[layout]]
    tensors["evil.lora_A.weight" if layout == "authors" else "evil.weight"] = torch.zeros(2, 2)
    rewrite(tmp_path / "a", tensors, config, metadata)
    with pytest.warns(UserWarning) as record:
        partial = load_piflow_adapter(base_transformer("flux"), tmp_path / "a", strict=False)
    messages = " | ".join(str(w.message) for w in record)
    assert re.search(r"1 unknown tensors \(first: 'evil\.(lora_A\.)?weight'\) — loaded anyway", messages), messages
    assert re.search(rf"1 missing tensors \(first: '{FIRST_LORA[layout]}'\) — loaded anyway", messages), messages
    latents, sigma, cond = inputs("flux")
    with torch.no_grad():       # the missing LoRA A is a fresh random one: the output differs from the complete one
        assert not torch.allclose(partial(latents, sigma, cond)["means"], complete(latents, sigma, cond)["means"])


def stock_latents(pipe):
    """The stock FluxPipeline's call (the teacher's sampler) on `pipe`, 2 steps, as latents."""
    return diffusers.FluxPipeline.__call__(pipe, prompt=["a red cat"], num_inference_steps=2, output_type="latent",
                                           generator=torch.Generator().manual_seed(0), **stock_arguments("flux")).images


def adapter_and_pipeline(directory):
    """(a saved FLUX adapter's folder, a tiny PiFluxPipeline, what the stock FluxPipeline computes: `stock_latents`)."""
    save_piflow_adapter(student_on(base_transformer("flux"), "flux", "gmflow"), directory)
    stock = tiny_pipeline("flux")
    stock.set_progress_bar_config(disable=True)
    pipe = tiny_pipeline("flux", pipeline_class("flux"))
    pipe.set_progress_bar_config(disable=True)
    return directory, pipe, stock_latents(stock)


def test_unload_gives_back_the_stock_transformer_and_pipeline(tmp_path):
    adapter, pipe, expected = adapter_and_pipeline(tmp_path / "a")
    stock_scheduler = type(pipe.scheduler)
    pipe.load_piflow_adapter(adapter)
    assert type(pipe.scheduler) is not stock_scheduler and pipe.piflow_student is not None
    pipe.unload_piflow_adapter()
    assert pipe.piflow_student is None and type(pipe.scheduler) is stock_scheduler
    assert not any("lora" in name for name, _ in pipe.transformer.named_parameters())
    assert torch.equal(stock_latents(pipe), expected)               # bit-for-bit the stock pipeline
    with pytest.raises(RuntimeError, match="no π-Flow student"):
        pipe(prompt="a red cat", num_inference_steps=1, height=32, width=32)
    # the function form on a bare transformer, and unload_lora_weights() drops the student with every LoRA
    transformer = base_transformer("flux")
    latents, sigma, cond = inputs("flux")
    arguments = dict(hidden_states=torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3)),
                     encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"],
                     timestep=sigma, img_ids=torch.zeros(16, 3), txt_ids=cond["txt_ids"], guidance=cond["guidance"],
                     return_dict=False)
    with torch.no_grad():
        before = transformer(**arguments)[0]
        load_piflow_adapter(transformer, adapter)
        assert not torch.equal(transformer(**arguments)[0], before)
        piflow_diffusers.unload_piflow_adapter(transformer)
        assert torch.equal(transformer(**arguments)[0], before)
    pipe.load_piflow_adapter(adapter)
    pipe.unload_lora_weights()
    assert pipe.piflow_student is None and type(pipe.scheduler) is stock_scheduler
    assert torch.equal(stock_latents(pipe), expected)


def test_a_refused_adapter_never_leaves_a_student_without_its_lora(tmp_path):
    adapter, pipe, expected_stock = adapter_and_pipeline(tmp_path / "good")
    student = pipe.load_piflow_adapter(adapter)
    kwargs = dict(prompt="a red cat", height=32, width=32, num_inference_steps=2, output_type="latent")
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    # a bad head is found before anything changes: the loaded student stays as it was
    with pytest.raises(DataError, match="missing tensors"):
        pipe.load_piflow_adapter(saved_without(tmp_path / "bad", "piflow", HEAD["piflow"]))
    assert pipe.piflow_student is student
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images, before)
    # a bad LoRA is found once the old LoRA is gone: the pipeline falls back to the stock one
    with pytest.raises(DataError, match="missing tensors"):
        pipe.load_piflow_adapter(saved_without(tmp_path / "bad", "piflow", FIRST_LORA["piflow"]))
    assert pipe.piflow_student is None
    assert torch.equal(stock_latents(pipe), expected_stock)
