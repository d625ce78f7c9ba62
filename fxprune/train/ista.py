"""ISTA training of BatchNorm scales (Ye et al. 2018, Sections 4.1-4.2).

- `class_costs` / `layer_penalties`: λ of every channel from the traced graph (Eq. 2).
- `IstaOptimizer`: wraps SGD, Adam or AdamW; γ sit in their own param group
  (`param_groups_for`: no momentum, no weight decay), and after the inner step
  the proximal step γ ← sign(γ)·max(|γ| − s·ρ·λ, 0), s the step the optimizer
  took per unit gradient (lr for SGD, lr/(√v̂+ε) for Adam), makes γ exactly
  zero (a group-lasso prox over all BN sites of a channel with `group_ista`).
- `rescale` / `unscale`: the γ–W rescaling trick, refused wherever the
  function would change.
- `Monitor`: per-epoch diagnostics and the paper's tuning advice.

Training runs on the user's module; sites come from the traced GraphModule,
whose submodules have the same qualified names.

Eq. 2 itself lives in `fxprune.analysis.costs` (the only copy).
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxprune.analysis import ChannelAnalysis, Group, class_costs, site_classes
from fxprune.errors import UsageError


def bn_penalties(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, np.ndarray]:
    """λ of every channel of every BN module (module name -> array over its channels)."""
    nodes, lam = {n.name: n for n in gm.graph.nodes}, class_costs(gm, analysis)
    result: dict[str, np.ndarray] = {}
    for group in analysis.groups:
        for site in group.bn_sites:
            width = gm.get_submodule(site.module).num_features
            vector = result.setdefault(site.module, np.zeros(width))
            vector[site.positions] = lam[site_classes(nodes[site.node], site, analysis, "bn")]
    return result


def layer_penalties(gm: fx.GraphModule, analysis: ChannelAnalysis) -> dict[str, float]:
    """λ per BN module (Eq. 2); the mean over its channels when they differ."""
    return {name: float(vec.mean()) for name, vec in bn_penalties(gm, analysis).items()}


@dataclass
class PenaltyTarget:
    """The penalised channels of one BN module: `positions` into its γ, their λ and class."""

    module: str
    positions: np.ndarray
    lam: np.ndarray
    classes: np.ndarray


def penalty_targets(
    gm: fx.GraphModule, analysis: ChannelAnalysis, *, group_ista: bool = False
) -> list[PenaltyTarget]:
    """BN channels to penalise: classes not frozen, in groups with one BN site (the
    paper's ResNet choice) or, with `group_ista`, in every group that has BN sites."""
    nodes, lam = {n.name: n for n in gm.graph.nodes}, class_costs(gm, analysis)
    per_module: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for group in analysis.groups:
        if not group.bn_sites or (len(group.bn_sites) > 1 and not group_ista):
            continue
        for site in group.bn_sites:
            classes = site_classes(nodes[site.node], site, analysis, "bn")
            keep = np.array([int(c) not in group.frozen for c in classes], dtype=bool)
            per_module.setdefault(site.module, []).append((site.positions[keep], classes[keep]))
    targets = []
    for module, parts in per_module.items():
        positions = np.concatenate([p for p, _ in parts])
        classes = np.concatenate([c for _, c in parts])
        if len(positions):
            order = np.argsort(positions)
            positions, classes = positions[order], classes[order]
            targets.append(PenaltyTarget(module, positions, lam[classes], classes))
    return targets


# -- the optimizer ---------------------------------------------------------------


GAMMA_GROUP = {"weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": False}
ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


def param_groups_for(
    model: nn.Module,
    targets: list[PenaltyTarget] | list[str],
    weight_decay: float,
    *,
    adam_beta2: float | None = None,
) -> list[dict]:
    """Two param groups: everything with `weight_decay`, the penalised γ in their own.

    The γ group takes a plain gradient step before the prox, as in Eq. 1: no
    weight decay (it would fight the L1 prox) and no momentum (with momentum
    0.9 a zero γ is stable only while |∇γ| ≤ 0.1·ρλ, so ρ would act ten times
    weaker). For Adam/AdamW give `adam_beta2`: the γ group then has
    betas (0, β2) and `IstaOptimizer` scales the threshold by Adam's step.
    """
    names = {t.module if isinstance(t, PenaltyTarget) else str(t) for t in targets}
    gammas = [model.get_submodule(name).weight for name in sorted(names)]
    ids = {id(p) for p in gammas}
    others = [p for p in model.parameters() if id(p) not in ids]
    plain = {"weight_decay": 0.0, "betas": (0.0, adam_beta2)} if adam_beta2 else GAMMA_GROUP
    return [
        {"params": others, "weight_decay": weight_decay},
        {"params": gammas, **plain},
    ]


def gamma_group_problem(optimizer: torch.optim.Optimizer, group: dict) -> str | None:
    """Why the prox after `optimizer`'s step on `group` would not be Eq. 1 (None: it would).

    SGD: no momentum, no weight decay (a plain gradient step). Adam/AdamW: β1 = 0,
    no weight decay, no amsgrad (the threshold is then scaled by Adam's own
    per-parameter step lr/(√v̂+ε), so a zero stays zero while |∇γ| ≤ ρλ).
    """
    if group.get("weight_decay", 0):
        return f"weight_decay={group['weight_decay']}"
    if isinstance(optimizer, torch.optim.SGD):
        return f"momentum={group['momentum']}" if group.get("momentum", 0) else None
    if isinstance(optimizer, ADAM_FAMILY):
        if group.get("amsgrad"):
            return "amsgrad=True"
        return f"betas={tuple(group['betas'])} (β1 must be 0)" if group["betas"][0] else None
    return f"{type(optimizer).__name__} is not supported (SGD, Adam or AdamW)"


class IstaOptimizer(torch.optim.Optimizer):
    """`inner.step()`, then the ISTA prox on the γ of `targets`.

    Shares `param_groups` and `state` with `inner`, so LR schedulers attached to
    this object (or to `inner`) just work; the prox reads lr from the param
    group that holds each γ at every step. `rho` may be changed between steps.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        model: nn.Module,
        targets: list[PenaltyTarget],
        rho: float,
        *,
        group_ista: bool = False,
    ) -> None:
        state = inner.state
        self.inner = inner
        # Re-registers inner's own group dicts (same objects), which wipes state: restore it.
        super().__init__(list(inner.param_groups), inner.defaults)
        self.inner.state = state
        self.rho = float(rho)
        self.group_ista = group_ista
        if group_ista and isinstance(inner, ADAM_FAMILY):
            raise UsageError("--group-ista works with SGD only (its prox has one step per class)")
        self.entries = [self._entry(model, t) for t in targets]
        # Group lasso: every γ of a class is one vector; a class takes λ and lr from
        # its first entry (param_groups_for puts all γ in one group).
        classes = np.concatenate([t.classes for t in targets]) if targets else np.zeros(0, int)
        uniq, first, compact = np.unique(classes, return_index=True, return_inverse=True)
        owner = np.repeat(np.arange(len(targets)), [len(t.classes) for t in targets])
        lam = np.concatenate([t.lam for t in targets]) if targets else np.zeros(0)
        self._class_index = torch.as_tensor(compact, dtype=torch.long)
        self._class_lam = torch.as_tensor(lam[first], dtype=torch.float32)
        self._class_entry = torch.as_tensor(owner[first], dtype=torch.long)

    param_groups = property(  # type: ignore[assignment]
        lambda self: self.inner.param_groups,
        lambda self, value: setattr(self.inner, "param_groups", value),
    )
    state = property(  # type: ignore[assignment]
        lambda self: self.inner.state, lambda self, value: setattr(self.inner, "state", value)
    )

    def _entry(self, model: nn.Module, target: PenaltyTarget) -> dict:
        gamma = model.get_submodule(target.module).weight
        holders = [
            i for i, g in enumerate(self.param_groups) if any(p is gamma for p in g["params"])
        ]
        if not holders:
            raise UsageError(f"γ of {target.module} is not in the optimizer's parameters")
        index = holders[0]
        problem = gamma_group_problem(self.inner, self.param_groups[index])
        if problem:
            raise UsageError(
                f"γ of {target.module} is in a param group with {problem}: the prox needs a "
                "plain step; build the groups with param_groups_for()"
            )
        full = len(target.positions) == gamma.numel()
        positions = None if full else torch.as_tensor(target.positions, device=gamma.device)
        lam = torch.as_tensor(target.lam, dtype=gamma.dtype, device=gamma.device)
        return {"gamma": gamma, "group": index, "positions": positions, "lam": lam}

    def step(self, closure=None):
        loss = self.inner.step(closure)
        self.prox()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def prox(self) -> None:
        """The proximal step of ρ·Σλ|γ| (or of the group lasso over each class)."""
        if self.group_ista:
            return self._group_prox()
        for e in self.entries:
            shrink = e["lam"] * (self._step_size(e) * self.rho)
            gamma = e["gamma"]
            if e["positions"] is None:
                gamma.copy_(gamma.sign() * (gamma.abs() - shrink).clamp_(min=0))
            else:
                g = gamma[e["positions"]]
                gamma[e["positions"]] = g.sign() * (g.abs() - shrink).clamp_(min=0)

    def _step_size(self, e: dict) -> float | torch.Tensor:
        """The step the inner optimizer just took per unit gradient: lr for SGD,
        lr/(√v̂+ε) per γ for Adam (β1 = 0; before Adam's first step on γ, lr)."""
        group = self.param_groups[e["group"]]
        state = self.state.get(e["gamma"], {})
        if not isinstance(self.inner, ADAM_FAMILY) or "exp_avg_sq" not in state:
            return group["lr"]
        beta2, step = group["betas"][1], float(state["step"])
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        size = group["lr"] / denom
        return size if e["positions"] is None else size[e["positions"]]

    def _group_prox(self) -> None:
        """Scale each class's vector of γ over all its BN sites by max(0, 1 − t/‖γ‖₂)."""
        if not self.entries:
            return
        values = torch.cat([self._gather(e) for e in self.entries])
        device = values.device
        index, lam = self._class_index.to(device), self._class_lam.to(device, values.dtype)
        lrs = torch.tensor([self.param_groups[e["group"]]["lr"] for e in self.entries])
        lr = lrs.to(device, values.dtype)[self._class_entry.to(device)]
        norm = torch.zeros_like(lam).index_add_(0, index, values * values).sqrt_()
        factor = (1 - lr * self.rho * lam / norm.clamp_min(1e-30)).clamp_(min=0)
        values *= factor[index]
        start = 0
        for e in self.entries:
            size = e["lam"].numel()
            self._scatter(e, values[start : start + size])
            start += size

    @staticmethod
    def _gather(e: dict) -> torch.Tensor:
        gamma = e["gamma"].detach()
        return gamma.reshape(-1) if e["positions"] is None else gamma[e["positions"]]

    @staticmethod
    def _scatter(e: dict, values: torch.Tensor) -> None:
        if e["positions"] is None:
            e["gamma"].copy_(values)
        else:
            e["gamma"][e["positions"]] = values

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "ista": {"rho": self.rho}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        self.rho = float(state_dict["ista"]["rho"])


def lasso_term(model: nn.Module, targets: list[PenaltyTarget]) -> float:
    """Σ λ·|γ| over the penalised channels (without ρ)."""
    total = 0.0
    for t in targets:
        gamma = model.get_submodule(t.module).weight.detach().cpu().double()
        total += float((gamma[t.positions].abs() * torch.as_tensor(t.lam)).sum())
    return total


def suggest_rho(ce: float, lasso: float) -> float:
    """ρ that makes ρ·lasso equal the cross-entropy (the paper: same magnitude)."""
    if lasso <= 0 or not math.isfinite(lasso):
        raise UsageError("the lasso term is 0: no BatchNorm γ to penalise, cannot suggest ρ")
    return ce / lasso


def suggest_alpha(gamma_mean: float, lr: float, lam: float, rho: float) -> float:
    """α that puts the rescaled γ near 100·μ·λ·ρ (about 100 prox steps from zero)."""
    return 100 * lr * lam * rho / max(gamma_mean, 1e-12)


# -- γ–W rescaling ----------------------------------------------------------------

_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.cat, torch.concat,
    torch.split, torch.chunk, torch.transpose, torch.permute, torch.mean, operator.getitem,
}  # fmt: skip
_HOMOGENEOUS_METHODS = {
    "relu", "relu_", "view", "reshape", "flatten", "contiguous", "split", "chunk", "squeeze",
    "unsqueeze", "transpose", "permute", "mean", "view_as", "reshape_as",
}  # fmt: skip
_ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
        "add", "add_", "sub", "sub_"}  # fmt: skip
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CONSUMERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_homogeneous(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def _arithmetic_ok(node: fx.Node, scaled: set[fx.Node]) -> bool:
    """add/sub of scaled tensors only; mul by, or div of, exactly one scaled operand."""
    args = list(node.args)
    tensors = [a for a in args if isinstance(a, fx.Node) and "tensor_meta" in a.meta]
    inside = [a in scaled for a in tensors]
    if node.target in _ADD:  # x + 1 is not homogeneous; torch.add(x, y, alpha=2) is
        return len(tensors) == len(args) and all(inside)
    if node.target in _MUL:
        return sum(inside) == 1
    if node.target in _DIV:
        return bool(args) and args[0] in scaled and sum(inside) == 1
    return False


def _path_problem(gm: fx.GraphModule, bn_nodes: set[fx.Node]) -> str | None:
    """Why scaling the outputs of `bn_nodes` by α would change the function (None: it would not).

    Walks the graph in order: every node reading a scaled tensor must be a
    positively homogeneous op (its output is scaled too), a conv/Linear consumer
    (which absorbs 1/α), or a shape read.
    """
    scaled = set(bn_nodes)
    for node in gm.graph.nodes:
        reads_scaled = any(i in scaled for i in node.all_input_nodes)
        if node in bn_nodes and reads_scaled:
            return f"BatchNorm {node.target} normalises channels another of its BNs scaled"
        if node in scaled or not reads_scaled:
            continue
        if node.op == "output":
            return "its channels reach the model output"
        if "tensor_meta" not in node.meta:
            continue  # x.size(), x.dim(): shapes do not change
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, _CONSUMERS):
            if getattr(module, "groups", 1) > 1 and module.groups == module.in_channels:
                return f"depthwise conv {node.target} is not a consumer that can absorb 1/α"
            continue
        if _is_homogeneous(node, gm) or (
            node.target in _ADD | _MUL | _DIV and _arithmetic_ok(node, scaled)
        ):
            scaled.add(node)
            continue
        what = (
            f"{node.target} ({type(module).__name__})"
            if module
            else str(getattr(node.target, "__name__", node.target))
        )
        return f"path to the consumers goes through {what}, not positively homogeneous"
    return None


