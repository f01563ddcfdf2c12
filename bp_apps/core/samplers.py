"""Samplers whose order depends on ``(seed, epoch)`` alone, so a resumed run replays the same batches."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["MIX", "BucketBatchSampler", "EpochShuffle", "EvaluationShard", "batch_order", "epoch_permutation",
           "evaluation_loader"]

MIX = 1_000_003  # a prime that spreads (seed, epoch, batch) over distinct generator seeds


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    """A shuffle of ``range(num_samples)`` that depends on ``(seed, epoch)`` alone."""
    generator = torch.Generator().manual_seed(seed * MIX + epoch)
    return torch.randperm(num_samples, generator=generator)


def batch_order(num_samples: int, batch_size: int, seed: int, epoch: int = 0) -> list[Tensor]:
    """The index batches of one shuffled epoch; the same (seed, epoch) gives the same batches."""
    return list(epoch_permutation(num_samples, seed, epoch).split(batch_size))


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)`` (Lightning calls ``set_epoch``), so a restarted process
    replays exactly the order an uninterrupted run would have used."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.num_samples, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.num_samples


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length sentences (less padding for the LSTM): shuffle, sort within pools
    of 50 batches by length, cut into batches, shuffle the batches. Deterministic for a seed and
    epoch; under DDP each process takes every ``num_replicas``-th batch.

    ``groups`` (one hashable key per item, e.g. the sentence of an SRL predicate instance) keeps the
    items of a group next to each other, so they share batches: the shuffle moves whole groups.

    ``even``: under DDP, repeat the first batches so every process gets as many (training: the processes step
    together). Evaluation passes False: a repeated batch would count its items twice in the metrics."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, groups: Sequence[Hashable] | None = None,
                 even: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if groups is not None and len(groups) != len(lengths):
            raise ValueError(f"{len(groups)} groups for {len(lengths)} items")
        self.lengths, self.batch_size, self.shuffle, self.seed = list(lengths), batch_size, shuffle, seed
        self.num_replicas, self.rank, self.epoch, self.even = num_replicas, rank, 0, even
        self.members: list[list[int]] | None = None  # the items of each group, in first-seen order
        if groups is not None:
            index: dict[Hashable, int] = {}
            self.members = []
            for i, key in enumerate(groups):
                if key not in index:
                    index[key] = len(self.members)
                    self.members.append([])
                self.members[index[key]].append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: self.lengths[i])
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng = random.Random(self.seed * MIX + self.epoch)
        if self.members is None:
            rng.shuffle(order)
        else:
            groups = list(self.members)
            rng.shuffle(groups)
            order = [i for group in groups for i in group]
        rank = [0] * len(order)  # ties in length keep the shuffled order (a group's items stay together)
        for position, i in enumerate(order):
            rank[i] = position
        pool = self.batch_size * 50
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=lambda i: (self.lengths[i], rank[i]))
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        if self.num_replicas > 1 and self.even:  # equal counts per process: pad by repeating the first batches
            per_rank = math.ceil(len(batches) / self.num_replicas)
            batches = (batches * self.num_replicas)[: per_rank * self.num_replicas]
        elif len(batches) < self.num_replicas:  # too few batches to go round: every process takes a share of items
            items = [i for batch in batches for i in batch]
            return iter([items[self.rank::self.num_replicas]] if len(items) > self.rank else [])
        return iter(batches[self.rank::self.num_replicas])

    def __len__(self) -> int:
        count = math.ceil(len(self.lengths) / self.batch_size)
        if self.shuffle:  # pools may leave one short batch each
            pool = self.batch_size * 50
            count = sum(math.ceil(min(pool, len(self.lengths) - s) / self.batch_size)
                        for s in range(0, len(self.lengths), pool))
        if self.even:
            return math.ceil(count / self.num_replicas)
        if count < self.num_replicas:
            return int(len(self.lengths) > self.rank)
        return len(range(self.rank, count, self.num_replicas))


class EvaluationShard(DistributedSampler):
    """Process ``rank``'s share of an evaluation split, in order: every ``num_replicas``-th example, so that over
    all processes each example is seen exactly once. (Lightning's ``DistributedSampler`` repeats up to
    ``num_replicas - 1`` examples to even out the processes, which then count twice in the metrics; a sampler that
    is already a ``DistributedSampler`` is left in place.)"""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def evaluation_loader(dataset: Dataset, trainer: object | None, **kwargs: object) -> DataLoader:
    """A ``DataLoader`` over a validation or test split (no shuffling); under several processes each process reads
    its :class:`EvaluationShard`, so the synchronised metrics count every example once, as one process would."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world > 1:
        kwargs["sampler"] = EvaluationShard(dataset, world, trainer.global_rank)  # type: ignore[union-attr]
    return DataLoader(dataset, **kwargs)  # type: ignore[arg-type]
