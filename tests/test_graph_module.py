"""fxprune's GraphModule builder holds what `fx.GraphModule(root, graph)` holds."""

from __future__ import annotations

import torch
import torch.fx as fx
import torchvision
from torch import nn

from fxprune.trace import trace_model
from fxprune.trace.graph_module import graph_module


class _Parts(nn.Module):
    """A called module inside a container whose parent is also called, a parameter
    read directly, a non-persistent buffer and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.register_buffer("shift", torch.full((1, 4, 1, 1), 0.5), persistent=False)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        y = self.block[0](x)
        return self.block(x) * self.scale + self.shift + y


def _same(a: fx.GraphModule, b: fx.GraphModule, x: torch.Tensor) -> None:
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].data_ptr() == sb[k].data_ptr() for k in sa)  # shared, not copied
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    assert a.code == b.code
    assert torch.equal(a(x), b(x))


def test_the_same_attributes_as_fx_graph_module():
    traced = fx.symbolic_trace(_Parts())
    x = torch.randn(1, 3, 5, 5)
    _same(fx.GraphModule(traced, traced.graph), graph_module(traced, traced.graph), x)
    lazy = graph_module(traced, traced.graph, lazy=True)
    _same(fx.GraphModule(traced, traced.graph), lazy, x)
    assert "unused" not in dict(lazy.named_children())


def test_a_traced_model_generates_its_code_when_run():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    traced = trace_model(model, x)
    _same(fx.GraphModule(traced.gm, traced.gm.graph), traced.gm, x)


def test_a_traced_model_saves_and_loads_as_a_whole_module(tmp_path):
    # torch.load re-traces a pickled GraphModule with its tracer class, called without
    # arguments: fxprune's tracers need their leaves, so they are not recorded
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.save(trace_model(model, x).gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_jit_script_takes_a_traced_model_itself():
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    scripted = torch.jit.script(trace_model(model, x).gm)  # __prepare_scriptable__
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
