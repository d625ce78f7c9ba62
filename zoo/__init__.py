"""fxprune's model zoo: the paper's CIFAR models and every torchvision model, by name.

>>> from fxprune.zoo import create_model, list_models, model_info
>>> model = create_model("resnet20")
>>> model_info("resnet20").input_shape
(1, 3, 32, 32)

Importing the zoo registers names only; models are built on ``create_model``.
"""

from __future__ import annotations

from . import cifar as _cifar  # noqa: F401  (registers the CIFAR models)
from .registry import (
    KINDS,
    ModelInfo,
    create_model,
    has_batchnorm,
    list_models,
    model_info,
    register_model,
)
from .torchvision_models import register_torchvision_models, torchvision_builder

register_torchvision_models()

__all__ = [
    "KINDS",
    "ModelInfo",
    "create_model",
    "has_batchnorm",
    "list_models",
    "model_info",
    "register_model",
    "torchvision_builder",
]