def _scale_units(analysis: ChannelAnalysis, group_ista: bool) -> list[Group]:
    return [
        g for g in analysis.groups
        if g.bn_sites and g.prunable and (len(g.bn_sites) == 1 or group_ista)
    ]  # fmt: skip


def _scale_group(model: nn.Module, gm, analysis, group: Group, factor: float) -> None:
    """γ, β of every BN site of `group` times `factor`, consumer input weights divided."""
    nodes = {n.name: n for n in gm.graph.nodes}
    classes = set(group.classes.tolist())
    with torch.no_grad():
        for site in group.bn_sites:
            bn = model.get_submodule(site.module)
            positions = torch.as_tensor(site.positions, device=bn.weight.device)
            bn.weight[positions] *= factor
            bn.bias[positions] *= factor
        for site in group.consumers:
            cls = site_classes(nodes[site.node], site, analysis, "consumer")
            mine = site.positions[[int(c) in classes for c in cls]]
            _divide_inputs(model.get_submodule(site.module), mine, factor)


def _divide_inputs(module: nn.Module, positions: np.ndarray, factor: float) -> None:
    weight = module.weight
    if isinstance(module, nn.Linear) or module.groups == 1:
        weight[:, torch.as_tensor(positions, device=weight.device)] /= factor
        return
    per_in, per_out = weight.shape[1], weight.shape[0] // module.groups
    for p in positions.tolist():  # grouped conv: input p feeds only its group's outputs
        g = p // per_in
        weight[g * per_out : (g + 1) * per_out, p % per_in] /= factor


