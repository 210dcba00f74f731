"""Shared pytest fixtures."""
import pytest
import torch


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
