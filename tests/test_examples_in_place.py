"""The worked examples of examples/ run here (fast variants) and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.verify import TOLERANCE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timm_example_trains_with_ista_prunes_in_place_and_trains_on():
    timm = pytest.importorskip("timm")
    result = load_example("timm_in_place").main("resnet18", size=32, steps=12)
    model, report = result["model"], result["report"]
    assert isinstance(model, timm.models.resnet.ResNet)
    assert report.removed_classes > 0 and report.params_after < report.params_before
    assert result["error"] <= TOLERANCE and report.max_error <= TOLERANCE
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_ista_for_wraps_the_users_optimizer_and_makes_exact_zeros():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialise the lazy layer
    ista = fxprune.ista_for(model, x, rho=10.0)
    assert {t.module for t in ista.targets} == {"1", "4"}
    optimizer = ista.wrap(torch.optim.SGD(ista.param_groups(weight_decay=1e-4), lr=0.1))
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    assert ista.sparsity() > 0 and ista.lasso() >= 0
    with pytest.raises(fxprune.FxpruneError, match="weight_decay"):
        ista.wrap(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))


def needs_export_front_end():
    """Ultralytics and Hugging Face models trace only through the torch.export front end."""


def test_yolo_example_trains_prunes_trains_and_exports_with_ultralytics(tmp_path):
    pytest.importorskip("ultralytics")
    needs_export_front_end()
    from ultralytics.nn.tasks import DetectionModel

    result = load_example("yolo_in_place").main(size=64, steps=3, folder=tmp_path)
    model, report = result["model"], result["report"]
    assert type(model) is DetectionModel
    assert report.removed_classes > 0 and report.params_after < result["params_before"]
    assert result["error"] <= TOLERANCE and result["export_error"] <= TOLERANCE
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert list(tmp_path.glob("*.torchscript"))


def test_hf_example_fine_tunes_prunes_and_restores_from_data():
    pytest.importorskip("transformers")
    needs_export_front_end()
    from transformers import PreTrainedModel, ResNetForImageClassification

    result = load_example("hf_in_place").main(size=32, steps=8)
    model, report = result["model"], result["report"]
    assert type(model) is ResNetForImageClassification and isinstance(model, PreTrainedModel)
    assert report.removed_classes > 0
    assert result["error"] <= TOLERANCE and result["restore_error"] <= TOLERANCE
    assert torch.isfinite(torch.tensor(result["loss"]))
