"""Small edits of a traced graph shared by the trace passes."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

__all__ = ["erase_unused"]


def erase_unused(graph: fx.Graph, node: object, pure: Callable[[fx.Node], bool]) -> None:
    """Erase `node` when it is a call in `graph` that nothing reads and `pure(node)`
    says has no side effects, then its inputs likewise (a decided condition, a size
    computation replaced by its number)."""
    if (
        not isinstance(node, fx.Node)
        or node.users
        or node.graph is not graph
        or node.op not in ("call_function", "call_method")
        or not pure(node)
    ):
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for inp in inputs:
        erase_unused(graph, inp, pure)
