"""Front ends: fx with bound defaults, torch.export, functional layers as modules.

Every compile is checked with real forward passes against the original.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from frontend_models import (
    HfLike,
    IntSizeLike,
    PoseLike,
    SharedWeight,
    TfPadding,
    TimmLike,
    int_size_like,
    timm_like,
)
from helpers import compile_checked
from torch import nn

from fxprune.analysis import analyse
from fxprune.compile import compile_model
from fxprune.errors import TraceError
from fxprune.trace import trace_model
from fxprune.verify import relative_error, run_model

TESTS = Path(__file__).parent
EXE = shutil.which("fxprune", path=str(Path(sys.executable).parent)) or "fxprune"


def fxprune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS), YOLO_OFFLINE="1")
    return subprocess.run([EXE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def _module_nodes(traced) -> dict[str, str]:
    modules = dict(traced.gm.named_modules())
    return {
        n.target: type(modules[n.target]).__name__
        for n in traced.gm.graph.nodes
        if n.op == "call_module"
    }


def test_functional_layers_become_the_users_modules():
    traced = trace_model(TimmLike().eval(), torch.randn(1, 3, 16, 16))
    calls = _module_nodes(traced)
    assert traced.frontend == "fx"
    assert calls["bn1"] == calls["bn2"] == "BatchNorm2d"
    assert calls["conv1"] == "Conv2d" and calls["bn1.act"] == "ReLU"
    analysis = analyse(traced.gm)
    assert {s.module for g in analysis.groups for s in g.bn_sites} == {"bn1", "bn2"}
    assert all(g.prunable for g in analysis.groups if g.bn_sites)


def test_timm_style_model_compiles_exactly():
    _, result, errors = compile_checked(TimmLike(), (1, 3, 16, 16), other_shape=(2, 3, 24, 24))
    assert result.removed_classes > 0
    assert max(errors) <= 1e-4


def test_shared_weight_stays_functional_and_frozen():
    traced = trace_model(SharedWeight().eval(), torch.randn(1, 4, 8, 8))
    assert "conv" not in _module_nodes(traced)
    analysis = analyse(traced.gm)
    assert not any(g.prunable for g in analysis.groups)
    reasons = {r for g in analysis.groups for r in g.frozen.values()}
    assert any("conv2d" in r and "not understood" in r for r in reasons), reasons


def test_untraceable_model_goes_through_export_with_user_names():
    model = int_size_like().eval()
    x = torch.randn(1, 3, 16, 16)
    traced = trace_model(model, x)
    assert traced.frontend == "export"
    analysis = analyse(traced.gm)
    names = {s.module for g in analysis.groups for s in g.bn_sites}
    assert names == {"stem.1", "m.1", "cv2.1"}
    result = compile_model(traced)
    assert result.removed_classes > 0
    expected = model(x)
    actual = run_model(result.gm, x)  # flat outputs, in the dict's order
    assert relative_error(expected["boxes"], actual[0]) <= 1e-4
    assert relative_error(expected["features"], actual[1]) <= 1e-4


def test_in_place_writes_into_views_survive_compilation():
    model = PoseLike().eval()
    with torch.no_grad():
        model.bn.weight[::2] = 0.0
        model.bn.bias.uniform_(0.5, 1.0)
    x = torch.randn(1, 3, 8, 8)
    traced = trace_model(model, x)
    assert traced.frontend == "export"
    analyse(traced.gm)
    result = compile_model(traced)
    assert result.removed_classes > 0
    assert relative_error(model(x), run_model(result.gm, x)) <= 1e-4


def test_symmetric_zero_padding_becomes_the_convs_own():
    traced, result, errors = compile_checked(TfPadding(), (1, 3, 12, 12))
    modules = dict(traced.gm.named_modules())
    assert modules["conv1"].padding == (1, 1) and modules["conv3"].padding == (1, 1)
    assert modules["conv2"].padding == (0, 0)  # asymmetric: the pad stays, as F.pad
    assert result.removed_classes > 0
    assert max(errors) <= 1e-4


def test_frontend_can_be_forced():
    x = torch.randn(1, 3, 16, 16)
    assert trace_model(timm_like().eval(), x, frontend="export").frontend == "export"
    with pytest.raises(TraceError, match="--submodule"):
        trace_model(IntSizeLike().eval(), x, frontend="fx")
    with pytest.raises(TraceError, match="front end"):
        trace_model(TimmLike().eval(), x, frontend="onnx")


def test_export_front_end_compiles_timm_style_exactly():
    model = timm_like().eval()
    x = torch.randn(1, 3, 16, 16)
    traced = trace_model(model, x, frontend="export")
    assert _module_nodes(traced)["bn1"] == "BatchNorm2d"
    analyse(traced.gm)
    result = compile_model(traced)
    assert result.removed_classes > 0
    assert relative_error(model(x), run_model(result.gm, x)) <= 1e-4


def test_keyword_arguments_are_bound_to_their_defaults():
    traced = trace_model(HfLike().eval(), torch.randn(1, 3, 16, 16))
    assert traced.frontend == "fx"
    assert [n.name for n in traced.gm.graph.nodes if n.op == "placeholder"] == ["pixel_values"]


class SplitView(nn.Module):
    """resnest's radix softmax: the channel axis viewed as (1, 2, C/2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        b = y.size(0)
        z = y.mean((2, 3), keepdim=True).view(b, 1, 2, -1).transpose(1, 2)
        z = torch.softmax(z, dim=1).reshape(b, -1, 1, 1)
        return y * z


