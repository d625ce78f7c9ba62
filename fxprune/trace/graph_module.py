"""Build a GraphModule without the cost of `fx.GraphModule(root, graph)`.

`fx.GraphModule(root, graph)` copies every attribute the graph uses into a new
module tree (`_copy_attr`: one walk of the dotted path through `nn.Module`'s
Python `__getattr__` per target, a `setattr` per level) and generates and
compiles the code of `forward` at once. The compiler builds three GraphModules
per compile (the trace, its working copy, the result): on a mobile network those
builds took a fifth of the compile time, two thirds of it generating code that
nobody ran.

`graph_module` builds the same tree (fresh plain containers in their modules'
training mode, the graph's modules, parameters and buffers shared with `root`,
non-persistent buffers kept so) in one
pass over the targets, and generates the code at once or, with `lazy`, when the
module is first called (torch's `_LazyGraphModule`). The result is a GraphModule
like any other.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.fx as fx
from torch import nn

try:  # a GraphModule that generates its code when first called (torch >= 2.3)
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - older torch: code generated at once
    _LazyGraphModule = fx.GraphModule


class _DeferredCode(_LazyGraphModule):
    """torch's lazy GraphModule, which `torch.jit.script` cannot compile: scripting
    it compiles a plain GraphModule over the same graph and attributes instead."""

    def __prepare_scriptable__(self) -> fx.GraphModule:
        return graph_module(self, self.graph, type(self).__name__)


__all__ = ["graph_module"]


def graph_module(
    root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule", *, lazy: bool = False
) -> fx.GraphModule:
    """A GraphModule running `graph`, holding exactly the attributes of `root` its
    `call_module` and `get_attr` nodes name, at the same dotted paths (what
    `fx.GraphModule(root, graph, class_name)` holds). With `lazy`, its code is
    generated when it is first called or its `code` is read."""
    cls = _DeferredCode if lazy else fx.GraphModule
    gm = cls(nn.Module(), fx.Graph(), class_name)  # nothing to copy, no code yet
    gm.training = root.training
    containers: dict[str, nn.Module] = {"": gm}
    sources: dict[str, nn.Module] = {"": root}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            _install(root, gm, node.target, containers, sources)
    gm.graph = graph  # generates the code (or marks it pending, when lazy)
    tracer = graph._tracer_cls
    if tracer is not None and "<locals>" not in tracer.__qualname__ and _no_arguments(tracer):
        gm._tracer_cls = tracer  # as GraphModule.__init__ keeps it (unpickling re-traces with it)
    if graph._tracer_extras:
        gm._tracer_extras = graph._tracer_extras
    return gm


@functools.cache  # tracer classes are few and module-level (`<locals>` ones are not asked)
def _no_arguments(cls: type) -> bool:
    """`cls()` works: unpickling a GraphModule calls its tracer class so, and fxprune's
    tracers take their leaves (pickling would succeed and loading fail)."""
    try:
        inspect.signature(cls).bind()
    except (TypeError, ValueError):
        return False
    return True


def _install(
    root: nn.Module,
    gm: nn.Module,
    target: str,
    containers: dict[str, nn.Module],
    sources: dict[str, nn.Module],
) -> None:
    """Put `root`'s attribute at dotted `target` at the same path below `gm`,
    creating plain containers on the way (as fx's `_copy_attr` does)."""
    prefix, _, name = target.rpartition(".")
    if _below_installed(prefix, containers, sources):
        return  # a module on the path is installed whole: it holds this already
    _container(root, prefix, containers, sources)
    source, container = sources[prefix], containers[prefix]
    value = _child(source, name)
    if isinstance(value, nn.Module):  # whole (replacing a container made for its children)
        container._modules[name] = value
        containers[target] = sources[target] = value
    elif isinstance(value, nn.Parameter):
        container._parameters[name] = value
    elif isinstance(value, torch.Tensor):
        container._buffers[name] = value
        if name in source._non_persistent_buffers_set:
            container._non_persistent_buffers_set.add(name)
    else:
        setattr(container, name, value)


def _container(
    root: nn.Module, prefix: str, containers: dict[str, nn.Module], sources: dict[str, nn.Module]
) -> None:
    """Make sure a container exists at `prefix` (and its parents), in the training
    mode of the module it stands for (fx's containers are all in training mode, so
    a GraphModule over eval-mode layers was not in eval mode until `.eval()`)."""
    if prefix in containers:
        return
    parent_prefix, _, name = prefix.rpartition(".")
    _container(root, parent_prefix, containers, sources)
    source = _child(sources[parent_prefix], name)
    container = nn.Module()
    container.__dict__["training"] = source.training  # (nn.Module.__setattr__ checks its tables)
    containers[parent_prefix]._modules[name] = container
    containers[prefix], sources[prefix] = container, source


def _below_installed(prefix: str, containers: dict, sources: dict) -> bool:
    """True when a module on `prefix`'s path was installed whole (it is its own source)."""
    path = prefix
    while path:  # the root itself ("") is never installed whole
        found = containers.get(path)
        if found is not None and found is sources.get(path):
            return True
        path = path.rpartition(".")[0]
    return False


def _child(module: nn.Module, name: str):
    """`getattr(module, name)`, sooner for a submodule (nn.Module's `__getattr__` runs
    Python)."""
    child = module._modules.get(name)
    return child if child is not None else getattr(module, name)
