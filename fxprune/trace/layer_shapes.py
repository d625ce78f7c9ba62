"""Output shapes of common layers and ops by their formulas, for shape propagation on
the meta device: the meta kernels of convolution, linear, pooling, upsampling, cat,
arange and arithmetic run through Python reference implementations (tens of
microseconds to a millisecond a call), more than the rest of propagation per node.
Each function returns an empty meta tensor of the output's shape, dtype and layout
(contiguous, as the kernels return for contiguous inputs; `empty_like` keeps torch's
own choice), or None whenever anything is unusual: then the real meta kernel runs.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "arange_output",
    "binary_output",
    "cat_output",
    "empty_like",
    "layer_output",
    "unary_output",
]

_ARANGE_KEYWORDS = {"start", "end", "step", "dtype", "device"}  # (the device: meta, always)
_ARANGE_NAMED = ({"end"}, {"start", "end"}, {"start", "end", "step"})
_ARANGE_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul}  # fmt: skip
# Those that take a Python number first (`2 * x`); `2 / x` has its own layout rule
_NUMBER_FIRST = {operator.add, operator.sub, operator.mul}


# Elementwise functions whose output has their input's shape and dtype; the keyword
# arguments each may take (none of which changes the shape)
_UNARY = {torch.relu: (), torch.sigmoid: (), torch.tanh: (), F.relu: ("inplace",),
          F.relu6: ("inplace",), F.silu: ("inplace",), F.hardswish: ("inplace",),
          F.hardsigmoid: ("inplace",), F.gelu: ("approximate",), F.sigmoid: (),
          F.leaky_relu: ("negative_slope", "inplace"), F.mish: ("inplace",)}  # fmt: skip


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like(x)`, sooner for a meta tensor: its meta kernel finds the layout
    to keep in Python (25 us a call). A tensor laid out contiguously (and not also
    channels-last, where the layout to keep is ambiguous: (N, C, 1, 1)) keeps it;
    for any other the strides torch chose are remembered per shape and strides."""
    if not x.is_meta or x.layout is not torch.strided:
        return torch.empty_like(x)
    if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        return _empty(x.shape, x)
    strides = _strides_kept(x.shape, x.stride())
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device)


