"""Which channels are constant, which are dead (DESIGN.md, "What is dead, what is constant").

For every node that carries channel ids, `find_liveness` computes two boolean
arrays over its (flattened) channel positions:

- `const[p]`: the channel holds the same value at every spatial position and
  for every input (forward pass over the rules: BN γ=0, all-zero conv rows,
  and what pointwise ops make of constants);
- `dead[p]`: nothing downstream reads it (backward pass: BN γ=0, zero weight
  columns, dead outputs of channel-wise ops).

Values of constant channels are not derived by hand: `const_values` runs each
node that has one on tiny inputs, and where it cannot, `probe_values` runs the
graph once and reads each channel at the first spatial position.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.vocabulary import concrete, reads_only_shape, tensor_shape
from fxprune.trace.run import run_graph


@dataclass
class Liveness:
    """Per-node channel facts, keyed by node (not stored in meta: they are
    specific to one set of weights, while meta describes the structure)."""

    const: dict[fx.Node, object]
    dead: dict[fx.Node, object]
    values: dict[fx.Node, object]


def flat(ids) -> np.ndarray:
    return ids.reshape(-1)


def channel_nodes(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.meta.get("channels") is not None:
            yield node


class ProbeValues(dict):
    """Probe values by node. A node the probe did not sample (it has no constant
    channel, whose value is all that is ever read) reads as NaN."""

    def __missing__(self, node: fx.Node):
        ids = node.meta["channels"]
        if isinstance(ids, list):
            return [np.full(flat(i).size, np.nan) if i is not None else None for i in ids]
        return np.full(flat(ids).size, np.nan)


def _record_channels(values: dict[fx.Node, object], nodes):
    """A `run_graph` hook that keeps, per channel node in `nodes` (None: all), each
    channel's first value."""

    def record(n: fx.Node, result) -> None:
        if nodes is not None and n not in nodes:
            return
        ids = n.meta.get("channels")
        if isinstance(ids, np.ndarray) and isinstance(result, torch.Tensor):
            values[n] = first_values(result, ids)
        elif isinstance(ids, list) and isinstance(result, (tuple, list)):
            values[n] = [
                first_values(r, i) if i is not None else None
                for r, i in zip(result, ids, strict=True)
            ]

    return record


def as_array(t: torch.Tensor) -> np.ndarray:
    """`t`'s values as a numpy array (a view on the CPU; bfloat16, which numpy lacks,
    as float32). Liveness and the rewrite read weights and small tensors this way: a
    numpy call costs a fraction of a torch op's dispatch."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def first_values(t: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """Each channel's value (float64) at sample 0, first position: (N, *block, *rest)."""
    return as_array(t[0]).reshape(ids.size, -1)[:, 0].astype(np.float64)


def probe_values(gm: fx.GraphModule, example: torch.Tensor, nodes=None) -> ProbeValues:
    """Each channel node's (or each of `nodes`') per-channel values from one forward
    pass (none at all, and no pass, when `nodes` is empty).

    Only the values of constant channels are ever read, and a constant channel
    has the same value at every resolution (the rules never call a channel
    constant when its value depends on the size: sums, padded ops and
    interpolation with borders stay live). So the probe first runs at an eighth,
    then a quarter of the example's spatial size, and at the full size when the
    graph accepts neither smaller input (a flatten → Linear, a fixed-size view).
    """
    if nodes is not None and not nodes:
        return ProbeValues()
    for small in _smaller(example):
        try:
            return _probe(gm, small, nodes)
        except Exception:  # the graph needs a larger (or its traced) size: try the next
            pass
    return _probe(gm, example, nodes)


def _probe(gm: fx.GraphModule, x: torch.Tensor, nodes) -> ProbeValues:
    values = ProbeValues()
    with torch.no_grad():
        run_graph(gm, [x], on_result=_record_channels(values, nodes))
    return values


