"""fx with meta values (trace/meta_proxy.py): iteration, shape branches, factories.

Every test runs the original module and the traced (or compiled) graph on the same
input and compares their outputs; the shapes written while tracing must be the ones
`propagate_shapes` writes, and the tensor metadata that of torch's own ShapeProp on a
real forward pass (no meta device, no shape formulas).
"""

from __future__ import annotations

import collections
import dis
import operator

import pytest
import torch
from frontend_models import yolov8n
from helpers import compile_checked
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.errors import TraceError
from fxprune.trace import frontends, propagate_shapes, trace_model
from fxprune.trace.layer_shapes import (
    arange_output,
    binary_output,
    cat_output,
    empty_like,
    layer_output,
)
from fxprune.trace.meta_proxy import _unpacked
from fxprune.trace.symbolic import symbolic_trace
from fxprune.verify import relative_error, run_model


class ChunkList(nn.Module):
    """Ultralytics' C2f: `list(conv(x).chunk(2, 1))`, extended, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.cv2 = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        assert len(y) == 3 and len(y[0]) == x.shape[0]  # len() of a list and of a proxy
        return self.cv2(torch.cat(y, 1))


class ShapeBranch(nn.Module):
    """A branch on the input's size (`if x.shape[-1] > 8`): taken as the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if x.shape[-1] > 8:
            return y * 2.0
        return y + 1.0


class Anchors(nn.Module):
    """Ultralytics' Detect: anchors from `torch.arange(end=w)`, rebuilt when the shape
    changes, kept on the module itself (`self.anchors`, `self.shape`)."""

    shape = None

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.anchors = torch.empty(0)

    def forward(self, x):
        y = self.conv(x)
        shape = y.shape
        if self.shape != shape:
            h, w = shape[2:]
            sx = torch.arange(end=w, dtype=y.dtype) + 0.5
            sy = torch.arange(h).type_as(y) + 0.5
            grid_y, grid_x = torch.meshgrid(sy, sx, indexing="ij")
            self.anchors = torch.stack((grid_x, grid_y))  # (2, H, W)
            self.shape = shape
        return y * self.anchors.unsqueeze(0) + torch.full((1, 2, 1, w), 2.0)


class DataBranch(nn.Module):
    """A branch on the data (`if x.sum() > 0`): never guessed."""

    def forward(self, x):
        return x * 2.0 if x.sum() > 0 else x - 1.0


class WithDataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = DataBranch()

    def forward(self, x):
        return self.gate(self.conv(x))


