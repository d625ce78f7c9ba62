"""Stage 2, trace: `torch.fx.symbolic_trace` with a leaf-module policy, then shapes.

`trace_model` returns a `Traced` whose GraphModule has, on every node that
produces a tensor, `node.meta["tensor_meta"]` (shape, dtype) from a real
forward pass on the example input, and on nodes that produce plain Python
values (sizes, ints, tuples) `node.meta["value"]`. Later stages read these.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from fxprune.errors import TraceError, first_line
from fxprune.modules import BorderTerm
from fxprune.trace.shapes import propagate_shapes

# Modules fx must not trace into: their forward is data dependent or they are
# opaque kernels. The channel analysis freezes whatever they touch.
_OPAQUE_PREFIXES = ("torchvision.ops.deform_conv", "torchvision.ops.roi", "torchvision.ops.ps_roi")
_MAX_AUTO_LEAVES = 32


@dataclass
class Traced:
    """A traced, shape-annotated model.

    `gm` is the GraphModule (of `submodule` when one was given); `example` is
    the input it was shape-propagated with; `leaves` maps the qualified name
    of every module kept opaque to the reason why.
    """

    gm: fx.GraphModule
    example: torch.Tensor
    leaves: dict[str, str] = field(default_factory=dict)
    submodule: str | None = None


class LeafPolicyTracer(fx.Tracer):
    """fx tracer that keeps torch.nn modules, opaque torchvision ops and any
    module listed in `leaves` as `call_module` nodes."""

    def __init__(self, leaves: dict[str, str]) -> None:
        super().__init__()
        self.leaves = leaves

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

    def innermost_module(self) -> str:
        """Qualified name of the module being traced when tracing failed."""
        for _key, (qualname, _type) in reversed(self.module_stack.items()):
            if qualname:
                return qualname
        return ""


_LAYER_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                nn.BatchNorm3d)  # fmt: skip


def _plain_subclass(m: nn.Module) -> bool:
    """A subclass of a torch.nn layer that keeps the layer's own forward."""
    for base in _LAYER_BASES:
        if isinstance(m, base) and type(m).forward is base.forward:
            return True
    return False


def symbolic_trace(module: nn.Module, leaves: dict[str, str] | None = None) -> fx.GraphModule:
    """Trace `module`, turning submodules fx cannot trace into recorded leaves.

    When a submodule fails, it becomes a leaf (reason: fx's first error line)
    and tracing restarts; when the root's own forward fails, a TraceError
    names it and suggests `--submodule`. `leaves` is filled in place.
    """
    leaves = {} if leaves is None else leaves
    for _ in range(_MAX_AUTO_LEAVES):
        tracer = LeafPolicyTracer(leaves)
        try:
            graph = tracer.trace(module)
        except Exception as exc:  # fx raises many types: TraceError, TypeError, ...
            culprit = tracer.innermost_module()
            if not culprit or culprit in leaves:
                raise TraceError(
                    f"torch.fx cannot trace {type(module).__name__}"
                    f"{f' (in {culprit})' if culprit else ''}: {first_line(exc)}; "
                    "trace a part of it with --submodule PATH (e.g. --submodule backbone)"
                ) from exc
            leaves[culprit] = f"fx cannot trace inside: {first_line(exc)}"
            continue
        name = type(module).__name__
        return fx.GraphModule(tracer.root, graph, name)
    raise TraceError(f"torch.fx cannot trace {type(module).__name__}: too many untraceable parts")


def resolve_submodule(module: nn.Module, path: str) -> nn.Module:
    """Return the submodule at dotted `path`, or raise TraceError listing children."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in module.named_children()) or "none"
        raise TraceError(
            f"{type(module).__name__} has no submodule '{path}' (its children: {children})"
        ) from None


def trace_model(
    module: nn.Module,
    example: torch.Tensor,
    submodule: str | None = None,
    *,
    copy_module: bool = True,
) -> Traced:
    """Trace a deep copy of `module` (or of its `submodule`) and propagate shapes.

    The input module is never mutated. With `copy_module=False` the graph shares
    the module's layers (no copy; for a module nobody else holds, such as one
    fxprune just loaded): later zeroing then writes into those layers. With
    `submodule`, `example` must be the input of that submodule.
    """
    target = resolve_submodule(module, submodule) if submodule else module
    target = (copy.deepcopy(target) if copy_module else target).eval()
    leaves: dict[str, str] = {}
    gm = symbolic_trace(target, leaves)
    propagate_shapes(gm, example)
    return Traced(gm=gm, example=example, leaves=leaves, submodule=submodule)


__all__ = [
    "LeafPolicyTracer",
    "Traced",
    "resolve_submodule",
    "symbolic_trace",
    "trace_model",
]
