"""A step checkpoint written on an epoch's last batch resumes into the next epoch without skipping it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from bp_apps.core.resume import ExactResume, FailAtStep, ResumableDataLoader, resumable_loader

BATCHES, EPOCHS = 5, 3


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> ResumableDataLoader:
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(BATCHES * 8, 4, generator=generator)
        return resumable_loader(torch.utils.data.TensorDataset(x, x.sum(1)), batch_size=8, seed=0)


def fit(folder: Path, every: int, fail: int | None = None, ckpt_path: Path | None = None) -> tuple[Regression, int]:
    L.seed_everything(0, verbose=False)
    model = Regression()
    steps = ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=0, save_last=True)
    callbacks = [steps, ExactResume(), *([FailAtStep(fail)] if fail else [])]
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer.global_step


@pytest.mark.parametrize("fail", [BATCHES + 2, 2 * BATCHES + 1])
def test_resume_from_a_checkpoint_on_the_last_batch_of_an_epoch_trains_every_epoch(tmp_path, fail) -> None:
    straight, straight_steps = fit(tmp_path / "straight", every=BATCHES)
    assert straight_steps == EPOCHS * BATCHES
    with pytest.raises(RuntimeError, match="injected fault"):
        fit(tmp_path / "run", every=BATCHES, fail=fail)
    last = tmp_path / "run" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] % BATCHES == 0  # written on an epoch's last batch
    resumed, steps = fit(tmp_path / "run", every=BATCHES, ckpt_path=last)
    assert steps == straight_steps  # no epoch skipped
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_loader_whose_pass_was_complete_starts_the_next_pass_from_its_first_batch() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(20.0))
    loader = resumable_loader(data, batch_size=4, seed=0)
    loader.load_state_dict({"batches_served": len(loader)})
    assert len(list(loader)) == len(loader)
    loader.load_state_dict({"batches_served": 2})
    assert len(list(loader)) == len(loader) - 2


def test_a_step_checkpoint_never_takes_the_place_of_the_best_checkpoint(tmp_path) -> None:
    from bp_apps.core.callbacks import BestCheckpoint, LastCheckpoint, best_checkpoint_callback
    from bp_apps.core.resume import StepCheckpoint

    best = BestCheckpoint(monitor="val_loss", mode="min")
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, accelerator="cpu",
                        callbacks=[StepCheckpoint(every_n_train_steps=3), LastCheckpoint(), best])
    assert best_checkpoint_callback(trainer) is best  # what the CLI tests after fit and metrics.json names
