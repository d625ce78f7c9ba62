"""Stage 2, trace: a user's module to an analysable, shape-annotated graph.

Front ends: `symbolic` (torch.fx symbolic tracing with a leaf-module policy;
`meta_proxy` gives its proxies meta values, so it follows shapes through
`list(x.chunk(...))`, `if self.shape != shape` and `torch.arange(end=w)`) and
`exported` (torch.export, non-strict, its aten ops rewritten into the same
vocabulary by `aten_ops`); `canonical` turns functional layers on one
module's parameters into that module; `frontends.trace_model` picks one.
Shapes land in `node.meta["tensor_meta"]` / `node.meta["value"]`.
"""

from fxprune.trace.exported import export_graph
from fxprune.trace.frontends import FRONTENDS, trace_model
from fxprune.trace.shapes import SAME_SHAPE, propagate_shapes
from fxprune.trace.symbolic import (
    LeafPolicyTracer,
    Traced,
    resolve_submodule,
    symbolic_trace,
)

__all__ = [
    "FRONTENDS",
    "SAME_SHAPE",
    "export_graph",
    "LeafPolicyTracer",
    "Traced",
    "propagate_shapes",
    "resolve_submodule",
    "symbolic_trace",
    "trace_model",
]
