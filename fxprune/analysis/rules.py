"""Channel rules for `call_function` / `call_method` nodes.

Each handler takes the `ChannelLabeller` and a node whose arguments already
carry channel ids; it sets the node's ids or freezes what it touches.
`handler_for` maps an fx target to its handler; unknown targets get None and
are frozen by the labeller.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune.analysis.vocabulary import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    CAT_FUNCTIONS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    PERMUTE_FUNCTIONS,
    PERMUTE_METHODS,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    SPLIT_FUNCTIONS,
    SPLIT_METHODS,
    concrete,
    op_name,
    tensor_shape,
)

Handler = Callable[[object, fx.Node], None]


def _channels(node) -> np.ndarray | None:
    ids = node.meta.get("channels") if isinstance(node, fx.Node) else None
    return ids if isinstance(ids, np.ndarray) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Concrete value of a positional-or-keyword argument."""
    if len(node.args) > index:
        return concrete(node.args[index])
    return concrete(node.kwargs.get(name, default))


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _outside_block(dims, k: int) -> bool:
    """True when none of `dims` is the batch axis or a channel-block axis."""
    return all(d > k for d in dims)


def elementwise(lab, node: fx.Node) -> None:
    x = node.args[0] if node.args else None
    ids = _channels(x)
    extra = [n for n in node.all_input_nodes if n is not x and tensor_shape(n) is not None]
    if ids is None or extra:
        return lab.frozen_output(node, f"{op_name(node)}: unsupported arguments")
    lab.passthrough(node, ids, "elementwise")


def spatial(lab, node: fx.Node, keeps_constants: bool) -> None:
    """A per-channel op that may break constant channels (padded pooling, resize)."""
    x = node.args[0] if node.args else None
    ids = _channels(x)
    if ids is None or len(node.all_input_nodes) != 1:
        return lab.frozen_output(node, f"{op_name(node)}: unsupported arguments")
    lab.passthrough(node, ids, "elementwise" if keeps_constants else "spatial")


def avg_pool(lab, node: fx.Node) -> None:
    padding = _arg(node, 3, "padding", 0)
    include_pad = _arg(node, 5, "count_include_pad", True)
    # A divisor other than the window size scales a constant by window/divisor,
    # which changes at ceil-mode borders: keep the channel live.
    override = _arg(node, 6, "divisor_override", None)
    padded = any(p != 0 for p in padding) if isinstance(padding, (tuple, list)) else padding != 0
    spatial(lab, node, keeps_constants=(not padded or not include_pad) and override is None)


def interpolate(lab, node: fx.Node) -> None:
    spatial(lab, node, keeps_constants=_arg(node, 3, "mode", "nearest") == "nearest")


def pad(lab, node: fx.Node) -> None:
    shape = tensor_shape(node.args[0]) or ()
    widths = _arg(node, 1, "pad", ())
    if len(widths) > 2 * (len(shape) - 2):
        return lab.frozen_output(node, f"{op_name(node)}: pads the channel axis")
    spatial(lab, node, keeps_constants=False)


def binary(lab, node: fx.Node) -> None:
    """add/sub/mul/div/max of activations: union ids position by position."""
    out = tensor_shape(node)
    if out is None or len(out) < 2:
        return lab.frozen_output(node, f"{op_name(node)}: not a channel tensor")
    aligned: list[np.ndarray] = []
    for operand in node.all_input_nodes:
        shape, ids = tensor_shape(operand), _channels(operand)
        if shape is None:
            continue  # a plain number computed in the graph
        offset = len(out) - len(shape)
        if (
            offset == 0
            and ids is not None
            and tuple(shape[1 : 1 + ids.ndim]) == tuple(out[1 : 1 + ids.ndim])
        ):
            aligned.append(ids)
        elif (offset == 0 and shape[1] == 1) or offset >= 2 or (offset == 1 and shape[0] == 1):
            lab.freeze(ids, f"{op_name(node)}: broadcast across channels")
        else:
            return lab.frozen_output(node, f"{op_name(node)}: operand {operand.name} {shape}")
    if not aligned or aligned[0].shape != tuple(out[1 : 1 + aligned[0].ndim]):
        return lab.frozen_output(node, f"{op_name(node)}: no operand carries the channels")
    for other in aligned[1:]:
        if other.shape != aligned[0].shape:
            return lab.frozen_output(node, f"{op_name(node)}: mismatched channel blocks")
        lab.uf.union_arrays(aligned[0], other)
    lab.set(node, aligned[0], "elementwise")


