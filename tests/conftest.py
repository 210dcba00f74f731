"""Shared pytest fixtures."""
import os
import socket
import tempfile

import pytest
import torch

# piflow's caches (the x0-baseline trajectory bank) go to a throw-away folder, not the user's ~/.cache
os.environ.setdefault("PIFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="piflow-test-cache-"))

# `make test` runs the test files in several pytest-xdist worker processes: each gets an equal share of the cores
# (its subprocesses too, through OMP_NUM_THREADS), instead of every worker starting one thread per core
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(min(_THREADS, torch.get_num_threads()))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread.

    The core tests use many tiny tensors; with several intra-op threads on a busy 2-core machine each op pays
    thread-synchronisation costs that dwarf the arithmetic (measured ~40× slower). Restores the setting after.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_dit():
    """A factory of one-block DiTs on (1, 8, 8) images with 3 classes and hidden size 32, every weight perturbed
    by N(0, 0.05²) noise after `torch.manual_seed(seed)` (a fresh DiT zero-initialises its output, so it would
    predict zero velocity everywhere)."""
    def make(seed: int = 0):
        from piflow.models import DiT

        torch.manual_seed(seed)
        model = DiT.from_preset("DiT-T", in_channels=1, input_size=8, patch_size=2, hidden_size=32, depth=1,
                                num_heads=2, num_classes=3)
        for parameter in model.parameters():
            parameter.data.add_(0.05 * torch.randn_like(parameter))
        return model

    return make


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
