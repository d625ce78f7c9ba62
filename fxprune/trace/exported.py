"""The second front end: `torch.export` (non-strict) for models fx cannot trace.

Ultralytics YOLO and Hugging Face models use Python control flow and
`*args`/`**kwargs` forwards that symbolic tracing cannot follow; export runs
the real Python once and records the aten ops. `export_graph` returns an
ordinary GraphModule: parameters keep the user's dotted names (`model.0.conv.
weight`), inputs are one tensor, outputs a flat tuple of tensors (a dict or a
`ModelOutput` is flattened in its own order), and the aten ops are written in
the analysis' vocabulary (`fxprune.trace.aten_ops`). Functional layers become
modules afterwards, with the fx front end's graphs (`fxprune.trace.canonical`).
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.fx as fx
from torch import nn

from fxprune.errors import TraceError, first_line
from fxprune.trace.aten_ops import translate_aten

__all__ = ["export_graph"]


def export_graph(
    module: nn.Module, example: torch.Tensor, *, recompile: bool = True
) -> fx.GraphModule:
    """Export `module` (eval mode) on `example` into a GraphModule (module
    docstring). TraceError (one line) if torch.export cannot capture it. With
    `recompile=False` the graph is final but the module's code is not
    regenerated: the caller edits the graph further and recompiles once (on
    YOLOv8n each regeneration costs 35 ms)."""
    module.eval()
    try:
        # a library's own prints must not land on the CLI's stdout (trace --format json)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), _no_stack_traces():
            program = torch.export.export(module, (example,), strict=False)
        # a plain GraphModule: ExportedProgram.module() refuses eval() and train()
        unlifted = program.module()
        gm = fx.GraphModule(unlifted, unlifted.graph)
    except Exception as exc:  # export raises many types; name the first line
        raise TraceError(
            f"torch.export cannot capture {type(module).__name__}: {first_line(exc)}"
        ) from exc
    _drop_guards(gm)
    _flat_io(gm)
    translate_aten(gm)
    gm.graph.lint()
    if recompile:
        gm.recompile()
    return gm


@contextlib.contextmanager
def _no_stack_traces():
    """Export without a Python stack trace per node (fxprune never reads them): the
    traceback capture and symbolisation took half of export's time on YOLOv8n."""
    config = getattr(torch.fx, "config", None)
    if config is None or not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove the input-shape guard calls `ExportedProgram.module()` inserts."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards") and not node.users:
            gm.graph.erase_node(node)
    for name in [n for n, _ in gm.named_children() if n.startswith("_guards")]:
        delattr(gm, name)


def _flat_io(gm: fx.GraphModule) -> None:
    """Plain calling convention: `forward(x)` returns a tensor or a flat tuple."""
    gm.graph._codegen = fx.graph.CodeGen()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    if isinstance(values, (tuple, list)):
        values = tuple(v for v in values if isinstance(v, fx.Node))
        output.args = (values[0] if len(values) == 1 else values,)