def cat(lab, node: fx.Node) -> None:
    tensors = _arg(node, 0, "tensors", ())
    ids = [_channels(t) for t in tensors]
    out = tensor_shape(node)
    if out is None or any(i is None for i in ids):
        return lab.frozen_output(node, f"{op_name(node)}: untracked input")
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
    if dim == 1 and all(i.ndim == 1 for i in ids):
        return lab.set(node, np.concatenate(ids), "structural")
    if (dim == 0 or dim > ids[0].ndim) and all(i.shape == ids[0].shape for i in ids):
        for other in ids[1:]:
            lab.uf.union_arrays(ids[0], other)
        return lab.set(node, ids[0], "spatial")
    return lab.frozen_output(node, f"{op_name(node)}: concatenates inside a channel block")


def split(lab, node: fx.Node) -> None:
    x = node.args[0]
    ids = _channels(x)
    metas = node.meta.get("tensor_meta")
    shape = tensor_shape(x)
    if ids is None or not isinstance(metas, (tuple, list)) or shape is None:
        return lab.frozen_output(node, f"{op_name(node)}: untracked input")
    dim = _norm_dim(_arg(node, 2, "dim", 0), len(shape))
    if dim == 1 and ids.ndim == 1:
        bounds = np.cumsum([0] + [m.shape[1] for m in metas])
        pieces = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return lab.set(node, pieces, "structural")
    if dim == 0 or dim > ids.ndim:
        return lab.set(node, [ids for _ in metas], "structural")
    return lab.frozen_output(node, f"{op_name(node)}: splits inside a channel block")


def getitem(lab, node: fx.Node) -> None:
    base, index = node.args[0], concrete(node.args[1])
    base_ids = base.meta.get("channels") if isinstance(base, fx.Node) else None
    if isinstance(base_ids, list):
        if isinstance(index, int):
            return lab.set(node, base_ids[index], "structural")
        return lab.frozen_output(node, f"{op_name(node)}: unsupported tuple index")
    if base_ids is None:
        if tensor_shape(node) is not None:
            return lab.frozen_output(node, f"{op_name(node)}: untracked input")
        return None  # indexing a size or another plain value
    return _index_tensor(lab, node, base, base_ids, index)


def _index_tensor(lab, node, base, ids: np.ndarray, index) -> None:
    shape = tensor_shape(base)
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(e, (fx.Node, torch.Tensor, list)) for e in entries) or shape is None:
        return lab.frozen_output(node, f"{op_name(node)}: advanced indexing")
    if any(_computed_slice(e) for e in entries):
        # x[:, : x.size(1) // 2] selects other channels once channels are removed
        return lab.frozen_output(node, f"{op_name(node)}: slice bounds computed in the graph")
    entries = expand_index(entries, len(shape))
    first, chan = entries[0], entries[1]
    if first != slice(None) or not isinstance(chan, slice) or any(e is None for e in entries[:2]):
        return lab.frozen_output(node, f"{op_name(node)}: indexes the batch or channel axis")
    if any(e != slice(None) for e in entries[2 : 1 + ids.ndim]):
        # y.view(B, 17, 3, N)[:, :, :2] (YOLO pose keypoints): inside a split channel axis
        return lab.frozen_output(node, f"{op_name(node)}: indexes inside a split channel axis")
    if chan == slice(None):
        return lab.set(node, ids, "structural")
    if ids.ndim != 1 or chan.step not in (None, 1):
        return lab.frozen_output(node, f"{op_name(node)}: strided channel slice")
    lab.set(node, ids[chan], "structural")


