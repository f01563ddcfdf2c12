"""Checkpoints are written atomically in their own folder, whatever filesystem the temporary folder is on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from bp_apps.core.checkpoint_io import AtomicCheckpointIO
from bp_apps.core.io import load_checkpoint_dict

WRITER = """
import sys, torch
from bp_apps.core.checkpoint_io import AtomicCheckpointIO
path, io = sys.argv[1], AtomicCheckpointIO()
weights = torch.randn(6_000_000)  # 24 MB: long enough a write to be killed in the middle
for step in range(10_000):
    weights[0] = step
    io.save_checkpoint({"step": step, "state_dict": {"w": weights}}, path)
    print(step, flush=True)
"""


def _other_filesystem_tmpdir(near: Path) -> Path:
    """A temporary folder on another filesystem than ``near`` when the machine has one (/dev/shm), else beside."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != near.stat().st_dev:
        return Path(tempfile.mkdtemp(dir=shm))
    return Path(tempfile.mkdtemp(dir=near))


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_a_write_killed_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, delay) -> None:
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    path = run / "last.ckpt"
    tmpdir = _other_filesystem_tmpdir(tmp_path)
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "0"  # one complete save
        time.sleep(delay)  # then kill it, most likely in the middle of a later write
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    checkpoint = load_checkpoint_dict(path)  # never truncated: the previous save or the last complete one
    assert float(checkpoint["state_dict"]["w"][0]) == checkpoint["step"]
    assert list(tmpdir.iterdir()) == []  # nothing staged in the temporary folder
    leftovers = [p.name for p in run.iterdir() if p.name != "last.ckpt"]
    assert all(name.startswith(".last.ckpt.") for name in leftovers) and len(leftovers) <= 1
    AtomicCheckpointIO().save_checkpoint({"step": -1}, path)  # the next save removes a killed write's file
    assert [p.name for p in run.iterdir()] == ["last.ckpt"]


def test_a_failing_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "best.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


def test_bp_apps_trainers_write_checkpoints_atomically_unless_a_plugin_is_chosen(tmp_path) -> None:
    import lightning as L
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from bp_apps.cli import use_atomic_checkpoints

    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, accelerator="cpu")
    use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    class OwnIO(TorchCheckpointIO):
        pass

    own = L.Trainer(logger=False, default_root_dir=tmp_path, accelerator="cpu", plugins=[OwnIO()])
    use_atomic_checkpoints(own)
    assert type(own.strategy.checkpoint_io) is OwnIO
