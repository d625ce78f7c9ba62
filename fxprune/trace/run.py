"""Run a GraphModule's graph node by node, with a hook on every result.

`torch.fx.Interpreter` does this too, at a cost of tens of microseconds per node
(context managers, dispatch by name, attribute paths walked on every call): on a
small probe input of a mobile network that was more than the arithmetic itself.
`run_graph` keeps to what shape propagation and the liveness probe need: the
same calls (call_module / call_function / call_method / get_attr with the
arguments fx recorded, lists and dicts handed over as plain mutable ones, as the
generated code does), each value dropped after its last reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["attribute", "run_graph"]

ModuleCall = Callable[[str, nn.Module, tuple, dict], Any]


def run_graph(
    gm: fx.GraphModule,
    inputs: Sequence[Any],
    *,
    on_result: Callable[[fx.Node, Any], None] | None = None,
    call_module: ModuleCall | None = None,
    call_function: Callable[[Any, tuple, dict], Any] | None = None,
    get_attr: Callable[[str, Any], Any] | None = None,
) -> Any:
    """The graph's output for `inputs` (one per placeholder). `on_result(node, value)`
    sees every node's value; `call_module(target, module, args, kwargs)`,
    `call_function(target, args, kwargs)` and `get_attr(target, value)` replace the
    default calls (shape propagation on the meta device uses them)."""
    modules = dict(gm.named_modules())
    free = _last_readers(gm.graph)
    env: dict[fx.Node, Any] = {}
    arguments = iter(inputs)
    load = env.__getitem__
    for node in gm.graph.nodes:
        op = node.op
        if op == "placeholder":  # a missing argument takes the placeholder's default
            value = next(arguments, node.args[0] if node.args else None)
        elif op == "output":
            return _mutable(fx.node.map_arg(node.args[0], load))
        else:
            args = _mutable(fx.node.map_arg(node.args, load))
            kwargs = _mutable(fx.node.map_arg(node.kwargs, load))
            if op == "call_function":
                value = (
                    node.target(*args, **kwargs)
                    if call_function is None
                    else call_function(node.target, args, kwargs)
                )
            elif op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif op == "call_module":
                module = modules[node.target]
                value = (
                    module(*args, **kwargs)
                    if call_module is None
                    else call_module(node.target, module, args, kwargs)
                )
            else:  # get_attr
                value = attribute(gm, node.target)
                value = value if get_attr is None else get_attr(node.target, value)
        env[node] = value
        if on_result is not None:
            on_result(node, value)
        for done in free.get(node, ()):
            del env[done]
    return None


def attribute(root: nn.Module, target: str) -> Any:
    """The attribute at dotted `target` below `root` (a get_attr node's value)."""
    value = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _last_readers(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """node -> the values whose last reader it is (to drop once it has run)."""
    seen: set[fx.Node] = set()
    free: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for inp in node.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                free.setdefault(node, []).append(inp)
    return free


def _mutable(value: Any) -> Any:
    """fx hands calls immutable lists and dicts; generated code passes plain ones
    (some callees, e.g. torchvision's 3-D Swin, mutate their arguments)."""
    if isinstance(value, tuple):
        return tuple(_mutable(v) for v in value) if _nested(value) else value
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def _nested(values: tuple) -> bool:
    return any(isinstance(v, (tuple, list, dict)) for v in values)
