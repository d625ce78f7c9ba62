"""In-place pruning (`fxprune.prune_`): the user's own model, narrower, same classes,
same function (checked with real forward passes), still trainable."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers import params
from torch import nn

import fxprune
from fxprune.analysis import analyse
from fxprune.compile import in_place
from fxprune.compile.in_place_plan import LITERAL_REASON
from fxprune.errors import VerificationError
from fxprune.testing import randomize_batchnorm, zero_random
from fxprune.trace import trace_model
from fxprune.verify import TOLERANCE, relative_error, run_model


def zero_half(model: nn.Module, x: torch.Tensor, seed: int = 0) -> int:
    """Random BN statistics, then γ = 0 on half of every prunable group, in `model` itself."""
    randomize_batchnorm(model, seed)
    traced = trace_model(model, x)
    analyse(traced.gm)
    count = zero_random(traced.gm, 0.5, seed)
    model.load_state_dict(traced.gm.state_dict(), strict=False)
    return count


def prune_checked(model: nn.Module, shape: tuple[int, ...]):
    """Zero half, prune in place, return (report, errors on two inputs, classes before)."""
    x = torch.randn(shape)
    zero_half(model, x)
    original = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    report = fxprune.prune_(model, x)
    errors = [
        relative_error(run_model(original, i), run_model(model, i)) for i in (x, torch.randn(shape))
    ]
    assert [type(m) for m in model.modules()] == classes  # every class survives
    return report, errors, original


def one_training_step(model: nn.Module, shape: tuple[int, ...]) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = model(torch.randn(shape))
    loss = nn.functional.cross_entropy(out, torch.zeros(shape[0], dtype=torch.long))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_prune_in_place_exactly(name):
    model = getattr(torchvision.models, name)(num_classes=10)
    kind = type(model)
    report, errors, original = prune_checked(model, (2, 3, 32, 32))
    assert max(errors) <= TOLERANCE, errors
    assert type(model) is kind
    assert report.removed_classes > 0 and report.layers
    assert params(model) < params(original) and report.params_after == params(model)
    one_training_step(model, (2, 3, 32, 32))


def cbr(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class LiteralSplit(nn.Module):
    """YOLO-style: `split((self.c, self.c), 1)` has its width written in the code."""

    def __init__(self) -> None:
        super().__init__()
        self.c = 8
        self.cv1, self.cv2, self.head = cbr(3, 16), cbr(8, 8), cbr(16, 4)
        self.other = cbr(3, 8)

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.head(torch.cat([a + self.other(x), self.cv2(b)], 1))


class Chunked(nn.Module):
    """`chunk(2, 1)` adapts to the width: kept balanced instead of frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1, self.cv2, self.head = cbr(3, 16), cbr(8, 8), cbr(16, 4)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.head(torch.cat([a, self.cv2(b)], 1))


def test_literal_split_width_is_frozen_with_the_reason():
    model = LiteralSplit()
    report, errors, _ = prune_checked(model, (2, 3, 8, 8))
    assert max(errors) <= TOLERANCE
    reasons = [why for why in report.frozen if LITERAL_REASON in why]
    assert reasons and report.frozen[reasons[0]] >= 16, report.frozen
    assert model.cv1[0].out_channels == 16  # the literal split still gets (8, 8)
    assert model.cv2[0].out_channels < 8  # a channel the split does not reach was pruned


def test_chunk_is_kept_balanced():
    model = Chunked()
    report, errors, _ = prune_checked(model, (2, 3, 8, 8))
    assert max(errors) <= TOLERANCE
    assert not any(LITERAL_REASON in why for why in report.frozen)
    assert model.cv1[0].out_channels % 2 == 0 and model.cv1[0].out_channels < 16


def test_failed_verification_leaves_the_model_untouched(monkeypatch):
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    zero_half(model, x)
    state = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(in_place, "verify_equal", lambda *args: float("nan"))
    with pytest.raises(VerificationError, match="not modified"):
        fxprune.prune_(model, x)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_threshold_zeroes_then_prunes_and_reports_the_drift():
    model = torchvision.models.resnet18(num_classes=10)
    randomize_batchnorm(model)
    x = torch.randn(1, 3, 32, 32)
    report = fxprune.prune_(model, x, threshold=0.9)  # γ ~ U(0.75, 1.25): about a third go
    assert report.zeroed > 0 and report.removed_classes > 0
    assert report.drift is not None and report.drift > 0
    assert report.max_error <= TOLERANCE


