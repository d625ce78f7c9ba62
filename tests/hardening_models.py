"""Factories the hardening tests load as `hardening_models:NAME` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

from torch import nn


def _small(shape: object) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.input_shape = shape
    return model


def huge_shape() -> nn.Module:
    return _small((1, 3, 100_000, 100_000))


def text_shape() -> nn.Module:
    return _small("1,3,8,8")


def negative_shape() -> nn.Module:
    return _small((1, 3, -8, 8))