def test_literal_view_of_a_split_channel_axis_is_kept():
    _, _, errors = compile_checked(SplitView(), (1, 4, 6, 6))
    assert max(errors) <= 1e-4


# -- through the installed `fxprune` command ----------------------------------
def test_cli_reports_the_front_end_and_compiles_exactly(tmp_path):
    result = fxprune("compile", "frontend_models:int_size_like", "--out", "y.ts", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "front end: export" in result.stderr
    assert "max relative error vs original" in result.stdout
    assert (tmp_path / "y.ts").exists()
    traced = fxprune("trace", "frontend_models:timm_like", "--frontend", "export", "--format",
                     "json", cwd=tmp_path)  # fmt: skip
    data = json.loads(traced.stdout)
    assert data["frontend"] == "export"
    assert {s["module"] for g in data["groups"] for s in g["bn_sites"]} == {"bn1", "bn2"}


@pytest.mark.parametrize(
    "factory, package",
    [("timm_resnet18", "timm"), ("yolov8n", "ultralytics"), ("hf_resnet", "transformers")],
)
def test_cli_compiles_library_models(tmp_path, factory, package):
    pytest.importorskip(package)
    # A random-init YOLO's decoded boxes hardly depend on the input even before
    # pruning (anchors dominate), which main's constant-output check refuses.
    extra = ["--allow-constant"] if factory == "yolov8n" else []
    result = fxprune("compile", f"frontend_models:{factory}", "--out", "m.ts", "--report",
                     "r.json", *extra, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["channels_removed"] > 0
    assert report["max_relative_error"] <= 1e-4
    artifact = torch.jit.load(str(tmp_path / "m.ts"))  # loads without fxprune
    assert artifact is not None
    if factory == "yolov8n":  # the trace JSON is the only thing on stdout
        traced = fxprune("trace", f"frontend_models:{factory}", "--format", "json", cwd=tmp_path)
        data = json.loads(traced.stdout)
        assert data["frontend"] == "fx"  # meta values carry fx through C2f and Detect
        # Detect's `if self.shape != shape` took the example's branch, and says so
        assert any("model.22" in note and "shape" in note for note in data["notes"])
        # no aten op is kept (the box decoder is Python-level calls): the compact YOLO
        # scripts rather than being traced
        assert "aten ops kept" not in traced.stdout + traced.stderr
        assert "used torch.jit.trace" not in result.stdout + result.stderr


class FunctionalActivations(nn.Module):
    """Activations called as functions, each with its own arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = nn.functional.gelu(y, approximate="tanh") + nn.functional.silu(y, inplace=False)
        y = nn.functional.leaky_relu(y, 0.2) * torch.sigmoid(y)
        return nn.functional.hardswish(nn.functional.relu6(y, inplace=True)).flatten(1)


@pytest.mark.parametrize(
    "source", ["zoo:resnet20", "torchvision:mobilenet_v3_small", FunctionalActivations]
)
def test_shape_formulas_equal_the_meta_kernels(source, monkeypatch):
    """Shapes by formula (layers, broadcasting, elementwise functions) are the meta
    kernels' own: every node's shape and dtype, propagated both ways."""
    import torchvision

    from fxprune import zoo
    from fxprune.trace import shapes

    if isinstance(source, str):
        library, _, name = source.partition(":")
        model = zoo.create_model(name) if library == "zoo" else getattr(torchvision.models, name)()
        x = torch.randn(1, 3, 64, 64) if library == "torchvision" else torch.randn(1, 3, 32, 32)
    else:
        model, x = source(), torch.randn(2, 3, 16, 16)
    traced = trace_model(model.eval(), x).gm

    def found():
        metas = {n.name: n.meta.get("tensor_meta") for n in traced.graph.nodes}
        return {k: (tuple(m.shape), m.dtype) for k, m in metas.items() if hasattr(m, "shape")}

    used = []
    for formula in ("binary_output", "unary_output", "layer_output"):
        real = getattr(shapes, formula)
        monkeypatch.setattr(shapes, formula, lambda *a, f=real: used.append(f(*a)) or used[-1])
    shapes.propagate_shapes(traced, x)
    by_formula = found()
    assert sum(u is not None for u in used) > 3  # the formulas did the work
    for formula in ("binary_output", "unary_output", "layer_output"):
        monkeypatch.setattr(shapes, formula, lambda *args: None)
    shapes.propagate_shapes(traced, x)
    assert by_formula == found() and len(by_formula) > 5
