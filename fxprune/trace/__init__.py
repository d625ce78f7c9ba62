"""Stage 2, trace: a user's module to an analysable, shape-annotated graph.

Front ends: `symbolic` (torch.fx symbolic tracing with a leaf-module policy).
Shapes land in `node.meta["tensor_meta"]` / `node.meta["value"]`.
"""

from fxprune.trace.shapes import SAME_SHAPE, mutable_copy, propagate_shapes
from fxprune.trace.symbolic import (
    LeafPolicyTracer,
    Traced,
    resolve_submodule,
    symbolic_trace,
    trace_model,
)

__all__ = [
    "SAME_SHAPE",
    "LeafPolicyTracer",
    "Traced",
    "mutable_copy",
    "propagate_shapes",
    "resolve_submodule",
    "symbolic_trace",
    "trace_model",
]