class NoMetaKernel(nn.Module):
    """`torch.nonzero` has no meta value (its size is the data's): shapes are then
    propagated by a real run, and nothing after it can be iterated."""

    def __init__(self, iterate: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.iterate = iterate

    def forward(self, x):
        y = self.conv(x)
        hits = torch.nonzero(y > 0)
        if self.iterate:
            return [row.sum() for row in hits]
        return y, hits.float().mean()


class ForeignChannels(nn.Module):
    """Ultralytics' C2PSA attention: `B, C, H, W = x.shape`, then another tensor (the
    attention's values, from their own conv) viewed with x's channel count C."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.qkv = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.proj = nn.Conv2d(8, 4, 1)

    def forward(self, inp):
        x = self.cv1(inp)
        B, C, H, W = x.shape
        v = self.qkv(x).view(B, 8, H * W)
        return self.proj((v * 2.0).view(B, C, H, W)), x


def _traced(model: nn.Module, x: torch.Tensor, monkeypatch, **kwargs):
    """trace_model, and whether it had to propagate shapes separately."""
    calls = []

    def counted(gm, example):
        calls.append(gm)
        propagate_shapes(gm, example)

    monkeypatch.setattr(frontends, "propagate_shapes", counted)
    return trace_model(model, x, **kwargs), bool(calls)


def _same_meta_as_propagation(gm, example) -> None:
    """The metadata every node got while traced is what `propagate_shapes` writes, and
    its tensor metadata (shape, dtype, strides, memory format) that of a real run."""
    written = {n: (n.meta.get("tensor_meta"), n.meta.get("value", "-")) for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
        n.meta.pop("value", None)
    propagate_shapes(gm, example)
    for n in gm.graph.nodes:
        assert written[n] == (n.meta.get("tensor_meta"), n.meta.get("value", "-")), n.name
        n.meta.pop("tensor_meta", None)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    for n in gm.graph.nodes:  # (ShapeProp annotates the output node too)
        assert n.op == "output" or written[n][0] == n.meta.get("tensor_meta"), n.name


def test_chunk_list_is_traced_by_fx_and_compiles_exactly(monkeypatch):
    model, x = ChunkList().eval(), torch.randn(2, 3, 8, 8)
    traced, propagated = _traced(model, x, monkeypatch)
    assert traced.frontend == "fx" and not traced.leaves and not propagated
    assert relative_error(model(x), traced.gm(x)) == 0.0
    _same_meta_as_propagation(traced.gm, x)
    _, result, errors = compile_checked(ChunkList(), (2, 3, 8, 8), other_shape=(1, 3, 12, 12))
    assert result.removed_classes > 0
    assert max(errors) <= 1e-4


def test_shape_branch_takes_the_examples_branch_and_says_so(monkeypatch):
    model, x = ShapeBranch().eval(), torch.randn(1, 3, 16, 16)
    traced, propagated = _traced(model, x, monkeypatch, frontend="fx")
    assert not propagated
    assert relative_error(model(x), traced.gm(x)) == 0.0
    assert "fx took the example's branch of a condition on shapes in the model's forward" in (
        " ".join(traced.notes)
    )
    # the decided condition left nothing behind
    assert all(n.target is not getattr for n in traced.gm.graph.nodes)
    _same_meta_as_propagation(traced.gm, x)


def test_tensor_factories_on_traced_sizes_become_nodes(monkeypatch):
    arange, full = torch.arange, torch.full
    model, x = Anchors().eval(), torch.randn(1, 3, 6, 10)
    traced, propagated = _traced(model, x, monkeypatch, frontend="fx")
    assert torch.arange is arange and torch.full is full  # restored after tracing
    assert not propagated
    targets = [n.target for n in traced.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(arange) == 2 and full in targets
    # one condition decided (`self.shape != shape`): the traced sizes were never bool()ed
    assert "branch of a condition on shapes" in " ".join(traced.notes)
    assert relative_error(model(x), traced.gm(x)) == 0.0
    # the sizes are nodes, not numbers: another input size is still exact (only the
    # branch was specialised, and the example's branch is the one that rebuilds)
    other = torch.randn(2, 3, 5, 7)
    assert relative_error(_fresh_anchors(model)(other), traced.gm(other)) == 0.0
    _same_meta_as_propagation(traced.gm, x)


def _fresh_anchors(model: Anchors) -> Anchors:
    fresh = Anchors().eval()
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_attributes_the_forward_sets_are_restored():
    model, x = Anchors().eval(), torch.randn(1, 3, 4, 4)
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    traced = trace_model(model, x, frontend="fx", copy_module=False)
    after = {name: dict(m.__dict__) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name, attributes in before.items():
        assert after[name].keys() == attributes.keys(), name
        assert all(after[name][k] is v for k, v in attributes.items()), name
    assert model.shape is None and model.anchors.numel() == 0
    assert relative_error(model(x), traced.gm(x)) == 0.0  # the user's module still runs


def test_data_dependent_branch_is_never_guessed():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(TraceError, match="control flow"):
        trace_model(DataBranch(), x, frontend="fx")
    model = WithDataBranch().eval()
    traced = trace_model(model, x, frontend="fx")
    assert "control flow" in traced.leaves["gate"]  # kept opaque, as plain fx keeps it
    assert relative_error(model(x), traced.gm(x)) == 0.0
    assert relative_error(model(-x), traced.gm(-x)) == 0.0  # both branches still there


def test_device_checks_are_not_answered_by_the_meta_device():
    class DeviceBranch(nn.Module):
        def forward(self, x):
            return x + 1.0 if x.device.type == "cpu" else x

    with pytest.raises(TraceError, match="control flow"):
        trace_model(DeviceBranch(), torch.randn(2, 3), frontend="fx")
    assert DeviceBranch()(torch.zeros(1)).item() == 1.0


def test_an_op_without_meta_value_falls_back_to_propagation(monkeypatch):
    model, x = NoMetaKernel().eval(), torch.randn(1, 3, 4, 4)
    traced, propagated = _traced(model, x, monkeypatch, frontend="fx")
    assert propagated
    assert all("tensor_meta" in n.meta for n in traced.gm.graph.nodes if n.op != "output")
    expected, actual = model(x), traced.gm(x)
    assert all(relative_error(e, a) == 0.0 for e, a in zip(expected, actual, strict=True))
    with pytest.raises(TraceError, match="iterated"):  # no value, no length: as plain fx
        trace_model(NoMetaKernel(iterate=True), x, frontend="fx")


def test_a_channel_count_read_off_another_tensor_becomes_a_number():
    """x and v lose different channels: C read off x would no longer fit v."""
    traced, result, errors = compile_checked(ForeignChannels(), (1, 3, 6, 6),
                                             other_shape=(2, 3, 5, 7))  # fmt: skip
    assert any("read off another tensor's channels" in note for note in traced.notes)
    assert result.removed_classes > 0
    assert max(errors) <= 1e-4  # the other resolution too: H and W stay computed


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "googlenet"]
)
def test_meta_written_while_tracing_equals_propagation_torchvision(name, monkeypatch):
    from fxprune import zoo

    model, x = zoo.create_model(name).eval(), torch.randn(1, 3, 64, 64)
    traced, propagated = _traced(model, x, monkeypatch)
    assert traced.frontend == "fx" and not propagated
    assert not any(m.training for m in traced.gm.modules())  # as propagate_shapes leaves it
    assert relative_error(model(x), run_model(traced.gm, x)) <= 1e-6
    _same_meta_as_propagation(traced.gm, x)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "googlenet"])
def test_leaf_policy_tracer_records_fxs_own_graph(name):
    """The tracer's shortcuts (its create_arg, its module stack's copies) change nothing
    fx records: the nodes, their arguments and `nn_module_stack` are plain fx's."""
    from fxprune import zoo

    model, x = zoo.create_model(name).eval(), torch.randn(1, 3, 64, 64)

    def recorded(gm):
        return [(n.name, n.op, n.target, map_arg(n.args, str), map_arg(n.kwargs, str),
                 n.meta.get("nn_module_stack"), type(n.meta.get("nn_module_stack")))
                for n in gm.graph.nodes]  # fmt: skip

    ours = symbolic_trace(model)
    assert recorded(ours) == recorded(torch.fx.symbolic_trace(model))
    assert any(type(n.meta.get("nn_module_stack")) is collections.OrderedDict
               for n in ours.graph.nodes)  # fmt: skip
    assert relative_error(model(x), ours(x)) == 0.0


