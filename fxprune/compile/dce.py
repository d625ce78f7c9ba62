"""Dead-code elimination that knows which calls have side effects.

fx's own pass treats every call as pure; wrapped user functions and in-place
ops (`x.add_(y)` whose result is unused) must stay.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxprune.analysis.vocabulary import mutates_input

_PURE_MODULES = ("torch", "operator", "_operator", "math", "builtins")


def _side_effect_free(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "get_attr" or node.op == "call_method":
        return True
    if node.op == "call_module":
        module = type(gm.get_submodule(node.target))
        return module.__module__.startswith("torch.nn") or module.__name__ == "BorderTerm"
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):  # export's aten: its schema knows
            return not node.target._schema.is_mutable  # aten.copy_ into a view of a tensor
        module = getattr(node.target, "__module__", None) or ""
        return module.split(".")[0] in _PURE_MODULES
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Erase unused nodes that provably have no side effects.

    fx's own pass treats every call as pure; wrapped user functions and
    in-place ops (`x.add_(y)` whose result is unused) must stay.
    """
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            if not _side_effect_free(node, gm):
                continue
            if (
                mutates_input(
                    node, gm.get_submodule(node.target) if node.op == "call_module" else None
                )
                and node.args
                and isinstance(node.args[0], fx.Node)
            ):
                if len(node.args[0].users) > 1:
                    continue
            gm.graph.erase_node(node)
            changed = True


__all__ = ["eliminate_dead_code"]
