"""Stage 5, compile: constant propagation + dead-channel elimination.

`compile_model(traced)` copies the analysed graph (or, with `consume`, takes it
over), decides which channel classes can go (every position constant or dead,
not frozen, groups kept balanced, no layer left empty), slices producers,
BatchNorms and consumers, folds the constants the consumers read into them
(exactly, see DESIGN.md "Exact absorption"), replaces constant residual branches
by a constant and ends with a lint, dead-code elimination and the compact
GraphModule's code. The user's model is never mutated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.fx as fx

from fxprune.analysis import ANALYSIS_KEY, analyse
from fxprune.compile.dce import eliminate_dead_code
from fxprune.compile.liveness import find_liveness
from fxprune.compile.plan import ChannelPlan
from fxprune.compile.removal import balance_and_keep, removable_classes, widen
from fxprune.compile.rewrite import Rewriter
from fxprune.errors import CheckpointError, UsageError
from fxprune.trace import Traced, propagate_shapes
from fxprune.trace.graph_module import graph_module

ABSORB_MODES = ("exact", "bias")


@dataclass
class CompileOptions:
    """How to compile. `absorb="bias"` is the paper's fold (inexact at padded
    borders); `"exact"` adds the border term."""

    absorb: str = "exact"
    round_to: int = 1  # keep every producer's width a multiple of this
    min_width: int = 1  # and at least this many channels

    def __post_init__(self) -> None:
        if self.round_to < 1 or self.min_width < 1:
            raise UsageError("--round-to and --min-width must be at least 1")
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
    plan: ChannelPlan | None = None  # the structural decisions, as data (checkpoints)

    @property
    def changed(self) -> bool:
        return self.removed_classes > 0 or any("branch" in n for n in self.notes)


def compile_model(
    traced: Traced,
    options: CompileOptions | None = None,
    *,
    plan: ChannelPlan | None = None,
    consume: bool = False,
) -> CompileResult:
    """Remove every removable channel of `traced.gm`; return a new GraphModule.

    The result computes the same function in eval mode (up to float rounding;
    with `absorb="bias"` up to the paper's border error). `result.plan` records
    the structural decisions. Given a `plan`, the compiler takes its decisions
    instead of reading the weights and rebuilds the same structure, with
    placeholder values until the matching state_dict is loaded (checkpoints).

    The traced model is left as it was, unless `consume`: then its graph becomes
    the compact model's (no copy of it is made) and `traced` must not be used
    again. The modules and tensors of the user's model are never edited either way.
    """
    options = options or CompileOptions()
    gm = traced.gm if consume and _in_eval_mode(traced.gm) else working_copy(traced.gm)
    if not any("tensor_meta" in node.meta for node in gm.graph.nodes):
        propagate_shapes(gm, traced.example)  # a GraphModule that was never traced by us
    analysis = traced.gm.meta.get(ANALYSIS_KEY) if _analysed(traced.gm) else None
    analysis = analysis or analyse(gm)
    modules = dict(gm.named_modules())  # read by liveness, then kept current by the rewriter
    if plan is None:
        liveness = find_liveness(gm, traced.example, modules)
        removed, notes = _decide(gm, analysis, liveness, options)
    else:
        liveness, removed, notes = None, _replayed_mask(plan, analysis.num_classes), []
    rewriter = Rewriter(
        gm, analysis, liveness, removed, options.absorb, replay=plan, modules=modules
    )
    rewriter.apply()
    notes += rewriter.notes
    lint_structure(gm.graph)
    eliminate_dead_code(gm)
    drop_type_annotations(gm)
    # a plain GraphModule holding only the modules and tensors the graph uses; its code
    # is generated here, once (the working copy never generated any)
    gm = graph_module(gm, gm.graph, gm.__class__.__name__)
    for node in gm.graph.nodes:  # structure changed: the old analysis is stale
        node.meta.pop("channels", None)
        node.meta.pop("channel_rule", None)
    gm.meta.clear()
    return CompileResult(gm, int(removed.sum()), analysis.num_classes, notes, rewriter.plan())


def _decide(gm, analysis, liveness, options: CompileOptions):
    """The classes to remove (a mask) and notes on what was kept, from the weights."""
    removed = removable_classes(gm, analysis, liveness)
    notes = balance_and_keep(gm, analysis, removed)
    notes += widen(gm, analysis, removed, round_to=options.round_to, min_width=options.min_width)
    return removed, notes


def _replayed_mask(plan: ChannelPlan, num_classes: int):
    if plan.num_classes != num_classes:
        raise CheckpointError(
            f"the channel plan is for {plan.num_classes} channel classes, the traced base "
            f"has {num_classes} (compiled by another fxprune version?)"
        )
    return plan.mask()


def working_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph (node.meta copied, names kept)
    that shares `gm`'s modules and tensors: nothing is copied that the rewriter
    does not replace, and `gm` itself is never changed. A model with modules in
    training mode is deep-copied and put in eval mode instead.

    The copy's code is generated only if it is called: the compiler reads and edits
    its graph and ends with a new GraphModule (generating code costs as much as
    tracing)."""
    if not _in_eval_mode(gm):
        return copy.deepcopy(gm).eval()
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    clone = graph_module(gm, graph, type(gm).__name__, lazy=True)
    clone.training = False
    return clone


def _in_eval_mode(gm: fx.GraphModule) -> bool:
    return not any(module.training for module in gm.modules())


def _analysed(gm: fx.GraphModule) -> bool:
    """`analyse` ran on this very graph (its channel ids are on the nodes)."""
    return ANALYSIS_KEY in gm.meta and any("channels" in n.meta for n in gm.graph.nodes)


def lint_structure(graph: fx.Graph) -> None:
    """fx's `Graph.lint` (every node's inputs defined before it, names unique, nodes
    of this graph) without its walk of every `call_module`/`get_attr` target through
    `nn.Module.__getattr__`, which cost 0.9 of its 1.0 ms on mobilenet_v3_large: the
    GraphModule the compiler builds next resolves each target itself (a missing one
    raises there). fx checks targets only for a graph that has an owning module."""
    owner = graph.owning_module
    graph.owning_module = None
    try:
        graph.lint()
    finally:
        graph.owning_module = owner


def drop_type_annotations(gm: fx.GraphModule) -> None:
    """Forget the user's type annotations on graph nodes: fx prints them with
    mangled names (`x : _Tensor_`) that TorchScript cannot resolve, which made
    every `torch.jit.script` of a compiled model fail. They carry no meaning
    for the compact model."""
    for node in gm.graph.nodes:
        node.type = None


__all__ = [
    "ABSORB_MODES",
    "CompileOptions",
    "CompileResult",
    "compile_model",
    "drop_type_annotations",
]
