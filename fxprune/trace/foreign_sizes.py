"""Channel counts read off one tensor and used to view another become numbers.

`B, C, H, W = x.shape; y.view(B, C, H, W)` (Ultralytics' attention): the analysis
sees a view of `y` and ties nothing to `x`, and the compiler leaves sizes computed in
the graph alone, expecting them to follow the tensor they are read from. Once `x`
loses channels and `y` does not (or not the same), `C` no longer fits `y`. Written as
the number it was on the example (what torch.export writes), the size is an ordinary
literal that the compiler rewrites to `y`'s own kept channels. Only channel axes
(dimension 1 of a 4-D or 5-D tensor) read off a tensor other than the one viewed are
rewritten: batch and spatial sizes stay computed (other resolutions still work).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxprune.trace.graph_edits import erase_unused

__all__ = ["foreign_channel_sizes"]

_RESHAPE_METHODS = {"view", "reshape"}
_ARITHMETIC = {operator.mul, operator.floordiv, operator.add, operator.sub, operator.mod}
_IMAGE_RANKS = (4, 5)  # (N, C, H, W), (N, C, D, H, W): dimension 1 is the channel axis


def foreign_channel_sizes(gm: fx.GraphModule) -> tuple[list[str], bool]:
    """Write as numbers the view/reshape sizes computed from another tensor's channel
    count (module docstring); the nodes that computed them go when nothing else reads
    them. Returns a note naming the modules where it did, and whether the graph
    changed."""
    places: list[str] = []
    for node in list(gm.graph.nodes):
        if not _is_reshape(node) or not isinstance(node.args[0], fx.Node):
            continue
        viewed, sizes = node.args[0], node.args[1:]
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
        dims = list(sizes[0]) if packed else list(sizes)
        foreign = [i for i, d in enumerate(dims) if _reads_foreign_channels(d, viewed)]
        if not foreign:
            continue
        replaced = [dims[i] for i in foreign]
        for i in foreign:
            dims[i] = dims[i].meta["value"]
        node.args = (viewed, tuple(dims)) if packed else (viewed, *dims)
        for old in dict.fromkeys(replaced):  # C may be read twice by one call
            erase_unused(gm.graph, old, _size_arithmetic)
        places.append(_module_of(node))
    if not places:
        return [], False
    unique = list(dict.fromkeys(places))
    listed = ", ".join(unique[:6]) + (f" +{len(unique) - 6} more" if len(unique) > 6 else "")
    return [f"{len(places)} view/reshape channel sizes read off another tensor's channels "
            f"written as numbers (as torch.export writes them) in {listed}"], True  # fmt: skip


def _module_of(node: fx.Node) -> str:
    """The user's module whose forward made `node` (fx's nn_module_stack), or its name."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [path for path, _ in stack.values() if path]
    return names[-1] if names else node.name


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    return node.op == "call_function" and node.target is torch.reshape


def _reads_foreign_channels(value, viewed: fx.Node) -> bool:
    """True when the int `value` (a node with a known value) is computed from channel
    counts of image tensors other than `viewed` and numbers only (`C`, `C // 2`), so
    that writing it as a number bakes in no batch or spatial size."""
    if not isinstance(value, fx.Node) or not isinstance(value.meta.get("value"), int):
        return False
    leaves: list[tuple[fx.Node, int] | None] = []
    _size_leaves(value, leaves, depth=0)
    return bool(leaves) and all(leaf is not None and _foreign_channel(*leaf, viewed)
                                for leaf in leaves)  # fmt: skip


def _size_leaves(value: fx.Node, leaves: list, depth: int) -> None:
    """The size reads (tensor, dim) an int node is computed from; None for anything
    else it depends on (a reduction, an input, too deep an expression)."""
    read = _size_read(value)
    if read is not None:
        leaves.append(read)
    elif value.op == "call_function" and value.target in _ARITHMETIC and depth < 8:
        for arg in value.args:
            if isinstance(arg, fx.Node):
                _size_leaves(arg, leaves, depth + 1)
            elif not isinstance(arg, int):
                leaves.append(None)
    else:
        leaves.append(None)


def _foreign_channel(tensor: fx.Node, dim: int, viewed: fx.Node) -> bool:
    shape = getattr(tensor.meta.get("tensor_meta"), "shape", None)
    if tensor is viewed or shape is None or len(shape) not in _IMAGE_RANKS:
        return False
    return dim % len(shape) == 1


def _size_read(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(tensor, dim) for `t.shape[dim]`, `t.size()[dim]` and `t.size(dim)`."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        tensor, dim = node.args
        return (tensor, dim) if isinstance(tensor, fx.Node) and isinstance(dim, int) else None
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    shape, dim = node.args
    if not isinstance(shape, fx.Node) or not isinstance(dim, int):
        return None
    attribute = shape.op == "call_function" and shape.target is getattr
    is_shape = (attribute and shape.args[1] == "shape") or (
        shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1
    )
    tensor = shape.args[0]
    return (tensor, dim) if is_shape and isinstance(tensor, fx.Node) else None


def _size_arithmetic(node: fx.Node) -> bool:
    """A size read or integer arithmetic on sizes: nothing else reads it once replaced."""
    return node.target in _ARITHMETIC or node.target in (getattr, operator.getitem, "size")
