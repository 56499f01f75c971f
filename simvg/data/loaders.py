"""The data loaders of a run: a resumable, sharded train order, unpadded evaluation shards, and ``build_loaders``.

Exact resume: the sample order of an epoch is a permutation drawn from (seed, epoch), padded by wrap-around and
sharded over ranks the way ``DistributedSampler`` does it, and the dataset draws expressions and augmentation from
(seed, epoch, index); a resumed run skips the batches already trained and sees the same batches as an uninterrupted
one. Evaluation shards are not padded, so every sample counts once (docs/design.md B12).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from simvg.config import Config
from simvg.data.collate import collate
from simvg.data.datasets import Tokenizer, build_dataset, dataset_task, resolve_paths
from simvg.utils.dist import DistInfo


def batches_per_epoch(length: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per rank in an epoch of ``length`` samples (the last one may be short; each rank holds
    ceil(length / world_size) samples)."""
    return math.ceil(math.ceil(length / world_size) / batch_size)


class ResumableSampler(Sampler[int]):
    """Epoch permutation from (seed, epoch), padded by wrap-around to a multiple of the world size and sharded
    as ``rank::world`` (``DistributedSampler``'s layout, so K ranks x batch b cover the same samples as one process
    with batch K*b); ``set_epoch(epoch, start_batch)`` skips batches already trained (resume)."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def shard(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        pad = (-self.length) % self.world_size
        order = np.concatenate([order, order[:pad]])
        return order[self.rank :: self.world_size].tolist()

    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.length, self.batch_size, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(0, math.ceil(self.length / self.world_size) - self.start_batch * self.batch_size)


class ShardSampler(Sampler[int]):
    """Eval sharding without padding: rank r gets indices r, r + world, ... (every sample exactly once overall;
    ``DistributedSampler`` would duplicate samples to even the shards out, docs/design.md B12)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler[int], num_workers: int) -> DataLoader:
    """A ``DataLoader`` yielding ``simvg.data.collate.Batch`` in ``sampler``'s order, the last batch possibly short."""
    # A fixed generator keeps the loader from drawing its worker base seed from the global RNG, which would shift
    # the dropout stream of a resumed run; the dataset seeds its own draws from (seed, epoch, index).
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        drop_last=False, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def eval_loader(cfg: Config, dataset: Dataset, info: DistInfo) -> DataLoader:
    """An unpadded, sharded loader over ``dataset`` (its first ``eval.max_samples`` items when set)."""
    if cfg.eval.max_samples and cfg.eval.max_samples < len(dataset):
        dataset = Subset(dataset, range(cfg.eval.max_samples))
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return make_loader(dataset, cfg.eval.batch_size, sampler, cfg.data.num_workers)


def build_loaders(cfg: Config, tokenizer: Tokenizer, info: DistInfo) -> tuple[str, DataLoader, dict[str, DataLoader]]:
    """(task, train loader over a ``ResumableSampler``, {val split: eval loader}) of ``cfg``'s data for this rank."""
    spec, _, _ = resolve_paths(cfg.data)
    task = dataset_task(spec, Path(cfg.data.root))
    seed = cfg.train.seed
    train_set = build_dataset(cfg.data, cfg.data.train_split, True, tokenizer, seed=seed)
    sampler = ResumableSampler(len(train_set), cfg.train.batch_size, seed, info.rank, info.world_size)
    train_loader = make_loader(train_set, cfg.train.batch_size, sampler, cfg.data.num_workers)
    val_loaders = {}
    for split in cfg.data.val_splits:
        val_loaders[split] = eval_loader(cfg, build_dataset(cfg.data, split, False, tokenizer, seed=seed), info)
    return task, train_loader, val_loaders
