"""Making channels zero: thresholds, target sparsity, and random test patterns.

ISTA training gives exact zeros; these functions give them to models that
were not trained that way. Each edits BatchNorm γ (and, where a producer has
no BatchNorm behind it, the producer's weight rows) of an analysed
GraphModule in place and returns how many channels it zeroed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.channels import ChannelAnalysis, Group, get_analysis


def _bn_users_only(gm: fx.GraphModule, node_name: str) -> bool:
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    return bool(node.users) and all(u.meta.get("channel_rule") == "bn" for u in node.users)


def zero_classes(gm: fx.GraphModule, group: Group, classes: np.ndarray, *, producers: bool) -> None:
    """Set γ of `classes` to 0 at every BN site of `group`; with `producers`, also
    zero the weight rows of producers that feed no BN directly."""
    analysis = get_analysis(gm)
    chosen = set(int(c) for c in classes)
    sites = list(group.bn_sites) + (list(group.producers) if producers else [])
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        if site in group.producers and (site.kind == "depthwise" or _bn_users_only(gm, site.node)):
            continue
        node = nodes[site.node]
        ids = node.meta["channels"].reshape(-1)
        positions = [p for p in site.positions.tolist() if int(analysis.class_of[ids[p]]) in chosen]
        module = gm.get_submodule(site.module)
        with torch.no_grad():
            module.weight[positions] = 0
            if site in group.producers and module.bias is not None:
                module.bias[positions] = 0


def prunable_classes(group: Group) -> np.ndarray:
    return np.array([c for c in group.classes.tolist() if c not in group.frozen], dtype=np.int64)


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


def bn_gamma_by_class(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[int, float]:
    """max |γ| over the BN sites of each class (0 when every site is zero)."""
    result: dict[int, float] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for group in analysis.groups:
        for site in group.bn_sites:
            ids = nodes[site.node].meta["channels"].reshape(-1)
            gamma = gm.get_submodule(site.module).weight.detach().abs()
            for p in site.positions.tolist():
                c = int(analysis.class_of[ids[p]])
                result[c] = max(result.get(c, 0.0), float(gamma[p]))
    return result


def _candidates(gm: fx.GraphModule) -> list[tuple[Group, int]]:
    """(group, class) pairs that can be zeroed: prunable classes of groups with BN."""
    return [
        (group, int(c))
        for group in get_analysis(gm).groups
        if group.bn_sites
        for c in prunable_classes(group).tolist()
    ]


def apply_threshold(gm: fx.GraphModule, threshold: float) -> int:
    """Zero the channels whose |γ| ≤ threshold at every BN site; returns how many."""
    gamma = bn_gamma_by_class(gm, get_analysis(gm))
    chosen = [(g, c) for g, c in _candidates(gm) if gamma.get(c, 0.0) <= threshold]
    _zero_pairs(gm, chosen)
    return len(chosen)


def apply_sparsity(gm: fx.GraphModule, fraction: float) -> int:
    """Zero `fraction` of the prunable channels with the smallest |γ|·cost (Eq. 2 cost)."""
    analysis = get_analysis(gm)
    gamma = bn_gamma_by_class(gm, analysis)
    cost = class_costs(gm, analysis)
    pairs = _candidates(gm)
    scores = [gamma.get(c, 0.0) * cost[c] for _g, c in pairs]
    count = int(round(fraction * len(pairs)))
    chosen = [pairs[i] for i in np.argsort(scores, kind="stable")[:count]]
    _zero_pairs(gm, chosen)
    return len(chosen)


def _zero_pairs(gm: fx.GraphModule, pairs: list[tuple[Group, int]]) -> None:
    by_group: dict[int, tuple[Group, list[int]]] = {}
    for group, c in pairs:
        by_group.setdefault(group.index, (group, []))[1].append(c)
    for group, classes in by_group.values():
        zero_classes(gm, group, np.array(classes), producers=False)


def class_costs(gm: fx.GraphModule, analysis: ChannelAnalysis) -> np.ndarray:
    """Per-channel compute cost of each class (the bracket of the paper's Eq. 2,
    summed over every producer and consumer of its group), divided by I_w·I_h."""
    costs = np.zeros(analysis.num_classes)
    nodes = {n.name: n for n in gm.graph.nodes}
    for group in analysis.groups:
        total = 0.0
        for site in group.producers + group.consumers:
            module = gm.get_submodule(site.module)
            shape = nodes[site.node].meta["tensor_meta"].shape
            spatial = float(np.prod(shape[2:])) if len(shape) > 2 else 1.0
            kernel = float(np.prod(module.weight.shape[2:])) if module.weight.dim() > 2 else 1.0
            if site in group.producers:
                total += kernel * module.weight.shape[1] * spatial
            else:
                total += kernel * module.weight.shape[0] * spatial
        for site in group.bn_sites[:1]:
            shape = nodes[site.node].meta["tensor_meta"].shape
            spatial = float(np.prod(shape[2:])) if len(shape) > 2 else 1.0
            costs[group.classes] = (total + spatial) / spatial
    return costs
