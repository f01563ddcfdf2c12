"""Shared test set-up: one torch thread per xdist worker (2 workers on 2 cores) and no GPU."""

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # as the CLI does: hide the profiler's expected warnings

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_rng():
    """Tests that seed torch leave the global RNG as they found it."""
    with torch.random.fork_rng(devices=[]):
        yield
