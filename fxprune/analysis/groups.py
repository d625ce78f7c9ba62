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
    """Union-find over integer ids that grows as ids are created.

    Unions are recorded as arrays of id pairs and resolved all at once, with
    numpy, when a root is first asked for (`roots`, `find`): the labeller ties
    thousands of channels per residual add, and a Python loop per channel was
    the analysis' hot spot. The root of a class is its smallest id.
    """

    def __init__(self) -> None:
        self.size = 0
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._roots: np.ndarray | None = np.zeros(0, dtype=np.int64)

    def make(self, count: int) -> np.ndarray:
        """Create `count` fresh ids and return them."""
        start, self.size = self.size, self.size + count
        self._roots = None
        return np.arange(start, start + count, dtype=np.int64)

    def union(self, a: int, b: int) -> None:
        self.union_arrays(np.array([a]), np.array([b]))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie the ids of `a` and `b` position by position."""
        a, b = np.asarray(a, dtype=np.int64).reshape(-1), np.asarray(b, dtype=np.int64).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"union of {a.size} ids with {b.size}")
        self._pairs.append((a, b))
        self._roots = None

    def roots(self) -> np.ndarray:
        """The root (smallest id of its class) of every id, as one array."""
        if self._roots is None or len(self._roots) != self.size:
            if self._pairs:
                a = np.concatenate([p[0] for p in self._pairs])
                b = np.concatenate([p[1] for p in self._pairs])
            else:
                a = b = np.zeros(0, dtype=np.int64)
            self._roots = component_roots(self.size, a, b)
        return self._roots

    def find(self, i: int) -> int:
        return int(self.roots()[i])


def component_roots(size: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on `size` nodes with edges a[k]-b[k]: each
    node's smallest connected node. Hook every edge's larger root onto the smaller,
    then jump pointers until every label is a root; repeat until every edge's ends
    agree. Labels only decrease and stay inside their component, so this ends with
    the component minimum; in practice after a few rounds."""
    labels = np.arange(size, dtype=np.int64)
    while len(a):
        la, lb = labels[a], labels[b]
        differ = la != lb
        if not differ.any():
            break
        la, lb = la[differ], lb[differ]
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
        while True:  # pointer jumping: every label becomes a root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    return labels


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
    roots = labeller.uf.roots()  # each id's class's smallest id: a root is its own
    ids = np.arange(len(roots), dtype=np.int64)
    is_root = roots == ids
    class_of = (np.cumsum(is_root) - 1)[roots]  # classes numbered in their roots' order
    frozen: dict[int, str] = {}
    for raw, reason in labeller.frozen.items():
        frozen.setdefault(int(class_of[raw]), reason)
    # Groups: classes whose ids were created by connected origin blocks. Tie the
    # block of every id to the block of its class's first id.
    block_of = labeller.block_array()
    first_block = block_of[ids[is_root]]  # each class's first id is its root
    block_roots = component_roots(labeller.num_blocks, first_block[class_of], block_of)
    group_root = block_roots[first_block]
    groups, group_of_class = _collect_groups(gm, labeller, class_of, group_root, frozen)
    return ChannelAnalysis(class_of, frozen, groups, group_of_class)


def _collect_groups(gm, labeller, class_of, group_root, frozen):
    """Turn recorded sites into Group records, keeping only groups a module touches."""
    by_root: dict[int, Group] = {}
    order = np.argsort(group_root, kind="stable")  # classes by root, ascending within each
    sorted_roots = group_root[order]

    def group_for(root: int) -> Group:
        if root not in by_root:
            lo, hi = np.searchsorted(sorted_roots, [root, root + 1])
            by_root[root] = Group(index=-1, classes=order[lo:hi])
        return by_root[root]

    # every site's group roots in one array, with each site's smallest and largest
    flat = [ids.reshape(-1) for *_, ids in labeller.sites]
    sizes = np.array([f.size for f in flat], dtype=np.int64)
    ends = np.cumsum(sizes)
    roots_of = group_root[class_of[np.concatenate(flat)]] if flat else sizes
    low, high = np.zeros(len(flat), np.int64), np.full(len(flat), -1, np.int64)
    if sizes.any():  # reduceat over the non-empty sites (their starts ascend)
        starts = (ends - sizes)[sizes > 0]
        low[sizes > 0] = np.minimum.reduceat(roots_of, starts)
        high[sizes > 0] = np.maximum.reduceat(roots_of, starts)
    everywhere: dict[int, np.ndarray] = {}  # n -> arange(n): a site within one group
    for (role, kind, node, module, _ids), size, end, lo, hi in zip(
        labeller.sites, sizes.tolist(), ends.tolist(), low.tolist(), high.tolist(), strict=True
    ):
        if lo == hi:  # the common case: the whole site lies in one group
            if size not in everywhere:  # shared by the sites of that width: read-only
                everywhere[size] = np.arange(size)
                everywhere[size].flags.writeable = False
            parts = [(lo, everywhere[size])]
        else:
            roots = roots_of[end - size : end]
            parts = [(root, np.nonzero(roots == root)[0]) for root in np.unique(roots).tolist()]
        for root, positions in parts:
            site = Site(node=node, module=module, kind=kind, positions=positions)
            group = group_for(root)
            sites = group.producers if role == "producer" else (
                group.bn_sites if role == "bn" else group.consumers)  # fmt: skip
            sites.append(site)
    groups = sorted(by_root.values(), key=lambda g: int(g.classes[0]))
    group_of_class = np.full(len(group_root), -1, dtype=np.int64)
    for index, group in enumerate(groups):
        group.index = index
        group_of_class[group.classes] = index
        group.frozen = {}
    for c in sorted(frozen):  # ascending, as each group's classes are
        if group_of_class[c] >= 0:
            groups[group_of_class[c]].frozen[c] = frozen[c]
    return groups, group_of_class


__all__ = [
    "ANALYSIS_KEY",
    "ChannelAnalysis",
    "Group",
    "RULES",
    "Site",
    "UnionFind",
    "analyse",
    "component_roots",
    "get_analysis",
]
