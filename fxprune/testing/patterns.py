"""Test patterns: random BatchNorm statistics and zeroed channels that make a
model prunable without training (used by tests, the fuzzer, benchmarks and
`fxprune doctor`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis import get_analysis
from fxprune.compile import prunable_classes, zero_classes


def zero_random(gm: fx.GraphModule, fraction: float = 0.5, seed: int = 0) -> int:
    """Zero about `fraction` of the prunable channels of every group (test pattern)."""
    rng = np.random.default_rng(seed)
    total = 0
    for group in get_analysis(gm).groups:
        classes = prunable_classes(group)
        if not len(classes) or not group.bn_sites:
            continue
        count = int(round(fraction * len(classes)))
        chosen = rng.choice(classes, size=count, replace=False)
        zero_classes(gm, group, chosen, producers=True)
        total += count
    return total


def zero_test_pattern(gm: fx.GraphModule, fraction: float = 0.5, seed: int = 0) -> str:
    """The zoo-wide test pattern: `fraction` of every prunable group, every fifth
    prunable group whole, and one whole residual branch. Returns what it did."""
    count = zero_random(gm, fraction, seed)
    groups = [g for g in get_analysis(gm).groups if g.bn_sites and len(prunable_classes(g))]
    for group in groups[::5]:
        zero_classes(gm, group, prunable_classes(group), producers=True)
    branch = zero_residual_branch(gm)
    return (
        f"{count} channels, {len(groups[::5])} whole groups, residual branch "
        f"{branch or '(none: no BatchNorm feeds an add)'}"
    )


def zero_residual_branch(gm: fx.GraphModule) -> str | None:
    """Set γ = 0 on the BN that ends a residual branch (a BN whose only user is an
    add of two activations), so the branch is constant; the middle one of the
    model's such BNs. Returns the BN's name, or None when there is none."""
    adds = ("add", "iadd", "add_")
    candidates = []
    for node in gm.graph.nodes:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op not in ("call_function", "call_method") or name not in adds:
            continue
        inputs = [n for n in node.all_input_nodes if n.meta.get("channels") is not None]
        for inp in inputs if len(inputs) == 2 else []:
            if inp.meta.get("channel_rule") == "bn" and len(inp.users) == 1:
                candidates.append(inp.target)
    if not candidates:
        return None
    target = candidates[len(candidates) // 2]
    with torch.no_grad():
        gm.get_submodule(target).weight.zero_()
    return target


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Random BN statistics and affine parameters (eval-mode tests without training)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


__all__ = ["randomize_batchnorm", "zero_random", "zero_residual_branch", "zero_test_pattern"]
