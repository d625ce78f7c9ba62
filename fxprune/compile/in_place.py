"""The in-place back end: shrink the user's own Conv / BatchNorm / Linear modules.

`prune_(model, example)` traces and analyses a deep copy of `model`, decides
the removal plan with the compiler's own liveness and removal code (narrowed
by `in_place_plan` to what module surgery alone does exactly), slices the
modules of the traced copy with the compiler's `Rewriter` (constants folded
into conv / linear biases and BatchNorm running means), then copies the new
tensors and widths into a second deep copy of `model` and verifies it against
the original (≤ `TOLERANCE`). Only then are the same tensors put into `model`
itself, module by module: `type(model)` and every submodule's class survive,
so the user's own trainer, exporter and saving code keep working. On any
failure `model` is left exactly as it was.

Parameters keep their identity where they existed (`param.data` is replaced),
so hooks and references stay valid; an optimizer built before `prune_` holds
state of the old shapes: build a new one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis import ChannelAnalysis, analyse
from fxprune.compile.in_place_plan import LITERAL_REASON, freeze_literal_widths, in_place_plan
from fxprune.compile.liveness import find_liveness
from fxprune.compile.rewrite import Rewriter
from fxprune.compile.zeroing import apply_sparsity, apply_threshold
from fxprune.errors import CompileError, UsageError, VerificationError
from fxprune.modules import BorderTerm, ConvWithBorder
from fxprune.trace import trace_model
from fxprune.verify import TOLERANCE, relative_error, run_model, verify_equal

_TENSORS = ("weight", "bias", "running_mean", "running_var")
_WIDTHS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")
_LAYER_RULES = ("conv", "grouped", "depthwise", "bn")
BORDER_MODES = ("keep", "wrap")


@dataclass
class LayerChange:
    """One module that changed: its path, class and widths before → after."""

    module: str
    kind: str
    before: dict[str, int]
    after: dict[str, int]

    def __str__(self) -> str:
        widths = ", ".join(
            f"{k} {self.before[k]}→{self.after[k]}"
            for k in self.after
            if self.before.get(k) != self.after[k]
        )
        return f"{self.module} ({self.kind}): {widths or 'constants absorbed'}"


@dataclass
class PruneReport:
    """What `prune_` did: changed layers, frozen channels by reason, notes,
    parameter counts and the verified max relative error."""

    layers: list[LayerChange]
    frozen: dict[str, int]
    removed_classes: int
    total_classes: int
    params_before: int
    params_after: int
    max_error: float
    zeroed: int = 0
    drift: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines a person can read: counts, then every changed layer and frozen reason."""
        lines = [
            f"removed {self.removed_classes} of {self.total_classes} channels in place; "
            f"parameters {self.params_before:,} → {self.params_after:,}; "
            f"max relative error {self.max_error:.2e}"
        ]
        lines += [f"  {change}" for change in self.layers]
        lines += [f"  frozen: {count} channel(s): {why}" for why, count in self.frozen.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "removed_classes": self.removed_classes,
            "total_classes": self.total_classes,
            "params": {"before": self.params_before, "after": self.params_after},
            "max_relative_error": self.max_error,
            "zeroed": self.zeroed,
            "output_drift_from_zeroing": self.drift,
            "layers": [vars(change) for change in self.layers],
            "frozen": self.frozen,
            "notes": self.notes,
        }


def prune_(
    model: nn.Module,
    example: torch.Tensor,
    *,
    threshold: float | None = None,
    sparsity: float | None = None,
    border: str = "keep",
    verify: int = 3,
    seed: int = 0,
) -> PruneReport:
    """Remove, in place, every channel of `model` that is provably constant or dead
    (BatchNorm γ exactly 0 after ISTA; or |γ| ≤ `threshold`; or the `sparsity`
    fraction with the smallest |γ|·λ), keeping `model`'s classes.

    The pruned `model` computes the same function as before in eval mode (as
    the zeroed model, when `threshold`/`sparsity` zeroed channels) within
    TOLERANCE on `example` and `verify - 1` random inputs of its shape;
    otherwise VerificationError is raised and `model` is not modified.

    A removed constant channel read by a zero-padded conv changes the conv's
    output at the border. `border="keep"` (default) keeps such channels, so no
    module changes class; `border="wrap"` removes them and puts the conv in a
    `fxprune.modules.ConvWithBorder` (the conv plus its exact border term) in
    its parent module.
    """
    if border not in BORDER_MODES:
        raise UsageError(f"border must be one of {', '.join(BORDER_MODES)}, not {border!r}")
    if verify < 1:
        raise UsageError("verify must be ≥ 1: in-place pruning is always verified")
    surgery = plan_surgery(model, example, threshold=threshold, sparsity=sparsity, border=border)
    work = copy.deepcopy(model)
    surgery.apply(work)
    reference = model
    if surgery.zeroed:  # the reference is the zeroed, unpruned model
        reference = copy.deepcopy(model)
        reference.load_state_dict(surgery.zeroed_state, strict=False)
    error = verify_equal(reference, work, example, verify, seed)
    if not error <= TOLERANCE:
        raise VerificationError(
            f"in-place pruned model differs from the original by {error:.2e} "
            f"(> {TOLERANCE:g}); the model was not modified"
        )
    drift = None
    if surgery.zeroed:
        drift = relative_error(run_model(model, example), run_model(reference, example))
    params_before = _params(model)
    layers = surgery.apply(model)
    return PruneReport(
        layers, _frozen_counts(surgery.analysis), int(surgery.removed.sum()),
        surgery.analysis.num_classes, params_before, _params(model), error, surgery.zeroed,
        drift, surgery.notes,
    )  # fmt: skip


