"""Shared test set-up: one torch thread per xdist worker (2 workers on 2 cores) and no GPU."""

import os
from pathlib import Path

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # as the CLI does: hide the profiler's expected warnings

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The configs name no data root: they read $BP_APPS_DATA, else ./data. Where the developers' copy of the data sets
# sits beside the checkout (../shared/data), the tests (and the commands they start) read it; elsewhere the tests
# that need real data skip. An explicitly set $BP_APPS_DATA is kept.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("BP_APPS_DATA", str(SHARED_DATA))


@pytest.fixture(autouse=True)
def _restore_torch_rng():
    """Tests that seed torch leave the global RNG as they found it."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture
def session_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$BP_APPS_CACHE`` in this test session's temporary folder: caches built by one test serve the next ones
    (of this worker), and nothing is written to the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("BP_APPS_CACHE", str(cache))
    return cache
