"""Small models the CLI tests load as `cli_models:NAME` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


class DataDependent(nn.Module):
    input_shape = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace a branch on a tensor value
            return self.conv(x)
        return x


def untraceable() -> nn.Module:
    return DataDependent()


def no_batchnorm() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    model.input_shape = (1, 3, 8, 8)
    return model


class Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))  # fmt: skip
    model.input_shape = (1, 3, 8, 8)
    with torch.no_grad():
        model[1].weight[:2] = 0
    return model


def mini_convnet() -> nn.Module:
    """The ConvNet's layout at 16×16 (conv-BN-ReLU-pool ×2, fc-BN-ReLU, fc): its last
    penalised BN feeds the classifier with no BN behind it, trains in seconds."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2)]  # fmt: skip

    model = nn.Sequential(*block(3, 16), *block(16, 32), nn.Flatten(), nn.Linear(32 * 4 * 4, 64),
                          nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))  # fmt: skip
    model.input_shape = (1, 3, 16, 16)
    return model


@dataclasses.dataclass
class Maps:
    """A model output TorchScript cannot hold (neither script nor trace takes a
    dataclass), registered as a pytree so torch.export can."""

    maps: torch.Tensor


torch.export.register_dataclass(Maps, serialized_type_name="cli_models.Maps")


class DataclassOutput(nn.Module):
    input_shape = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return Maps(self.head(torch.relu(self.bn(self.conv(x)))))


def dataclass_output() -> nn.Module:
    with torch.random.fork_rng():  # the same weights on every call: the test compares
        torch.manual_seed(0)
        model = DataclassOutput()
    with torch.no_grad():
        model.bn.weight[:2] = 0
    return model
