"""Stage 5, compile: constant propagation + dead-channel elimination.

`compile_model(traced)` copies the analysed graph, decides which channel
classes can go (every position constant or dead, not frozen, groups kept
balanced, no layer left empty), slices producers, BatchNorms and consumers,
folds the constants the consumers read into them (exactly, see DESIGN.md
"Exact absorption"), replaces constant residual branches by a constant and
ends with `lint()`, `eliminate_dead_code()`, `recompile()`. The input model
is never mutated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.channel_rules import AUGMENTED
from fxprune.channels import ChannelAnalysis, analyse
from fxprune.errors import CompileError, UsageError
from fxprune.liveness import Liveness, channel_nodes, find_liveness, flat
from fxprune.rewrite import Rewriter
from fxprune.trace import Traced, propagate_shapes

ABSORB_MODES = ("exact", "bias")


@dataclass
class CompileOptions:
    """How to compile. `absorb="bias"` is the paper's fold (inexact at padded
    borders); `"exact"` adds the border term."""

    absorb: str = "exact"

    def __post_init__(self) -> None:
        if self.absorb not in ABSORB_MODES:
            raise UsageError(
                f"--absorb must be one of {', '.join(ABSORB_MODES)}, not '{self.absorb}'"
            )


@dataclass
class CompileResult:
    """The compact model and what happened to it."""

    gm: fx.GraphModule
    removed_classes: int
    total_classes: int
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.removed_classes > 0 or any("branch" in n for n in self.notes)


def compile_model(traced: Traced, options: CompileOptions | None = None) -> CompileResult:
    """Remove every removable channel of `traced.gm`; return a new GraphModule.

    The result computes the same function in eval mode (up to float rounding;
    with `absorb="bias"` up to the paper's border error).
    """
    options = options or CompileOptions()
    gm = copy.deepcopy(traced.gm).eval()  # keeps node.meta: the traced shapes still hold
    if not any("tensor_meta" in node.meta for node in gm.graph.nodes):
        propagate_shapes(gm, traced.example)  # a GraphModule that was never traced by us
    analysis = analyse(gm)
    liveness = find_liveness(gm, traced.example)
    removed = removable_classes(gm, analysis, liveness)
    notes = balance_and_keep(gm, analysis, removed)
    rewriter = Rewriter(gm, analysis, liveness, removed, options.absorb)
    rewriter.apply()
    notes += rewriter.notes
    gm.graph.lint()
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    for node in gm.graph.nodes:  # structure changed: the old analysis is stale
        node.meta.pop("channels", None)
        node.meta.pop("channel_rule", None)
    gm.meta.clear()
    return CompileResult(gm, int(removed.sum()), analysis.num_classes, notes)


_PURE_MODULES = ("torch", "operator", "_operator", "math", "builtins")


def _mutates_input(node: fx.Node, gm: fx.GraphModule) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    in_place_name = name.endswith("_") and not name.endswith("__")
    augmented = node.op == "call_function" and name in AUGMENTED
    return in_place_name or augmented or bool(node.kwargs.get("inplace", False))


def _side_effect_free(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "get_attr" or node.op == "call_method":
        return True
    if node.op == "call_module":
        module = type(gm.get_submodule(node.target))
        return module.__module__.startswith("torch.nn") or module.__name__ == "BorderTerm"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        return module.split(".")[0] in _PURE_MODULES
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Erase unused nodes that provably have no side effects.

    fx's own pass treats every call as pure; wrapped user functions and
    in-place ops (`x.add_(y)` whose result is unused) must stay.
    """
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            if not _side_effect_free(node, gm):
                continue
            if _mutates_input(node, gm) and node.args and isinstance(node.args[0], fx.Node):
                if len(node.args[0].users) > 1:
                    continue
            gm.graph.erase_node(node)
            changed = True


def removable_classes(gm: fx.GraphModule, analysis: ChannelAnalysis, live: Liveness) -> np.ndarray:
    """Boolean mask over classes: not frozen, and constant or dead wherever they appear."""
    ok = np.ones(analysis.num_classes, bool)
    ok[list(analysis.frozen)] = False
    for node in channel_nodes(gm):
        ids, const, dead = node.meta["channels"], live.const[node], live.dead[node]
        pieces = (
            zip(ids, const, dead, strict=True) if isinstance(ids, list) else [(ids, const, dead)]
        )
        for i, c, d in pieces:
            if i is not None:
                ok[analysis.class_of[flat(i)][~(c | d)]] = False
    return ok


def balance_and_keep(
    gm: fx.GraphModule, analysis: ChannelAnalysis, removed: np.ndarray
) -> list[str]:
    """Shrink `removed` (in place) until grouped convs stay balanced and no
    tensor loses all its channels. Returns notes on what was kept."""
    notes: list[str] = []
    modules = dict(gm.named_modules())
    changed = True
    while changed:
        changed = False
        for node in channel_nodes(gm):
            ids = node.meta["channels"]
            for i in ids if isinstance(ids, list) else [ids]:
                if i is None:
                    continue
                classes = analysis.class_of[flat(i)]
                if removed[classes].all():
                    removed[classes[0]] = False
                    notes.append(f"{node.name}: kept 1 channel (never a zero-width layer)")
                    changed = True
            if node.meta["channel_rule"] == "grouped":
                changed |= _balance(node, modules[node.target], analysis, removed, notes)
    return notes


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


def max_relative_error(expected, actual) -> float:
    """max |expected - actual| / max |expected| over all tensor outputs."""
    exp, act = _tensors(expected), _tensors(actual)
    if len(exp) != len(act):
        raise CompileError(f"outputs differ in structure: {len(exp)} vs {len(act)} tensors")
    worst, scale = 0.0, 1e-12
    for e, a in zip(exp, act, strict=True):
        if e.shape != a.shape:
            raise CompileError(f"output shape changed: {tuple(e.shape)} -> {tuple(a.shape)}")
        worst = max(worst, float((e.double() - a.double()).abs().max()) if e.numel() else 0.0)
        scale = max(scale, float(e.double().abs().max()) if e.numel() else 0.0)
    return worst / scale


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def run_model(module: nn.Module, x: torch.Tensor):
    """Eval-mode, no-grad forward pass."""
    module.eval()
    with torch.no_grad():
        return module(x)
