"""The front door of the trace stage: a user's module to an analysable graph.

`trace_model` picks a front end ("fx": symbolic tracing, `symbolic.py`, with
proxies that carry meta values, `meta_proxy.py`, which write the shapes as they
go; "export": torch.export, `exported.py`), propagates shapes, then writes the
graph in one vocabulary (`canonical.py`), so the analysis never asks where a
graph came from.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch._ops import OpOverload

from fxprune.errors import TraceError
from fxprune.trace.canonical import canonicalise, functional_layers
from fxprune.trace.exported import export_graph
from fxprune.trace.meta_proxy import MetaFindings, MetaTracer
from fxprune.trace.shapes import propagate_shapes
from fxprune.trace.symbolic import (
    LeafNeeded,
    Traced,
    bound_to_input,
    resolve_submodule,
    symbolic_trace,
    unbind,
)

FRONTENDS = ("auto", "fx", "export")
# nn.Module's own, to tell a class that changes what `eval()` does
_TRAIN, _EVAL, _SETATTR = nn.Module.train, nn.Module.eval, nn.Module.__setattr__


def trace_model(
    module: nn.Module,
    example: torch.Tensor,
    submodule: str | None = None,
    frontend: str = "auto",
    *,
    copy_module: bool = True,
) -> Traced:
    """Trace a deep copy of `module` (or of its `submodule`) and propagate shapes.

    `frontend` "fx" traces symbolically, "export" uses torch.export, "auto"
    uses fx and switches to export when fx fails or has to leave parts of
    the model opaque, or followed it only on the example's shape and kept
    functional layers (and export succeeds). The input module is never
    mutated; with `copy_module=False` the graph shares the module's layers (no
    copy; for a module nobody else holds): later zeroing writes into them.
    With `submodule`, `example` must be the input of that submodule.
    """
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown front end '{frontend}' (choose from {', '.join(FRONTENDS)})")
    target = resolve_submodule(module, submodule) if submodule else module
    target = copy.deepcopy(target) if copy_module else target
    if not _eval_is_no_op(target):
        target.eval()
    leaves: dict[str, str] = {}
    findings = MetaFindings(complete=False)
    if frontend == "export":
        gm, used = _export(target, example, None), "export"
    else:
        gm, used, leaves = _trace_fx(target, example, leaves, frontend == "auto", findings)
    notes = _shaped_and_canonical(gm, used, findings, example)
    layers = functional_layers(gm) if used == "fx" and findings.specialised else []
    exported = _export_instead(target, example, layers) if frontend == "auto" else None
    if exported is not None:
        gm, notes, used, leaves = *exported, "export", {}
    kept = sorted({str(n.target) for n in gm.graph.nodes if isinstance(n.target, OpOverload)})
    if kept:
        notes.append(f"aten ops kept as they are (frozen where they touch channels): "
                     f"{', '.join(kept)}")  # fmt: skip
    return Traced(gm=gm, example=example, leaves=leaves, submodule=submodule,
                  frontend=used, notes=notes)  # fmt: skip


def _eval_is_no_op(module: nn.Module) -> bool:
    """`module.eval()` would change nothing (it walks every module through
    `nn.Module.__setattr__`: 0.5 ms on a mobile network): every module is in eval
    mode already and none of their classes has its own `train`, `eval` or
    `__setattr__` (timm's LeViT clears a cache in `train`)."""
    kinds, stack = set(), [module]
    while stack:
        m = stack.pop()
        if m.training:
            return False
        kinds.add(type(m))
        stack.extend(child for child in m._modules.values() if child is not None)
    return all(k.train is _TRAIN and k.eval is _EVAL and k.__setattr__ is _SETATTR for k in kinds)


def _export_instead(target: nn.Module, example: torch.Tensor, layers: list[str]):
    """(graph, notes) of torch.export for a model fx followed only by taking the
    example's branch (plain fx failed there: export was the path) and whose graph
    kept functional `layers` (timm's 'same' padding) the analysis cannot read and
    export reads as modules; None when there are none, or export fails."""
    if not layers:
        return None
    try:
        gm = export_graph(target, example, recompile=False)
        notes = _shaped_and_canonical(gm, "export", MetaFindings(complete=False), example)
    except TraceError:
        return None  # fx's graph stays
    return gm, [f"fx needed the example's shape and kept functional layers "
                f"({', '.join(layers[:3])}): torch.export used instead", *notes]  # fmt: skip


def _shaped_and_canonical(gm: fx.GraphModule, used: str, findings: MetaFindings,
                          example: torch.Tensor) -> list[str]:  # fmt: skip
    """Shapes on every node (propagated, unless fx's tracer wrote them all), then the
    graph in one vocabulary; the notes of both."""
    if used == "export" or not findings.complete:
        propagate_shapes(gm, example)
    notes = list(findings.notes) if used == "fx" else []
    return notes + canonicalise(gm, recompile=used == "export")  # export left it to us


def _trace_fx(target: nn.Module, example: torch.Tensor, leaves: dict[str, str], auto: bool,
              findings: MetaFindings):  # fmt: skip
    """(gm, front end used, leaves). With `auto`, export is tried as soon as fx
    meets the first submodule it cannot trace (a graph with such a leaf, or no
    graph, would go to export anyway), so fx does not re-trace the model once
    per untraceable submodule only to be replaced. fx's tracer carries meta
    values (`meta_proxy`); `findings` gets what it learnt."""

    def make_tracer(leaves: dict[str, str]) -> MetaTracer:
        return MetaTracer(leaves, example, findings)

    try:
        gm = symbolic_trace(bound_to_input(target), leaves, stop_at_leaf=auto,
                            make_tracer=make_tracer)  # fmt: skip
        return gm, "fx", leaves
    except LeafNeeded:
        pass
    except TraceError as fx_error:
        if not auto:
            raise
        return _export(target, example, fx_error), "export", {}
    finally:
        unbind(target)
    try:
        return export_graph(target, example, recompile=False), "export", {}
    except TraceError as exc:
        export_error = exc
    try:  # export failed too: fx's graph with the untraceable parts as leaves
        return symbolic_trace(bound_to_input(target), leaves, make_tracer=make_tracer), "fx", leaves
    except TraceError as fx_error:
        raise TraceError(f"{fx_error}; {export_error}") from fx_error
    finally:
        unbind(target)


def _export(target: nn.Module, example: torch.Tensor, fx_error):
    """The export front end's graph; if export fails, fx's error (when fx was tried)
    is named beside export's."""
    try:
        return export_graph(target, example, recompile=False)
    except TraceError as exc:
        if fx_error is None:
            raise
        raise TraceError(f"{fx_error}; {exc}") from exc


__all__ = ["FRONTENDS", "trace_model"]
