"""Zoo-wide checks, parametrized over the registry (timm style).

Every model is traced and analysed (invariants below); every model with
BatchNorm is compiled with half of every prunable group zeroed, plus every
fifth group and one residual branch zeroed whole, and must match
the original within 1e-4 (and at a second resolution when fully
convolutional). Heavy models run in the `slow` group (`make test-slow`);
each exclusion names its reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import compile_checked, params

from fxprune import zoo
from fxprune.analysis import analyse
from fxprune.report import count_model
from fxprune.trace import trace_model
from fxprune.verify import TOLERANCE

# Small inputs keep the suite fast; every model here is checked at its size.
TEST_SHAPES = {
    "cifar": (1, 3, 32, 32),
    "classification": (1, 3, 64, 64),
    "segmentation": (1, 3, 64, 64),
    "video": (1, 3, 4, 32, 32),
    "detection": (1, 3, 64, 64),
}
SHAPE_OVERRIDES = {
    "inception_v3": (1, 3, 96, 96),
    "s3d": (1, 3, 16, 224, 224),
    "mvit_v1_b": (1, 3, 16, 224, 224),
    "mvit_v2_s": (1, 3, 16, 224, 224),
    "swin3d_t": (1, 3, 4, 64, 64),
    "swin3d_s": (1, 3, 4, 64, 64),
    "swin3d_b": (1, 3, 4, 64, 64),
}
# Models with a fixed-size input (positional embeddings or fixed pooling).
FIXED_SIZE = {"vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "maxvit_t",
              "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t"}  # fmt: skip
# Heavy to build or run on 2 CPU cores: run with `make test-slow`.
SLOW = {
    "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf", "regnet_x_16gf",
    "vit_h_14", "vit_l_16", "vit_l_32", "convnext_large", "efficientnet_b7", "efficientnet_b6",
    "efficientnet_b5", "efficientnet_v2_l", "efficientnet_v2_m", "resnext101_64x4d",
    "resnext101_32x8d", "wide_resnet101_2", "wide_resnet50_2", "resnet152", "swin_v2_b", "swin_b",
    "swin3d_b", "swin3d_s", "mvit_v1_b", "mvit_v2_s", "s3d", "maskrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "deeplabv3_resnet101",
    "fcn_resnet101", "densenet161", "densenet201", "vgg19_bn", "vgg16_bn", "regnet_y_8gf",
    "regnet_x_8gf", "convnext_base", "vit_b_16", "vit_b_32", "maxvit_t", "swin_v2_s",
    "swin_s", "resnet101", "efficientnet_b4", "densenet169",
}  # fmt: skip
# Classifiers whose head pools to a fixed size before a Linear still accept
# other resolutions; those whose Linear reads a flattened map do not.
NOT_FULLY_CONVOLUTIONAL = {"vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "convnet"}


def shape_for(name: str) -> tuple[int, ...]:
    info = zoo.model_info(name)
    if name in FIXED_SIZE or info.kind == "detection":
        return info.input_shape
    return SHAPE_OVERRIDES.get(name, TEST_SHAPES[info.kind])


def marks(name: str):
    return [pytest.mark.slow] if name in SLOW else []


ALL = [pytest.param(n, marks=marks(n), id=n) for n in zoo.list_models()]


@pytest.mark.parametrize("name", ALL)
def test_analysis_invariants(name):
    """Each conv/linear channel in exactly one group; widths agree; nothing unknown prunable."""
    info = zoo.model_info(name)
    model = zoo.create_model(name).eval()
    traced = trace_model(model, torch.randn(shape_for(name)), info.submodule)
    analysis = analyse(traced.gm)
    modules = dict(traced.gm.named_modules())
    seen: dict[tuple[str, str], int] = {}
    for group in analysis.groups:
        for role in ("producers", "consumers"):
            for site in getattr(group, role):
                key = (site.node, role)
                seen[key] = seen.get(key, 0) + len(site.positions)
        for cls in group.classes.tolist():
            assert analysis.group_of_class[cls] == group.index
    for node in traced.gm.graph.nodes:
        rule = node.meta.get("channel_rule")
        if rule in ("conv", "grouped"):
            module = modules[node.target]
            width_in = node.args[0].meta["channels"].size
            width_out = node.meta["channels"].size
            assert seen[(node.name, "consumers")] == width_in
            assert seen[(node.name, "producers")] == width_out
            assert width_out == module.weight.shape[0]
        if rule == "frozen":
            ids = node.meta["channels"]
            for arr in ids if isinstance(ids, list) else [ids]:
                if arr is not None:
                    assert all(int(analysis.class_of[i]) in analysis.frozen for i in np.ravel(arr))


BN_MODELS = [
    pytest.param(n, marks=marks(n), id=n)
    for n in zoo.list_models()
    if zoo.model_info(n).kind != "detection"
]


@pytest.mark.parametrize("name", BN_MODELS)
def test_compile_matches_original(name):
    model = zoo.create_model(name).eval()
    if not zoo.has_batchnorm(model):
        pytest.skip("no BatchNorm: no γ to prune (reported by fxprune trace, not an error)")
    shape = shape_for(name)
    other = None
    if name not in NOT_FULLY_CONVOLUTIONAL and name not in FIXED_SIZE and len(shape) == 4:
        other = (2, shape[1], shape[2] + 16, shape[3] + 32)
    traced, result, errors = compile_checked(model, shape, other_shape=other, whole=True)
    assert max(errors) <= TOLERANCE, errors
    before, after = count_model(traced.gm, traced.example), count_model(result.gm, traced.example)
    assert params(result.gm) < params(traced.gm)
    assert after.flops < before.flops
