"""The model registry: factories registered by name, looked up by name.

timm-style: ``@register_model`` on a factory ``() -> nn.Module``, then
``create_model(name)``, ``list_models(pattern)`` and ``model_info(name)``.
The zoo is data, not if/else chains: everything a caller needs to build and
trace a model (its example input shape, which submodule to trace) lives in
its ``ModelInfo``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fxprune.errors import LoadError, UsageError

KINDS: tuple[str, ...] = ("cifar", "classification", "segmentation", "video", "detection")

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows about one model, without building it.

    ``input_shape`` is the example input including the batch dimension,
    e.g. ``(1, 3, 32, 32)``. ``submodule`` names the attribute to trace when
    the whole model cannot be traced (detection models: ``"backbone"``).
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    submodule: str | None
    description: str
    factory: Factory


_REGISTRY: dict[str, ModelInfo] = {}


def add_model(info: ModelInfo) -> None:
    """Register ``info``; a duplicate name or an unknown kind is a programming error."""
    if info.kind not in KINDS:
        raise ValueError(f"model {info.name!r}: kind {info.kind!r} is not one of {KINDS}")
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = info


def register_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    kind: str,
    submodule: str | None = None,
    description: str = "",
) -> Callable[[Factory], Factory]:
    """Decorator: register a factory under ``name`` and return it unchanged."""

    def decorator(factory: Factory) -> Factory:
        doc = description or _first_line(factory.__doc__)
        add_model(ModelInfo(name, kind, tuple(input_shape), submodule, doc, factory))
        return factory

    return decorator


def model_info(name: str) -> ModelInfo:
    """Return the registered ``ModelInfo`` for ``name``; raise ``LoadError`` if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoadError(unknown_name_message("model", name, _REGISTRY)) from None


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a fresh, randomly initialised model; ``kwargs`` go to its factory."""
    return model_info(name).factory(**kwargs)


def list_models(pattern: str | None = None, kind: str | None = None) -> list[str]:
    """Sorted names matching the fnmatch ``pattern`` (all if None) and ``kind`` (any if None)."""
    if kind is not None and kind not in KINDS:
        raise UsageError(f"unknown model kind {kind!r}; expected one of: {', '.join(KINDS)}")
    names = (info.name for info in _REGISTRY.values() if kind is None or info.kind == kind)
    return sorted(n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern))


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` contains any BatchNorm layer (1d, 2d, 3d or SyncBatchNorm)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def unknown_name_message(what: str, name: str, known: object) -> str:
    """One line: ``unknown <what> 'name' (did you mean: a, b?); see 'fxprune zoo list'``."""
    candidates = list(known)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    # get_close_matches breaks score ties by reverse name order; alphabetical reads better.
    close.sort(key=lambda c: (-difflib.SequenceMatcher(None, name, c).ratio(), c))
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; see 'fxprune zoo list'"


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


__all__ = [
    "Factory",
    "KINDS",
    "ModelInfo",
    "add_model",
    "create_model",
    "has_batchnorm",
    "list_models",
    "model_info",
    "register_model",
    "unknown_name_message",
]
