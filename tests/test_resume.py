"""Fault injection: a run killed mid-epoch (by an exception, and by SIGKILL in a child process) resumes from its
last checkpoint and ends with exactly the weights and metrics of an uninterrupted run, for both backends."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from bp_apps.core.resume import FailAtStep as FailAt
from bp_apps.core.resume import ResumableDataLoader, resumable_loader
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import EngineImageMLP, ImageMLP
from bp_apps.vision.task import ImageClassifier

EPOCHS = 2
FAIL_AT = 25  # digits: 19 training steps an epoch at batch 64, so step 25 is mid-way through the second epoch
NETS = {"engine": EngineImageMLP, "autograd": ImageMLP}  # the digits MLP by the engine, and its torch.nn twin
OPTIM = {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "scheduler": "cosine"}


def run(backend: str, folder: Path, seed: int = 0, ckpt_path: Path | None = None,
        fail: FailAt | None = None) -> tuple[ImageClassifier, L.Trainer]:
    L.seed_everything(seed, verbose=False)
    model = ImageClassifier(partial(NETS[backend], hidden=(32,), dropout=0.2), optim=OPTIM, input_shape=(1, 8, 8),
                            seed=seed)
    every_step = ModelCheckpoint(dirpath=folder / "steps", every_n_train_steps=1, save_top_k=0, save_last=True)
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", deterministic=True, default_root_dir=folder,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[every_step, *([fail] if fail else [])])
    trainer.fit(model, datamodule=DigitsImageDataModule(batch_size=64), ckpt_path=ckpt_path)
    return model, trainer


def outcome(model: ImageClassifier, trainer: L.Trainer) -> tuple[list[torch.Tensor], dict[str, float]]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    return [p.detach().clone() for p in model.net.parameters()], metrics


def assert_same(resumed: tuple, straight: tuple) -> None:
    assert all(torch.equal(a, b) for a, b in zip(resumed[0], straight[0], strict=True)), "weights differ"
    assert resumed[1] == straight[1] and resumed[1]


@pytest.mark.parametrize("backend", ["engine", "autograd"])
def test_resume_after_an_exception_matches_an_uninterrupted_run(backend: str, tmp_path: Path) -> None:
    straight = outcome(*run(backend, tmp_path / "straight"))
    with pytest.raises(RuntimeError, match="injected fault at step 25"):
        run(backend, tmp_path / "faulty", fail=FailAt(FAIL_AT))
    last = tmp_path / "faulty" / "steps" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == FAIL_AT - 1
    # Another seed for the fresh process state: everything that matters must come from the checkpoint.
    model, trainer = run(backend, tmp_path / "faulty", seed=7, ckpt_path=last)
    assert trainer.global_step == straight_steps(tmp_path)
    assert_same(outcome(model, trainer), straight)


def straight_steps(tmp_path: Path) -> int:
    return torch.load(tmp_path / "straight" / "steps" / "last.ckpt", weights_only=True)["global_step"]


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from test_resume import FailAt, run
from pathlib import Path
run({backend!r}, Path({folder!r}), fail=FailAt({step}, kill=True))
"""


@pytest.mark.parametrize("backend", ["engine", "autograd"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(backend: str, tmp_path: Path) -> None:
    straight = outcome(*run(backend, tmp_path / "straight"))
    folder = tmp_path / "killed"
    code = CHILD.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(), backend=backend,
                        folder=str(folder), step=FAIL_AT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # killed, not finished
    checkpoints = list((folder / "steps").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["last.ckpt"]
    assert not [p for p in (folder / "steps").iterdir() if p.suffix != ".ckpt"], "a half-written file was left"
    last = torch.load(checkpoints[0], weights_only=True)
    assert last["global_step"] == FAIL_AT - 1
    assert json.dumps(last["loops"]["fit_loop"]["state_dict"]["combined_loader"]) == json.dumps(
        [{"batches_served": (FAIL_AT - 1) % 19}]), "the loader's position is in the checkpoint"
    model, trainer = run(backend, folder, seed=7, ckpt_path=folder / "steps" / "last.ckpt")
    assert_same(outcome(model, trainer), straight)


class Recorder(torch.utils.data.Dataset):
    """Items are their index plus one random draw made while loading (as an augmentation would)."""

    def __init__(self, size: int) -> None:
        self.size, self.loaded = size, []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int, float]:
        self.loaded.append(index)
        return index, torch.rand(()).item()


def test_resumable_loader_skips_by_index_and_replays_loading_randomness() -> None:
    straight_data = Recorder(20)
    loader = resumable_loader(straight_data, batch_size=4, seed=3)
    loader.sampler.set_epoch(1)
    straight = list(loader)
    assert len(loader) == 5 and loader.state_dict() == {"batches_served": 5}
    resumed_data = Recorder(20)
    resumed = resumable_loader(resumed_data, batch_size=4, seed=3)
    resumed.sampler.set_epoch(1)
    resumed.load_state_dict({"batches_served": 2})
    torch.manual_seed(123)  # the global stream must neither matter to loading nor be moved by it
    before = torch.get_rng_state()
    replayed = list(resumed)
    assert torch.equal(torch.get_rng_state(), before)
    assert [b[0].tolist() for b in replayed] == [b[0].tolist() for b in straight[2:]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(replayed, straight[2:], strict=True))
    assert sorted(resumed_data.loaded) == sorted(i for b in straight[2:] for i in b[0].tolist()), \
        "skipped batches must not be loaded"
    assert resumed.state_dict() == {"batches_served": 5}
    assert [b[0].tolist() for b in resumed] == [b[0].tolist() for b in straight]  # the next pass starts at 0
    other_epoch = resumable_loader(Recorder(20), batch_size=4, seed=3)
    assert [b[0].tolist() for b in other_epoch] != [b[0].tolist() for b in straight]


def test_resumable_loader_refuses_an_unreplayable_shuffle() -> None:
    with pytest.raises(ValueError, match="EpochShuffle"):
        ResumableDataLoader(Recorder(4), batch_size=2, shuffle=True)
