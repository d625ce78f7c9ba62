"""The model registry: names, metadata, real forward passes, exact parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx
import torchvision.models as tvm
from torch import nn

from fxprune import zoo
from fxprune.errors import LoadError, UsageError

CIFAR_MODELS = ["convnet", "resnet110", "resnet20", "resnet32", "resnet56"]
TORCHVISION_FAMILIES = {
    "classification": tvm,
    "segmentation": tvm.segmentation,
    "video": tvm.video,
    "detection": tvm.detection,
}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch weights fails the test instead of touching the network."""

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cifar_models_are_registered() -> None:
    assert zoo.list_models(kind="cifar") == CIFAR_MODELS


@pytest.mark.parametrize("kind", sorted(TORCHVISION_FAMILIES))
def test_every_torchvision_model_is_registered(kind: str) -> None:
    expected = tvm.list_models(module=TORCHVISION_FAMILIES[kind])
    assert expected and zoo.list_models(kind=kind) == sorted(expected)


def test_skipped_torchvision_families_are_absent() -> None:
    skipped = tvm.list_models(module=tvm.quantization) + tvm.list_models(module=tvm.optical_flow)
    assert not set(skipped) & set(zoo.list_models())


def test_list_models_filters_by_pattern_and_kind() -> None:
    assert zoo.list_models("resnet*", kind="cifar") == CIFAR_MODELS[1:]
    assert "resnet50" in zoo.list_models("resnet*")
    assert zoo.list_models() == sorted(zoo.list_models())
    assert zoo.list_models("no-such-*") == []


def test_list_models_rejects_unknown_kind() -> None:
    with pytest.raises(UsageError, match="unknown model kind 'audio'"):
        zoo.list_models(kind="audio")


def test_model_info_describes_without_building() -> None:
    info = zoo.model_info("convnet")
    assert (info.name, info.kind, info.input_shape, info.submodule) == (
        "convnet",
        "cifar",
        (1, 3, 32, 32),
        None,
    )
    assert info.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.kind = "video"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet50", (1, 3, 224, 224)),
        ("inception_v3", (1, 3, 299, 299)),
        ("deeplabv3_resnet50", (1, 3, 224, 224)),
        ("r3d_18", (1, 3, 16, 112, 112)),
        ("s3d", (1, 3, 16, 224, 224)),
        ("mvit_v2_s", (1, 3, 16, 224, 224)),
        ("fasterrcnn_resnet50_fpn", (1, 3, 320, 320)),
    ],
)
def test_default_input_shapes(name: str, shape: tuple[int, ...]) -> None:
    assert zoo.model_info(name).input_shape == shape


def test_every_model_has_a_known_kind_and_description() -> None:
    for name in zoo.list_models():
        info = zoo.model_info(name)
        assert info.kind in zoo.KINDS and info.description, name
        assert info.submodule == ("backbone" if info.kind == "detection" else None), name


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_model_forward_and_trace(name: str) -> None:
    model = zoo.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)(x)
    assert eager.shape == (2, 10)
    torch.testing.assert_close(traced, eager)
    assert zoo.has_batchnorm(model)


def test_convnet_parameter_count_and_paper_reading() -> None:
    model = zoo.create_model("convnet")
    assert param_count(model) == 1_985_002
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() > 1)
    out_units = sum(m.out_features if isinstance(m, nn.Linear) else m.out_channels
                    for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))  # fmt: skip
    assert weights == 1_983_264
    # The docstring's reading of the paper's 1,986,760: weights + 4 per output unit.
    assert weights + 4 * out_units == 1_986_760
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert [m.num_features for m in bn] == [96, 192, 192, 384]  # every layer but the last
    assert param_count(model) + sum(m.num_features * 2 for m in bn) == 1_986_730


def test_convnet_last_feature_map_is_4x4() -> None:
    model = zoo.create_model("convnet").eval()
    with torch.no_grad():
        features = model.features(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 192, 4, 4)


def test_resnet20_parameter_count_with_and_without_projections() -> None:
    model = zoo.create_model("resnet20")
    assert param_count(model) == 272_474
    projection = sum(p.numel() for n, p in model.named_parameters() if ".shortcut." in n)
    assert param_count(model) - projection == 269_722  # option A, as the docstring says


@pytest.mark.parametrize(
    ("name", "shape", "out_shape"),
    [
        ("resnet18", (1, 3, 64, 64), (1, 1000)),
        ("mobilenet_v3_small", (1, 3, 64, 64), (1, 1000)),
        ("googlenet", (2, 3, 96, 96), (2, 1000)),
        ("deeplabv3_mobilenet_v3_large", (2, 3, 64, 64), (2, 21, 64, 64)),
    ],
)
def test_torchvision_model_builds_offline_and_runs(
    name: str, shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> None:
    model = zoo.create_model(name)  # train mode: googlenet must not return aux outputs
    with torch.no_grad():
        out = model(torch.randn(shape))
    out = out["out"] if isinstance(out, dict) else out
    assert isinstance(out, torch.Tensor) and out.shape == out_shape


def test_create_model_passes_kwargs_to_the_builder() -> None:
    assert zoo.create_model("resnet18", num_classes=7).fc.out_features == 7
    assert zoo.create_model("resnet20", num_classes=3).fc.out_features == 3


@pytest.mark.parametrize(
    "name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"]
)
def test_detection_backbone_exists_and_runs(name: str) -> None:
    info = zoo.model_info(name)
    backbone = getattr(zoo.create_model(name).eval(), info.submodule)
    with torch.no_grad():
        features = backbone(torch.randn(info.input_shape))
    assert features and all(f.shape[0] == 1 for f in features.values())


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(LoadError) as error:
        zoo.create_model("resnet5")
    message = str(error.value)
    assert message.startswith("unknown model 'resnet5' (did you mean: resnet50, resnet56")
    assert message.endswith("see 'fxprune zoo list'") and "\n" not in message


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(LoadError, match=r"^unknown model 'qqqq'; see 'fxprune zoo list'$"):
        zoo.model_info("qqqq")


def test_torchvision_builder_accepts_only_torchvision_names() -> None:
    factory, kind, shape, submodule = zoo.torchvision_builder("retinanet_resnet50_fpn")
    assert (kind, shape, submodule) == ("detection", (1, 3, 320, 320), "backbone")
    assert callable(factory)
    with pytest.raises(LoadError, match="unknown torchvision model 'resnet20'"):
        zoo.torchvision_builder("resnet20")


def test_register_model_decorator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo.registry, "_REGISTRY", dict(zoo.registry._REGISTRY))

    @zoo.register_model("tiny_test_net", input_shape=(1, 4), kind="classification")
    def tiny(width: int = 2) -> nn.Module:
        """A two-layer MLP used only by this test."""
        return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width))

    assert zoo.model_info("tiny_test_net").description == "A two-layer MLP used only by this test."
    assert zoo.create_model("tiny_test_net", width=5)[0].out_features == 5
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_model("tiny_test_net", input_shape=(1, 4), kind="classification")(tiny)
    with pytest.raises(ValueError, match="kind"):
        zoo.register_model("other", input_shape=(1, 4), kind="audio")(tiny)


def test_has_batchnorm() -> None:
    assert zoo.has_batchnorm(nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)))
    assert not zoo.has_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 1), nn.GroupNorm(1, 2)))