def test_saved_state_dict_restores_into_a_fresh_base_model(tmp_path):
    from fxprune.compile.in_place_save import load_pruned, save_pruned

    model = torchvision.models.mobilenet_v2(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    zero_half(model, x)
    fxprune.prune_(model, x)
    path = save_pruned(model, tmp_path / "pruned.pt", example=x,
                       rebuild=lambda: torchvision.models.mobilenet_v2(num_classes=10))  # fmt: skip
    fresh = torchvision.models.mobilenet_v2(num_classes=10)
    load_pruned(fresh, torch.load(path, weights_only=True))
    assert relative_error(run_model(model, x), run_model(fresh, x)) <= TOLERANCE
    assert params(fresh) == params(model) < params(torchvision.models.mobilenet_v2(num_classes=10))


def test_prune_command_writes_a_verified_state_dict_and_refuses_to_overwrite(tmp_path):
    from typer.testing import CliRunner

    from fxprune.cli.main import app
    from fxprune.compile.in_place_save import load_pruned
    from fxprune.zoo import create_model

    out = tmp_path / "small.pt"
    args = ["prune", "zoo:resnet20", "--sparsity", "0.4", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and out.exists()
    restored = create_model("resnet20")
    load_pruned(restored, torch.load(out, weights_only=True))
    assert params(restored) < params(create_model("resnet20"))
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_border_wrap_removes_what_the_compiler_removes_and_restores_from_data(tmp_path):
    from fxprune.compile import compile_model
    from fxprune.compile.in_place_save import load_pruned, save_pruned
    from fxprune.modules import ConvWithBorder

    def build():
        return torchvision.models.resnet18(num_classes=10)

    model, x = build(), torch.randn(2, 3, 32, 32)
    zero_half(model, x)
    original = copy.deepcopy(model)
    traced = trace_model(model, x)
    analyse(traced.gm)
    compiled = compile_model(traced).removed_classes
    kept = fxprune.prune_(copy.deepcopy(model), x)  # default: border="keep"
    report = fxprune.prune_(model, x, border="wrap")
    assert kept.removed_classes < report.removed_classes == compiled
    assert isinstance(model.layer1[0].conv2, ConvWithBorder)
    assert type(model.layer1[0].conv2.conv) is nn.Conv2d
    assert relative_error(run_model(original, x), run_model(model, x)) <= TOLERANCE
    path = save_pruned(model, tmp_path / "wrapped.pt", example=x, rebuild=build)
    fresh = build()
    load_pruned(fresh, torch.load(path, weights_only=True))
    assert relative_error(run_model(model, x), run_model(fresh, x)) <= TOLERANCE
    one_training_step(model, (2, 3, 32, 32))


@pytest.mark.parametrize("name", ["resnet10t", "resnet18", "mobilenetv3_small_050", "cspresnet50"])
def test_timm_models_prune_in_place_exactly(name):
    """Plain timm ResNets, and norm-act models: timm's BatchNormAct2d calls F.batch_norm,
    understood through the functional-layer canonicalisation of the front end (issue
    17). CSP blocks split with literal widths."""
    timm = pytest.importorskip("timm")

    model = timm.create_model(name, pretrained=False, num_classes=10)
    kind = type(model)
    report, errors, original = prune_checked(model, (2, 3, 32, 32))
    assert max(errors) <= TOLERANCE, errors
    assert type(model) is kind and report.removed_classes > 0
    assert params(model) < params(original)
    if name.startswith("csp"):
        assert any(".split()" in why and LITERAL_REASON in why for why in report.frozen)
    one_training_step(model, (2, 3, 32, 32))


class LiteralView(nn.Module):
    """`view(B, 16, -1)`: a width written in the code, behind a prunable BN."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1, self.cv2 = cbr(3, 16), cbr(3, 8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(24, 2)

    def forward(self, x):
        a = self.cv1(x)
        a = a.view(a.shape[0], 16, -1).mean(-1)
        return self.fc(torch.cat([a, torch.flatten(self.pool(self.cv2(x)), 1)], 1))


def test_literal_view_is_frozen_and_not_penalised_by_ista_for():
    model = LiteralView()
    report, errors, _ = prune_checked(model, (2, 3, 8, 8))
    assert max(errors) <= TOLERANCE
    assert any(".view()" in why and LITERAL_REASON in why for why in report.frozen)
    assert model.cv1[0].out_channels == 16 and model.cv2[0].out_channels < 8
    ista = fxprune.ista_for(LiteralView(), torch.randn(2, 3, 8, 8), rho=1.0)
    assert {t.module for t in ista.targets} == {"cv2.1"}
