"""Parameter and FLOP counts of a model, per counted layer and in total.

All numbers come from fvcore: ``FlopCountAnalysis`` (one fused multiply-add counts as
one FLOP, fvcore's convention) and ``parameter_count`` (parameters only, no buffers).
Tables live in `fxprune.report.tables`.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxprune.report.graph_counts import count_graph_flops
from fxprune.verify import eval_mode, flatten_outputs

FLOPS_UNIT = "fvcore: one multiply-add = one FLOP"
_COUNTED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class LayerCount:
    """One Conv/Linear/BatchNorm leaf: channel widths, parameters and fvcore FLOPs."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    params: int
    flops: int


@dataclass
class ModelCounts:
    """fvcore totals for a model plus one LayerCount per counted leaf, in call order."""

    params: int
    flops: int
    input_shape: tuple[int, ...]
    layers: dict[str, LayerCount] = field(default_factory=dict)
    unsupported_ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSummary:
    """One row of the paper's Table 1/2: size, cost, accuracy (percent) and layer widths."""

    params: int
    flops: int
    accuracy: float | None
    channels: tuple[int, ...]

    @classmethod
    def from_counts(cls, counts: ModelCounts, accuracy: float | None = None) -> ModelSummary:
        """Summarise ``counts``; widths are Conv/Linear output widths, minus the output layer.

        The last Conv/Linear (the classifier) is left out because its width is fixed by
        the task, as in the paper's ``96-192-192-384``.
        """
        widths = [c.out_channels for c in counts.layers.values() if "BatchNorm" not in c.kind]
        return cls(counts.params, counts.flops, accuracy, tuple(widths[:-1]))


# --------------------------------------------------------------------------- counting


def count_model(
    module: nn.Module, example: torch.Tensor, *, from_shapes: bool = False
) -> ModelCounts:
    """Count parameters and FLOPs of ``module`` on ``example`` with fvcore (eval, no_grad).

    Every Conv/Linear/BatchNorm leaf gets a row keyed by its qualified module name, in
    the order the forward pass first calls it (uncalled layers last, with 0 FLOPs).
    Operators fvcore cannot count are listed in ``unsupported_ops``, not warned about.

    With ``from_shapes``, a GraphModule made only of ops whose fvcore count is known
    (`graph_counts`) is counted from its shapes, with fvcore's formulas and without a
    forward pass: the same numbers, but ``unsupported_ops`` stays empty. Any other
    model is counted by fvcore as above.
    """
    counted = count_graph_flops(module, example) if from_shapes else None
    flop_count_analysis, parameter_count = _fvcore() if counted is None else (None, _param_count)
    if counted is not None:
        total_flops, by_module = counted
        order = [n.target for n in module.graph.nodes if n.op == "call_module"]
        order = list(
            dict.fromkeys(n for n in order if isinstance(module.get_submodule(n), _COUNTED))
        )
        unsupported: dict[str, int] = {}
    else:
        with eval_mode(module), _call_order(module) as order, torch.no_grad():
            analysis = flop_count_analysis(_TensorOutputs(module), example)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total_flops = int(analysis.total())
            by_module = {_inner_name(k): v for k, v in analysis.by_module().items()}
            unsupported = dict(analysis.unsupported_ops())
    params = parameter_count(module)
    leaves = dict(module.named_modules())
    names = order + [n for n in leaves if n not in order]
    layers = {
        name: _layer_count(name, leaves[name], params[name], by_module.get(name, 0))
        for name in names
        if isinstance(leaves[name], _COUNTED)
    }
    return ModelCounts(params[""], total_flops, tuple(example.shape), layers, unsupported)


class _TensorOutputs(nn.Module):
    """`inner` with its outputs as a flat tuple of tensors: fvcore traces with
    torch.jit, which takes no other output (a dataclass, a string)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.inner(x)))


def _inner_name(name: str) -> str:
    """A `_TensorOutputs` module path as the path in the user's module."""
    return "" if name in ("", "inner") else name.removeprefix("inner.")


def _layer_count(name: str, layer: nn.Module, params: int, flops: int) -> LayerCount:
    if isinstance(layer, nn.Linear):
        widths = (layer.in_features, layer.out_features)
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        widths = (layer.num_features, layer.num_features)
    else:
        widths = (layer.in_channels, layer.out_channels)
    return LayerCount(name, type(layer).__name__, *widths, int(params), int(flops))


def _param_count(module: nn.Module) -> dict[str, int]:
    """fvcore's `parameter_count` (parameters per module prefix, "" the whole model),
    without importing fvcore."""
    counts: dict[str, int] = {}
    for name, param in module.named_parameters():
        parts = name.split(".")
        for k in range(len(parts) + 1):
            prefix = ".".join(parts[:k])
            counts[prefix] = counts.get(prefix, 0) + param.numel()
    return collections.defaultdict(int, counts)


def _fvcore() -> tuple[Any, Any]:
    # Importing fvcore.nn scripts helpers at import time, which warns in recent torch.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        from fvcore.nn import FlopCountAnalysis, parameter_count
    return FlopCountAnalysis, parameter_count


@contextlib.contextmanager
def _call_order(module: nn.Module) -> Iterator[list[str]]:
    """Collect qualified names of counted leaves in the order they are first called."""
    order: list[str] = []

    def hook(name: str) -> Any:
        return lambda *_: None if name in order else order.append(name)

    handles = [
        m.register_forward_pre_hook(hook(name))
        for name, m in module.named_modules()
        if isinstance(m, _COUNTED)
    ]
    try:
        yield order
    finally:
        for handle in handles:
            handle.remove()


__all__ = [
    "FLOPS_UNIT",
    "LayerCount",
    "ModelCounts",
    "ModelSummary",
    "count_model",
]
