"""Stage 3, analyse: label the channel axis of every activation with channel ids.

Every tensor node with a channel axis gets `node.meta["channels"]`: an integer
array of ids, one per channel (a 2-D array while a channel shuffle has split
the axis in two), and `node.meta["channel_rule"]`, how the op treats channels.
Ids that must be removed together are tied with a union-find; a class of tied
ids is one removable channel. Ops the rules below do not understand freeze the
ids they touch with a recorded reason: skip, never guess.

The rules (DESIGN.md, "Channel ids") live in `fxprune.analysis.rules`; this
module holds the bookkeeping and the public result, `ChannelAnalysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

ANALYSIS_KEY = "fxprune.analysis"

# node.meta["channel_rule"] values, read by the compiler:
#   conv        consumes its input ids, produces fresh ids (conv, linear)
#   grouped     like conv, per group (1 < groups)
#   depthwise   output channel c is computed from input channel c only
#   bn          BatchNorm: passes ids, a BN site of their group
#   elementwise passes ids; a constant channel stays constant (activations,
#               max-pooling, unpadded avg-pooling, binary arithmetic)
#   spatial     passes ids; a constant channel may vary at borders
#   structural  moves ids around (cat, split, slicing, reshape, transpose)
#   frozen      not understood: every id it touches is frozen
#   source      a model input or constant tensor (its ids are frozen)
RULES = ("conv", "grouped", "depthwise", "bn", "elementwise", "spatial", "structural")


class UnionFind:
    """Union-find over integer ids that grows as ids are created."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def make(self, count: int) -> np.ndarray:
        """Create `count` fresh ids and return them."""
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie the ids of `a` and `b` position by position."""
        for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist(), strict=True):
            self.union(x, y)


@dataclass(eq=False)  # identity: positions is an array, == would be ambiguous
class Site:
    """Where a group meets a module: `positions` index the module's channel axis
    (output channels for producers, BN channels, input features for consumers)."""

    node: str
    module: str
    kind: str
    positions: np.ndarray

    def to_json(self) -> dict:
        return {"module": self.module, "kind": self.kind, "channels": int(len(self.positions))}


@dataclass
class Group:
    """Channels that share producers, BN sites and consumers.

    `classes` are the removable channels of the group (union-find classes);
    `frozen` maps a class to the reason it cannot be pruned.
    """

    index: int
    classes: np.ndarray
    producers: list[Site] = field(default_factory=list)
    bn_sites: list[Site] = field(default_factory=list)
    consumers: list[Site] = field(default_factory=list)
    frozen: dict[int, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(len(self.classes))

    @property
    def prunable_channels(self) -> int:
        return self.width - len(self.frozen)

    @property
    def prunable(self) -> bool:
        return self.prunable_channels > 0

    @property
    def status(self) -> str:
        if not self.frozen:
            return "prunable"
        reasons = sorted(set(self.frozen.values()))
        reason = reasons[0] + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "")
        if len(self.frozen) == self.width:
            return f"frozen: {reason}"
        return f"partly frozen ({len(self.frozen)} of {self.width}): {reason}"

    def to_json(self) -> dict:
        return {
            "id": self.index,
            "width": self.width,
            "prunable_channels": self.prunable_channels,
            "status": self.status,
            "producers": [s.to_json() for s in self.producers],
            "bn_sites": [s.to_json() for s in self.bn_sites],
            "consumers": [s.to_json() for s in self.consumers],
        }


@dataclass
class ChannelAnalysis:
    """The result of `analyse`, kept in `gm.meta[ANALYSIS_KEY]`.

    `class_of[id]` is the removable-channel class of a raw channel id;
    `frozen[cls]` the reason a class is frozen; `groups` the report view.
    """

    class_of: np.ndarray
    frozen: dict[int, str]
    groups: list[Group]
    group_of_class: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(len(self.group_of_class))

    def summary(self) -> str:
        prunable = sum(g.prunable for g in self.groups)
        channels = sum(g.prunable_channels for g in self.groups)
        total = sum(g.width for g in self.groups)
        return (
            f"{len(self.groups)} groups, {prunable} prunable, {len(self.groups) - prunable} "
            f"frozen, {channels} channels prunable of {total}"
        )

    def to_json(self) -> dict:
        return {"summary": self.summary(), "groups": [g.to_json() for g in self.groups]}


def analyse(gm: fx.GraphModule) -> ChannelAnalysis:
    """Label every node of a shape-propagated `gm` with channel ids and build groups.

    Writes `node.meta["channels"]` and `node.meta["channel_rule"]` on every
    node that carries channels, and the result to `gm.meta[ANALYSIS_KEY]`.
    """
    from fxprune.analysis.labeller import ChannelLabeller

    labeller = ChannelLabeller(gm)
    labeller.run()
    result = _build_groups(gm, labeller)
    gm.meta[ANALYSIS_KEY] = result
    return result


def get_analysis(gm: fx.GraphModule) -> ChannelAnalysis:
    """The analysis stored on `gm` by `analyse` (KeyError if it never ran)."""
    return gm.meta[ANALYSIS_KEY]


def _build_groups(gm: fx.GraphModule, labeller) -> ChannelAnalysis:
    uf: UnionFind = labeller.uf
    roots = np.fromiter((uf.find(i) for i in range(len(uf.parent))), dtype=np.int64)
    _, class_of = np.unique(roots, return_inverse=True)
    num_classes = int(class_of.max()) + 1 if len(class_of) else 0
    frozen: dict[int, str] = {}
    for raw, reason in labeller.frozen.items():
        frozen.setdefault(int(class_of[raw]), reason)
    # Groups: classes whose ids were created by connected origin blocks.
    blocks = UnionFind()
    blocks.make(labeller.num_blocks)
    first_block = np.full(num_classes, -1, dtype=np.int64)
    for raw, cls in enumerate(class_of.tolist()):
        block = int(labeller.block_of[raw])
        if first_block[cls] < 0:
            first_block[cls] = block
        else:
            blocks.union(int(first_block[cls]), block)
    group_root = np.array([blocks.find(int(b)) for b in first_block], dtype=np.int64)
    groups, group_of_class = _collect_groups(gm, labeller, class_of, group_root, frozen)
    return ChannelAnalysis(class_of, frozen, groups, group_of_class)


def _collect_groups(gm, labeller, class_of, group_root, frozen):
    """Turn recorded sites into Group records, keeping only groups a module touches."""
    by_root: dict[int, Group] = {}

    def group_for(root: int) -> Group:
        if root not in by_root:
            members = np.nonzero(group_root == root)[0]
            by_root[root] = Group(index=-1, classes=members)
        return by_root[root]

    for role, kind, node, module, ids in labeller.sites:
        classes = class_of[ids.reshape(-1)]
        roots = group_root[classes]
        for root in np.unique(roots).tolist():
            positions = np.nonzero(roots == root)[0]
            site = Site(node=node, module=module, kind=kind, positions=positions)
            group = group_for(root)
            {"producer": group.producers, "bn": group.bn_sites, "consumer": group.consumers}[
                role
            ].append(site)
    groups = sorted(by_root.values(), key=lambda g: int(g.classes[0]))
    group_of_class = np.full(len(group_root), -1, dtype=np.int64)
    for index, group in enumerate(groups):
        group.index = index
        group_of_class[group.classes] = index
        group.frozen = {int(c): frozen[int(c)] for c in group.classes if int(c) in frozen}
    return groups, group_of_class


__all__ = [
    "ANALYSIS_KEY",
    "ChannelAnalysis",
    "Group",
    "RULES",
    "Site",
    "UnionFind",
    "analyse",
    "get_analysis",
]