def _computed_slice(entry) -> bool:
    return isinstance(entry, slice) and any(
        isinstance(v, fx.Node) for v in (entry.start, entry.stop, entry.step)
    )


def expand_index(entries: list, ndim: int) -> list:
    """An index tuple with its Ellipsis spelled out and at least two entries,
    so that entry 1 is the channel axis (unless a None comes first)."""
    entries = list(entries)
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        explicit = len(entries) - 1 - entries.count(None)
        entries[at : at + 1] = [slice(None)] * (ndim - explicit)
    return entries + [slice(None)] * (2 - len(entries))


def narrow_args(node: fx.Node, ndim: int) -> tuple[int, int, int]:
    """(dim, start, length) of a narrow call, normalised, positional or keyword."""
    dim = _norm_dim(_arg(node, 1, "dim"), ndim)
    return dim, _arg(node, 2, "start"), _arg(node, 3, "length")


def narrow(lab, node: fx.Node) -> None:
    x = node.args[0]
    ids, shape = _channels(x), tensor_shape(x)
    if ids is None or shape is None:
        return lab.frozen_output(node, f"{op_name(node)}: untracked input")
    dim, start, length = narrow_args(node, len(shape))
    if dim == 1 and ids.ndim == 1:
        start = _norm_dim(start, len(ids))
        return lab.set(node, ids[start : start + length], "structural")
    if dim == 0 or dim > ids.ndim:
        return lab.set(node, ids, "structural")
    return lab.frozen_output(node, f"{op_name(node)}: narrows inside a channel block")


def reshape(lab, node: fx.Node) -> None:
    """view/reshape/flatten/squeeze: carry the channel block through the new shape."""
    x = node.args[0]
    ids, before, after = _channels(x), tensor_shape(x), tensor_shape(node)
    if ids is None or before is None or after is None or len(after) < 2:
        return lab.frozen_output(node, f"{op_name(node)}: untracked reshape")
    if before[0] != after[0]:
        return lab.frozen_output(node, f"{op_name(node)}: reshapes the batch axis")
    block, rest = ids.size, before[1 + ids.ndim :]
    for repeat in [1] + [math.prod(rest[:m]) for m in range(1, len(rest) + 1)]:
        for j in range(1, len(after)):
            if math.prod(after[1 : 1 + j]) == block * repeat:
                new = np.repeat(ids.reshape(-1), repeat).reshape(after[1 : 1 + j])
                return lab.set(node, new, "structural")
    return lab.frozen_output(node, f"{op_name(node)}: mixes channels with other axes")


def permute(lab, node: fx.Node) -> None:
    """transpose/permute; a transpose inside a split channel axis is a channel shuffle."""
    x = node.args[0]
    ids, shape = _channels(x), tensor_shape(x)
    if ids is None or shape is None:
        return lab.frozen_output(node, f"{op_name(node)}: untracked input")
    perm = _permutation(node, len(shape))
    k = ids.ndim
    if perm is None or perm[0] != 0 or sorted(perm[1 : 1 + k]) != list(range(1, 1 + k)):
        return lab.frozen_output(node, f"{op_name(node)}: moves the channel axis")
    block_perm = [p - 1 for p in perm[1 : 1 + k]]
    if block_perm == list(range(k)):
        return lab.set(node, ids, "elementwise")
    if k != 2:
        return lab.frozen_output(node, f"{op_name(node)}: shuffle over {k} axes")
    # Channel shuffle: tie the channel at the same position of every group so a
    # removal keeps the groups equal and the interleaving intact.
    for column in ids.T:
        lab.uf.union_arrays(np.full_like(column, column[0]), column)
    lab.set(node, ids.transpose(block_perm), "structural")


