"""Making channels zero: thresholds and target sparsity.

ISTA training gives exact zeros; these functions give them to models that
were not trained that way. Each edits BatchNorm γ (and, where a producer has
no BatchNorm behind it, the producer's weight rows) of an analysed
GraphModule in place and returns how many channels it zeroed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis import ChannelAnalysis, Group, class_costs, get_analysis


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


DEFAULT_MIN_KEEP = 0.1  # --min-keep: every group keeps ≥ 10 % of its channels, at least one


def group_floor(group: Group, min_keep: float) -> int:
    """How many channels of `group` thresholds and sparsity targets must leave:
    ceil(min_keep · width), at least 1; 0 when `min_keep` is 0 (the floor lifted)."""
    return max(1, math.ceil(min_keep * group.width)) if min_keep > 0 else 0


def _within_floor(pairs: list[tuple[Group, int]], min_keep: float) -> list[tuple[Group, int]]:
    """The pairs, taken in priority order, that leave every group its floor
    (channels frozen in a group count as kept)."""
    taken: dict[int, int] = {}
    chosen = []
    for group, c in pairs:
        allowed = group.width - group_floor(group, min_keep)
        if taken.get(group.index, 0) < allowed:
            taken[group.index] = taken.get(group.index, 0) + 1
            chosen.append((group, c))
    return chosen


def apply_threshold(
    gm: fx.GraphModule, threshold: float, min_keep: float = DEFAULT_MIN_KEEP
) -> int:
    """Zero the channels whose |γ| ≤ threshold at every BN site, smallest |γ| first,
    leaving every group its floor (`group_floor`); returns how many."""
    gamma = bn_gamma_by_class(gm, get_analysis(gm))
    below = [(g, c) for g, c in _candidates(gm) if gamma.get(c, 0.0) <= threshold]
    below.sort(key=lambda pair: gamma.get(pair[1], 0.0))
    chosen = _within_floor(below, min_keep)
    _zero_pairs(gm, chosen)
    return len(chosen)


def apply_sparsity(gm: fx.GraphModule, fraction: float, min_keep: float = DEFAULT_MIN_KEEP) -> int:
    """Zero `fraction` of the prunable channels with the smallest |γ|·cost (Eq. 2 cost),
    leaving every group its floor (`group_floor`), so fewer may be zeroed; returns how many."""
    analysis = get_analysis(gm)
    gamma = bn_gamma_by_class(gm, analysis)
    cost = class_costs(gm, analysis)
    pairs = _candidates(gm)
    scores = [gamma.get(c, 0.0) * cost[c] for _g, c in pairs]
    count = int(round(fraction * len(pairs)))
    ranked = [pairs[i] for i in np.argsort(scores, kind="stable")]
    chosen = _within_floor(ranked, min_keep)[:count]
    _zero_pairs(gm, chosen)
    return len(chosen)


def _zero_pairs(gm: fx.GraphModule, pairs: list[tuple[Group, int]]) -> None:
    by_group: dict[int, tuple[Group, list[int]]] = {}
    for group, c in pairs:
        by_group.setdefault(group.index, (group, []))[1].append(c)
    for group, classes in by_group.values():
        zero_classes(gm, group, np.array(classes), producers=False)


__all__ = [
    "DEFAULT_MIN_KEEP",
    "apply_sparsity",
    "apply_threshold",
    "bn_gamma_by_class",
    "group_floor",
    "prunable_classes",
    "zero_classes",
]