def rescale(
    model: nn.Module, gm: fx.GraphModule, analysis: ChannelAnalysis, alpha: float,
    *, group_ista: bool = False,
) -> list[str]:  # fmt: skip
    """γ–W rescaling: multiply γ and β of each penalised BN by α, divide its consumers' weights.

    The function is unchanged (eval and train mode) where every path from the
    BN to its consumers is positively homogeneous; elsewhere the BN is left
    alone. Returns one reason per refused BN module.
    """
    if not alpha > 0:
        raise UsageError(f"α must be positive, got {alpha}")
    refused = []
    nodes = {n.name: n for n in gm.graph.nodes}
    for group in _scale_units(analysis, group_ista):
        problem = _path_problem(gm, {nodes[s.node] for s in group.bn_sites})
        if problem:
            refused += [f"{s.module}: {problem}" for s in group.bn_sites]
        elif alpha != 1:
            _scale_group(model, gm, analysis, group, alpha)
    return refused


def unscale(
    model: nn.Module, gm: fx.GraphModule, analysis: ChannelAnalysis, alpha: float,
    *, group_ista: bool = False,
) -> list[str]:  # fmt: skip
    """Undo `rescale` with the same α (γ that reached zero stay exactly zero)."""
    return rescale(model, gm, analysis, 1.0 / alpha, group_ista=group_ista)