@dataclass
class Surgery:
    """What to do to a model (or a deep copy of it): zeroed γ to load, sliced
    modules to transplant by path, border terms to wrap around convs."""

    analysis: ChannelAnalysis
    removed: np.ndarray
    changed: dict[str, nn.Module]
    borders: dict[str, BorderTerm]
    zeroed: int
    zeroed_state: dict[str, torch.Tensor]
    notes: list[str]

    def apply(self, model: nn.Module) -> list[LayerChange]:
        """Carry the surgery out on `model`; return the changed layers. CompileError,
        before anything changes, when a layer of the plan is not in `model`."""
        for path in list(self.changed) + list(self.borders):
            try:
                model.get_submodule(path)
            except AttributeError:
                raise CompileError(
                    f"the traced graph names a layer {path!r} that {type(model).__name__} "
                    "does not have: cannot prune it in place"
                ) from None
        if self.zeroed:
            model.load_state_dict(self.zeroed_state, strict=False)
        layers = []
        for path, module in self.changed.items():
            target = model.get_submodule(path)
            before = _widths(target)
            transplant(module, target)
            layers.append(LayerChange(path, type(target).__name__, before, _widths(target)))
        wrap_borders(model, self.borders)
        return layers


def plan_surgery(
    model: nn.Module, example: torch.Tensor, *, threshold=None, sparsity=None, border="keep"
) -> Surgery:
    """Trace and analyse a deep copy of `model`, zero (threshold / sparsity), decide
    what goes (`in_place_plan`) and slice the copy's layers (`Rewriter`)."""
    gm = trace_model(model, example).gm
    analysis = analyse(gm)
    freeze_literal_widths(gm, analysis)
    zeroed = _zero(gm, threshold, sparsity)
    state = {k: v.detach().clone() for k, v in gm.state_dict().items()} if zeroed else {}
    live = find_liveness(gm, example)
    removed, notes = in_place_plan(gm, analysis, live, borders=border == "wrap")
    changed, borders = _rewrite(gm, analysis, live, removed)
    notes += [f"{path}: wrapped with its exact border term (ConvWithBorder)" for path in borders]
    return Surgery(analysis, removed, changed, borders, zeroed, state, notes)


def _zero(gm: fx.GraphModule, threshold: float | None, sparsity: float | None) -> int:
    if threshold is not None:
        return apply_threshold(gm, threshold)
    if sparsity is not None:
        return apply_sparsity(gm, sparsity)
    return 0


def _rewrite(gm: fx.GraphModule, analysis: ChannelAnalysis, live, removed) -> tuple[dict, dict]:
    """Slice the traced copy's layers; return {path: new module} for those that
    changed and {conv path: BorderTerm} for the convs that need one."""
    layer_paths = [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and n.meta.get("channel_rule") in _LAYER_RULES
    ]
    before = {p: _tensor_ids(gm.get_submodule(p)) for p in layer_paths}
    rewriter = Rewriter(gm, analysis, live, removed, "exact", graph_edits=False)
    rewriter.apply()
    changed = {
        p: gm.get_submodule(p) for p in layer_paths if _tensor_ids(gm.get_submodule(p)) != before[p]
    }
    return changed, rewriter.borders


def wrap_borders(model: nn.Module, borders: dict[str, BorderTerm]) -> None:
    """Put each conv at a path of `borders` into a ConvWithBorder, in its parent."""
    for path, border in borders.items():
        parent_name, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, name)
        setattr(parent, name, ConvWithBorder(conv, copy.deepcopy(border)))


def _tensor_ids(module: nn.Module) -> tuple:
    return tuple(id(getattr(module, name, None)) for name in _TENSORS)


def transplant(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the tensors and widths of `source` (a sliced copy of it).

    Existing parameters keep their identity (`.data` is replaced); a bias that
    did not exist becomes a new parameter; buffers are replaced.
    """
    for name in _TENSORS:
        new = getattr(source, name, None)
        if new is None:
            continue
        new = new.detach().clone()
        if name in target._parameters:
            old = target._parameters[name]
            if old is None:
                grad = target.weight.requires_grad
                target._parameters[name] = nn.Parameter(new, requires_grad=grad)
            else:
                old.data = new.to(old.dtype)
        elif name in target._buffers:
            target._buffers[name] = new
        else:
            raise VerificationError(f"cannot put {name} into {type(target).__name__}")
    for attr in _WIDTHS:
        if hasattr(source, attr) and hasattr(target, attr):
            setattr(target, attr, getattr(source, attr))


def _widths(module: nn.Module) -> dict[str, int]:
    values = {a: getattr(module, a, None) for a in _WIDTHS}
    return {a: int(v) for a, v in values.items() if isinstance(v, int)}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _frozen_counts(analysis: ChannelAnalysis) -> dict[str, int]:
    """Frozen channels of groups a module touches, counted per reason."""
    counts: dict[str, int] = {}
    for group in analysis.groups:
        for reason in group.frozen.values():
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


__all__ = [
    "BORDER_MODES",
    "LITERAL_REASON",
    "LayerChange",
    "PruneReport",
    "prune_",
    "transplant",
    "wrap_borders",
]
