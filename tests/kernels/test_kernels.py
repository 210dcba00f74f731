"""Building the native kernel: cached per machine, written atomically, one warning and the plain path without a
compiler."""
import warnings

import pytest
import torch

from piflow import kernels
from piflow.policies import GMFlowPolicy
from piflow.rollout import rollout


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path))
    kernels.gm_rollout_library.cache_clear()
    yield tmp_path
    kernels.gm_rollout_library.cache_clear()


def _policy():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, 2, 5, generator=gen)
    logweights = torch.log_softmax(torch.randn(3, 4, 1, 5, generator=gen), dim=1)
    return GMFlowPolicy(means, torch.full((3,), -1.0), logweights, torch.randn(3, 2, 5, generator=gen), 1.0)


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler")
def test_library_is_built_once_into_the_cache(fresh_library):
    assert kernels.gm_rollout_library() is not None
    built = sorted(p.name for p in (fresh_library / "kernels").iterdir())
    assert len(built) == 1 and built[0].startswith("gm_rollout-") and built[0].endswith(".so")   # no temporaries
    stamp = (fresh_library / "kernels" / built[0]).stat().st_mtime_ns
    kernels.gm_rollout_library.cache_clear()
    assert kernels.gm_rollout_library() is not None
    assert (fresh_library / "kernels" / built[0]).stat().st_mtime_ns == stamp                  # reused, not rebuilt


def test_missing_compiler_warns_once_and_rolls_out_in_plain_pytorch(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    policy = _policy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            first = rollout(policy, policy.x_src, 1.0, 0.0, total_substeps=16)
            second = rollout(policy, policy.x_src, 1.0, 0.0, total_substeps=16)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C compiler" in messages[0], messages
    assert not policy.fixed_batch
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_failed_compilation_warns_and_leaves_no_file(fresh_library, monkeypatch, tmp_path):
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match="could not build the fused GM rollout kernel.*broken compiler"):
        assert kernels.gm_rollout_library() is None
    assert not any((fresh_library / "kernels").iterdir())
