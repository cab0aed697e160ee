"""The data sets the trainer knows and what each trains with by default. No torch here: the command line
checks its flags against this before anything heavy is imported."""

from __future__ import annotations

__all__ = ["DATASETS", "default_arch", "default_epochs", "default_lr", "default_warmup"]

DATASETS = ("digits", "cifar10", "imagenet", "synthetic")


def default_arch(dataset: str) -> str:
    return {"digits": "digits_cnn", "cifar10": "cifar_resnet18", "imagenet": "resnet50"}.get(dataset, "resnet18")


def default_epochs(dataset: str) -> float:
    return {"digits": 15.0, "cifar10": 30.0, "imagenet": 90.0}.get(dataset, 1.0)


def default_lr(dataset: str) -> float:
    return 0.2 if dataset == "digits" else 0.1


def default_warmup(dataset: str) -> int:
    return 10 if dataset == "digits" else 0
