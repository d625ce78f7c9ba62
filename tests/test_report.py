"""Reports: numbers are fvcore's (checked against fvcore itself and by hand), tables render."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import subprocess
import warnings

import pytest
import torch
import torchvision
from torch import nn

from fxprune.errors import UsageError
from fxprune.report import (
    FORMATS,
    ModelSummary,
    count_model,
    format_count,
    layer_table,
    summary_table,
)

with warnings.catch_warnings():  # fvcore scripts helpers at import time
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis, parameter_count


def convnet(widths: tuple[int, int, int, int] = (96, 192, 192, 384)) -> nn.Sequential:
    """The paper's CIFAR-10 ConvNet layout (5x5, 5x5, 3x3 convs, 4x4 fc) with given widths."""
    c1, c2, c3, fc = widths
    return nn.Sequential(
        nn.Conv2d(3, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c3 * 4 * 4, fc), nn.ReLU(), nn.Linear(fc, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def cifar_input() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def counts_pair(cifar_input):
    return count_model(convnet(), cifar_input), count_model(convnet((48, 96, 96, 100)), cifar_input)


def fvcore_reference(module: nn.Module, example: torch.Tensor):
    module.eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(module, example)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total(), analysis.by_module(), parameter_count(module)[""]


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize("traced", [False, True], ids=["module", "fx"])
def test_resnet18_counts_are_fvcore_totals(traced: bool) -> None:
    net = torchvision.models.resnet18(weights=None)
    module = torch.fx.symbolic_trace(net) if traced else net
    example = torch.randn(1, 3, 64, 64)
    counts = count_model(module, example)
    flops, by_module, params = fvcore_reference(module, example)
    assert (counts.flops, counts.params) == (flops, params) == (flops, 11_689_512)
    assert counts.input_shape == (1, 3, 64, 64)
    assert list(counts.layers)[:4] == ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1"]
    assert len(counts.layers) == 20 + 20 + 1  # convs (incl. downsample), BNs, fc
    assert all(layer.flops == by_module[name] for name, layer in counts.layers.items())
    assert counts.layers["fc"].in_channels == 512 and counts.layers["fc"].out_channels == 1000
    assert "aten::max_pool2d" in counts.unsupported_ops


def test_single_layers_by_hand() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten())
    net.append(nn.Linear(8 * 16 * 16, 10))
    net.train()
    counts = count_model(net, torch.randn(1, 3, 16, 16))
    conv, bn, fc = counts.layers["0"], counts.layers["1"], counts.layers["3"]
    assert (conv.kind, conv.in_channels, conv.out_channels) == ("Conv2d", 3, 8)
    assert conv.params == 8 * 3 * 3 * 3 + 8
    assert conv.flops == (16 * 16) * 8 * (3 * 3 * 3)  # one multiply-add per output tap
    assert (bn.params, fc.params) == (2 * 8, 2048 * 10 + 10)
    assert fc.flops == 2048 * 10
    assert counts.params == conv.params + bn.params + fc.params
    assert net.training  # count_model evaluates in eval mode and restores the flag


def test_layers_are_listed_in_call_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv2d(4, 4, 1)
            self.unused = nn.Linear(3, 3)
            self.early = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(self.early(x))

    counts = count_model(Reversed(), torch.randn(1, 3, 8, 8))
    assert list(counts.layers) == ["early", "late", "unused"]
    assert counts.layers["unused"].flops == 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_counts_from_shapes_equal_fvcore_before_and_after_compile(name: str) -> None:
    """The compile command counts from the traced shapes (no forward pass): the same
    totals, per-layer FLOPs, parameters and order as fvcore, on the original and on
    the compiled model (sliced layers, border terms)."""
    from fxprune.compile import compile_model
    from fxprune.pipeline import loaded_module, open_module
    from fxprune.testing import randomize_batchnorm, zero_random
    from fxprune.zoo import create_model

    model = create_model(name).eval()
    randomize_batchnorm(model)
    example = torch.randn(1, 3, 64, 64)
    analysed = open_module(loaded_module(model, example))
    zero_random(analysed.traced.gm, 0.5, seed=0)
    compiled = compile_model(analysed.traced).gm
    borders = [n for n, _ in compiled.named_children() if n.endswith("_border")]
    assert borders or name != "resnet18"  # resnet18 covers the border terms' count
    for gm in (analysed.traced.gm, compiled):
        fast, slow = count_model(gm, example, from_shapes=True), count_model(gm, example)
        assert (fast.flops, fast.params) == (slow.flops, slow.params)
        assert fast.layers == slow.layers and list(fast.layers) == list(slow.layers)


def test_counts_from_shapes_fall_back_to_fvcore_on_unknown_ops() -> None:
    class Attention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(x, x.transpose(-1, -2))  # fvcore counts matmul

    gm = torch.fx.symbolic_trace(Attention())
    example = torch.randn(1, 4, 8, 8)
    fast = count_model(gm, example, from_shapes=True)
    assert fast.flops == count_model(gm, example).flops == 4 * 8 * 8 * 8
    assert fast.unsupported_ops == count_model(gm, example).unsupported_ops  # fvcore ran


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layer_table_format_renders(counts_pair, fmt: str) -> None:
    before, after = counts_pair
    for table in (layer_table(before, fmt=fmt), layer_table(before, after, fmt=fmt)):
        assert table.strip()
        if fmt == "latex":
            assert table.startswith("\\begin{tabular}") and table.rstrip().endswith(
                "\\end{tabular}"
            )
            assert "→" not in table and "–" not in table  # pdflatex-safe
        if fmt in ("text", "github"):
            assert "96 → 48" in table or "96" in table


def test_layer_table_text_shows_widths_and_kept_percentages(counts_pair) -> None:
    before, after = counts_pair
    text = layer_table(before, after)
    conv1 = next(line for line in text.splitlines() if line.startswith("0 "))
    assert "96 → 48" in conv1 and "50.0%" in conv1
    total = text.splitlines()[-1]
    assert total.startswith("total (model)")
    assert format_count(before.params) in total and format_count(after.params) in total


def test_layer_table_json_and_csv_carry_exact_integers(counts_pair) -> None:
    before, after = counts_pair
    data = json.loads(layer_table(before, after, fmt="json"))
    assert data["totals"]["params_before"] == before.params
    assert data["totals"]["flops_after"] == after.flops
    first = data["layers"][0]
    assert (first["layer"], first["out_channels_before"], first["out_channels_after"]) == (
        "0",
        96,
        48,
    )
    assert first["status"] == "pruned" and list(first) == sorted(first)
    rows = list(csv.DictReader(io.StringIO(layer_table(before, after, fmt="csv"))))
    assert rows[0]["params_before"] == str(before.layers["0"].params)
    assert rows[-1]["layer"] == "total" and int(rows[-1]["flops_before"]) == before.flops


def test_removed_layer_shows_as_removed(cifar_input) -> None:
    before = count_model(convnet((8, 8, 8, 16)), cifar_input)
    without_bn = convnet((8, 8, 8, 16))
    without_bn[1] = nn.Identity()
    after = count_model(without_bn, cifar_input)
    assert "8 → removed" in layer_table(before, after)
    bn = next(
        r for r in json.loads(layer_table(before, after, fmt="json"))["layers"] if r["layer"] == "1"
    )
    assert bn["status"] == "removed" and bn["params_after"] is None


def test_latex_escapes_names(cifar_input) -> None:
    counts = count_model(convnet((8, 8, 8, 16)), cifar_input)
    counts.layers = {"stem_conv%": dataclasses.replace(counts.layers["0"], name="stem_conv%")}
    table = layer_table(counts, fmt="latex")
    assert "stem\\_conv\\%" in table


# --------------------------------------------------------------------------- summary table


def test_summary_table_matches_the_papers_layout(counts_pair) -> None:
    before, after = counts_pair
    rows = [ModelSummary.from_counts(before, 89.0), ModelSummary.from_counts(after)]
    assert rows[0].channels == (96, 192, 192, 384)  # the classifier's width is not listed
    text = summary_table(rows, names=["ConvNet", "pruned"])
    base_line, pruned_line = text.splitlines()[2:4]
    assert "96-192-192-384" in base_line and "100.0%" in base_line and "89.0" in base_line
    assert "48-96-96-100" in pruned_line and "–" in pruned_line
    assert format_count(after.params) in pruned_line
    data = json.loads(summary_table(rows, names=["ConvNet", "pruned"], fmt="json"))
    assert data["models"][1]["params"] == after.params
    assert data["models"][1]["params_ratio"] == pytest.approx(after.params / before.params)
    assert data["models"][1]["accuracy"] is None
    for fmt in FORMATS:
        assert summary_table(rows, names=["ConvNet", "pruned"], fmt=fmt).strip()


def test_bad_arguments_are_usage_errors(counts_pair) -> None:
    before, _ = counts_pair
    with pytest.raises(UsageError, match="unknown table format"):
        layer_table(before, fmt="html")
    with pytest.raises(UsageError, match="one name per model"):
        summary_table([ModelSummary.from_counts(before)], names=["a", "b"])


@pytest.mark.parametrize(
    ("count", "text"),
    [(512, "512"), (1_986_760, "1.99M"), (309_655, "309.7K"), (44_700_000, "44.7M")]
    + [(999_960, "1.00M"), (1000, "1.00K"), (2_500_000_000, "2.50G")],
)
def test_format_count(count: int, text: str) -> None:
    assert format_count(count) == text


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine (pdflatex) installed")
def test_latex_tables_compile(counts_pair, tmp_path) -> None:
    """The paper table and the layer table, as printed, go into a document that pdflatex builds."""
    before, after = counts_pair
    rows = [ModelSummary.from_counts(before, 89.0), ModelSummary.from_counts(after, 87.6)]
    body = "\n\n".join(
        [
            summary_table(rows, names=["ConvNet_base", "pruned & small"], fmt="latex"),
            layer_table(before, after, fmt="latex"),
        ]
    )
    doc = f"\\documentclass{{article}}\n\\begin{{document}}\n{body}\n\\end{{document}}\n"
    (tmp_path / "table.tex").write_text(doc)
    run = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "table.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    assert (tmp_path / "table.pdf").stat().st_size > 0
