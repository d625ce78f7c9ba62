"""Stage 2, trace: `torch.fx.symbolic_trace` with a leaf-module policy, then shapes.

`trace_model` returns a `Traced` whose GraphModule has, on every node that
produces a tensor, `node.meta["tensor_meta"]` (shape, dtype) from a real
forward pass on the example input, and on nodes that produce plain Python
values (sizes, ints, tuples) `node.meta["value"]`. Later stages read these.
"""

from __future__ import annotations

import collections
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import Scope

from fxprune.errors import TraceError, first_line
from fxprune.modules import BorderTerm
from fxprune.trace.graph_module import graph_module

# Modules fx must not trace into: their forward is data dependent or they are
# opaque kernels. The channel analysis freezes whatever they touch.
_OPAQUE_PREFIXES = ("torchvision.ops.deform_conv", "torchvision.ops.roi", "torchvision.ops.ps_roi")
_MAX_AUTO_LEAVES = 32
_PLAIN_ARGUMENTS = frozenset({int, float, bool, str, type(None)})
CANNOT_TRACE = "fx cannot trace inside"


@dataclass
class Traced:
    """A traced, shape-annotated model.

    `gm` is the GraphModule (of `submodule` when one was given); `example` is
    the input it was shape-propagated with; `leaves` maps the qualified name
    of every module kept opaque to the reason why; `frontend` is "fx" or
    "export"; `notes` say what the front end rewrote (functional layers).
    """

    gm: fx.GraphModule
    example: torch.Tensor
    leaves: dict[str, str] = field(default_factory=dict)
    submodule: str | None = None
    frontend: str = "fx"
    notes: list[str] = field(default_factory=list)


class LeafPolicyTracer(fx.Tracer):
    """fx tracer that keeps torch.nn modules, opaque torchvision ops and any
    module listed in `leaves` as `call_module` nodes."""

    def __init__(self, leaves: dict[str, str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.module_stack = _ModuleStack()
        self.scope = _Scope("", None)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        if _plain_subclass(m):
            return True  # e.g. torchvision's Conv3DSimple(nn.Conv3d): a conv, not a graph
        if isinstance(m, BorderTerm):
            return True  # the compiler's own layer: understood by the analysis
        if type(m).__module__.startswith(_OPAQUE_PREFIXES):
            self.leaves.setdefault(module_qualified_name, "opaque torchvision op")
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a: Any) -> Any:
        """fx's `create_arg`, sooner for the commonest arguments: a proxy is its node, a
        number or string itself, a plain tuple, list or dict (string keys) that of its
        items' (fx first asks of each whether it is a parameter, tensor, module, named
        tuple or constant: microseconds an argument)."""
        if isinstance(a, fx.Proxy):
            return a.node
        kind = type(a)
        if kind in _PLAIN_ARGUMENTS:
            return a
        if kind is tuple:
            return tuple([self.create_arg(item) for item in a])
        if kind is list:
            return [self.create_arg(item) for item in a]
        if kind is dict and all(type(key) is str for key in a):
            return {key: self.create_arg(value) for key, value in a.items()}
        return super().create_arg(a)

    def innermost_module(self) -> str:
        """Qualified name of the module being traced when tracing failed."""
        for _key, (qualname, _type) in reversed(self.module_stack.items()):
            if qualname:
                return qualname
        return ""


class _ModuleStack(collections.OrderedDict):
    """fx's stack of the modules being traced, which fx copies into every node's
    `nn_module_stack` meta with `copy.copy` (through the pickle protocol, 2.7 us): the
    copy, a plain OrderedDict as before, is made directly."""

    def __copy__(self) -> collections.OrderedDict:
        return collections.OrderedDict(self)


class _Scope(Scope):
    """fx's current scope (module path and type), which fx saves with `copy.copy` (the
    pickle protocol) around every module call: saved directly."""

    def __copy__(self) -> Scope:
        return Scope(self.module_path, self.module_type)


_LAYER_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                nn.BatchNorm3d)  # fmt: skip


def _plain_subclass(m: nn.Module) -> bool:
    """A subclass of a torch.nn layer that keeps the layer's own forward."""
    for base in _LAYER_BASES:
        if isinstance(m, base) and type(m).forward is base.forward:
            return True
    return False


class LeafNeeded(Exception):
    """fx cannot trace inside a submodule (already recorded as a leaf): raised by
    `symbolic_trace(..., stop_at_leaf=True)` so the caller can try torch.export
    before tracing again around each such submodule."""


