"""Nothing a file contains is executed (diffusers side): adapters, prompt caches and base pipelines."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import assert_one_line_error, crafted_pickle, run_cli

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from piflow.integrations.diffusers.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("flux") / "pipe"
    tiny_pipeline("flux").save_pretrained(path)
    return path


def test_crafted_adapter_weights_are_refused(tmp_path, marker, tiny_flux):
    from piflow.integrations.diffusers.adapter import WEIGHTS, load_piflow_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text('{"_class_name": "GMFluxTransformer2DModel", "architecture": "flux"}')
    (adapter / WEIGHTS).write_bytes(crafted_pickle(marker, torch_format=True))
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_piflow_adapter(transformer, adapter)


def test_crafted_prompt_cache_is_refused(tmp_path, marker):
    from piflow.errors import DataError
    from piflow.files import write_json
    from piflow.integrations.diffusers.prompts import PromptEmbeddingCache

    cache = tmp_path / "cache"
    cache.mkdir()
    write_json(cache / "index.json", {"architecture": "flux", "num_prompts": 1, "shard_size": 1,
                                      "shards": ["shard-00000.safetensors"]})
    (cache / "shard-00000.safetensors").write_bytes(crafted_pickle(marker, torch_format=True))
    (cache / "null.safetensors").write_bytes(crafted_pickle(marker))
    with pytest.raises(DataError, match="shard-00000"):
        PromptEmbeddingCache(cache, "flux")              # every shard header is read when the cache is opened
    import torch
    from safetensors.torch import save_file

    save_file({"0.encoder_hidden_states": torch.zeros(3, 4), "0.pooled_projections": torch.zeros(4)},
              str(cache / "shard-00000.safetensors"))
    prompts = PromptEmbeddingCache(cache, "flux")
    assert prompts[0]["encoder_hidden_states"].shape == (3, 4)
    with pytest.raises(DataError, match="null.safetensors"):
        prompts.null()


@pytest.mark.parametrize("index,fragment", [({"shard_size": 0}, "shard_size"), ({"num_prompts": "x"}, "num_prompts"),
                                            ({"shards": ["../../../etc/passwd"]}, "inside the cache folder"),
                                            ({"num_prompts": 5}, "must list")])
def test_prompt_cache_index_is_checked_when_opened(tmp_path, index, fragment):
    from piflow.errors import DataError
    from piflow.files import write_json
    from piflow.integrations.diffusers.prompts import PromptEmbeddingCache

    cache = tmp_path / "cache"
    cache.mkdir()
    write_json(cache / "index.json", dict({"architecture": "flux", "num_prompts": 1, "shard_size": 1,
                                           "shards": ["shard-00000.safetensors"]}, **index))
    with pytest.raises(DataError, match=fragment):
        PromptEmbeddingCache(cache, "flux")


@pytest.mark.slow                 # ~15 s: builds and saves a tiny pipeline with .bin weights
def test_pickled_pipeline_weights_are_never_loaded(tmp_path, marker, tiny_flux):
    """A pipeline whose transformer ships only a pickled .bin is refused (piflow loads safetensors only)."""
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_flux, pipe)
    for path in (pipe / "transformer").glob("*.safetensors"):
        path.unlink()
    (pipe / "transformer" / "diffusion_pytorch_model.bin").write_bytes(crafted_pickle(marker, torch_format=True))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    result = run_cli("distill", "--run-dir", str(tmp_path / "run"), f"pipeline={pipe}", f"prompts={prompts}",
                     "resolution=[32,32]", "train.iters=1")
    assert_one_line_error(result, "distill", "safetensors", only_line=False)
    assert not (tmp_path / "run").exists()


def test_pipeline_with_a_custom_code_component_is_refused(tmp_path, tiny_flux):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_flux, pipe)
    index = json.loads((pipe / "model_index.json").read_text())
    index["scheduler"] = ["my_module", "MyScheduler"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    from piflow.config import ConfigError
    from piflow.integrations.diffusers.loading import pipeline_architecture

    with pytest.raises(ConfigError, match="'my_module'"):
        pipeline_architecture(str(pipe))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a crafted pickle was executed"


def test_pipeline_with_a_nested_pipeline_component_is_refused(tmp_path, tiny_flux):
    """A component that is itself a pipeline (whose own weights could be pickles) is refused."""
    from piflow.config import ConfigError
    from piflow.integrations.diffusers.loading import pipeline_architecture

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_flux, pipe)
    shutil.copytree(tiny_flux, pipe / "feature_extractor")
    index = json.loads((pipe / "model_index.json").read_text())
    index["feature_extractor"] = ["diffusers", "FluxPipeline"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="nested pipelines"):
        pipeline_architecture(str(pipe))


def test_prompt_cache_with_a_missing_embedding_is_refused_when_opened(tmp_path):
    import torch
    from safetensors.torch import save_file

    from piflow.errors import DataError
    from piflow.files import write_json
    from piflow.integrations.diffusers.prompts import PromptEmbeddingCache

    cache = tmp_path / "cache"
    cache.mkdir()
    write_json(cache / "index.json", {"architecture": "flux", "num_prompts": 2, "shard_size": 2,
                                      "shards": ["shard-00000.safetensors"]})
    save_file({"0.encoder_hidden_states": torch.zeros(3, 4), "0.pooled_projections": torch.zeros(4),
               "1.encoder_hidden_states": torch.zeros(3, 4)}, str(cache / "shard-00000.safetensors"))
    with pytest.raises(DataError, match=r"lacks \['pooled_projections'\] of prompt 1"):
        PromptEmbeddingCache(cache, "flux")
