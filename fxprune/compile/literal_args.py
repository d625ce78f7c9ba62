"""Fix literal channel counts in call arguments after channels are removed.

`x.view(n, 384 * 16)`, `x.split([64, 64], 1)`, `x[:, 32:64]`, `x.chunk(2, 1)`:
arguments written as numbers no longer match a compacted tensor. Arguments
computed in the graph (from `x.size()`) adapt by themselves and are left alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis.rules import expand_index, narrow_args
from fxprune.analysis.vocabulary import concrete, tensor_shape
from fxprune.errors import CompileError


def fix_literal_channel_args(node: fx.Node, keep: dict) -> None:
    """Rewrite `node`'s literal arguments to the compacted channel counts."""
    if node not in keep:
        return
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in ("view", "reshape"):
        _fix_reshape(node, keep)
    elif name in ("split", "chunk"):
        _fix_split(node, keep)
    elif name == "getitem":
        _fix_slice(node, keep)
    elif name == "narrow":
        _fix_narrow(node, keep)
    elif name == "expand" and not np.all(keep[node]):
        _fix_expand(node)


def _kept_block_shape(node: fx.Node, keep: np.ndarray) -> tuple[int, ...]:
    ids = node.meta["channels"]
    if keep.all():
        return tuple(ids.shape)  # e.g. view(B, 1, 2, -1) of an untouched block
    if ids.ndim == 1:
        return (int(keep.sum()),)
    if ids.ndim == 2:
        rows = keep.reshape(ids.shape)
        return (ids.shape[0], int(rows[0].sum()))  # columns are tied: every row keeps the same
    raise CompileError(
        f"{node.name}: cannot rewrite the literal sizes of a channel axis split over "
        f"{ids.ndim} axes; freeze it or report this model"
    )


def _fix_reshape(node: fx.Node, keep: dict) -> None:
    shape = tensor_shape(node)
    block = _kept_block_shape(node, keep[node])
    new_shape = (shape[0], *block, *shape[1 + len(block) :])
    if tuple(new_shape) == tuple(shape):
        return
    sizes = node.args[1:]
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
    dims = list(sizes[0]) if packed else list(sizes)
    if len(dims) != len(new_shape):
        return
    for d, value in enumerate(dims):
        if isinstance(value, int) and value != -1 and value != new_shape[d]:
            dims[d] = new_shape[d]
    node.args = (node.args[0], tuple(dims)) if packed else (node.args[0], *dims)


def _fix_split(node: fx.Node, keep: dict) -> None:
    x = node.args[0]
    ids = x.meta.get("channels")
    dim = concrete(node.args[2]) if len(node.args) > 2 else concrete(node.kwargs.get("dim", 0))
    if not isinstance(ids, np.ndarray) or dim not in (1, 1 - len(tensor_shape(x))):
        return
    sizes = [int(k.sum()) for k in keep[node]]
    old = [len(k) for k in keep[node]]
    if sizes == old:
        return
    node.target = "split" if node.op == "call_method" else torch.split
    node.args = (x, sizes)
    node.kwargs = {"dim": 1}


def _new_index(keep: np.ndarray) -> np.ndarray:
    return np.cumsum(keep) - 1


def _fix_slice(node: fx.Node, keep: dict) -> None:
    base, index = node.args[0], node.args[1]
    shape = tensor_shape(base)
    if not isinstance(base.meta.get("channels"), np.ndarray) or shape is None:
        return
    # the same reading of the index as the analysis (channel_ops._index_tensor)
    entries = expand_index(list(index) if isinstance(index, tuple) else [index], len(shape))
    in_keep = keep[base]
    if not isinstance(entries[1], slice) or in_keep.all():
        return  # (a frozen slice with computed bounds keeps every channel)
    start, stop, _ = entries[1].indices(len(in_keep))
    selected = [p for p in range(start, stop) if in_keep[p]]
    renum = _new_index(in_keep)
    entries[1] = slice(int(renum[selected[0]]), int(renum[selected[-1]]) + 1)
    node.args = (base, tuple(entries))


def _fix_narrow(node: fx.Node, keep: dict) -> None:
    base = node.args[0]
    in_keep, shape = keep.get(base), tensor_shape(base)
    if not isinstance(in_keep, np.ndarray) or shape is None or in_keep.all():
        return
    dim, start, length = narrow_args(node, len(shape))
    if dim != 1:
        return
    start = start + len(in_keep) if start < 0 else start
    selected = [p for p in range(start, start + length) if in_keep[p]]
    renum = _new_index(in_keep)
    node.args = (base, 1, int(renum[selected[0]]), len(selected))
    node.kwargs = {}


def _fix_expand(node: fx.Node) -> None:
    # The channel axis is not broadcast here (the rule froze that case), so -1 keeps it.
    sizes = list(node.args[1:])
    if len(sizes) > 1 and isinstance(sizes[1], int):
        sizes[1] = -1  # keep the (compacted) channel count
        node.args = (node.args[0], *sizes)


__all__ = ["fix_literal_channel_args"]
