"""The removal decision: which channel classes go (constant or dead everywhere,
not frozen), then kept balanced for grouped convs and never to zero width."""

from __future__ import annotations

import numpy as np
import torch.fx as fx
from torch import nn

from fxprune.analysis import ChannelAnalysis, class_costs
from fxprune.compile.liveness import Liveness, channel_nodes, flat


def removable_classes(gm: fx.GraphModule, analysis: ChannelAnalysis, live: Liveness) -> np.ndarray:
    """Boolean mask over classes: not frozen, and constant or dead wherever they appear."""
    ok = np.ones(analysis.num_classes, bool)
    ok[list(analysis.frozen)] = False
    ids_seen, const_seen, dead_seen = [], [], []
    for node in channel_nodes(gm):
        ids, const, dead = node.meta["channels"], live.const[node], live.dead[node]
        pieces = (
            zip(ids, const, dead, strict=True) if isinstance(ids, list) else [(ids, const, dead)]
        )
        for i, c, d in pieces:
            if i is not None:
                ids_seen.append(i.reshape(-1))
                const_seen.append(c.reshape(-1))
                dead_seen.append(d.reshape(-1))
    if ids_seen:  # one pass over every position: a varying, read one keeps its class
        varying = ~(np.concatenate(const_seen) | np.concatenate(dead_seen))
        ok[analysis.class_of[np.concatenate(ids_seen)[varying]]] = False
    return ok


def balance_and_keep(
    gm: fx.GraphModule, analysis: ChannelAnalysis, removed: np.ndarray
) -> list[str]:
    """Shrink `removed` (in place) until grouped convs stay balanced and no
    tensor loses all its channels. Returns notes on what was kept."""
    notes: list[str] = []
    nodes = list(channel_nodes(gm))
    blocks = [  # (node, its block's classes), every channel block in graph order
        (node, analysis.class_of[flat(i)]) for node in nodes for i in _blocks(node) if flat(i).size
    ]
    grouped = {node for node in nodes if node.meta["channel_rule"] == "grouped"}
    sizes = np.array([len(classes) for _, classes in blocks], dtype=np.int64)
    every = np.concatenate([classes for _, classes in blocks]) if blocks else sizes
    starts = np.cumsum(sizes) - sizes
    changed = True
    while changed:
        changed = False
        # Fixing a node only keeps channels, so a block all removed when its turn
        # comes was all removed when the pass began: visit those and the grouped
        # convs, in graph order, and check each again at its turn.
        emptied = np.logical_and.reduceat(removed[every], starts) if blocks else sizes
        visit = {blocks[k][0] for k in np.nonzero(emptied)[0].tolist()} | grouped
        for node in (n for n in nodes if n in visit):
            for i in _blocks(node):
                classes = analysis.class_of[flat(i)]
                if classes.size and removed[classes].all():
                    removed[classes[0]] = False
                    notes.append(f"{node.name}: kept 1 channel (never a zero-width layer)")
                    changed = True
            if node in grouped:
                conv = gm.get_submodule(node.target)
                changed |= _balance(node, conv, analysis, removed, notes)
    return notes


def _blocks(node: fx.Node) -> list[np.ndarray]:
    """The channel id blocks of a node's output (one, or one per tensor of a tuple)."""
    ids = node.meta["channels"]
    return [i for i in ids if i is not None] if isinstance(ids, list) else [ids]


def _balance(node: fx.Node, conv: nn.Module, analysis, removed, notes) -> bool:
    """Keep the same number of removed channels in every group of a grouped conv."""
    changed = False
    x = node.args[0]
    for ids in (x.meta["channels"], node.meta["channels"]):
        chunks = analysis.class_of[flat(ids)].reshape(conv.groups, -1)
        gone = removed[chunks]
        least = int(gone.sum(axis=1).min())
        for row, mask in zip(chunks, gone, strict=True):
            extra = np.nonzero(mask)[0][least:]
            if len(extra):
                removed[row[extra]] = False
                changed = True
        if changed:
            notes.append(f"{node.target}: removed {least} channel(s) per group of {conv.groups}")
    return changed


def widen(
    gm: fx.GraphModule,
    analysis: ChannelAnalysis,
    removed: np.ndarray,
    *,
    round_to: int = 1,
    min_width: int = 1,
) -> list[str]:
    """Keep (un-remove, in place) the cheapest removable channels until every
    producer's output width is a multiple of `round_to` and at least `min_width`
    (or all its channels). Keeping a constant channel is always exact; the cost
    shows in the FLOP report. Grouped convs are rebalanced after each pass.
    Returns notes on what was kept."""
    if round_to <= 1 and min_width <= 1:
        return []
    cost = class_costs(gm, analysis)
    producers = [n for n in channel_nodes(gm) if n.meta["channel_rule"] in PRODUCER_RULES]
    notes: list[str] = []
    changed = True
    while changed:
        changed = False
        for node in producers:
            classes = analysis.class_of[flat(node.meta["channels"])]
            kept = classes[~removed[classes]]
            want = _wanted_width(len(np.unique(kept)), len(np.unique(classes)), round_to, min_width)
            extra = want - len(np.unique(kept))
            if extra > 0:
                gone = np.unique(classes[removed[classes]])
                chosen = gone[np.argsort(cost[gone], kind="stable")[:extra]]
                removed[chosen] = False
                notes.append(f"{node.target}: kept {len(chosen)} constant channel(s) for width")
                changed = True
        notes += balance_and_keep(gm, analysis, removed)
    return notes


PRODUCER_RULES = ("conv", "grouped")


def _wanted_width(kept: int, total: int, round_to: int, min_width: int) -> int:
    """The smallest width ≥ kept that is a multiple of round_to and ≥ min_width,
    capped at the layer's full width."""
    width = max(kept, min_width)
    width = -(-width // round_to) * round_to
    return min(width, total)


__all__ = ["PRODUCER_RULES", "balance_and_keep", "removable_classes", "widen"]
