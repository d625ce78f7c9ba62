"""Shape propagation: run a traced graph on the example input (on the meta
device when possible) and record `node.meta["tensor_meta"]` for tensors and
`node.meta["value"]` for plain Python values (sizes, ints, tuples)."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from fxprune.errors import TraceError, first_line
from fxprune.trace.layer_shapes import (
    arange_output,
    binary_output,
    cat_output,
    empty_like,
    layer_output,
    unary_output,
)
from fxprune.trace.run import run_graph

# Modules whose output has exactly their input's shape, dtype and layout: on the
# meta device their shapes need no kernel (the meta batch norm alone is slow).
SAME_SHAPE = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
    nn.GELU,
    nn.LeakyReLU,
)
# torch functions that make a tensor from sizes: called with traced sizes they are graph
# nodes (meta_proxy), and on the meta device they are asked for meta tensors.
TENSOR_FACTORIES = ("arange", "full", "zeros", "ones", "empty", "linspace", "logspace", "eye",
                    "rand", "randn", "tensor")  # fmt: skip
_FACTORY_FUNCTIONS = frozenset(getattr(torch, name) for name in TENSOR_FACTORIES)
# The input ranks each BatchNorm accepts; anything else goes to the module, which raises.
BN_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _keeps_shape(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """True when `module(*args, **kwargs)` surely returns a tensor of its input's
    shape: a SAME_SHAPE type on one tensor that the module itself would accept."""
    if type(module) not in SAME_SHAPE or len(args) != 1 or kwargs:
        return False
    (x,) = args
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    ranks = BN_RANKS.get(type(module))
    return ranks is None or (x.dim() in ranks and x.shape[1] == module.num_features)


class _ShapeRecorder:
    """Shape propagation's hooks for `run_graph`: records tensor metadata in
    meta["tensor_meta"] and plain results (sizes, ints) in meta["value"].

    With `on_meta`, modules and attributes come from copies on the meta device,
    made for the modules the graph calls when it first calls them, so shapes are
    found without computing anything.
    """

    def __init__(self, on_meta: bool) -> None:
        self.on_meta = on_meta
        self.meta_modules: dict[str, nn.Module] = {}
        self.metadata: dict[tuple, TensorMetadata] = {}

    def record(self, n: fx.Node, result) -> None:
        if isinstance(result, torch.Tensor):  # the common case, without the walk below
            n.meta["tensor_meta"] = self.tensor_metadata(result)
            return
        found = False

        def tensor_meta(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return self.tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        elif _is_plain_value(result):
            n.meta["value"] = result

    def tensor_metadata(self, t: torch.Tensor) -> TensorMetadata:
        """`_extract_tensor_metadata(t)`, made once for all the tensors alike in all it
        reads (it finds the memory format in Python, 10 us a tensor)."""
        if t.layout is not torch.strided or t.is_quantized:
            return _extract_tensor_metadata(t)
        key = (t.shape, t.stride(), t.dtype, t.requires_grad)
        found = self.metadata.get(key)
        if found is None:
            found = self.metadata[key] = _extract_tensor_metadata(t)
        return found

    def call_module(self, target: str, module: nn.Module, args: tuple, kwargs: dict):
        if not self.on_meta:
            return module(*args, **kwargs)
        if _keeps_shape(module, args, kwargs):
            return empty_like(args[0])  # shape, dtype and layout are the input's
        formula = layer_output(module, args, kwargs)
        if formula is not None:
            return formula
        if target not in self.meta_modules:
            self.meta_modules[target] = meta_copy(module)
        return self.meta_modules[target](*args, **kwargs)

    def call_function(self, target, args: tuple, kwargs: dict):
        formula = None
        if self.on_meta:
            if target in _FACTORY_FUNCTIONS:
                formula = arange_output(target, args, kwargs)
                return target(*args, **{**kwargs, "device": "meta"}) if formula is None else formula
            formula = binary_output(target, args, kwargs)
            formula = unary_output(target, args, kwargs) if formula is None else formula
            formula = cat_output(target, args, kwargs) if formula is None else formula
        return target(*args, **kwargs) if formula is None else formula

    def get_attr(self, target: str, value):
        # A number fx captured from the forward's Python (`_tensor_constant0`, e.g. a
        # stride) stays real: a fill value or factor must be read, and costs nothing.
        if self.on_meta and isinstance(value, torch.Tensor) and not _captured_number(target, value):
            return value.detach().to("meta")
        return value

    def run(self, gm: fx.GraphModule, example: torch.Tensor) -> None:
        run_graph(gm, [example], on_result=self.record, call_module=self.call_module,
                  call_function=self.call_function, get_attr=self.get_attr)  # fmt: skip


def _captured_number(target: str, value: torch.Tensor) -> bool:
    return value.dim() == 0 and not value.is_meta and target.startswith("_tensor_constant")


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers live on the meta device. A
    module without children is copied shallowly (its tables replaced, nothing
    else copied); one with children is deep-copied."""
    if not module._modules:
        new = copy.copy(module)
        new._parameters = {name: _meta_tensor(p) for name, p in module._parameters.items()}
        new._buffers = {name: _meta_tensor(b) for name, b in module._buffers.items()}
        return new
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = _meta_tensor(p)
    for b in module.buffers():
        memo[id(b)] = _meta_tensor(b)
    return copy.deepcopy(module, memo)


def _meta_tensor(t: torch.Tensor | None):
    if t is None:
        return None
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
    return t.detach().to("meta")


def _is_plain_value(value) -> bool:
    if isinstance(value, (int, float, bool, str, slice, type(None), torch.Size, torch.dtype)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain_value(v) for v in value)
    return False


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Annotate every node of `gm` with the shapes of a run on `example`.

    Runs on the meta device (no arithmetic) and falls back to a real forward
    pass (eval mode, no grad) for ops that have no meta kernel.
    """
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(on_meta=True).run(gm, example.to("meta"))
        return
    except Exception:  # some ops have no meta kernel: compute for real
        pass
    try:
        with torch.no_grad():
            _ShapeRecorder(on_meta=False).run(gm, example)
    except Exception as exc:
        raise TraceError(
            f"the model does not run on an input of shape {tuple(example.shape)}: "
            f"{first_line(exc)}; pass the right size with --input-shape N,C,H,W"
        ) from exc


__all__ = ["SAME_SHAPE", "TENSOR_FACTORIES", "propagate_shapes"]
