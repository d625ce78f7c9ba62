"""Per-op channel-id rules (DESIGN.md, "Channel ids"), applied node by node.

`ChannelLabeller.run()` walks a shape-propagated graph in order and writes
`node.meta["channels"]` / `node.meta["channel_rule"]`. Anything it does not
recognise is frozen with a reason; it never assumes an op is channel-wise.
"""

from __future__ import annotations

import builtins
import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from fxprune.channels import UnionFind

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


class ChannelLabeller:
    """Applies the channel rules to every node of a GraphModule, in order."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.block_of: list[int] = []  # raw id -> the block (node output) that created it
        self.num_blocks = 0
        self.frozen: dict[int, str] = {}  # raw id -> reason
        self.sites: list[tuple[str, str, str, str, np.ndarray]] = []
        self.module_calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.module_calls[node.target] = self.module_calls.get(node.target, 0) + 1

    # -- bookkeeping -------------------------------------------------------
    def fresh(self, shape: tuple[int, ...]) -> np.ndarray:
        ids = self.uf.make(math.prod(shape)).reshape(shape)
        self.block_of.extend([self.num_blocks] * ids.size)
        self.num_blocks += 1
        return ids

    def freeze(self, ids, reason: str) -> None:
        for arr in _arrays(ids):
            for i in arr.reshape(-1).tolist():
                self.frozen.setdefault(i, reason)

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for inp in node.all_input_nodes:
            self.freeze(inp.meta.get("channels"), reason)

    def site(self, role: str, kind: str, node: fx.Node, ids: np.ndarray) -> None:
        self.sites.append((role, kind, node.name, str(node.target), ids))

    def set(self, node: fx.Node, ids, rule: str) -> None:
        if ids is not None:
            node.meta["channels"] = ids
            node.meta["channel_rule"] = rule

    def frozen_output(self, node: fx.Node, reason: str) -> None:
        """Freeze every input and give tensor outputs fresh, frozen ids."""
        self.freeze_inputs(node, reason)
        ids = self.fresh_like(node)
        self.freeze(ids, reason)
        self.set(node, ids, "frozen")

    def fresh_like(self, node: fx.Node):
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return self.fresh((meta.shape[1],)) if len(meta.shape) >= 2 else None
        if isinstance(meta, (tuple, list)):
            return [
                self.fresh((m.shape[1],))
                if isinstance(m, TensorMetadata) and len(m.shape) >= 2
                else None
                for m in meta
            ]
        return None

    # -- driver ------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            handler = getattr(self, f"on_{node.op}")
            handler(node)

    def on_placeholder(self, node: fx.Node) -> None:
        ids = self.fresh_like(node)
        self.freeze(ids, "model input")
        self.set(node, ids, "source")

    def on_get_attr(self, node: fx.Node) -> None:
        ids = self.fresh_like(node)
        self.freeze(ids, f"constant tensor {node.target}")
        self.set(node, ids, "source")

    def on_output(self, node: fx.Node) -> None:
        self.freeze_inputs(node, "model output")

    def mutates_shared_input(self, node: fx.Node) -> bool:
        """An in-place op on a tensor that other nodes also read: they would see
        the mutated values, which the graph does not show. Skip, never guess."""
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or len(x.users) <= 1:
            return False
        if node.op == "call_module":
            return bool(getattr(self.modules[node.target], "inplace", False))
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        in_place = name.endswith("_") and not name.endswith("__")
        augmented = node.op == "call_function" and name in AUGMENTED
        return in_place or augmented or bool(node.kwargs.get("inplace", False))

    def on_call_module(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        if self.mutates_shared_input(node):
            return self.frozen_output(node, f"{op_name(node)}: in-place on a shared tensor")
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if stateful and self.module_calls[node.target] > 1:
            return self.frozen_output(node, f"{op_name(node)}: module called more than once")
        x = node.args[0] if node.args else None
        ids = x.meta.get("channels") if isinstance(x, fx.Node) else None
        if len(node.all_input_nodes) != 1 or not isinstance(ids, np.ndarray) or ids.ndim != 1:
            return self.frozen_output(node, f"{op_name(node)}: unsupported call")
        if isinstance(module, CONV_MODULES):
            return self.on_conv(node, module, ids)
        if isinstance(module, nn.Linear):
            return self.on_linear(node, ids)
        if _is_batchnorm(module):
            if getattr(module, "weight", None) is not None:
                self.site("bn", "bn", node, ids)
            return self.passthrough(node, ids, "bn")
        if isinstance(module, ELEMENTWISE_MODULES):
            return self.passthrough(node, ids, "elementwise")
        if isinstance(module, AVG_POOL_MODULES):
            exact = not _any(module.padding) or not module.count_include_pad
            exact = exact and getattr(module, "divisor_override", None) is None
            return self.passthrough(node, ids, "elementwise" if exact else "spatial")
        if isinstance(module, UPSAMPLE_MODULES):
            rule = "elementwise" if module.mode == "nearest" else "spatial"
            return self.passthrough(node, ids, rule)
        if isinstance(module, nn.Flatten):
            return self.on_reshape(node)
        return self.frozen_output(node, f"{op_name(node)}: op not understood")

    def on_conv(self, node: fx.Node, conv: nn.Module, ids: np.ndarray) -> None:
        if conv.padding_mode != "zeros" and _any(conv.padding):
            return self.frozen_output(node, f"{op_name(node)}: padding_mode {conv.padding_mode}")
        if conv.groups == 1:
            kind, rule = "conv", "conv"
        elif conv.groups == conv.in_channels == conv.out_channels:
            self.site("producer", "depthwise", node, ids)
            self.site("consumer", "depthwise", node, ids)
            return self.passthrough(node, ids, "depthwise")
        else:
            kind, rule = "grouped", "grouped"
        self.site("consumer", kind, node, ids)
        out = self.fresh((conv.out_channels,))
        self.site("producer", kind, node, out)
        self.set(node, out, rule)

    def on_linear(self, node: fx.Node, ids: np.ndarray) -> None:
        shape = tensor_shape(node)
        if shape is None or len(shape) != 2:
            return self.frozen_output(node, f"{op_name(node)}: Linear over a non-channel axis")
        self.site("consumer", "linear", node, ids)
        out = self.fresh((shape[1],))
        self.site("producer", "linear", node, out)
        self.set(node, out, "conv")

    def passthrough(self, node: fx.Node, ids: np.ndarray, rule: str) -> None:
        shape = tensor_shape(node)
        if (
            shape is None
            or len(shape) < 1 + ids.ndim
            or tuple(shape[1 : 1 + ids.ndim]) != ids.shape
        ):
            return self.frozen_output(node, f"{op_name(node)}: changes the channel count")
        if ids.ndim != 1 and rule != "elementwise":
            return self.frozen_output(node, f"{op_name(node)}: inside a channel shuffle")
        self.set(node, ids, rule)

    def on_call_function(self, node: fx.Node) -> None:
        self.dispatch(node, node.target, is_method=False)

    def on_call_method(self, node: fx.Node) -> None:
        self.dispatch(node, node.target, is_method=True)

    def dispatch(self, node: fx.Node, target, is_method: bool) -> None:
        from fxprune import channel_ops

        if not _produces_tensor(node):
            # Shapes may be read freely; values read into Python are a dependency.
            reads_values = target not in PLAIN_VALUE_METHODS | PLAIN_VALUE_FUNCTIONS
            if reads_values and any(_has_channels(i) for i in node.all_input_nodes):
                self.freeze_inputs(node, f"{op_name(node)}: reads channels into a Python value")
            return
        if self.mutates_shared_input(node):
            return self.frozen_output(node, f"{op_name(node)}: in-place on a shared tensor")
        handler = channel_ops.handler_for(target, is_method)
        if handler is None:
            return self.frozen_output(node, f"{op_name(node)}: op not understood")
        handler(self, node)

    # re-exported for channel_ops
    def on_reshape(self, node: fx.Node) -> None:
        from fxprune import channel_ops

        channel_ops.reshape(self, node)


def _is_batchnorm(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return type(module).__name__ == "FrozenBatchNorm2d"


def _any(value) -> bool:
    if isinstance(value, str):
        return value != "valid"
    if isinstance(value, (tuple, list)):
        return any(v != 0 for v in value)
    return value != 0


def _arrays(ids):
    if ids is None:
        return []
    if isinstance(ids, np.ndarray):
        return [ids]
    return [a for a in ids if a is not None]


def _has_channels(node: fx.Node) -> bool:
    return node.meta.get("channels") is not None


def _produces_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None