@functools.lru_cache(maxsize=1024)
def _strides_kept(shape: torch.Size, strides: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of `torch.empty_like` of a meta tensor of `shape` and `strides` (a
    function of these alone)."""
    return torch.empty_like(torch.empty_strided(shape, strides, device="meta")).stride()


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    """`like.new_empty(shape)` (contiguous; its meta kernel is a Python reference
    making this very call, 6 us instead of 2)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _plain(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta and x.is_contiguous() and x.dim() >= 1


def layer_output(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The output of a Conv1d/2d/3d, Linear, MaxPool2d, Upsample (nearest) or
    AdaptiveAvgPool2d call on one plain meta tensor, as an empty meta tensor; None for
    anything else."""
    if len(args) != 1 or kwargs or not _plain(args[0]):
        return None
    x, kind = args[0], type(module)
    if kind in _CONVS:
        return _conv_output(module, x, _CONVS[kind])
    if kind is nn.Linear and x.shape[-1] == module.in_features and x.dtype == module.weight.dtype:
        return _empty((*x.shape[:-1], module.out_features), x)
    if kind is nn.MaxPool2d and x.dim() == 4 and not _channels_last_too(x):
        return _max_pool_output(module, x)
    if kind is nn.Upsample and x.dim() == 4 and not _channels_last_too(x):
        return _upsample_output(module, x)
    if kind is nn.AdaptiveAvgPool2d and x.dim() in (3, 4):
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        spatial = tuple(s if s is not None else d for s, d in zip(size, x.shape[-2:], strict=True))
        return _empty((*x.shape[:-2], *spatial), x)
    return None


def _conv_output(conv: nn.Module, x: torch.Tensor, dims: int) -> torch.Tensor | None:
    if (
        x.dim() != dims + 2
        or x.shape[1] != conv.in_channels
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or x.dtype != conv.weight.dtype
    ):
        return None
    spatial = []
    for size, k, s, p, d in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation, strict=True):  # fmt: skip
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out <= 0:
            return None  # the kernel raises the user-facing error
        spatial.append(out)
    return _empty((x.shape[0], conv.out_channels, *spatial), x)


def _max_pool_output(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor | None:
    """Floor mode, no indices, padding at most half the kernel, every size known."""
    if pool.ceil_mode or pool.return_indices or x.numel() == 0:
        return None
    sides = [_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)]
    if any(side is None for side in sides):
        return None
    spatial = []
    for size, k, s, p, d in zip(x.shape[2:], *sides, strict=True):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if min(k, s, d) <= 0 or not 0 <= p <= k // 2 or out <= 0:
            return None  # the kernel raises the user-facing error
        spatial.append(out)
    return _empty((*x.shape[:2], *spatial), x)


def _upsample_output(up: nn.Upsample, x: torch.Tensor) -> torch.Tensor | None:
    """Nearest, by a positive scale factor: each side `floor(size * scale)`."""
    if up.mode != "nearest" or up.size is not None or up.recompute_scale_factor:
        return None
    scale = up.scale_factor
    scales = (scale, scale) if isinstance(scale, (int, float)) else scale
    if not isinstance(scales, tuple) or len(scales) != 2 or x.numel() == 0:
        return None
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in scales):
        return None
    spatial = [
        math.floor(float(size) * float(f)) for size, f in zip(x.shape[2:], scales, strict=True)
    ]
    return _empty((*x.shape[:2], *spatial), x) if min(spatial) > 0 else None


def _pair(value) -> tuple[int, int] | None:
    pair = (value, value) if isinstance(value, int) else value
    ok = isinstance(pair, tuple) and len(pair) == 2 and all(type(v) is int for v in pair)
    return pair if ok else None


def arange_output(target, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """`torch.arange(start, end, step)` of Python ints (`torch.arange(end=w)`, w traced),
    int64 or of the dtype asked for, as an empty meta tensor (the meta arange runs
    Python: 70 us); None for anything else."""
    if target is not torch.arange or len(args) > 3 or set(kwargs) - _ARANGE_KEYWORDS:
        return None
    named = set(kwargs) & {"start", "end", "step"}
    if named and (args or named not in _ARANGE_NAMED) or not (args or named):
        return None  # bounds all positional, or named as one of torch's signatures
    positional = ("end",) if len(args) == 1 else ("start", "end", "step")
    bounds = {"start": 0, "step": 1, **dict(zip(positional, args, strict=False)), **kwargs}
    start, end, step = bounds["start"], bounds["end"], bounds["step"]
    if any(type(v) is not int or abs(v) >= 2**53 for v in (start, end, step)) or step == 0:
        return None
    dtype = kwargs.get("dtype") or torch.int64
    if dtype not in _ARANGE_DTYPES and not (
        isinstance(dtype, torch.dtype) and dtype.is_floating_point
    ):
        return None
    if (end - start) * step < 0:
        return None  # torch's error: the bounds disagree with the step's sign
    length = -((start - end) // step)  # ceil((end - start) / step)
    return torch.empty(length, dtype=dtype, device="meta")


def binary_output(target, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """`a + b`, `a * b`, ... of two plain meta tensors of one floating dtype whose
    shapes broadcast, or of one and a Python number (`x + 0.5`, `2 * x`: the tensor's
    dtype and layout), as an empty meta tensor; None for anything else."""
    if target not in _BINARY or len(args) != 2 or kwargs:
        return None
    a, b = args
    if _number(b) or (_number(a) and target in _NUMBER_FIRST):
        x = b if _number(a) else a
        return empty_like(x) if _plain(x) and x.dtype.is_floating_point else None
    if not (_plain(a) and _plain(b)) or a.dtype != b.dtype or not a.dtype.is_floating_point:
        return None
    try:  # torch.broadcast_shapes' rule, in C++ (torch.broadcast_shapes runs Python: 13 us)
        shape = torch._C._infer_size(a.shape, b.shape)
    except RuntimeError:
        return None
    return _empty(shape, a)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cat_output(target, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """`torch.cat(tensors, dim)` of plain meta tensors of one dtype and rank whose sizes
    agree but along `dim`, the first not also channels-last (whose layout the output
    would keep), as an empty meta tensor; None for anything else."""
    if target is not torch.cat or len(args) + len(kwargs) not in (1, 2) or set(kwargs) - {"dim"}:
        return None
    tensors = args[0] if args else None
    dim = args[1] if len(args) == 2 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or type(dim) is not int:
        return None
    first = tensors[0]
    if not all(map(_plain, tensors)) or _channels_last_too(first):
        return None
    rank = first.dim()
    if not -rank <= dim < rank:
        return None
    dim %= rank
    shape, total = first.shape, 0
    for t in tensors:
        if t.dtype != first.dtype or t.dim() != rank:
            return None
        if any(n != m for i, (n, m) in enumerate(zip(t.shape, shape, strict=True)) if i != dim):
            return None
        total += t.shape[dim]
    return _empty((*shape[:dim], total, *shape[dim + 1 :]), first)


def _channels_last_too(x: torch.Tensor) -> bool:
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    )


def unary_output(target, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """`torch.relu(x)`, `F.silu(x, inplace=True)`, ... (`_UNARY`) of one plain floating
    meta tensor, the other arguments plain numbers or flags, as an empty meta tensor
    of its shape (the meta kernels of these run through Python references that cost
    a millisecond a call); None for anything else."""
    allowed = _UNARY.get(target)
    if allowed is None or not args or any(k not in allowed for k in kwargs):
        return None
    x, rest = args[0], args[1:]
    if not _plain(x) or not x.dtype.is_floating_point or len(rest) > len(allowed):
        return None
    if any(not isinstance(v, (bool, int, float, str)) for v in (*rest, *kwargs.values())):
        return None
    return empty_like(x)
