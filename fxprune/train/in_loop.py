"""ISTA in the user's own training loop: no fxprune trainer needed.

    ista = fxprune.ista_for(model, example, rho=1e-3)
    optimizer = ista.wrap(torch.optim.SGD(ista.param_groups(weight_decay=5e-4), lr=0.05))
    for x, y in loader:                      # the user's loop, loss and schedule
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()                     # the inner step, then the ISTA prox on γ
    print(ista.sparsity(), ista.lasso())
    ista.recalibrate(loader, batches=20)     # fresh BN statistics before eval or pruning
    fxprune.prune_(model, example)           # remove the channels whose γ reached 0

The penalties are the paper's Eq. 2 (`fxprune.analysis.costs`) from the
analysis of a deep copy of `model`; the channels that in-place pruning could
not remove anyway (frozen, or with a width written as a literal in the
model's code) are not penalised. Build the optimizer over `param_groups()` so
the penalised γ get no weight decay (it would fight the prox).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis import ChannelAnalysis, analyse
from fxprune.compile.in_place_plan import freeze_literal_widths
from fxprune.trace import trace_model
from fxprune.train.ista import (
    IstaOptimizer,
    Monitor,
    PenaltyTarget,
    lasso_term,
    param_groups_for,
    penalty_targets,
    rescale,
    unscale,
)
from fxprune.train.procedure import RECALIBRATION_BATCHES, recalibrate_batchnorm


@dataclass
class Ista:
    """The ISTA set-up for one model: penalised γ (with λ), ρ, and helpers that
    wrap the user's optimizer, report the lasso term and the sparsity."""

    model: nn.Module
    targets: list[PenaltyTarget]
    rho: float
    gm: fx.GraphModule
    analysis: ChannelAnalysis
    group_ista: bool = False

    def param_groups(self, weight_decay: float = 0.0, **options) -> list[dict]:
        """Everything with `weight_decay`, the penalised γ in their own group without
        (`options` go to `fxprune.train.ista.param_groups_for`)."""
        return param_groups_for(self.model, self.targets, weight_decay, **options)

    def step_rho(self, shrink: float, lr: float) -> float:
        """Set and return ρ such that one prox step at learning rate `lr` shrinks the
        median penalised γ by `shrink` (lr·ρ·λ = shrink): for short runs and demos.
        For real training the paper sets ρ so that ρ·lasso ≈ the loss
        (`fxprune.train.ista.suggest_rho`)."""
        lam = np.concatenate([t.lam for t in self.targets]) if self.targets else np.ones(1)
        self.rho = float(shrink / (lr * float(np.median(lam))))
        return self.rho

    def wrap(self, optimizer: torch.optim.Optimizer) -> IstaOptimizer:
        """`optimizer.step()` then the proximal step (exact zeros) on the penalised γ."""
        return IstaOptimizer(optimizer, self.model, self.targets, self.rho,
                             group_ista=self.group_ista)  # fmt: skip

    def monitor(self, num_classes: int = 2) -> Monitor:
        """Per-epoch records and the paper's tuning advice (`Monitor.record`)."""
        return Monitor(self.model, self.targets, num_classes)

    def lasso(self) -> float:
        """Σ λ·|γ| over the penalised channels (multiply by ρ for the loss term)."""
        return lasso_term(self.model, self.targets)

    def sparsity(self) -> float:
        """Fraction of the penalised γ that are exactly zero."""
        return Monitor(self.model, self.targets, 2).sparsity()[0]

    def recalibrate(self, loader: Iterable, batches: int = RECALIBRATION_BATCHES) -> int:
        """Re-estimate the model's BatchNorm statistics on the first `batches` of
        `loader` (`fxprune.train.procedure.recalibrate_batchnorm`: the penalty
        leaves them stale); returns how many batches were used."""
        device = next(iter(self.model.parameters()), torch.zeros(0)).device
        return recalibrate_batchnorm(self.model, itertools.islice(loader, batches), device)

    def rescale(self, alpha: float) -> list[str]:
        """γ–W rescaling by α (function unchanged); returns the refused BN modules."""
        return rescale(self.model, self.gm, self.analysis, alpha, group_ista=self.group_ista)

    def unscale(self, alpha: float) -> list[str]:
        """Undo `rescale(alpha)` (zeros stay zero)."""
        return unscale(self.model, self.gm, self.analysis, alpha, group_ista=self.group_ista)


def ista_for(
    model: nn.Module, example: torch.Tensor, *, rho: float, group_ista: bool = False
) -> Ista:
    """Analyse a deep copy of `model` on `example` and return its ISTA set-up
    (module docstring). `model` itself is not modified."""
    traced = trace_model(model, example)
    analysis = analyse(traced.gm)
    freeze_literal_widths(traced.gm, analysis)
    targets = penalty_targets(traced.gm, analysis, group_ista=group_ista)
    return Ista(model, targets, float(rho), traced.gm, analysis, group_ista)


__all__ = ["Ista", "ista_for"]
