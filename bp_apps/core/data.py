"""scikit-learn's digits: the embedded data set (1,797 8×8 images, shipped with scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from bp_apps.core.resume import resumable_loader
from bp_apps.core.samplers import epoch_permutation


@dataclass(frozen=True)
class DigitsSplit:
    """Flattened images scaled to [0, 1] (float32) and integer labels, train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    num_features: int = 64
    num_classes: int = 10


def load_digits_split(test_size: float = 0.25, random_state: int = 0, standardize: bool = False) -> DigitsSplit:
    """The digits with a stratified train/test split (25 %, ``random_state`` 0 by default).

    Pixels are scaled to [0, 1]; with ``standardize`` each pixel is then centred and scaled by
    the training part's mean and standard deviation (pixels constant in training keep scale 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=test_size, stratify=data.target,
                                              random_state=random_state)
    if standardize:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        std[std == 0] = 1.0
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return DigitsSplit(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                       torch.from_numpy(x_te), torch.from_numpy(y_te).long())


def batch_order(num_samples: int, batch_size: int, seed: int, epoch: int = 0) -> list[Tensor]:
    """The index batches of one shuffled epoch; the same (seed, epoch) gives the same batches."""
    return list(epoch_permutation(num_samples, seed, epoch).split(batch_size))


class DigitsDataModule(L.LightningDataModule):
    """Digits for Lightning: the stratified test split, and a validation split taken from the
    training part by ``seed`` (``val_fraction`` of it, stratified)."""

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.1, test_size: float = 0.25,
                 split_seed: int = 0, seed: int = 0, standardize: bool = True, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_features, self.num_classes = 64, 10

    def setup(self, stage: str | None = None) -> None:
        from sklearn.model_selection import train_test_split

        split = load_digits_split(self.hparams.test_size, self.hparams.split_seed, self.hparams.standardize)
        train_idx, val_idx = train_test_split(np.arange(len(split.y_train)), test_size=self.hparams.val_fraction,
                                              stratify=split.y_train.numpy(), random_state=self.hparams.seed)
        self.train_set = TensorDataset(split.x_train[train_idx], split.y_train[train_idx])
        self.val_set = TensorDataset(split.x_train[val_idx], split.y_train[val_idx])
        self.test_set = TensorDataset(split.x_test, split.y_test)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        """Training batches come from a :class:`ResumableDataLoader` over an :class:`EpochShuffle`, so a run
        resumed from a mid-epoch checkpoint continues with the very batches it would have seen."""
        if not shuffle:
            return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
        return resumable_loader(dataset, self.hparams.batch_size, self.hparams.seed,
                                num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
