"""Checkpoint files written atomically in their own folder.

Lightning's ``TorchCheckpointIO`` writes local checkpoints through an fsspec transaction, which stages the file in
the system's temporary folder and then moves it. When that folder is on another filesystem (a tmpfs ``/tmp``) the
move is a copy: a kill during it leaves a truncated file under the final name, and a killed write leaves its staging
file outside the run. :class:`AtomicCheckpointIO` (a public ``CheckpointIO`` plugin: ``Trainer(plugins=[...])``;
``bp-apps`` adds it to every Trainer) writes next to the destination under a temporary name, fsyncs, and renames,
so a checkpoint path holds the previous complete file or the new complete one. Staging files a killed write left
in that folder are removed by the next save of the same name.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from bp_apps.core.io import atomic_output

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic in the destination folder (remote paths: Lightning's)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
                        ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a write that was killed
            orphan.unlink(missing_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a failure here leaves nothing behind
        with atomic_output(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
