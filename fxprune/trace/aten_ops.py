"""The export front end's aten ops, spoken in the analysis' vocabulary.

`torch.export` records aten overloads (`aten.add.Tensor`, `aten.view.default`,
`aten.split_with_sizes.default`, ...). `translate_aten` rewrites each one it
knows into the Python-level call that computes the same thing (`torch.add`,
`.view()`, `torch.split`, ...), which the channel rules and the compiler
already understand: one op table, no second analysis. An aten op missing
here stays as it is and the analysis freezes what it touches, with its name.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

__all__ = ["translate_aten"]

aten = torch.ops.aten

# aten overload -> Python-level function with the same positional arguments
_SAME_ARGS: dict[object, Callable] = {
    aten.relu.default: torch.relu,
    aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh,
    aten.silu.default: F.silu,
    aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid,
    aten.hardtanh.default: F.hardtanh,
    aten.leaky_relu.default: F.leaky_relu,
    aten.mish.default: F.mish,
    aten.dropout.default: F.dropout,
    aten.add.Tensor: torch.add,
    aten.add.Scalar: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.sub.Scalar: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.mul.Scalar: torch.mul,
    aten.div.Tensor: torch.div,
    aten.div.Scalar: torch.div,
    aten.maximum.default: torch.maximum,
    aten.minimum.default: torch.minimum,
    aten.cat.default: torch.cat,
    aten.concat.default: torch.cat,
    aten.chunk.default: torch.chunk,
    aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split,
    aten.reshape.default: torch.reshape,
    aten.flatten.using_ints: torch.flatten,
    aten.permute.default: torch.permute,
    aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.squeeze.dim: torch.squeeze,
    aten.mean.dim: torch.mean,
    aten.sum.dim_IntList: torch.sum,
    aten.amax.default: torch.amax,
    aten.select.int: torch.select,
    aten.softmax.int: torch.softmax,
    aten.stack.default: torch.stack,
    aten.meshgrid.indexing: torch.meshgrid,
    aten.narrow.default: torch.narrow,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d,
    aten.avg_pool1d.default: F.avg_pool1d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.avg_pool3d.default: F.avg_pool3d,
    aten.pad.default: F.pad,
}
# in-place activations: the same function when nothing else can see the input
_IN_PLACE = {
    aten.relu_.default: torch.relu,
    aten.silu_.default: F.silu,
    aten.hardswish_.default: F.hardswish,
    aten.hardtanh_.default: F.hardtanh,
    aten.sigmoid_.default: torch.sigmoid,
    aten.dropout_.default: F.dropout,
}
# ops whose result may alias their input
_VIEWS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "expand",
          "narrow", "getitem", "split", "chunk", "slice", "select", "as_strided"}  # fmt: skip
# aten overload -> tensor method with the same positional arguments
_METHODS = {
    aten.view.default: "view",
    aten.contiguous.default: "contiguous",
    aten.clone.default: "clone",
    aten.type_as.default: "type_as",
    aten.item.default: "item",
    aten.add_.Tensor: "add_",
    aten.mul_.Tensor: "mul_",
}


def _kwargs(node: fx.Node) -> dict | None:
    pair = normalize_function(node.target, node.args, node.kwargs,
                              normalize_to_only_use_kwargs=True)  # fmt: skip
    return dict(pair.kwargs) if pair is not None else None


def _gelu(node: fx.Node) -> bool:
    kw = _kwargs(node)
    if kw is None:
        return False
    _set(node, F.gelu, (kw["input"],), {"approximate": kw["approximate"]})
    return True


def _max_pool(node: fx.Node) -> bool:
    kw = _kwargs(node)
    if kw is None:
        return False
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kw["kernel_size"])]
    stride = kw["stride"] or None  # aten's [] is "the kernel size"
    args = (kw["input"], kw["kernel_size"], stride, kw["padding"], kw["dilation"])
    _set(node, fn, args, {"ceil_mode": kw["ceil_mode"]})
    return True


def _upsample(node: fx.Node) -> bool:
    kw = _kwargs(node)
    if kw is None:
        return False
    name = node.target.overloadpacket.__name__  # upsample_nearest2d, upsample_bilinear2d
    mode = name.removeprefix("upsample_")[:-2]
    extra = {} if mode == "nearest" else {"align_corners": kw["align_corners"]}
    size, scale = kw.get("output_size"), kw.get("scale_factors")
    _set(node, F.interpolate, (kw["input"],),
         {"size": size, "scale_factor": scale, "mode": mode, **extra})  # fmt: skip
    return True


def _slice(node: fx.Node) -> bool:
    kw = _kwargs(node)
    if kw is None or not isinstance(kw["dim"], int) or kw["dim"] < 0:
        return False
    index = (slice(None),) * kw["dim"] + (slice(kw["start"], kw["end"], kw["step"]),)
    _set(node, operator.getitem, (kw["input"], index), {})
    return True


def _in_place(node: fx.Node) -> bool:
    """An in-place activation whose input nobody else reads and nothing aliases."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or len(x.users) != 1 or x.op == "placeholder":
        return False
    name = x.target if isinstance(x.target, str) else getattr(x.target, "__name__", "")
    if any(view in name for view in _VIEWS):
        return False
    node.target = _IN_PLACE[node.target]
    return True


