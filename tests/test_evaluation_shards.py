"""Evaluation under several processes sees every example exactly once (issue: DDP validation counted the examples
Lightning's DistributedSampler repeats to even out the processes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from bp_apps.core.samplers import BucketBatchSampler, EvaluationShard, evaluation_loader


@pytest.mark.parametrize(("size", "replicas"), [(135, 2), (10, 3), (2, 2), (7, 4)])
def test_shards_cover_the_split_once(size: int, replicas: int) -> None:
    dataset = TensorDataset(torch.arange(size))
    shards = [list(EvaluationShard(dataset, replicas, rank)) for rank in range(replicas)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(EvaluationShard(dataset, replicas, rank)) for rank in range(replicas)] == [len(s) for s in shards]
    # Lightning's own sampler would repeat examples here (the behaviour the shard replaces)
    padded = [list(DistributedSampler(dataset, replicas, rank, shuffle=False)) for rank in range(replicas)]
    assert sum(map(len, padded)) > size or size % replicas == 0


def test_evaluation_loader_shards_only_under_several_processes() -> None:
    dataset = TensorDataset(torch.arange(9))
    alone = evaluation_loader(dataset, None, batch_size=4)
    assert [b[0].tolist() for b in alone] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    second = evaluation_loader(dataset, SimpleNamespace(world_size=2, global_rank=1), batch_size=4)
    assert isinstance(second.sampler, EvaluationShard)  # a DistributedSampler: Lightning leaves it in place
    assert [b[0].tolist() for b in second] == [[1, 3, 5, 7]]


@pytest.mark.parametrize(("items", "batch", "replicas"), [(40, 8, 2), (41, 8, 3), (5, 8, 2), (3, 8, 4)])
def test_uneven_bucket_batches_count_every_item_once(items: int, batch: int, replicas: int) -> None:
    lengths = [(i * 7) % 13 + 1 for i in range(items)]
    seen = []
    for rank in range(replicas):
        sampler = BucketBatchSampler(lengths, batch, shuffle=False, num_replicas=replicas, rank=rank, even=False)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(items))


def test_training_bucket_batches_stay_even_across_processes() -> None:
    lengths = list(range(1, 42))
    counts = {len(list(BucketBatchSampler(lengths, 8, num_replicas=3, rank=rank))) for rank in range(3)}
    assert len(counts) == 1, "every process must take the same number of training steps"