def _permutation(node: fx.Node, ndim: int) -> list[int] | None:
    name = node.target if isinstance(node.target, str) else node.target.__name__
    args = [concrete(a) for a in node.args[1:]]
    if name == "transpose":
        d0, d1 = (_norm_dim(int(d), ndim) for d in args[:2])
        perm = list(range(ndim))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    dims = dims or concrete(node.kwargs.get("dims", ()))
    return [_norm_dim(int(d), ndim) for d in dims] if len(dims) == ndim else None


def reduce(lab, node: fx.Node) -> None:
    x = node.args[0]
    ids, shape = _channels(x), tensor_shape(x)
    dims = _arg(node, 1, "dim")
    if ids is None or shape is None or dims is None or tensor_shape(node) is None:
        return lab.frozen_output(node, f"{op_name(node)}: reduces over channels")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not _outside_block([_norm_dim(d, len(shape)) for d in dims], ids.ndim):
        return lab.frozen_output(node, f"{op_name(node)}: reduces over channels")
    # mean/amax/amin of a constant is that constant; a sum grows with the
    # resolution, so its channels are never taken for constants.
    name = node.target if node.op == "call_method" else node.target.__name__
    lab.set(node, ids, "spatial" if name == "sum" else "elementwise")


def expand(lab, node: fx.Node) -> None:
    x = node.args[0]
    ids = _channels(x)
    if ids is None:
        return lab.frozen_output(node, f"{op_name(node)}: untracked input")
    lab.passthrough(node, ids, "elementwise")


def plain_value(lab, node: fx.Node) -> None:
    """size(), dim(), x.shape: read the shape, not the values."""
    if tensor_shape(node) is not None:
        lab.frozen_output(node, f"{op_name(node)}: attribute returning a tensor")


_FUNCTIONS: dict[object, Handler] = {
    **{f: elementwise for f in ELEMENTWISE_FUNCTIONS},
    **{f: binary for f in BINARY_FUNCTIONS},
    **{f: reshape for f in RESHAPE_FUNCTIONS},
    **{f: permute for f in PERMUTE_FUNCTIONS},
    **{f: reduce for f in REDUCE_FUNCTIONS},
    **{f: cat for f in CAT_FUNCTIONS},
    **{f: split for f in SPLIT_FUNCTIONS},
    F.avg_pool1d: avg_pool,
    F.avg_pool2d: avg_pool,
    F.avg_pool3d: avg_pool,
    F.interpolate: interpolate,
    F.pad: pad,
    operator.getitem: getitem,
    torch.narrow: narrow,
    builtins.getattr: plain_value,
}
_METHODS: dict[str, Handler] = {
    **{m: elementwise for m in ELEMENTWISE_METHODS | {"to", "type_as"}},
    **{m: binary for m in BINARY_METHODS},
    **{m: reshape for m in RESHAPE_METHODS},
    **{m: permute for m in PERMUTE_METHODS},
    **{m: reduce for m in REDUCE_METHODS},
    **{m: split for m in SPLIT_METHODS},
    "narrow": narrow,
    "expand": expand,
    "expand_as": expand,
    "size": plain_value,
    "dim": plain_value,
}


try:  # torchvision wraps stochastic_depth for fx; it is the identity in eval mode
    from torchvision.ops import stochastic_depth as _stochastic_depth

    _FUNCTIONS[_stochastic_depth] = elementwise
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass


def handler_for(target, is_method: bool) -> Handler | None:
    """The channel rule for an fx call target, or None if it is not understood."""
    if is_method:
        return _METHODS.get(target)
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


__all__ = [
    "Handler",
    "avg_pool",
    "binary",
    "cat",
    "elementwise",
    "expand",
    "expand_index",
    "getitem",
    "handler_for",
    "interpolate",
    "narrow",
    "narrow_args",
    "pad",
    "permute",
    "plain_value",
    "reduce",
    "reshape",
    "spatial",
    "split",
]
