"""The op vocabulary of the channel analysis: which ops are elementwise,
binary, reshapes, concatenations, … as modules, functions and methods, and
small readers of fx nodes (shape, concrete arguments, a printable op name).

Everything that asks "what kind of op is this?" reads these tables; the per-op
rules in `fxprune.analysis.rules` are looked up by op from them.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
UPSAMPLE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.silu, F.gelu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clamp, torch.clip,
    operator.neg, torch.neg, torch.abs, torch.exp,
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
    "contiguous", "clone", "detach", "float", "abs", "exp", "neg", "hardtanh_",
}  # fmt: skip
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}  # fmt: skip
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
PERMUTE_FUNCTIONS = {torch.transpose, torch.permute}
PERMUTE_METHODS = {"transpose", "permute"}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
SPLIT_FUNCTIONS = {torch.split, torch.chunk}
SPLIT_METHODS = {"split", "chunk"}
AUGMENTED = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "iand", "ior", "ixor"}
PLAIN_VALUE_FUNCTIONS = {builtins.getattr, operator.floordiv, operator.mod, len}
PLAIN_VALUE_METHODS = {"size", "dim"}


def tensor_shape(node) -> tuple[int, ...] | None:
    """Shape of a node's tensor output, or None when it is not a single tensor."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def concrete(arg):
    """An fx argument with Nodes replaced by their recorded plain values."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("value", arg)
    if isinstance(arg, (tuple, list)):
        return type(arg)(concrete(a) for a in arg)
    return arg


def op_name(node: fx.Node) -> str:
    """A short human name for the op a node runs."""
    if node.op == "call_module":
        return (
            f"{node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
        )
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm of any rank, and torchvision's FrozenBatchNorm2d."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return type(module).__name__ == "FrozenBatchNorm2d"


def target_name(node: fx.Node) -> str:
    """The bare name of what a node calls: `add`, `view`, `relu_`, a module path."""
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", "")


def mutates_input(node: fx.Node, module: nn.Module | None = None) -> bool:
    """True when the op writes into its first argument (`x.add_(y)`, `operator.iadd`,
    `F.relu(x, inplace=True)`, a module with `inplace=True`)."""
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    name = target_name(node)
    in_place_name = name.endswith("_") and not name.endswith("__")
    augmented = node.op == "call_function" and name in AUGMENTED
    return in_place_name or augmented or bool(node.kwargs.get("inplace", False))


def reads_only_shape(node: fx.Node) -> bool:
    """`x.size()`, `x.dim()`, `getattr(x, "shape")`: the result depends on the
    shape of the input, not its values. Never true for a node that yields a tensor."""
    if node.meta.get("tensor_meta") is not None:
        return False
    if node.op == "call_method":
        return node.target in PLAIN_VALUE_METHODS
    return node.op == "call_function" and node.target in PLAIN_VALUE_FUNCTIONS


__all__ = [
    "AUGMENTED",
    "AVG_POOL_MODULES",
    "BINARY_FUNCTIONS",
    "BINARY_METHODS",
    "CAT_FUNCTIONS",
    "CONV_MODULES",
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS",
    "ELEMENTWISE_MODULES",
    "PERMUTE_FUNCTIONS",
    "PERMUTE_METHODS",
    "PLAIN_VALUE_FUNCTIONS",
    "PLAIN_VALUE_METHODS",
    "REDUCE_FUNCTIONS",
    "REDUCE_METHODS",
    "RESHAPE_FUNCTIONS",
    "RESHAPE_METHODS",
    "SPLIT_FUNCTIONS",
    "SPLIT_METHODS",
    "UPSAMPLE_MODULES",
    "concrete",
    "is_batchnorm",
    "mutates_input",
    "op_name",
    "reads_only_shape",
    "target_name",
    "tensor_shape",
]
