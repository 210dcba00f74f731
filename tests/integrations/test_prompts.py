"""Prompt files, on-the-fly encoding, the sharded prompt-embedding cache and text collation."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from piflow.integrations.diffusers.prompts import (EncodedPrompts, PromptEmbeddingCache,  # noqa: E402
                                                   collate_text, read_prompt_file, write_prompt_cache)
from piflow.integrations.diffusers.tiny import byte_level_tokenizer, tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a cat", "a much longer prompt about a lighthouse", "fog", "x"]


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n a cat \n\nfog\n")
    assert read_prompt_file(path) == ["a cat", "fog"]
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(path)
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        read_prompt_file(tmp_path / "missing.txt")


def test_byte_level_tokenizer_round_trips_text():
    tokenizer = byte_level_tokenizer(16, add_bos=True)
    ids = tokenizer("héllo wörld").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo wörld"
    assert len(tokenizer("a" * 40, truncation=True, max_length=16).input_ids) == 16


def test_qwen_embeddings_keep_valid_tokens_and_collate_with_a_mask():
    pipe = tiny_pipeline("qwen")
    source = EncodedPrompts(pipe, "qwen", PROMPTS, max_sequence_length=512)
    lengths = [source[i]["encoder_hidden_states"].shape[0] for i in range(len(PROMPTS))]
    assert lengths[1] > lengths[0] > lengths[3]          # bytes after the template: lengths differ
    cond = collate_text([source[0], source[1]], "qwen")
    assert cond["encoder_hidden_states"].shape[:2] == (2, lengths[1])
    assert cond["encoder_hidden_states_mask"].sum(dim=1).tolist() == [lengths[0], lengths[1]]
    assert torch.equal(cond["encoder_hidden_states"][0, :lengths[0]], source[0]["encoder_hidden_states"])
    assert cond["encoder_hidden_states"][0, lengths[0]:].abs().sum() == 0


def test_cache_matches_in_memory_encoding_and_resumes(tmp_path):
    pipe = tiny_pipeline("flux")
    memory = EncodedPrompts(pipe, "flux", PROMPTS, negative_prompt="blurry", max_sequence_length=32)
    cache_dir = write_prompt_cache(pipe, "flux", PROMPTS, tmp_path / "cache", negative_prompt="blurry",
                                   shard_size=3, max_sequence_length=32, progress=False)
    cache = PromptEmbeddingCache(cache_dir, "flux")
    assert len(cache) == 4 and cache.index["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    for i in range(4):
        assert sorted(cache[i]) == ["encoder_hidden_states", "pooled_projections"]
        assert all(torch.equal(cache[i][k], memory[i][k]) for k in memory[i])
    assert all(torch.equal(cache.null()[k], memory.null()[k]) for k in memory.null())
    cond = collate_text([cache[0], cache[1]], "flux")
    assert cond["txt_ids"].shape == (32, 3) and cond["pooled_projections"].shape[0] == 2
    # resume: an existing shard is kept, a missing one is written again
    first = (cache_dir / "shard-00000.safetensors").stat().st_mtime_ns
    (cache_dir / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="misses shards"):
        PromptEmbeddingCache(cache_dir)
    write_prompt_cache(pipe, "flux", PROMPTS, cache_dir, negative_prompt="blurry", shard_size=3,
                       max_sequence_length=32, progress=False)
    assert (cache_dir / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert torch.equal(PromptEmbeddingCache(cache_dir)[3]["encoder_hidden_states"],
                       memory[3]["encoder_hidden_states"])
    with pytest.raises(ValueError, match="encoded for 'flux'"):
        PromptEmbeddingCache(cache_dir, "qwen")
    with pytest.raises(IndexError):
        cache[4]
    with pytest.raises(FileNotFoundError, match="encode-prompts"):
        PromptEmbeddingCache(tmp_path)
