"""An fx tracer whose proxies carry meta values, so fx goes where only shapes are needed.

Each node's value on the meta device (an empty meta tensor for tensors, a real
torch.Size / int / bool for shape arithmetic) is computed by shape propagation's
own hooks (`shapes._ShapeRecorder`), in graph order, as soon as the trace needs one
(a branch, an iteration) and for the rest right after the trace (where fx's patched
module attributes no longer slow every read down), and written where
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

import dis
import functools
import operator
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_arg
from torch.fx.proxy import Attribute

from fxprune.trace.graph_edits import erase_unused
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
_UNPACK_SEQUENCE, _EXTENDED_ARG = dis.opmap["UNPACK_SEQUENCE"], dis.opmap["EXTENDED_ARG"]


@dataclass
class MetaFindings:
    """What one trace learnt: `complete` is True when every node got its meta value
    (then shapes need no separate propagation); `notes` name each specialisation."""

    complete: bool = True
    notes: list[str] = field(default_factory=list)
    specialised: bool = False  # a branch or loop was decided by the example's shape


class MetaProxy(fx.Proxy):
    """A proxy whose `len()`, iteration and attributes go through its `MetaTracer`."""

    def __len__(self) -> int:
        return self.tracer.length(self)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator:
        """fx's `Proxy.__iter__`: `a, b = proxy` unpacks as many getitems as the caller's
        bytecode asks for, anything else is the tracer's `iter`; only the caller's
        current instruction is read (fx disassembles the whole function on every call:
        0.25 ms for Ultralytics' make_anchors)."""
        caller = sys._getframe(1)
        count = _unpacked(caller.f_code, caller.f_lasti)
        if count is not None:
            return (self[i] for i in range(count))
        return self.tracer.iter(self)

    def __getattr__(self, k: str) -> Attribute:
        return MetaAttribute(self, k)


class MetaAttribute(Attribute, MetaProxy):
    """fx's lazy attribute proxy (`x.shape`), with MetaProxy's `len()`."""


class MetaTracer(LeafPolicyTracer):
    """LeafPolicyTracer that gives every node its meta value for input `example`
    (when the trace first needs it, or right after the trace).

    `findings` (shared with the caller, reset by each `trace`) gets the notes of the
    specialisations to the example's shape and whether every node has a value.
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
        self.branches: list[str] = []  # the module of each condition decided by shapes
        self.unrolled: list[str] = []  # the module of each iteration over a tensor
        self.recorder = _ShapeRecorder(on_meta=True)
        self.pending: list[fx.Node] = []
        self.modules: dict[fx.Node, nn.Module] = {}
        self.calling: nn.Module | None = None
        self.placeholders = 0
        self.computing = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return MetaProxy(node, self)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.findings.complete, self.findings.notes[:] = True, []
        self.findings.specialised = False
        self.values.clear()
        self.pending.clear()
        self.modules.clear()
        self.branches.clear()
        self.unrolled.clear()
        self.tainted.clear()
        self.specialised.clear()
        self.placeholders = 0
        with torch.no_grad():
            with _factories_as_nodes():
                graph = super().trace(root, concrete_args)
            self._catch_up()  # fx's patches are gone: module attributes read at full speed
        for node in dict.fromkeys(self.specialised):
            erase_unused(graph, node, _pure)
        self.findings.specialised = bool(self.branches or self.unrolled)
        self.findings.notes += _where("took the example's branch of {} on shapes",
                                      ("a condition", "{} conditions"), self.branches)  # fmt: skip
        self.findings.notes += _where("unrolled {} over a tensor's first dimension",
                                      ("a loop", "{} loops"), self.unrolled)  # fmt: skip
        return graph

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "call_module":
            self.modules[node] = self.calling
        if kind != "output":
            self.pending.append(node)  # valued in graph order, when first needed
        return node

    def _catch_up(self) -> None:
        """Compute the values of the nodes created since the last call, in graph order
        (as a run of the graph would: in-place ops see what came before them); after
        the first failure nothing more is computed."""
        pending, self.pending = self.pending, []
        if not self.findings.complete:
            return
        self.computing = True
        compute = self._compute
        try:
            for node in pending:
                if not compute(node):
                    self.findings.complete = False
                    return
        finally:
            self.computing = False

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.computing:  # a meta value reads the module's own attributes
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs) -> Any:
        if self.computing:  # a meta value calls a layer (or its meta copy) for real
            return forward(*args, **kwargs)
        self.calling = m  # the module of the call_module node this call may create
        return super().call_module(m, forward, args, kwargs)

    def _compute(self, node: fx.Node) -> bool:
        """Store the node's meta value (and its tensor_meta / value); False when it
        cannot be computed."""
        try:
            value = self._evaluate(node)
        except Exception:  # no meta kernel, or a value that needs real data
            return False
        self.values[node] = value
        self.recorder.record(node, value)
        if self.tainted and any(a in self.tainted for a in node.all_input_nodes):
            self.tainted.add(node)
        elif (node.op == "call_function" and node.target is getattr
              and node.args[1] in _DEVICE_ATTRIBUTES) or (
              node.op == "call_method" and node.target in _DEVICE_METHODS):  # fmt: skip
            self.tainted.add(node)
        return True

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
        return self.recorder.call_module(node.target, self.modules[node], args, kwargs)

    def _value(self, obj: fx.Proxy) -> tuple[bool, Any]:
        """(known, value): the meta value of `obj`, computed now if need be, when it
        is trustworthy (not derived from a device)."""
        node = obj.node
        self._catch_up()
        if node not in self.values or node in self.tainted:
            return False, None
        return True, self.values[node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        """The example's branch, for a plain value computed from shapes (noted);
        fx's error for anything else (tensors are data, never guessed)."""
        known, value = self._value(obj)
        if not known or not _is_plain_value(value):
            return super().to_bool(obj)
        self.branches.append(self.innermost_module() or "the model's forward")
        self.specialised.append(obj.node)
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator:
        """`obj[0], obj[1], ...` as getitem nodes, for a value of known length."""
        return iter([obj[i] for i in range(self._known_length(obj, "iterated"))])

    def length(self, obj: fx.Proxy) -> int:
        """`len(obj)` for a value of known length; fx's error otherwise."""
        return self._known_length(obj, "len()")

    def _known_length(self, obj: fx.Proxy, use: str) -> int:
        known, value = self._value(obj)
        if known and isinstance(value, (tuple, list, torch.Size)):
            return len(value)
        if known and isinstance(value, torch.Tensor) and value.dim() > 0:
            self.unrolled.append(self.innermost_module() or "the model's forward")
            return len(value)
        if use == "iterated":
            return super().iter(obj)  # raises fx's TraceError
        return fx.Proxy.__len__(obj)  # raises fx's RuntimeError


def _unpacked(code: CodeType, offset: int) -> int | None:
    """The count of the UNPACK_SEQUENCE at bytecode `offset` of `code`, None when the
    instruction there is another (what fx's `Proxy.__iter__` finds by disassembling
    `code`); read off the bytes, but for a count beyond one byte."""
    raw = code.co_code
    if raw[offset] != _UNPACK_SEQUENCE:
        return None
    if offset >= 2 and raw[offset - 2] == _EXTENDED_ARG:  # (more than 255 names)
        return next(i.argval for i in dis.get_instructions(code) if i.offset == offset)
    return raw[offset + 1]


def _where(done: str, counted: tuple[str, str], places: list[str]) -> list[str]:
    """One note for all the places (module names) where fx specialised the graph to
    the example's shape: `done` with the count (`counted`: singular, plural) filled in."""
    if not places:
        return []
    unique = list(dict.fromkeys(places))
    listed = ", ".join(unique[:6]) + (f" +{len(unique) - 6} more" if len(unique) > 6 else "")
    count = counted[0] if len(places) == 1 else counted[1].format(len(places))
    return [f"fx {done.format(count)} in {listed}: the graph is valid for inputs of the "
            "example's shape only"]  # fmt: skip


def _pure(node: fx.Node) -> bool:
    """What a decided condition may leave behind unused: comparisons, sizes, getattr."""
    if node.op == "call_function":
        return node.target in _PURE_FUNCTIONS
    return node.target in _PURE_METHODS


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


@functools.cache  # one wrapper per factory, made once (not on every trace)
def _as_node(original):
    @functools.wraps(original)
    def factory(*args, **kwargs):
        proxy = _find_proxy(args)
        proxy = _find_proxy(kwargs.values()) if proxy is None else proxy  # never bool(proxy)
        if proxy is None:  # torch's own calls (meta kernels, references) pass straight on
            return original(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", original, args, kwargs)

    return factory


def _find_proxy(values) -> fx.Proxy | None:
    """The first proxy in `values`, looking inside lists and tuples (a size tuple)."""
    for v in values:
        if isinstance(v, fx.Proxy):
            return v
        if isinstance(v, (tuple, list)):
            found = _find_proxy(v)
            if found is not None:
                return found
    return None
