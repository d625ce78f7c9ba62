"""Per-op channel-id rules (DESIGN.md, "Channel ids"), applied node by node.

`ChannelLabeller.run()` walks a shape-propagated graph in order and writes
`node.meta["channels"]` / `node.meta["channel_rule"]`. Anything it does not
recognise is frozen with a reason; it never assumes an op is channel-wise.
"""

from __future__ import annotations

import math

import numpy as np
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from fxprune.analysis.groups import UnionFind
from fxprune.analysis.vocabulary import (
    AVG_POOL_MODULES,
    CONV_MODULES,
    ELEMENTWISE_MODULES,
    UPSAMPLE_MODULES,
    is_batchnorm,
    mutates_input,
    op_name,
    reads_only_shape,
    tensor_shape,
)
from fxprune.modules import BorderTerm


class ChannelLabeller:
    """Applies the channel rules to every node of a GraphModule, in order."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.block_sizes: list[int] = []  # per block (node output): how many ids it created
        self.num_blocks = 0
        self.frozen: dict[int, str] = {}  # raw id -> reason
        self.sites: list[tuple[str, str, str, str, np.ndarray]] = []
        self.module_calls: dict[str, int] = {}
        read_attributes: set[str] = set()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.module_calls[node.target] = self.module_calls.get(node.target, 0) + 1
            elif node.op == "get_attr" and node.users:  # (export leaves some unused)
                read_attributes.add(node.target)
        self.used_elsewhere = _used_elsewhere(self.module_calls, read_attributes)

    # -- bookkeeping -------------------------------------------------------
    def fresh(self, shape: tuple[int, ...]) -> np.ndarray:
        ids = self.uf.make(math.prod(shape)).reshape(shape)
        self.block_sizes.append(ids.size)
        self.num_blocks += 1
        return ids

    def block_array(self) -> np.ndarray:
        """raw id -> the block (node output) that created it."""
        return np.repeat(np.arange(self.num_blocks, dtype=np.int64), self.block_sizes)

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
        return mutates_input(
            node, self.modules.get(node.target) if node.op == "call_module" else None
        )

    def on_call_module(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        if self.mutates_shared_input(node):
            return self.frozen_output(node, f"{op_name(node)}: in-place on a shared tensor")
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if stateful and self.module_calls[node.target] > 1:
            return self.frozen_output(node, f"{op_name(node)}: module called more than once")
        if stateful and node.target in self.used_elsewhere:
            return self.frozen_output(node, f"{op_name(node)}: {self.used_elsewhere[node.target]}")
        if isinstance(module, BorderTerm):  # reads only its input's spatial size
            return self.set(node, self.fresh((module.kernel.shape[0],)), "border")
        x = node.args[0] if node.args else None
        ids = x.meta.get("channels") if isinstance(x, fx.Node) else None
        if len(node.all_input_nodes) != 1 or not isinstance(ids, np.ndarray) or ids.ndim != 1:
            return self.frozen_output(node, f"{op_name(node)}: unsupported call")
        if isinstance(module, CONV_MODULES):
            return self.on_conv(node, module, ids)
        if isinstance(module, nn.Linear):
            return self.on_linear(node, ids)
        if is_batchnorm(module):
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
        from fxprune.analysis import rules as channel_ops

        if not _produces_tensor(node):
            # Shapes may be read freely; values read into Python are a dependency.
            reads_values = not reads_only_shape(node)
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
        from fxprune.analysis import rules as channel_ops

        channel_ops.reshape(self, node)


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


def _used_elsewhere(called: dict[str, int], read: set[str]) -> dict[str, str]:
    """Called modules whose state the graph also reaches another way, with why: a
    module inside another called module (a leaf runs it too: slicing it would change
    the leaf), or one whose own tensors a `get_attr` reads."""
    found: dict[str, str] = {}
    for target in called:
        parts = target.split(".")
        outers = [".".join(parts[:i]) for i in range(1, len(parts))]
        outer = next((o for o in outers if o in called), None)
        if outer is not None:
            found[target] = f"also run inside {outer}"
    for attribute in read:
        parts = attribute.split(".")
        for owner in (".".join(parts[:i]) for i in range(1, len(parts))):
            if owner in called:
                found.setdefault(owner, f"its tensor {attribute} is also read directly")
    return found


__all__ = [
    "ChannelLabeller",
]