def _expand(node: fx.Node) -> bool:
    if len(node.args) != 2 or node.kwargs:
        return False
    node.op, node.target = "call_method", "expand"
    return True


def _factory(node: fx.Node) -> tuple[dict, dict] | None:
    """A tensor factory's normalised arguments and the dtype/device keywords to keep
    (the ones at their default, `pin_memory=False` and strided layout, left out);
    None when one is not a default."""
    kw = _kwargs(node)
    if kw is None or kw.get("pin_memory") or kw.get("layout") not in (None, torch.strided):
        return None
    keep = {k: kw[k] for k in ("dtype", "device") if kw.get(k) is not None}
    if isinstance(keep.get("device"), torch.device):  # printed as a string TorchScript reads
        keep["device"] = str(keep["device"])
    return kw, keep


def _arange(node: fx.Node) -> bool:
    """`aten.arange.default(end, device=..., pin_memory=False)` -> `torch.arange(end, ...)`."""
    found = _factory(node)
    if found is not None:
        _set(node, torch.arange, (found[0]["end"],), found[1])
    return found is not None


def _new_full(node: fx.Node) -> bool:
    """`aten.new_full.default(x, size, fill, dtype=...)` -> `x.new_full(size, fill, ...)`."""
    found = _factory(node)
    if found is not None:
        kw, keep = found
        node.op = "call_method"
        _set(node, "new_full", (kw["input"], kw["size"], kw["fill_value"]), keep)
    return found is not None


def _set(node: fx.Node, target, args: tuple, kwargs: dict) -> None:
    node.target, node.args, node.kwargs = target, args, kwargs


_SPECIAL: dict[object, Callable[[fx.Node], bool]] = {
    aten.gelu.default: _gelu,
    aten.max_pool1d.default: _max_pool,
    aten.max_pool2d.default: _max_pool,
    aten.max_pool3d.default: _max_pool,
    aten.upsample_nearest1d.vec: _upsample,
    aten.upsample_nearest2d.vec: _upsample,
    aten.upsample_nearest3d.vec: _upsample,
    aten.upsample_bilinear2d.vec: _upsample,
    aten.slice.Tensor: _slice,
    aten.expand.default: _expand,
    aten.arange.default: _arange,
    aten.new_full.default: _new_full,
    **{op: _in_place for op in _IN_PLACE},
}


def translate_aten(gm: fx.GraphModule) -> list[str]:
    """Rewrite every aten call `gm` has a Python-level twin for (module
    docstring); returns the names of the aten ops left as they are. The graph
    changes; the caller recompiles `gm`."""
    left: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        target = node.target
        if target in _SAME_ARGS:
            node.target = _SAME_ARGS[target]
        elif target in _METHODS:
            node.op, node.target = "call_method", _METHODS[target]
        elif target in _SPECIAL and _SPECIAL[target](node):
            pass
        else:
            left.add(str(target))
    return sorted(left)
