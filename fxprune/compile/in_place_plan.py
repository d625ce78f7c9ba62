"""The removal plan of the in-place back end (DESIGN.md, "Front ends and back ends").

The compiler's plan (`removable_classes`, `balance_and_keep`) assumes it may
rewrite the graph: fix literal sizes in `view`/`split` calls, add border terms
after padded convs. In place the graph is the user's Python code and cannot
change, so the plan is narrowed until nothing but module surgery is needed:

- a channel whose width is a literal in the user's code (`split((c, c), 1)`,
  `view(B, 64, -1)`, `x[:, 32:64]`) is frozen, with that reason, through the
  analysis' own frozen mechanism;
- `chunk(n, 1)` is kept balanced (every piece loses as many channels), which
  is provably enough: `chunk(n)` of n·k channels gives pieces of k;
- a removed constant channel read by a zero-padded conv would need a border
  term: it is kept (the paper's bias fold would be inexact at the border),
  unless the caller wraps such convs (`borders=True`).

Every narrowing only un-removes classes, so the loop reaches a fixed point.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxprune.analysis import ChannelAnalysis
from fxprune.analysis.vocabulary import concrete, op_name, target_name, tensor_shape
from fxprune.compile.literal_args import fix_literal_channel_args
from fxprune.compile.liveness import Liveness, channel_nodes, flat, zero_padded
from fxprune.compile.removal import balance_and_keep, removable_classes

LITERAL_REASON = "literal channel width in the model's code (in-place pruning cannot change it)"
_LITERAL_OPS = ("view", "reshape", "split", "getitem", "narrow", "expand")


def keep_masks(gm: fx.GraphModule, analysis: ChannelAnalysis, removed: np.ndarray) -> dict:
    """Per channel node: which of its channel positions survive (a list for tuples)."""

    def keep_of(ids):
        return None if ids is None else ~removed[analysis.class_of[flat(ids)]]

    keep: dict[fx.Node, object] = {}
    for node in channel_nodes(gm):
        ids = node.meta["channels"]
        keep[node] = [keep_of(i) for i in ids] if isinstance(ids, list) else keep_of(ids)
    return keep


def in_place_plan(
    gm: fx.GraphModule, analysis: ChannelAnalysis, live: Liveness, *, borders: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Removed classes (bool mask) that module surgery alone can remove exactly
    (with `borders`, also those a padded conv needs a border term for), and notes
    on what was kept. Classes frozen here are added to `analysis.frozen` and
    their groups' `frozen` with the reason."""
    removed = removable_classes(gm, analysis, live)
    kept: list[str] = []
    for _ in range(len(removed) + 1):
        notes = balance_and_keep(gm, analysis, removed)
        keep = keep_masks(gm, analysis, removed)
        changed = False
        for node in channel_nodes(gm):
            if node.op in ("call_function", "call_method"):
                changed |= _literal_widths(node, keep, analysis, removed)
            elif (
                not borders
                and node.op == "call_module"
                and node.meta["channel_rule"] in ("conv", "grouped")
            ):
                changed |= _border_inputs(gm, node, keep, live, analysis, removed, kept)
        if not changed:
            return removed, notes + kept
    raise AssertionError("in_place_plan did not reach a fixed point")  # pragma: no cover