def test_yolov8n_is_traced_by_fx_with_the_same_meta(monkeypatch):
    pytest.importorskip("ultralytics")
    model, x = yolov8n().eval(), torch.randn(1, 3, 64, 64)
    head = model.model[-1]
    before = dict(head.__dict__)  # the build's forward pass left anchors for 256 px
    traced, propagated = _traced(model, x, monkeypatch, copy_module=False)
    assert traced.frontend == "fx" and not traced.leaves and not propagated
    assert not any(m.training for m in traced.gm.modules())
    assert head.__dict__ == before  # Detect's anchors, strides and shape left as they were
    expected, actual = model(x), run_model(traced.gm, x)
    assert relative_error(expected[0], actual[0]) <= 1e-6
    _same_meta_as_propagation(traced.gm, x)


def test_specialised_graph_with_unreadable_functional_layers_goes_to_export():
    """timm's 'same' padding: pads computed from the input's size (`max(..., 0)`, a
    decided condition) before F.conv2d on the module's weight. fx's graph keeps the
    functional conv (frozen by the analysis), torch.export reads it as a module."""
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.Conv2dSame(3, 8, 3, stride=2, bias=False),
                          nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)).eval()  # fmt: skip
    x = torch.randn(1, 3, 9, 9)
    fx_only = trace_model(model, x, frontend="fx")
    assert fx_only.frontend == "fx" and relative_error(model(x), fx_only.gm(x)) == 0.0
    traced = trace_model(model, x)
    assert traced.frontend == "export"
    assert any("torch.export used instead" in note for note in traced.notes)
    _, result, errors = compile_checked(model, (1, 3, 9, 9))
    assert result.removed_classes > 0
    assert max(errors) <= 1e-4


_LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "transposed": lambda x: x.t(),
    "strided": lambda x: x[::2],
    "expanded": lambda x: x[:, :1].expand(x.shape),
}


def _meta(shape, layout="contiguous"):
    return _LAYOUTS[layout](torch.empty(shape, device="meta"))


def _same_layout(ours: torch.Tensor, torchs: torch.Tensor) -> None:
    assert (ours.shape, ours.stride(), ours.dtype, ours.device) == (
        torchs.shape,
        torchs.stride(),
        torchs.dtype,
        torchs.device,
    )


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((1, 8, 5, 5), "contiguous"),
        ((1, 8, 5, 5), "channels_last"),
        ((1, 8, 1, 1), "contiguous"),  # contiguous and channels-last at once
        ((2, 8, 1, 1), "channels_last"),
        ((3, 4), "transposed"),
        ((6,), "strided"),
        ((2, 3, 4), "expanded"),
        ((0, 3), "contiguous"),
    ],
)
def test_meta_empty_like_is_torchs(shape, layout):
    """layer_shapes.empty_like takes a shortcut for contiguous meta tensors: the same
    shape, dtype, strides and memory format as torch.empty_like, whatever the layout."""
    x = _meta(shape, layout)
    _same_layout(empty_like(x), torch.empty_like(x))


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "taken"),
    [
        (torch.cat, ([_meta((1, 8, 5, 5)), _meta((1, 4, 5, 5))], 1), {}, True),
        (torch.cat, ([_meta((2, 3, 4)), _meta((2, 3, 1))],), {"dim": -1}, True),
        (torch.cat, ([_meta((7, 2)), _meta((3, 2))],), {}, True),
        (torch.cat, ([_meta((1, 8, 1, 1)), _meta((1, 8, 1, 1))], 1), {}, False),  # ambiguous
        (torch.cat, ([_meta((1, 8, 5, 5), "channels_last"), _meta((1, 8, 5, 5))], 1), {}, False),
        (torch.cat, ([_meta((4, 3), "transposed"), _meta((3, 4))],), {}, False),
        (operator.add, (_meta((1, 8, 5, 5)), 0.5), {}, True),
        (operator.mul, (2, _meta((7,))), {}, True),
        (operator.truediv, (_meta((1, 8, 1, 1)), 3), {}, True),
        (operator.sub, (1.0, _meta((2, 8, 1, 1), "channels_last")), {}, True),
        (operator.truediv, (2.0, _meta((3,))), {}, False),  # `2 / x`: torch's own rule
        (operator.add, (_meta((3, 4)), True), {}, False),
        (torch.arange, (), {"end": 7, "device": "meta"}, True),
        (torch.arange, (2, 11, 3), {"dtype": torch.float16, "device": "meta"}, True),
        (torch.arange, (5, -4, -2), {"device": "meta"}, True),
        (torch.arange, (3,), {"start": 1, "device": "meta"}, False),  # torch's error
        (torch.arange, (0.5, 4), {"device": "meta"}, False),  # float bounds: torch's rounding
    ],
)
def test_meta_formulas_are_torchs(target, args, kwargs, taken):
    """The shape formulas for cat, arange and arithmetic with a Python number give what
    torch's meta kernels give (shape, strides, dtype), or leave the case to them."""
    formula = {torch.cat: cat_output, torch.arange: arange_output}.get(target, binary_output)
    ours = formula(target, args, kwargs)
    assert (ours is not None) == taken
    if ours is not None:
        _same_layout(ours, target(*args, **kwargs))