# -- monitor -------------------------------------------------------------------


class Monitor:
    """Per-epoch records (cross-entropy, the lasso term ρ·Σλ|γ| as "lasso" and Σλ|γ| as
    "lasso_sum", γ sparsity, accuracy) and the paper's tuning advice as warning
    strings. `to_jsonl()` gives the JSON lines."""

    def __init__(self, model: nn.Module, targets: list[PenaltyTarget], num_classes: int) -> None:
        self.model, self.targets, self.num_classes = model, targets, num_classes
        self.history: list[dict] = []

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """Fraction of penalisable γ exactly 0: overall and per BN module."""
        zeros = total = 0
        layers = {}
        for t in self.targets:
            gamma = self.model.get_submodule(t.module).weight.detach()
            z = int((gamma[torch.as_tensor(t.positions, device=gamma.device)] == 0).sum())
            layers[t.module] = z / len(t.positions)
            zeros, total = zeros + z, total + len(t.positions)
        return (zeros / total if total else 0.0), layers

    def record(self, epoch: int, *, ce: float, accuracy: float, rho: float = 1.0, **extra) -> dict:
        """Add the epoch's record (with diagnostics in "warnings") and return it."""
        overall, layers = self.sparsity()
        total = lasso_term(self.model, self.targets)
        rec = {"epoch": epoch, "ce": ce, "lasso": rho * total, "lasso_sum": total, "rho": rho,
               "sparsity": overall, "accuracy": accuracy, **extra, "layers": layers}  # fmt: skip
        self.history.append(rec)
        rec["warnings"] = self.diagnose()
        return rec

    def diagnose(self) -> list[str]:
        """The paper's advice (Section 4.2) applied to the last epochs."""
        h = [r for r in self.history if r.get("rho", 1) > 0]
        advice = []
        if len(h) >= 3:
            lasso = [r["lasso"] for r in h[-3:]]
            drops = [lasso[0] - lasso[1], lasso[1] - lasso[2]]
            linear = min(drops) > 0 and abs(drops[0] - drops[1]) <= 0.5 * max(drops)
            if linear and h[-1]["sparsity"] < 0.01:
                advice.append("lasso falls linearly while sparsity stays ~0: decrease α")
            ce = [r["ce"] for r in h[-3:]]
            if max(ce) - min(ce) <= 0.01 * max(ce) and min(drops) > 0:
                advice.append("cross-entropy is flat while γ shrink: decrease the lr μ or ρ")
        if h and (h[-1]["sparsity"] >= 0.9 or any(v == 1.0 for v in h[-1]["layers"].values())):
            advice.append("sparsity races to 100% (a layer is fully zero): decrease ρ")
        if len(h) >= 2 and h[-1]["ce"] >= 0.9 * math.log(max(self.num_classes, 2)):
            advice.append("cross-entropy is at chance level: decrease μ or ρ")
        return advice

    def to_jsonl(self) -> str:
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))


__all__ = [
    "IstaOptimizer",
    "Monitor",
    "PenaltyTarget",
    "bn_penalties",
    "lasso_term",
    "layer_penalties",
    "param_groups_for",
    "penalty_targets",
    "rescale",
    "suggest_alpha",
    "suggest_rho",
    "unscale",
]
