"""An fx tracer whose proxies carry meta values, so fx goes where only shapes are needed.

Each node's value on the meta device (an empty meta tensor for tensors, a real
torch.Size / int / bool for shape arithmetic) is computed while the node is created,
by shape propagation's own hooks (`shapes._ShapeRecorder`), and written where
`propagate_shapes` writes it (`node.meta["tensor_meta"]` / `node.meta["value"]`).
With these values the tracer can:

- iterate over, and take `len()` of, a proxy whose value has a known length (the
  pieces of `chunk`/`split`, a shape): `[proxy[i] for i in range(n)]`, getitem nodes;
- take `bool()` of a proxy whose value is a plain Python value computed from shapes
  (`self.shape != shape`): the example's branch is taken and a note says the graph
  is valid for inputs of that shape only. A tensor-valued (data-dependent) proxy,
  one derived from a device, or one without a value fails as plain fx fails;
- record tensor factories called with traced sizes (`torch.arange(end=w)`) as nodes
  (`torch.arange` and friends are replaced during the trace only).

When a value cannot be computed (an op without a meta kernel), the node has none,
`MetaFindings.complete` is False and the caller propagates shapes itself.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate, map_arg
from torch.fx.proxy import Attribute

from fxprune.trace.run import _mutable, attribute
from fxprune.trace.shapes import TENSOR_FACTORIES, _is_plain_value, _ShapeRecorder
from fxprune.trace.symbolic import LeafPolicyTracer

__all__ = ["MetaFindings", "MetaProxy", "MetaTracer"]

# Values read from a tensor's device or storage: on the meta device they differ
# from the real run's, so no branch may be taken on them.
_DEVICE_ATTRIBUTES = frozenset({"device", "is_cpu", "is_cuda", "is_meta", "is_mps",
                                "requires_grad", "grad_fn", "is_leaf"})  # fmt: skip
_DEVICE_METHODS = frozenset({"get_device", "data_ptr", "untyped_storage", "storage_offset"})
# Nodes a specialised condition may leave behind unused (no side effects).
_PURE_FUNCTIONS = frozenset({getattr, operator.getitem, operator.eq, operator.ne, operator.lt,
                             operator.le, operator.gt, operator.ge, operator.not_,
                             operator.and_, operator.or_})  # fmt: skip
_PURE_METHODS = frozenset({"size", "dim", "numel"})


@dataclass
class MetaFindings:
    """What one trace learnt: `complete` is True when every node got its meta value
    (then shapes need no separate propagation); `notes` name each specialisation."""

    complete: bool = True
    notes: list[str] = field(default_factory=list)


class MetaProxy(fx.Proxy):
    """A proxy whose `len()` and attributes go through its `MetaTracer`."""

    def __len__(self) -> int:
        return self.tracer.length(self)  # type: ignore[attr-defined]

    def __getattr__(self, k: str) -> Attribute:
        return MetaAttribute(self, k)


class MetaAttribute(Attribute, MetaProxy):
    """fx's lazy attribute proxy (`x.shape`), with MetaProxy's `len()`."""


class MetaTracer(LeafPolicyTracer):
    """LeafPolicyTracer computing every node's meta value from `example` as it traces.

    `findings` (shared with the caller, reset by each `trace`) gets the notes of the
    branches taken on shapes and whether every node has a value.
    """

    def __init__(
        self, leaves: dict[str, str], example: torch.Tensor, findings: MetaFindings
    ) -> None:
        super().__init__(leaves)
        self.example = example.detach().to("meta")
        self.findings = findings
        self.values: dict[fx.Node, Any] = {}
        self.tainted: set[fx.Node] = set()
        self.specialised: list[fx.Node] = []
        self.recorder = _ShapeRecorder(on_meta=True)
        self.placeholders = 0
        self.computing = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return MetaProxy(node, self)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.findings.complete, self.findings.notes[:] = True, []
        self.values.clear()
        self.placeholders = 0
        with torch.no_grad(), _factories_as_nodes():
            graph = super().trace(root, concrete_args)
        for node in self.specialised:
            _erase_unused(graph, node)
        return graph

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output" and self.findings.complete:
            self._compute(node)
        return node

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.computing:  # a meta value reads the module's own attributes
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs) -> Any:
        if self.computing:  # a meta value calls a layer (or its meta copy) for real
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _compute(self, node: fx.Node) -> None:
        """Store the node's meta value (and its tensor_meta / value), or mark the
        trace incomplete when it cannot be computed."""
        self.computing = True
        try:
            value = self._evaluate(node)
        except Exception:  # no meta kernel, or a value that needs real data
            self.findings.complete = False
            return
        finally:
            self.computing = False
        self.values[node] = value
        self.recorder.record(node, value)
        if self.tainted and any(a in self.tainted for a in node.all_input_nodes):
            self.tainted.add(node)
        elif (node.op == "call_function" and node.target is getattr
              and node.args[1] in _DEVICE_ATTRIBUTES) or (
              node.op == "call_method" and node.target in _DEVICE_METHODS):  # fmt: skip
            self.tainted.add(node)

    def _evaluate(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            self.placeholders += 1
            if self.placeholders == 1:
                return self.example
            if node.args:
                return node.args[0]
            raise ValueError("a second input without a default")
        if op == "get_attr":
            return self.recorder.get_attr(node.target, attribute(self.root, node.target))
        load = self.values.__getitem__
        args = _mutable(map_arg(node.args, load))
        kwargs = _mutable(map_arg(node.kwargs, load))
        if op == "call_function":
            return self.recorder.call_function(node.target, args, kwargs)
        if op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        module = self.root.get_submodule(node.target)
        return self.recorder.call_module(node.target, module, args, kwargs)

    def _plain_value(self, obj: fx.Proxy) -> tuple[bool, Any]:
        """(known, value): the meta value of `obj` when it is trustworthy."""
        node = obj.node
        if node not in self.values or node in self.tainted:
            return False, None
        return True, self.values[node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        """The example's branch, for a plain value computed from shapes (noted);
        fx's error for anything else (tensors are data, never guessed)."""
        known, value = self._plain_value(obj)
        if not known or not _is_plain_value(value):
            return super().to_bool(obj)
        where = self.innermost_module() or "the model's forward"
        self.findings.notes.append(
            f"fx took the branch of the example's shape in {where} (on {obj.node.name} = "
            f"{bool(value)}): the graph is valid for inputs of that shape"
        )
        self.specialised.append(obj.node)
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator:
        """`obj[0], obj[1], ...` as getitem nodes, for a value of known length."""
        return iter([obj[i] for i in range(self._known_length(obj, "iterated"))])

    def length(self, obj: fx.Proxy) -> int:
        """`len(obj)` for a value of known length; fx's error otherwise."""
        return self._known_length(obj, "len()")

    def _known_length(self, obj: fx.Proxy, use: str) -> int:
        known, value = self._plain_value(obj)
        if known and isinstance(value, (tuple, list, torch.Size)):
            return len(value)
        if known and isinstance(value, torch.Tensor) and value.dim() > 0:
            where = self.innermost_module() or "the model's forward"
            self.findings.notes.append(
                f"fx {use} a tensor of first dimension {len(value)} in {where}: the graph "
                "is valid for inputs of that shape"
            )
            return len(value)
        if use == "iterated":
            return super().iter(obj)  # raises fx's TraceError
        return fx.Proxy.__len__(obj)  # raises fx's RuntimeError


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Remove `node` (a condition that was decided) and its inputs that nothing else
    reads, as long as they are side-effect free."""
    if node.users or node.graph is not graph:
        return
    pure = (node.op == "call_function" and node.target in _PURE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _PURE_METHODS
    )
    if not pure:
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for inp in inputs:
        _erase_unused(graph, inp)


class _factories_as_nodes:
    """Within the block, the TENSOR_FACTORIES called with a proxy anywhere in their
    arguments (`torch.arange(end=w)`, w traced) become graph nodes; the originals
    are restored on leaving, whatever happens."""

    def __enter__(self) -> None:
        self.saved = {name: getattr(torch, name) for name in TENSOR_FACTORIES}
        for name, original in self.saved.items():
            setattr(torch, name, _as_node(original))

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch, name, original)


def _as_node(original):
    @functools.wraps(original)
    def factory(*args, **kwargs):
        proxy = None

        def find(a):
            nonlocal proxy
            if isinstance(a, fx.Proxy):
                proxy = a
            return a

        map_aggregate((args, kwargs), find)
        if proxy is None:
            return original(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", original, args, kwargs)

    return factory