@pytest.mark.parametrize(
    ("module", "x", "taken"),
    [
        (nn.MaxPool2d(5, 1, 2), _meta((1, 8, 9, 7)), True),  # Ultralytics' SPPF
        (nn.MaxPool2d(3, 2, 1), _meta((2, 8, 10, 10)), True),
        (nn.MaxPool2d((2, 3), (1, 2), (1, 0), 2), _meta((1, 3, 9, 9)), True),
        (nn.MaxPool2d(3, 2, ceil_mode=True), _meta((1, 8, 10, 10)), False),
        (nn.MaxPool2d(2), _meta((1, 8, 6, 6), "channels_last"), False),
        (nn.Upsample(scale_factor=2.0), _meta((1, 8, 5, 7)), True),
        (nn.Upsample(scale_factor=(1.5, 0.5)), _meta((1, 8, 5, 7)), True),
        (nn.Upsample(scale_factor=2, mode="bilinear"), _meta((1, 8, 5, 7)), False),
        (nn.Upsample(size=(3, 3)), _meta((1, 8, 5, 7)), False),
    ],
)
def test_meta_layer_formulas_are_torchs(module, x, taken):
    """The shape formulas for MaxPool2d and nearest Upsample give what the modules give
    on the meta device, or leave the case to them."""
    ours = layer_output(module, (x,), {})
    assert (ours is not None) == taken
    if ours is not None:
        _same_layout(ours, module(x))


class CachedInEval(nn.Module):
    """timm's LeViT: a cache filled in eval mode, cleared by its own `train`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.cleared = 0

    def train(self, mode: bool = True):
        self.cleared += 1
        return super().train(mode)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("training", [True, False])
def test_trace_puts_the_model_in_eval_mode_through_its_own_train(training):
    """trace_model leaves out `eval()` only where it would change nothing: a model in
    training mode is put in eval mode, and a class's own `train` still runs."""
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train(training)
    x = torch.randn(2, 3, 5, 5)
    traced = trace_model(plain, x, copy_module=False)
    assert not any(m.training for m in plain.modules())
    assert not any(m.training for m in traced.gm.modules())
    assert relative_error(plain(x), traced.gm(x)) == 0.0
    model = CachedInEval().train(training)
    calls = model.cleared
    traced = trace_model(model, x, copy_module=False)
    assert model.cleared == calls + 1 and not model.training
    assert relative_error(model(x), traced.gm(x)) == 0.0


def _wide_unpacking() -> nn.Module:
    """`v0, v1, ..., v299 = x.split(1, 1)`: a count beyond one byte of bytecode."""
    names = ", ".join(f"v{i}" for i in range(300))
    namespace: dict = {}
    exec(f"def forward(self, x):\n    {names} = x.split(1, 1)\n    return v0 - v299", namespace)
    return type("WideUnpacking", (nn.Module,), {"forward": namespace["forward"]})()


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (ChunkList(), (2, 3, 8, 8)),
        (ForeignChannels(), (1, 3, 6, 6)),
        (_wide_unpacking(), (1, 300, 2, 2)),
    ],
)
def test_unpacking_a_proxy_reads_the_count_as_fx_does(module, shape):
    """MetaProxy.__iter__ reads `a, b = proxy`'s count off the caller's bytecode: at every
    instruction of these forwards it finds what fx's disassembly finds, and the traced
    graphs run as the modules do."""
    code = type(module).forward.__code__
    for instruction in dis.get_instructions(code):
        expected = instruction.argval if instruction.opname == "UNPACK_SEQUENCE" else None
        assert _unpacked(code, instruction.offset) == expected
    module, x = module.eval(), torch.randn(shape)
    expected, actual = module(x), trace_model(module, x, frontend="fx").gm(x)
    expected, actual = (o if isinstance(o, tuple) else (o,) for o in (expected, actual))
    assert all(relative_error(e, a) == 0.0 for e, a in zip(expected, actual, strict=True))