def _smaller(example: torch.Tensor) -> list[torch.Tensor]:
    """The example at an eighth, then a quarter of each spatial size (at least 16
    each), smallest first; sizes that are not smaller than the example are left out."""
    if example.dim() < 3:
        return []
    full = tuple(example.shape[2:])
    sizes = []
    for divisor in (8, 4):
        spatial = tuple(max(16, s // divisor) for s in full)
        if spatial < full and spatial not in sizes:
            sizes.append(spatial)
    return [torch.randn((1, example.shape[1], *s), dtype=example.dtype) for s in sizes]


_TAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def nonzero_taps(module: nn.Module) -> np.ndarray:
    """(out, in/groups) bool: which input channel of its group each output row reads
    (any nonzero kernel tap). Grouped convs stay grouped: no dense expansion, which
    for regnet_y_128gf would take gigabytes per layer.

    Cached per module until its weight is replaced or edited in place.
    """
    key = (id(module.weight), module.weight._version)
    cached = _TAPS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = as_array(module.weight)
    if w.ndim == 2 or w[0, 0].size == 1:  # Linear or 1x1 kernel: one tap per pair
        taps = w.reshape(w.shape[0], w.shape[1]) != 0
    else:
        taps = (w.reshape(w.shape[0], w.shape[1], -1) != 0).any(-1)
    _TAPS[module] = (key, taps)
    return taps


def per_row_inputs(module: nn.Module, per_input: np.ndarray) -> np.ndarray:
    """Lay a per-input-channel array out as (out, in/groups): row o sees its group's
    inputs (for one group, a read-only (1, in) view that broadcasts over the rows)."""
    groups, rows = getattr(module, "groups", 1), module.weight.shape[0]
    if groups == 1:
        return per_input.reshape(1, -1)
    return per_input.reshape(groups, -1)[np.repeat(np.arange(groups), rows // groups)]


def _weight3(module: nn.Module) -> np.ndarray:
    """The weight as an (out, in/groups, taps) array (a view; bfloat16 as float32)."""
    w = as_array(module.weight)
    return w.reshape(w.shape[0], w.shape[1], -1)


# The three questions liveness asks of a layer's weights. Each answers from one
# row or column first and reads the rest only where that leaves it open: a dense
# weight (every trained layer) is answered in time linear in its rows + columns,
# not in its size; zeros cost at most what the whole weight would.


def zero_rows(module: nn.Module) -> np.ndarray:
    """Per output row: are all its weights zero (it reads no input)?"""
    w = _weight3(module)
    w = w.reshape(w.shape[0], -1)
    zero = w[:, 0] == 0  # a row with a nonzero first tap is not zero
    if zero.any():
        open_rows = np.nonzero(zero)[0]
        zero[open_rows] = ~w[open_rows].any(axis=1)
    return zero


def rows_reading(module: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """Per output row: does it read (a nonzero tap on) some input channel in `inputs`
    (a mask over all in_channels)?"""
    if getattr(module, "groups", 1) != 1:
        return (nonzero_taps(module) & per_row_inputs(module, inputs)).any(axis=1)
    w, cols = _weight3(module), np.nonzero(inputs)[0]
    if cols.size == 0:
        return np.zeros(w.shape[0], bool)
    reads = w[:, cols[0]].any(axis=1)
    if not reads.all():  # rows that may read nothing in `inputs`: first, the zero rows
        open_rows = np.nonzero(~reads)[0]
        rows = w[open_rows]
        some = np.nonzero(rows.reshape(open_rows.size, -1).any(axis=1))[0]
        reads[open_rows[some]] = (rows[some].any(axis=2) & inputs).any(axis=1)
    return reads


def inputs_read(module: nn.Module, live_rows: np.ndarray) -> np.ndarray:
    """Per input channel: does some live output row read it (nonzero weight)?"""
    groups = getattr(module, "groups", 1)
    if groups != 1:
        taps = nonzero_taps(module) & live_rows[:, None]
        return taps.reshape(groups, -1, taps.shape[1]).any(axis=1).reshape(-1)
    w, rows = _weight3(module), np.nonzero(live_rows)[0]
    if rows.size == 0:
        return np.zeros(w.shape[1], bool)
    read = w[rows[0]].any(axis=1)
    if not read.all():  # some column unread by that row: OR the live rows together
        live = w if rows.size == w.shape[0] else w[rows]  # (rows are contiguous copies)
        taps = np.logical_or.reduce(live.reshape(rows.size, -1) != 0, axis=0)
        read |= taps.reshape(w.shape[1], -1).any(axis=1)
    return read


def zero_padded(module: nn.Module) -> bool:
    """True when a conv pads with zeros (so a constant input varies at borders)."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return False
    padding = module.padding
    if module.padding_mode != "zeros":
        return False
    if isinstance(padding, str):
        return padding != "valid" and any(k > 1 for k in module.kernel_size)
    return any(p != 0 for p in padding)


def zero_gamma(module: nn.Module) -> np.ndarray | None:
    """Per channel of a BatchNorm: is its scale γ exactly zero? None without an affine
    scale."""
    w = getattr(module, "weight", None)
    if w is None:
        return None
    return as_array(w) == 0


def aligned_operands(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Inputs of a position-wise node whose channel block matches the output's,
    and the other tensor inputs (broadcast operands)."""
    ids = node.meta["channels"]
    aligned, other = [], []
    out_shape = tensor_shape(node)
    for inp in node.all_input_nodes:
        shape, in_ids = tensor_shape(inp), inp.meta.get("channels")
        if shape is None:
            continue
        ok = isinstance(in_ids, np.ndarray) and in_ids.shape == ids.shape
        (aligned if ok and len(shape) == len(out_shape or ()) else other).append(inp)
    return aligned, other


def _input_state(node: fx.Node, state: dict) -> np.ndarray:
    """Indexed by raw id: True where every channel input position holding that id is
    True in `state` (False for ids no input holds), over all channel inputs of a
    structural node."""
    ids_seen, flags_seen = [], []
    for inp in node.all_input_nodes:
        ids, vals = inp.meta.get("channels"), state.get(inp)
        if ids is None or vals is None:
            continue
        pairs = zip(ids, vals, strict=True) if isinstance(ids, list) else [(ids, vals)]
        for i, v in pairs:
            if i is not None:
                ids_seen.append(flat(i))
                flags_seen.append(np.asarray(v, bool).reshape(-1))
    if not ids_seen:
        return np.zeros(0, bool)
    raw, flags = np.concatenate(ids_seen), np.concatenate(flags_seen)
    table = np.zeros(int(raw.max()) + 1, bool)
    table[raw] = True
    np.logical_and.at(table, raw, flags)
    return table


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """table[ids], False for ids beyond the table."""
    ids = flat(ids)
    inside = ids < len(table)
    out = np.zeros(ids.size, bool)
    out[inside] = table[ids[inside]]
    return out


def _structural_input(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def find_liveness(
    gm: fx.GraphModule, example: torch.Tensor, modules: dict[str, nn.Module] | None = None
) -> Liveness:
    """Constant and dead channel positions of every channel node of `gm`. `modules`:
    `dict(gm.named_modules())`, if the caller has it."""
    from fxprune.compile.const_values import constant_values  # it builds on this module

    modules = dict(gm.named_modules()) if modules is None else modules
    const = _forward_const(gm, modules)
    dead = _backward_dead(gm, modules)
    values = constant_values(gm, const, modules)
    if values is None:  # some node cannot run on tiny inputs: one forward pass
        values = probe_values(gm, example, {n for n, c in const.items() if any_true(c)})
    return Liveness(const=const, dead=dead, values=values)


def any_true(mask) -> bool:
    if isinstance(mask, list):
        return any(m is not None and bool(m.any()) for m in mask)
    return bool(mask.any())


def _forward_const(gm, modules) -> dict:
    const: dict[fx.Node, object] = {}
    for node in channel_nodes(gm):
        ids, rule = node.meta["channels"], node.meta["channel_rule"]
        if isinstance(ids, list):
            table = _input_state(node, const)
            const[node] = [_lookup(table, i) if i is not None else None for i in ids]
            continue
        n = flat(ids).size
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        x_const = const.get(x) if x is not None and isinstance(const.get(x), np.ndarray) else None
        if rule in ("conv", "grouped"):
            module = modules[node.target]
            # constant when every row reads constant inputs only (and, with zero
            # padding, reads nothing at all: the border would differ)
            if x_const is None or zero_padded(module) or not x_const.any():
                const[node] = zero_rows(module)
            else:
                const[node] = ~rows_reading(module, ~x_const)
        elif rule == "depthwise":
            m = modules[node.target]
            const[node] = zero_rows(m) | (x_const & (not zero_padded(m)))
        elif rule == "bn":
            zero = zero_gamma(modules[node.target])
            const[node] = x_const | zero if zero is not None else x_const.copy()
        elif rule == "border":  # a zero row adds 0 everywhere; any other row varies at borders
            kernel = modules[node.target].kernel.detach().reshape(n, -1).cpu().numpy()
            const[node] = ~np.any(kernel != 0, axis=1)
        elif rule == "elementwise":
            aligned, other = aligned_operands(node)
            result = np.full(n, bool(aligned) and not other)
            for inp in aligned:
                result &= const[inp]
            const[node] = result
        elif rule == "structural":
            const[node] = _lookup(_input_state(node, const), ids)
        else:  # spatial, frozen, source
            const[node] = np.zeros(n, bool)
    return const


def _backward_dead(gm, modules) -> dict:
    dead: dict[fx.Node, object] = {}
    for node in channel_nodes(gm):
        ids = node.meta["channels"]
        dead[node] = (
            [np.ones(flat(i).size, bool) if i is not None else None for i in ids]
            if isinstance(ids, list)
            else np.ones(flat(ids).size, bool)
        )
    for user in reversed(list(gm.graph.nodes)):
        for inp in user.all_input_nodes:
            if inp in dead:
                _mark_reads(user, inp, dead, modules)
    return dead


def _mark_reads(user: fx.Node, inp: fx.Node, dead: dict, modules) -> None:
    """Clear `dead` on the positions of `inp` that `user` reads."""
    reads = _reads(user, inp, dead, modules)
    if isinstance(dead[inp], list):
        for d, r in zip(dead[inp], reads, strict=True):
            if d is not None:
                d &= ~r
    else:
        dead[inp] &= ~reads


def _all(inp: fx.Node, dead: dict, value: bool):
    d = dead[inp]
    if isinstance(d, list):
        return [np.full(x.size, value) if x is not None else None for x in d]
    return np.full(d.size, value)


def _reads(user: fx.Node, inp: fx.Node, dead: dict, modules):
    """Boolean mask (or list of masks) of the positions of `inp` that `user` reads."""
    if reads_only_shape(user):
        return _all(inp, dead, False)
    rule = user.meta.get("channel_rule")
    if rule == "border":  # a border term reads its input's spatial size, no channel
        return _all(inp, dead, False)
    if user not in dead or rule in (None, "frozen", "source"):
        return _all(inp, dead, True)
    live = ~dead[user] if isinstance(dead[user], np.ndarray) else None
    if rule in ("conv", "grouped") and user.args[0] is inp:
        module = modules[user.target]
        rows = live if live is not None else np.ones(module.weight.shape[0], bool)
        return inputs_read(module, rows)
    if rule == "depthwise" and user.args[0] is inp:
        return live & ~zero_rows(modules[user.target])
    if rule == "bn":
        zero = zero_gamma(modules[user.target])
        return live & ~zero if zero is not None else live
    if rule in ("elementwise", "spatial") and live is not None:
        aligned, _other = aligned_operands(user)
        return live.copy() if inp in aligned else _all(inp, dead, bool(live.any()))
    if rule == "structural":
        return _structural_reads(user, inp, dead)
    return _all(inp, dead, True)


def _structural_reads(user: fx.Node, inp: fx.Node, dead: dict):
    """A position of `inp` is read when some live output position has its raw id."""
    out_ids, out_dead = user.meta["channels"], dead[user]
    pairs = (
        zip(out_ids, out_dead, strict=True) if isinstance(out_ids, list) else [(out_ids, out_dead)]
    )
    live = [flat(i)[~d] for i, d in pairs if i is not None]
    live_ids = np.concatenate(live) if live else np.zeros(0, np.int64)
    if (
        user.op == "call_function"
        and user.target.__name__ == "getitem"
        and isinstance(inp.meta.get("channels"), list)
    ):
        index = concrete(user.args[1])
        masks = _all(inp, dead, False)
        masks[index] = ~out_dead.copy()
        return masks
    in_ids = inp.meta["channels"]
    if isinstance(in_ids, list):
        return [_member(flat(i), live_ids) if i is not None else None for i in in_ids]
    return _member(flat(in_ids), live_ids)


def _member(ids: np.ndarray, members: np.ndarray) -> np.ndarray:
    """`np.isin` for small non-negative ids, by a lookup table (linear time)."""
    size = 1 + max(int(ids.max(initial=0)), int(members.max(initial=0)))
    table = np.zeros(size, bool)
    table[members] = True
    return table[ids]


__all__ = [
    "Liveness",
    "ProbeValues",
    "aligned_operands",
    "any_true",
    "as_array",
    "channel_nodes",
    "find_liveness",
    "first_values",
    "flat",
    "inputs_read",
    "nonzero_taps",
    "per_row_inputs",
    "probe_values",
    "rows_reading",
    "zero_gamma",
    "zero_padded",
    "zero_rows",
]
