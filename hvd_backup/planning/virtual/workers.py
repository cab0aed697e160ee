"""The virtual workers' data: each worker's batches in the order the trainer's loop takes them, the data set
held as tensors, and the communicator a trainer sizes a job of N ranks with."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

from ...train.data import SyntheticImages

__all__ = ["Ranks", "WorkerBatches", "fetch", "in_memory"]


class Ranks:
    """What a :class:`~hvd_backup.train.trainer.Trainer` asks its communicator while it sizes a job: N ranks."""

    def __init__(self, n: int):
        self.n = n

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return self.n


_IN_MEMORY: dict[tuple, TensorDataset] = {}


def in_memory(dataset):
    """A synthetic data set as tensors (its items are generated one by one, too slowly for thousands of batches),
    computed once per process; every other data set as it is."""
    if not isinstance(dataset, SyntheticImages):
        return dataset
    key = (dataset.size, dataset.image_size, dataset.num_classes, dataset.seed, dataset.channels)
    if key not in _IN_MEMORY:
        _IN_MEMORY[key] = TensorDataset(*next(iter(DataLoader(dataset, batch_size=len(dataset)))))
    return _IN_MEMORY[key]


def fetch(dataset, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``indices``, as the trainer's loader collates it."""
    if isinstance(dataset, TensorDataset):
        x, y = (t[indices] for t in dataset.tensors)
    else:
        x, y = default_collate([dataset[i] for i in indices])
    return x.to(device), y.to(device)


class WorkerBatches:
    """Worker ``rank``'s batches (as index lists) in the order the trainer's loop takes them: at a step of a new
    epoch a pass over its shard of that epoch from the step's batch on, else the next batch; an async worker
    that went through its shard before the epoch ended starts it again."""

    def __init__(self, trainer, rank: int):
        self.trainer, self.rank = trainer, rank
        self.epoch, self.batches = None, None

    def next(self, version: int) -> list[int]:
        """The batch the worker computes on when it starts a gradient on the parameters of step ``version``."""
        spe = self.trainer.steps_per_epoch
        if version // spe != self.epoch:
            self.epoch = version // spe
            self.batches = iter(self.trainer.shard(self.epoch, version % spe, rank=self.rank))
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.trainer.shard(self.epoch, 0, rank=self.rank))
            return next(self.batches)
