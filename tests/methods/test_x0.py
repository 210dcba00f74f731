"""The x0-regression teacher bank: chunked, cached, resumable after a kill part-way."""
import pytest
import torch

from piflow.methods import x0
from piflow.sampling import euler_trajectory

INDICES = [0, 8, 16, 24]


def velocity(x, sigma, cond):
    """A smooth nonlinear teacher, so that every state of the ODE differs from its neighbours."""
    return torch.tanh(x) * sigma.reshape(-1, *[1] * (x.dim() - 1)) - 0.3 * x


@pytest.fixture
def bank_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("PIFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(x0, "BANK_CHUNK", 4)
    noise = torch.randn(14, 2, 3, generator=torch.Generator().manual_seed(0))
    return noise, tmp_path / "cache" / "x0_bank"


def cached_bank(monkeypatch, noise, indices, limit=None):
    """`teacher_ode_bank` with the cache, its teacher trajectories counted and killed once `limit` chunks are done:
    (the bank, or None when killed; the size of each chunk run)."""
    calls = []

    def run(*args, **kwargs):
        if limit is not None and len(calls) == limit:
            raise KeyboardInterrupt("killed")
        calls.append(args[1].shape[0])
        return euler_trajectory(*args, **kwargs)

    monkeypatch.setattr(x0, "euler_trajectory", run)
    try:
        return x0.teacher_ode_bank(velocity, noise, None, indices, cache_key=b"teacher"), calls
    except KeyboardInterrupt:
        return None, calls


def test_bank_is_the_teachers_euler_trajectories_at_the_grid_indices(bank_setup):
    noise, _ = bank_setup
    states, endpoints = x0.teacher_ode_bank(velocity, noise, None, INDICES)
    full = euler_trajectory(velocity, noise, x0.X0_BANK_STEPS)          # one batch, no chunks
    torch.testing.assert_close(states, full[INDICES], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(endpoints, full[-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states[0], noise)                         # index 0 is σ = 1: the noise itself


def test_a_bank_killed_part_way_resumes_from_its_finished_chunks(bank_setup, monkeypatch):
    noise, folder = bank_setup
    reference = x0.teacher_ode_bank(velocity, noise, None, INDICES)
    bank, calls = cached_bank(monkeypatch, noise, INDICES, limit=2)
    assert bank is None and calls == [4, 4] and not list(folder.glob("*.safetensors"))   # no entry, two parts
    assert sorted(p.name for p in folder.glob("*.parts/*")) == ["0-4.safetensors", "4-8.safetensors"]

    (states, endpoints), calls = cached_bank(monkeypatch, noise, INDICES)
    assert calls == [4, 2]                                      # only the chunks 8-12 and 12-14 were run
    torch.testing.assert_close(states, reference[0], rtol=0, atol=0)
    torch.testing.assert_close(endpoints, reference[1], rtol=0, atol=0)
    assert len(list(folder.glob("*.safetensors"))) == 1 and not list(folder.glob("*.parts"))   # parts cleared

    # the finished entry now serves the same trajectories without running the teacher
    (states, _), calls = cached_bank(monkeypatch, noise, INDICES[:1], limit=0)
    torch.testing.assert_close(states, reference[0][:1], rtol=0, atol=0)


def test_a_damaged_or_narrower_part_is_recomputed(bank_setup, monkeypatch):
    noise, folder = bank_setup
    reference = x0.teacher_ode_bank(velocity, noise, None, INDICES)
    bank, _ = cached_bank(monkeypatch, noise, INDICES[:2], limit=3)          # parts hold two of the indices
    assert bank is None
    (part,) = folder.glob("*.parts/0-4.safetensors")
    part.write_bytes(b"not safetensors")

    (states, _), calls = cached_bank(monkeypatch, noise, INDICES[:2])
    assert calls == [4, 2]                                      # the damaged chunk 0-4 and the unfinished 12-14
    torch.testing.assert_close(states, reference[0][:2], rtol=0, atol=0)

    # a wider grid than the parts and the entry hold: every chunk runs again, the entry keeps both grids
    (states, _), calls = cached_bank(monkeypatch, noise, INDICES)
    assert calls == [4, 4, 4, 2]
    torch.testing.assert_close(states, reference[0], rtol=0, atol=0)


def test_a_part_without_its_states_is_recomputed(bank_setup, monkeypatch):
    """A readable part that lacks a tensor (or holds too few rows) counts as damaged, not as an error."""
    from piflow.files import save_safetensors

    noise, folder = bank_setup
    reference = x0.teacher_ode_bank(velocity, noise, None, INDICES[:2])
    cached_bank(monkeypatch, noise, INDICES[:2], limit=2)                     # parts 0-4 and 4-8 kept
    part_a, part_b = sorted(folder.glob("*.parts/[04]-*.safetensors"))
    save_safetensors(part_a, {"indices": torch.tensor(INDICES[:2])})                      # no states, no endpoints
    save_safetensors(part_b, {"indices": torch.tensor(INDICES[:2]), "states": torch.zeros(1, 4, 2, 3),
                              "endpoints": torch.zeros(4, 2, 3)})                         # one row for two indices

    (states, _), calls = cached_bank(monkeypatch, noise, INDICES[:2])
    assert calls == [4, 4, 4, 2]
    torch.testing.assert_close(states, reference[0], rtol=0, atol=0)
