"""The paper's training procedure around the ISTA step (Ye et al. 2018, Section 5).

- `RhoSchedule`: ρ by step or epoch, e.g. ``0.0002:30000,0.001`` (ρ = 0.0002 for
  the first 30,000 steps, then 0.001) or ``0.0002:5ep,0.001`` (by epochs).
- `ParameterEma`: an exponential moving average of the parameters and buffers,
  which the paper evaluates; γ the live model holds at exactly zero stay zero in
  it, so the averaged model compiles to the same channels.
- `plateaued`: the paper's stop rule, cross-entropy, sparsity and the lasso term
  all flat over the last epochs.
- `recalibrate_batchnorm`: re-estimate BatchNorm running statistics after a
  penalised epoch (see its docstring for why ISTA needs it).
- `choose_alpha`: the γ–W rescaling factor of the paper's advice, rescaled γ
  around 100·μ·λ·ρ, so a channel the data does not need reaches zero in about
  100 steps, never below ALPHA_FLOOR when ρ is chosen too.
- `loss_scale`: the cross-entropy the automatic ρ and α are weighed against,
  at least ln(classes) so that trained weights get the same scale as a fresh model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fxprune.errors import UsageError

__all__ = [
    "RhoSchedule", "ParameterEma", "plateaued", "choose_alpha", "loss_scale",
    "recalibrate_batchnorm", "ALPHA_FLOOR", "PLATEAU_EPOCHS", "PLATEAU_TOLERANCE", "PROX_STEPS",
    "RECALIBRATION_BATCHES",
]  # fmt: skip

PLATEAU_EPOCHS = 3  # epochs whose records must all agree
PLATEAU_TOLERANCE = 0.02  # relative change of ce and lasso; absolute change of sparsity
RECALIBRATION_BATCHES = 20  # train batches that re-estimate BN statistics after an epoch
PROX_STEPS = 100  # the paper: choose α so the rescaled γ sit near 100·μ·λ·ρ
# The automatic α stops here: γ and β then take gradient steps 1/α² = 100× larger
# relative to their size, and the consumers' weights grow by 1/α. From trained
# weights α = 0.007 (ConvNet) made ISTA diverge to chance in its first epoch.
ALPHA_FLOOR = 0.1
_PIECE = re.compile(r"^\s*([0-9.eE+-]+)\s*(?::\s*([0-9]+)\s*(ep)?\s*)?$")


def recalibrate_batchnorm(model: nn.Module, batches: Iterable, device=None) -> int:
    """Re-estimate every BatchNorm's running mean and variance as the plain average
    over `batches` (inputs, or (input, target) pairs), without gradients; returns
    how many batches were used (0 leaves the statistics untouched).

    Why ISTA needs it: a BatchNorm that follows a penalised layer makes the loss
    blind to that layer's overall γ scale, so the penalty can shrink a whole layer
    towards zero quickly. Training-mode BatchNorm renormalises and does not
    notice, but its running statistics (an average with momentum 0.1) lag by up
    to 5× in variance, and the eval-mode model, which fxprune compiles, loses its
    accuracy (the demo's ConvNet: 99.5 % → 65 %; 99.8 % after 10 batches here).
    Only the BatchNorm layers run in training mode; everything else (dropout)
    stays in eval mode. Each module's mode and momentum are restored.
    """
    norms = [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]  # fmt: skip
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [(m, m.momentum, [b.clone() for b in m.buffers(recurse=False)]) for m in norms]
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device) if device is not None else x)
                used += 1
    finally:
        for m, momentum, buffers in saved:
            m.momentum = momentum
            if not used:
                for buffer, old in zip(m.buffers(recurse=False), buffers, strict=True):
                    buffer.copy_(old)
        for m, training in modes.items():
            m.train(training)
    return used


@dataclass(frozen=True)
class RhoSchedule:
    """Piecewise-constant ρ: `values[i]` until `ends[i]` (exclusive, in `unit`s), then the last."""

    values: tuple[float, ...]
    ends: tuple[int, ...]
    unit: str = "step"  # "step" or "epoch"

    @classmethod
    def parse(cls, text: str | float) -> RhoSchedule:
        """``0.001``, ``0.0002:30000,0.001`` (steps) or ``0.0002:5ep,0.001`` (epochs)."""
        pieces = [_PIECE.match(p) for p in str(text).split(",")]
        bad = UsageError(
            f"--rho '{text}' is not ρ or a schedule like 0.0002:30000,0.001 (steps) "
            "or 0.0002:5ep,0.001 (epochs)"
        )
        if not pieces or any(m is None for m in pieces):
            raise bad
        try:
            values = tuple(float(m.group(1)) for m in pieces)  # type: ignore[union-attr]
        except ValueError:
            raise bad from None
        ends = tuple(int(m.group(2)) for m in pieces[:-1] if m.group(2))  # type: ignore[union-attr]
        units = {"epoch" if m.group(3) else "step" for m in pieces if m.group(2)}  # type: ignore[union-attr]
        if pieces[-1].group(2) or len(ends) != len(values) - 1 or len(units) > 1:  # type: ignore[union-attr]
            raise bad
        if any(not (v >= 0 and math.isfinite(v)) for v in values) or list(ends) != sorted(
            set(ends)
        ):
            raise UsageError(f"--rho '{text}': ρ must be ≥ 0 and the ends must increase")
        return cls(values, ends, units.pop() if units else "step")

    def at(self, step: int, epoch: int) -> float:
        """ρ at global `step` (0-based) of 0-based `epoch`."""
        position = epoch if self.unit == "epoch" else step
        for value, end in zip(self.values, self.ends, strict=False):
            if position < end:
                return value
        return self.values[-1]

    def __str__(self) -> str:
        suffix = "ep" if self.unit == "epoch" else ""
        parts = [f"{v:g}:{e}{suffix}" for v, e in zip(self.values, self.ends, strict=False)]
        return ",".join([*parts, f"{self.values[-1]:g}"])


class ParameterEma:
    """EMA of `model`'s parameters and buffers with `decay` per step, for evaluation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise UsageError(f"--ema must be in (0, 1), e.g. 0.999; got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def model_like(self, model: nn.Module, gammas: list[str]) -> nn.Module:
        """The averaged weights, with every γ in `gammas` zero where `model`'s is zero."""
        ema = self.averaged.module
        with torch.no_grad():
            for name in gammas:
                live = model.get_submodule(name).weight
                ema.get_submodule(name).weight[live == 0] = 0
        return ema

    def copy_into(self, model: nn.Module, gammas: list[str]) -> None:
        """Load the (masked) averaged weights and buffers into `model`."""
        model.load_state_dict(self.model_like(model, gammas).state_dict())

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def plateaued(history: list[dict], epochs: int = PLATEAU_EPOCHS) -> bool:
    """True when the last `epochs` records agree on cross-entropy and lasso (relative
    change ≤ PLATEAU_TOLERANCE) and on sparsity (absolute change ≤ PLATEAU_TOLERANCE)."""
    if len(history) < epochs:
        return False
    last = history[-epochs:]
    for key, relative in (("ce", True), ("lasso", True), ("sparsity", False)):
        values = [float(r[key]) for r in last]
        spread = max(values) - min(values)
        scale = max(abs(v) for v in values) if relative else 1.0
        if spread > PLATEAU_TOLERANCE * max(scale, 1e-12):
            return False
    return True


def loss_scale(ce: float, num_classes: int) -> float:
    """The cross-entropy the automatic ρ and α are chosen from: the first batch's `ce`,
    but at least ln(`num_classes`), the cross-entropy of a classifier that knows nothing.

    From scratch the two agree (the first batch sits near ln C); from trained weights
    `ce` is near 0 (the ConvNet at 99.5 %: 0.009 against ln 10 = 2.3) while ISTA soon
    raises it, and ρ = ce/lasso would barely penalise, α from it would be tiny.
    """
    return max(ce, math.log(max(num_classes, 1)))


def choose_alpha(
    *, gamma_mean: float, lam_mean: float, lasso_sum: float, ce: float, lr: float,
    rho: float | None, num_classes: int,
) -> float:  # fmt: skip
    """α ≤ 1 that puts the mean rescaled γ at PROX_STEPS·μ·λ̄·ρ.

    With a given ρ that is α = 100·μ·λ̄·ρ/γ̄ (the user chose the scale: kept as
    the formula gives it). With ρ chosen by the trainer (ρ = L/(α·Σλ|γ|) once
    rescaled, L = `loss_scale(ce, num_classes)`) both are solved together,
    α = √(100·μ·λ̄·L/(γ̄·Σλ|γ|)), and kept in [ALPHA_FLOOR, 1]; a smaller α must
    be asked for (``--alpha``). Returns 1 (no rescaling) when there is nothing to
    penalise, ρ = 0 or `ce` is not finite.
    """
    if gamma_mean <= 0 or lasso_sum <= 0 or not math.isfinite(ce):
        return 1.0
    if rho is None:
        scale = loss_scale(ce, num_classes)
        alpha = math.sqrt(PROX_STEPS * lr * lam_mean * scale / (gamma_mean * lasso_sum))
        alpha = max(ALPHA_FLOOR, alpha)
    else:
        alpha = PROX_STEPS * lr * lam_mean * rho / gamma_mean
    return min(1.0, alpha) if alpha > 0 else 1.0
