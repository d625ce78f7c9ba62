"""fvcore's FLOP counts read off a traced graph's shapes, without a forward pass.

`FlopCountAnalysis` traces the model with `torch.jit` (a full forward pass plus
the tracer's own cost) to find the shapes its handlers need. A GraphModule that
fxprune traced already carries those shapes (`node.meta["tensor_meta"]`, kept
current by a propagation on the meta device), so for graphs made only of ops
whose fvcore count is known — convolutions, linear layers, eval-mode batch norms
and adaptive average pooling, which fvcore counts, and the ops it does not count
(activations, additions, pooling, reshapes) — the same numbers follow from the
shapes with fvcore's own formulas. Any other op (matmul, einsum, interpolation,
norms, an opaque leaf, an aten op of the export front end) makes `count_graph`
return None, and the caller counts with fvcore: skip, never guess.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.modules import BorderTerm
from fxprune.trace import propagate_shapes

__all__ = ["count_graph_flops"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# modules whose ops fvcore does not count (no handler): 0 FLOPs, as fvcore reports
_UNCOUNTED_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
    nn.LeakyReLU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Flatten,
)  # fmt: skip
_UNCOUNTED_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.getitem,
    operator.iadd, operator.imul, operator.floordiv, torch.add, torch.sub, torch.mul,
    torch.div, torch.cat, torch.flatten, torch.relu, torch.sigmoid, torch.tanh,
    torch.chunk, torch.split, torch.reshape, torch.transpose, torch.permute, F.relu,
    F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.dropout, F.max_pool2d,
    F.avg_pool2d, F.pad, getattr,
}  # fmt: skip
_UNCOUNTED_METHODS = {
    "view", "reshape", "flatten", "size", "dim", "transpose", "permute", "contiguous",
    "chunk", "split", "add", "add_", "mul", "mul_", "relu", "relu_", "sigmoid", "expand",
    "expand_as", "unsqueeze", "squeeze", "narrow", "mean",
}  # fmt: skip
# torchvision's stochastic depth: the identity in eval mode, random masks in training;
# fvcore counts neither (matched by name: report does not import torchvision)
_UNCOUNTED_NAMED = {("torchvision.ops.stochastic_depth", "stochastic_depth")}


def count_graph_flops(gm: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]] | None:
    """(total FLOPs, FLOPs per called module path) as fvcore counts them on `example`,
    from shapes alone; None when `gm` is not a GraphModule or holds an op whose fvcore
    count this module does not know. Re-propagates shapes (on the meta device) first,
    so a compiled graph's stale shapes are brought up to date."""
    if not isinstance(gm, fx.GraphModule):  # (count_model counts in eval mode)
        return None
    modules = dict(gm.named_modules())
    if not all(_known(node, modules) for node in gm.graph.nodes):
        return None
    try:
        propagate_shapes(gm, example)
    except Exception:  # noqa: BLE001 - fvcore will say what is wrong with the model
        return None
    total, by_module = 0, {}
    for node in gm.graph.nodes:
        flops = _node_flops(node, modules)
        if flops is None:
            return None
        if flops and node.op == "call_module":
            by_module[node.target] = by_module.get(node.target, 0) + flops
        total += flops
    return total, by_module


def _known(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op == "call_function":
        named = (getattr(node.target, "__module__", None), getattr(node.target, "__name__", None))
        return (
            node.target in _UNCOUNTED_FUNCTIONS
            or node.target is F.adaptive_avg_pool2d
            or named in _UNCOUNTED_NAMED
        )
    if node.op == "call_method":
        return node.target in _UNCOUNTED_METHODS
    module = modules.get(node.target)
    if type(module) in _CONVS:
        return module.padding_mode == "zeros"
    if type(module) in _BATCHNORMS:
        return module.track_running_stats and module.running_mean is not None
    return type(module) in (*_UNCOUNTED_MODULES, nn.Linear, nn.AdaptiveAvgPool2d, BorderTerm)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _node_flops(node: fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """fvcore's count for one node (its handler's formula), None if a shape is missing."""
    counted = node.op == "call_module" or node.target is F.adaptive_avg_pool2d
    module = modules.get(node.target) if node.op == "call_module" else None
    if not counted or isinstance(module, _UNCOUNTED_MODULES):
        return 0
    out = _shape(node)
    x = _shape(node.args[0]) if node.args else None
    if out is None or x is None:
        return None
    if isinstance(module, _CONVS):  # conv_flop_count: batch · prod(w) · prod(out spatial)
        return x[0] * module.weight.numel() * math.prod(out[2:])
    if isinstance(module, BorderTerm):  # a conv of a 1-sample ones tensor with its kernel
        return module.kernel.numel() * math.prod(out[2:])
    if isinstance(module, nn.Linear):  # linear_flop_jit: prod(input) · out_features
        return math.prod(x) * module.out_features
    if isinstance(module, _BATCHNORMS):  # batchnorm_flop_jit, eval: 1 or 2 per element
        return math.prod(x) * (2 if module.weight is not None else 1)
    return math.prod(x)  # adaptive_avg_pool2d: one per input element
