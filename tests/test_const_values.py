"""Constant channels' values from tiny inputs (compile/const_values.py) against the
values a forward pass of the whole graph reads (liveness.probe_values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from fxprune.analysis import analyse
from fxprune.compile import liveness
from fxprune.compile.const_values import constant_values
from fxprune.testing import randomize_batchnorm, zero_random, zero_test_pattern
from fxprune.testing.fuzz import random_model
from fxprune.trace import trace_model


def _const_and_traced(model, shape, seed, whole=False):
    randomize_batchnorm(model, seed)
    x = torch.randn(shape)
    traced = trace_model(model, x)
    analyse(traced.gm)
    (zero_test_pattern if whole else zero_random)(traced.gm, 0.5, seed)
    modules = dict(traced.gm.named_modules())
    return traced, x, liveness._forward_const(traced.gm, modules)


def _compare(traced, x, const) -> int:
    """Assert the two agree on every constant channel; return how many were compared."""
    local = constant_values(traced.gm, const)
    assert local is not None, "the tiny-input path gave up"
    nodes = {n for n, c in const.items() if liveness.any_true(c)}
    probe = liveness.probe_values(traced.gm, x, nodes)
    compared = 0
    for node in nodes:
        mine, theirs, mask = local[node], probe[node], const[node]
        triples = (
            zip(mine, theirs, mask, strict=True)
            if isinstance(mask, list)
            else [(mine, theirs, mask)]
        )
        for a, b, m in triples:
            if m is None:
                continue
            a, b = np.asarray(a)[m], np.asarray(b)[m]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=node.name)
            compared += int(m.sum())
    return compared


TORCHVISION = ["mobilenet_v3_small", "resnet18", "googlenet", "shufflenet_v2_x0_5"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_tiny_inputs_give_the_forward_pass_values_on_torchvision(name):
    builder = getattr(torchvision.models, name)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = builder(weights=None, **kwargs).eval()
    traced, x, const = _const_and_traced(model, (1, 3, 96, 96), seed=1, whole=True)
    assert _compare(traced, x, const) > 100


def test_tiny_inputs_give_the_forward_pass_values_on_random_graphs():
    used = compared = 0
    for seed in range(60):
        model, shape = random_model(seed)
        traced, x, const = _const_and_traced(model.eval(), shape, seed)
        if constant_values(traced.gm, const) is None:
            continue  # falls back to the forward pass: nothing to compare
        used += 1
        compared += _compare(traced, x, const)
    assert used >= 40 and compared > 1000


def test_an_in_place_op_does_not_change_the_values_it_read():
    # ReLU(inplace=True) on a constant BN output: the BN's own values stay β
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True), torch.nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip
    traced, x, const = _const_and_traced(model, (1, 3, 16, 16), seed=3)
    assert _compare(traced, x, const) > 0
