"""Models by name: a small CNN for digits, a CIFAR-sized ResNet, and every ``torchvision.models`` name."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .catalog import default_arch

__all__ = ["ModelError", "build_model", "default_arch", "model_names"]

_OWN = ("digits_cnn", "cifar_resnet18")


class ModelError(UserError):
    """An unknown model name."""


def model_names() -> list[str]:
    import torchvision

    return sorted(_OWN) + sorted(torchvision.models.list_models(module=torchvision.models))


def _digits_cnn(num_classes: int, channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def _cifar_resnet18(num_classes: int, channels: int) -> nn.Module:
    import torchvision

    # torchvision's ResNet-18 with the usual CIFAR stem: a 3x3 stride-1 first convolution and no max-pool.
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(arch: str, *, num_classes: int, channels: int = 3) -> nn.Module:
    if arch == "digits_cnn":
        return _digits_cnn(num_classes, channels)
    if arch == "cifar_resnet18":
        return _cifar_resnet18(num_classes, channels)
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"--arch {arch!r} is not a model here: use digits_cnn, cifar_resnet18 or a torchvision.models "
            f"classification name (e.g. resnet18, resnet50, mobilenet_v3_small; `--arch list` shows all)"
        )
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    if channels != 3:
        raise ModelError(f"--arch {arch}: torchvision models take 3-channel images, this data set has {channels}")
    return model
