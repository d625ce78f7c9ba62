"""Every torchvision classification, segmentation, video and detection model, by name.

Registration only records names and example input shapes; no model is built
until ``create_model`` is called. Every factory passes ``weights=None`` (and
``weights_backbone=None`` where the builder has a backbone): nothing is ever
downloaded. Weights come from a file the user gives.

Skipped families, on purpose:

- ``torchvision.models.quantization``: with ``quantize=False`` these are the
  classification models plus quant/dequant stubs (duplicates); with
  ``quantize=True`` they are int8 modules whose BatchNorms are already fused
  away, so there is no γ to prune.
- ``torchvision.models.optical_flow`` (RAFT): takes an image *pair* and
  returns a list of iterative flow refinements; it has no single example
  input of the kind the registry describes and no classifier-style channel
  pipeline to prune.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torchvision.models as tvm
from torch import nn

from fxprune.errors import LoadError

from .registry import Factory, ModelInfo, add_model, model_info, unknown_name_message

# The family modules we register, by registry kind.
FAMILIES: dict[str, ModuleType] = {
    "classification": tvm,
    "segmentation": tvm.segmentation,
    "video": tvm.video,
    "detection": tvm.detection,
}

# Example inputs, batch included. 224 (not 520) for segmentation keeps tests
# fast; the segmentation models are fully convolutional, any size works.
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "classification": (1, 3, 224, 224),
    "segmentation": (1, 3, 224, 224),
    "video": (1, 3, 16, 112, 112),
    "detection": (1, 3, 320, 320),
}
SHAPE_OVERRIDES: dict[str, tuple[int, ...]] = {
    "inception_v3": (1, 3, 299, 299),
    # s3d's final average pool needs 224x224 frames; MViT has a fixed
    # 16x224x224 positional embedding.
    "s3d": (1, 3, 16, 224, 224),
    "mvit_v1_b": (1, 3, 16, 224, 224),
    "mvit_v2_s": (1, 3, 16, 224, 224),
}

# Builder arguments so that every model builds offline with random weights.
KIND_KWARGS: dict[str, dict[str, object]] = {
    "classification": {"weights": None},
    "segmentation": {"weights": None, "weights_backbone": None},
    "video": {"weights": None},
    "detection": {"weights": None, "weights_backbone": None},
}
# Without weights these builders would warn and build auxiliary heads that
# change the train-mode output type; we want one tensor out in every mode.
MODEL_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}

# Detection models cannot be traced whole (data-dependent post-processing);
# their backbone can.
KIND_SUBMODULE: dict[str, str | None] = {"detection": "backbone"}

_TORCHVISION_NAMES: set[str] = set()


def build_torchvision_model(name: str, kind: str, **overrides: object) -> nn.Module:
    """Build torchvision model ``name`` with random weights; ``overrides`` win over defaults."""
    kwargs = {**KIND_KWARGS[kind], **MODEL_KWARGS.get(name, {}), **overrides}
    return tvm.get_model(name, **kwargs)


def register_torchvision_models() -> None:
    """Register every model of the families in ``FAMILIES`` (idempotent, builds nothing)."""
    for kind, family in FAMILIES.items():
        for name in tvm.list_models(module=family):
            if name in _TORCHVISION_NAMES:
                continue
            factory: Factory = functools.partial(build_torchvision_model, name, kind)
            shape = SHAPE_OVERRIDES.get(name, DEFAULT_SHAPES[kind])
            doc = f"torchvision {kind}: {_builder_summary(name)}"
            add_model(ModelInfo(name, kind, shape, KIND_SUBMODULE.get(kind), doc, factory))
            _TORCHVISION_NAMES.add(name)


def torchvision_builder(name: str) -> tuple[Factory, str, tuple[int, ...], str | None]:
    """``(factory, kind, input_shape, submodule)`` for a torchvision model name.

    Only torchvision names are accepted (``resnet20`` is ours, not
    torchvision's); anything else raises ``LoadError`` with suggestions.
    """
    if name not in _TORCHVISION_NAMES:
        raise LoadError(unknown_name_message("torchvision model", name, _TORCHVISION_NAMES))
    info = model_info(name)
    return info.factory, info.kind, info.input_shape, info.submodule


def _builder_summary(name: str) -> str:
    """First sentence of the builder's docstring, without reST markup."""
    doc = tvm.get_model_builder(name).__doc__ or name
    line = doc.strip().split("\n\n")[0].replace("\n", " ")
    return " ".join(line.replace("`", "").split())


__all__ = [
    "DEFAULT_SHAPES",
    "FAMILIES",
    "KIND_KWARGS",
    "KIND_SUBMODULE",
    "MODEL_KWARGS",
    "SHAPE_OVERRIDES",
    "build_torchvision_model",
    "register_torchvision_models",
    "torchvision_builder",
]
