"""Test helpers: trace + analyse + zero + compile + compare, with real forward passes."""

from __future__ import annotations

import torch
from torch import nn

from fxprune.analysis import analyse
from fxprune.compile import CompileOptions, compile_model
from fxprune.testing import randomize_batchnorm, zero_random, zero_test_pattern
from fxprune.trace import trace_model
from fxprune.verify import relative_error, run_model


def compile_checked(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    fraction: float = 0.5,
    seed: int = 0,
    absorb: str = "exact",
    other_shape: tuple[int, ...] | None = None,
    randomize: bool = True,
    whole: bool = False,
):
    """Zero `fraction` of every prunable group, compile, and return
    (traced, result, errors) where errors are max relative output errors on
    the traced input, a fresh input, and `other_shape` if given. With `whole`,
    also zero every fifth group whole and one residual branch (zero_test_pattern)."""
    if randomize:
        randomize_batchnorm(model, seed)
    x = torch.randn(shape)
    traced = trace_model(model, x)
    analyse(traced.gm)
    if whole:
        zero_test_pattern(traced.gm, fraction, seed)
    else:
        zero_random(traced.gm, fraction, seed)
    result = compile_model(traced, CompileOptions(absorb=absorb))
    inputs = [x, torch.randn(shape)] + ([torch.randn(other_shape)] if other_shape else [])
    errors = [relative_error(run_model(traced.gm, i), run_model(result.gm, i)) for i in inputs]
    return traced, result, errors


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
