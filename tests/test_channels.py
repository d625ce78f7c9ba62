"""Channel-id rules on small hand-built models, and the paper's ResNet-20."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune import zoo
from fxprune.analysis import analyse
from fxprune.errors import TraceError
from fxprune.trace import trace_model


def cbr(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


def groups_of(model: nn.Module, shape=(1, 3, 16, 16)):
    traced = trace_model(model, torch.randn(shape))
    return analyse(traced.gm), traced


def group_with(analysis, module: str, role: str = "producers"):
    return next(g for g in analysis.groups if any(s.module == module for s in getattr(g, role)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = cbr(3, 8), cbr(8, 8), cbr(8, 8)

    def forward(self, x):
        x = self.stem(x)
        return self.b(self.a(x)) + x


def test_residual_add_ties_stream():
    analysis, _ = groups_of(Residual())
    stream = group_with(analysis, "stem.0")
    assert {s.module for s in stream.producers} == {"stem.0", "b.0"}
    assert not stream.prunable and "model output" in stream.status
    inner = group_with(analysis, "a.0")
    assert inner.prunable and [s.module for s in inner.consumers] == ["b.0"]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = cbr(3, 4), cbr(3, 6), cbr(10, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        left, right = torch.split(y, [3, 7], dim=1)
        return self.head(torch.cat([right, left], 1)).mean((2, 3))


def test_concat_and_split_keep_groups_apart():
    analysis, _ = groups_of(Concat())
    a, b = group_with(analysis, "a.0"), group_with(analysis, "b.0")
    assert a.index != b.index and a.prunable and b.prunable
    consumer = [s for s in a.consumers if s.module == "head.0"][0]
    assert consumer.positions.tolist() == [0, 7, 8, 9]  # a3 first, then a0..a2 after b


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = cbr(3, 8)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.body(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * s)


def test_squeeze_excite_multiply_unions_with_broadcast_scale():
    analysis, _ = groups_of(SqueezeExcite())
    group = group_with(analysis, "body.0")
    assert {s.module for s in group.producers} == {"body.0", "fc2"}
    assert {s.module for s in group.consumers} == {"fc1", "out"}
    assert group.prunable


def test_depthwise_and_grouped_convs():
    model = nn.Sequential(cbr(3, 8, 1), cbr(8, 8, 3, groups=8), cbr(8, 8, 3, groups=2), cbr(8, 4))
    analysis, _ = groups_of(model)
    expand = group_with(analysis, "0.0")
    assert {s.module for s in expand.producers} == {"0.0", "1.0"}  # depthwise passes ids
    grouped = group_with(analysis, "2.0")
    assert grouped.prunable and grouped.index != expand.index


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = cbr(3, 4), nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        y = F.max_pool2d(self.body(x), 4)
        return self.fc(y.view(y.size(0), -1))


def test_flatten_linear_consumes_blocks_of_hw():
    analysis, _ = groups_of(Flatten())
    group = group_with(analysis, "body.0")
    site = [s for s in group.consumers if s.module == "fc"][0]
    assert len(site.positions) == 64 and group.prunable


def test_channel_shuffle_ties_columns():
    model = zoo.create_model("shufflenet_v2_x0_5")
    analysis, _ = groups_of(model, (1, 3, 64, 64))
    assert analysis.summary().split(",")[1].strip().endswith("prunable")
    inner = group_with(analysis, "stage2.0.branch2.0")
    assert inner.prunable


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = cbr(3, 8), nn.GroupNorm(2, 8), cbr(8, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_unknown_op_freezes_with_reason():
    analysis, _ = groups_of(Unknown())
    group = group_with(analysis, "a.0")
    assert not group.prunable and "GroupNorm" in group.status


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_batchnorm_width_mismatch_is_a_trace_error():
    """The meta-device shortcut for BatchNorm must not hide a model that cannot run."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(TraceError, match="does not run on an input of shape"):
        trace_model(model, torch.randn(1, 3, 8, 8))
    flat = nn.Sequential(nn.Flatten(), nn.BatchNorm2d(192))
    with pytest.raises(TraceError, match="does not run on an input of shape"):
        trace_model(flat, torch.randn(1, 3, 8, 8))


def test_untraceable_model_names_module_and_suggests_submodule():
    with pytest.raises(TraceError, match="DataDependent.*--submodule"):
        trace_model(DataDependent(), torch.randn(1, 3, 8, 8))


class Inner(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class PartlyTraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.inner, self.b = cbr(3, 4), Inner(), cbr(4, 4)

    def forward(self, x):
        return self.b(self.inner(self.a(x)))


def test_untraceable_submodule_becomes_recorded_leaf():
    analysis, traced = groups_of(PartlyTraceable())
    assert "inner" in traced.leaves
    assert not group_with(analysis, "a.0").prunable


def test_model_without_batchnorm_is_reported_not_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    analysis, _ = groups_of(model)
    inner = group_with(analysis, "0")
    assert inner.bn_sites == [] and inner.prunable


def test_resnet20_inner_channels_prunable_and_one_stream_group_per_stage():
    analysis, _ = groups_of(zoo.create_model("resnet20"), (1, 3, 32, 32))
    for stage in (1, 2, 3):
        for block in range(3):
            inner = group_with(analysis, f"layer{stage}.{block}.conv1")
            assert inner.prunable and [s.module for s in inner.consumers] == [
                f"layer{stage}.{block}.conv2"
            ]
        streams = {group_with(analysis, f"layer{stage}.{b}.conv2").index for b in range(3)}
        assert len(streams) == 1