def _classes(node: fx.Node, analysis: ChannelAnalysis) -> np.ndarray:
    ids = node.meta.get("channels")
    arrays = ids if isinstance(ids, list) else [ids]
    parts = [analysis.class_of[flat(i)] for i in arrays if i is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _literal_widths(node: fx.Node, keep: dict, analysis, removed: np.ndarray) -> bool:
    """Freeze (or, for chunk, balance) the channels of a call with literal widths
    that the planned removal would change."""
    if target_name(node) == "chunk":
        return _balance_chunk(node, keep, analysis, removed)
    if target_name(node) not in _LITERAL_OPS or not _needs_new_args(node, keep):
        return False
    classes = _freeze_node(node, analysis)
    changed = bool(removed[classes].any())
    removed[classes] = False
    return changed


def _freeze_node(node: fx.Node, analysis: ChannelAnalysis) -> np.ndarray:
    """Freeze every class `node` reads or writes with the literal-width reason."""
    touched = [node] + [i for i in node.all_input_nodes if i.meta.get("channels") is not None]
    classes = np.unique(np.concatenate([_classes(n, analysis) for n in touched]))
    reason = f"{op_name(node)}: {LITERAL_REASON}"
    for cls in classes.tolist():
        analysis.frozen.setdefault(cls, reason)
        index = int(analysis.group_of_class[cls])
        if index >= 0:
            analysis.groups[index].frozen.setdefault(cls, reason)
    return classes


def freeze_literal_widths(gm: fx.GraphModule, analysis: ChannelAnalysis) -> int:
    """Freeze, before any decision, the channels that reach a call whose literal
    channel widths would have to change if they were pruned (every other
    unfrozen class is tried as removed). Returns how many classes it froze."""
    trial = np.zeros(analysis.num_classes, bool)
    trial[::2] = True
    trial[list(analysis.frozen)] = False
    keep = keep_masks(gm, analysis, trial)
    before = len(analysis.frozen)
    for node in channel_nodes(gm):
        if node.op in ("call_function", "call_method") and target_name(node) in _LITERAL_OPS:
            if _needs_new_args(node, keep):
                _freeze_node(node, analysis)
    return len(analysis.frozen) - before


def _needs_new_args(node: fx.Node, keep: dict) -> bool:
    """Would the compiler have to rewrite this call's literal arguments?"""
    saved = (node.target, node.args, node.kwargs)
    try:
        fix_literal_channel_args(node, keep)
        return (node.target, node.args, node.kwargs) != saved
    except (IndexError, ValueError):  # e.g. a slice left empty: it cannot stay as written
        return True
    finally:
        node.target, node.args, node.kwargs = saved


def _balance_chunk(node: fx.Node, keep: dict, analysis, removed: np.ndarray) -> bool:
    """`x.chunk(n, 1)`: every piece must lose as many channels (then chunk(n)
    of the narrower tensor still cuts at the right places)."""
    pieces = node.meta.get("channels")
    masks = keep.get(node)
    shape = tensor_shape(node.args[0])
    dim = concrete(node.args[2]) if len(node.args) > 2 else concrete(node.kwargs.get("dim", 0))
    if not isinstance(pieces, list) or shape is None or dim not in (1, 1 - len(shape)):
        return False
    kept = [int(m.sum()) for m in masks]
    if kept == _chunk_sizes(sum(kept), len(masks)):
        return False
    if len({len(m) for m in masks}) != 1:  # uneven pieces to begin with: keep them whole
        removed[np.concatenate([analysis.class_of[flat(i)] for i in pieces])] = False
        return True
    most = max(kept)  # removal only shrinks: every piece keeps as many as the fullest
    for ids in pieces:
        classes = analysis.class_of[flat(ids)]
        gone = np.nonzero(removed[classes])[0]
        allowed = len(classes) - most
        removed[classes[gone[allowed:]]] = False
    return True


def _chunk_sizes(total: int, n: int) -> list[int]:
    return [len(p) for p in torch.arange(total).chunk(n)] if total else [0] * n


def _border_inputs(gm, node: fx.Node, keep: dict, live: Liveness, analysis, removed, notes) -> bool:
    """Keep removed constant inputs a zero-padded conv would need a border term for."""
    conv = gm.get_submodule(node.target)
    x = node.args[0]
    if not zero_padded(conv) or not isinstance(keep.get(x), np.ndarray):
        return False
    need = ~keep[x] & live.const[x] & (live.values[x] != 0)
    if not need.any():
        return False
    removed[analysis.class_of[flat(x.meta["channels"])][need]] = False
    notes.append(
        f"{node.target}: kept {int(need.sum())} constant input channel(s) "
        "(a border term would change the model's code)"
    )
    return True


__all__ = ["LITERAL_REASON", "freeze_literal_widths", "in_place_plan", "keep_masks"]