def symbolic_trace(
    module: nn.Module,
    leaves: dict[str, str] | None = None,
    *,
    stop_at_leaf: bool = False,
    make_tracer: Callable[[dict[str, str]], LeafPolicyTracer] = LeafPolicyTracer,
) -> fx.GraphModule:
    """Trace `module`, turning submodules fx cannot trace into recorded leaves.

    When a submodule fails, it becomes a leaf (reason: fx's first error line)
    and tracing restarts (or, with `stop_at_leaf`, LeafNeeded is raised); when
    the root's own forward fails, a TraceError names it and suggests
    `--submodule`. `leaves` is filled in place. `make_tracer(leaves)` makes the
    tracer of each attempt. Attributes the forward assigns on its modules while
    traced (Ultralytics' Detect stores proxies in `self.anchors`) are undone:
    `module` is left as it was.
    """
    leaves = {} if leaves is None else leaves
    for _ in range(_MAX_AUTO_LEAVES):
        tracer = make_tracer(leaves)
        saved = _attributes(module)
        try:
            graph = tracer.trace(module)
            gm = graph_module(tracer.root, graph, type(module).__name__, lazy=True)  # code: on use
        except Exception as exc:  # fx raises many types: TraceError, TypeError, ...
            culprit = tracer.innermost_module()
            if not culprit or culprit in leaves:
                raise TraceError(
                    f"torch.fx cannot trace {type(module).__name__}"
                    f"{f' (in {culprit})' if culprit else ''}: {first_line(exc)}; "
                    "trace a part of it with --submodule PATH (e.g. --submodule backbone)"
                ) from exc
            leaves[culprit] = f"{CANNOT_TRACE}: {first_line(exc).split('. ')[0]}"
            if stop_at_leaf:
                raise LeafNeeded(culprit) from exc
            continue
        finally:
            _restore_attributes(saved)
        return gm
    parts = ", ".join(list(leaves)[:4]) + (f" +{len(leaves) - 4} more" if len(leaves) > 4 else "")
    raise TraceError(
        f"torch.fx cannot trace {type(module).__name__}: too many untraceable parts ({parts})"
    )


def _attributes(module: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Every submodule with a copy of its `__dict__` (its plain attributes); walks
    `_modules` itself (a module shared by two parents is listed twice, harmlessly),
    several times faster than `modules()` on a large model."""
    saved, stack = [], [module]
    while stack:
        m = stack.pop()
        saved.append((m, m.__dict__.copy()))
        stack.extend(child for child in m._modules.values() if child is not None)
    return saved


def _restore_attributes(saved: list[tuple[nn.Module, dict]]) -> None:
    """Give each module the plain attributes `_attributes` saved: added ones go,
    replaced ones come back (no-op for a module the trace did not touch)."""
    for module, before in saved:
        now = module.__dict__
        if len(now) == len(before) and all(map(operator.is_, now.values(), before.values())):
            if now.keys() == before.keys():
                continue
        now.clear()
        now.update(before)


def resolve_submodule(module: nn.Module, path: str) -> nn.Module:
    """Return the submodule at dotted `path`, or raise TraceError listing children."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in module.named_children()) or "none"
        raise TraceError(
            f"{type(module).__name__} has no submodule '{path}' (its children: {children})"
        ) from None


def bound_to_input(module: nn.Module) -> nn.Module:
    """Make `module.forward` take the input alone, every other argument bound
    to its default (YOLO's `forward(x, *args, **kwargs)`, Hugging Face's
    `forward(pixel_values, labels=None, ...)`): fx would trace them as inputs.
    `unbind` undoes it."""
    cls = type(module)
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    if len(params) < 2 or any(p.default is p.empty for p in params[1:] if p.kind in _NAMED):
        return module
    forward = cls.forward

    def bound(self, x):
        return forward(self, x)

    # fx names the graph's input after the argument: keep the user's name
    bound.__code__ = bound.__code__.replace(co_varnames=("self", params[0].name))
    module.__class__ = type(cls.__name__, (cls,), {"forward": bound, "_fxprune_bound": cls,
                                                    "__module__": cls.__module__})  # fmt: skip
    return module


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def unbind(module: nn.Module) -> None:
    """Give a module `bound_to_input` changed its own class back."""
    original = type(module).__dict__.get("_fxprune_bound")
    if original is not None:
        module.__class__ = original


__all__ = [
    "CANNOT_TRACE",
    "LeafNeeded",
    "LeafPolicyTracer",
    "Traced",
    "bound_to_input",
    "resolve_submodule",
    "symbolic_trace",
    "unbind",
]
