"""Data sets and per-rank shards.

``digits`` (scikit-learn's 8x8 digits, embedded, the default), ``cifar10`` (torchvision's on-disk format under
``--data``), ``imagenet`` (an ``ImageFolder`` with ``train/`` and ``val/`` under ``--data``) and ``synthetic``
(random images of any size with a learnable class signal, for throughput). Every rank reads its own shard of
a per-epoch permutation (like ``DistributedSampler``); the epoch follows the global step, so all ranks agree
on it even when a slow rank computes fewer batches.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ..errors import UserError
from .catalog import DATASETS

__all__ = ["DATASETS", "DataError", "Split", "ShardBatches", "load_dataset", "shard_loader", "eval_loader"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DataError(UserError):
    """A data set that cannot be used as asked (missing, empty, too small)."""


@dataclass
class Split:
    train: Dataset
    test: Dataset
    num_classes: int
    channels: int
    image_size: int


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits(return_X_y=True)`` gives them, read from the file that scikit-learn
    ships (a row per image: 64 pixels, then the label) when it is where it has always been: importing
    ``sklearn.datasets`` next to torch costs 2.5 s of CPU, which every rank of a job paid at start."""
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
    if os.path.isfile(path):
        rows = np.loadtxt(path, delimiter=",")
        return rows[:, :-1], rows[:, -1].astype(int)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def _digits(seed: int) -> Split:
    x, y = _load_digits()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(y, dtype=torch.long)
    # A fixed split, the same on every rank and every run: 1437 train, 360 test.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    train, test = order[:1437], order[1437:]
    return Split(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), 10, 1, 8)


def _require_dir(path: str | None, what: str) -> str:
    if not path:
        raise DataError(f"--data is required for {what}")
    if not os.path.isdir(path):
        raise DataError(f"--data {path!r}: no such directory (expected {what})")
    return path


def _cifar10(root: str | None, download: bool) -> Split:
    from torchvision import datasets
    from torchvision import transforms as T

    root = root or "data/cifar10"
    if not download:
        _require_dir(root, "CIFAR-10's cifar-10-batches-py/ (or pass --download)")
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    cls = datasets.CIFAR10 if download else _cifar10_on_disk()
    try:
        train = cls(root, train=True, transform=train_tf, download=download)
        test = cls(root, train=False, transform=test_tf, download=download)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
        raise DataError(f"--data {root!r}: {str(exc).strip() or type(exc).__name__} "
                        "(expected cifar-10-batches-py/ from CIFAR-10's python version)") from None
    return Split(train, test, 10, 3, 32)


def _cifar10_on_disk():
    """torchvision's CIFAR10 reading any copy in the on-disk format. torchvision checks the files against the
    official MD5 sums, which refuses a copy converted or subsetted elsewhere; here the format is checked by
    loading it, and a missing file is named. (Made on first use: importing torchvision takes seconds, which
    every rank of a job on the digits would pay at start.)"""
    from torchvision.datasets import CIFAR10

    class CIFAR10OnDisk(CIFAR10):
        meta = dict(CIFAR10.meta, md5=None)

        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise RuntimeError(f"missing {', '.join(missing)} in {folder}")
            return True

    return CIFAR10OnDisk


def _imagenet(root: str | None, image_size: int) -> Split:
    from torchvision import datasets
    from torchvision import transforms as T

    root = _require_dir(root, "an ImageNet folder with train/ and val/")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    resize = int(round(image_size * 256 / 224))
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
    splits = []
    for name, tf in (("train", train_tf), ("val", val_tf)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise DataError(f"--data {root!r}: missing {name}/ (expected train/ and val/ with one folder per class)")
        try:
            splits.append(datasets.ImageFolder(folder, transform=tf))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"--data {root!r}: {name}/: {exc}") from None
    train, val = splits
    if train.classes != val.classes:
        raise DataError(f"--data {root!r}: train/ has {len(train.classes)} classes, val/ has {len(val.classes)}")
    return Split(train, val, len(train.classes), 3, image_size)


class SyntheticImages(Dataset):
    """Random images whose class shifts the mean of one channel-and-quadrant: learnable, generated on the fly."""

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int, channels: int = 3):
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.channels = seed, channels

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        image = torch.randn(self.channels, self.image_size, self.image_size, generator=g)
        half = self.image_size // 2
        quadrant, channel = divmod(label, self.channels)
        r, c = divmod(quadrant % 4, 2)
        # A faint signal under unit noise, so that accuracy climbs over epochs rather than at once.
        image[channel, r * half:(r + 1) * half, c * half:(c + 1) * half] += 0.3 + 0.1 * (label // (4 * self.channels))
        return image, label


def load_dataset(name: str, *, data: str | None = None, download: bool = False, image_size: int = 224,
                 num_classes: int = 1000, synthetic_size: int = 10_000, seed: int = 0) -> Split:
    if name == "digits":
        return _digits(seed)
    if name == "cifar10":
        return _cifar10(data, download)
    if name == "imagenet":
        return _imagenet(data, image_size)
    if name == "synthetic":
        train = SyntheticImages(synthetic_size, image_size, num_classes, seed)
        test = SyntheticImages(max(1, synthetic_size // 10), image_size, num_classes, seed + 1)
        return Split(train, test, num_classes, 3, image_size)
    raise DataError(f"--dataset {name!r} is not one of {', '.join(DATASETS)}")


class ShardBatches(Sampler):
    """Batches of one rank's shard of a per-epoch permutation, from batch ``start`` on. Every batch is full;
    the shard is the permutation's ``rank::size`` slice, padded by wrapping like ``DistributedSampler``."""

    def __init__(self, length: int, *, rank: int, size: int, batch_size: int, seed: int, epoch: int, start: int = 0):
        self.length, self.rank, self.size, self.batch_size = length, rank, size, batch_size
        self.seed, self.epoch, self.start = seed, epoch, start
        self.shard_len = math.ceil(length / size)
        self.batches = self.shard_len // batch_size
        if self.batches < 1:
            raise DataError(
                f"the training set has {length} samples, {self.shard_len} per rank on {size} ranks: "
                f"fewer than one batch of --batch-size {batch_size}"
            )

    def __len__(self):
        return max(0, self.batches - self.start)

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        total = self.shard_len * self.size
        perm = np.concatenate([perm, perm[: total - self.length]]) if total > self.length else perm
        shard = perm[self.rank::self.size]
        for b in range(self.start, self.batches):
            yield shard[b * self.batch_size:(b + 1) * self.batch_size].tolist()


def shard_loader(dataset: Dataset, sampler: ShardBatches, *, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False)


def eval_loader(dataset: Dataset, *, rank: int, size: int, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """This rank's part of the whole evaluation set (every sample exactly once across ranks)."""
    indices = list(range(rank, len(dataset), size))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
