"""One way to say "computes the same function": the relative output error.

Every correctness gate of fxprune (compile, export, doctor, tests, the fuzzer,
benchmarks) uses `relative_error` and `TOLERANCE` from here. The error is
max |expected − actual| / max |expected| over every output tensor; a NaN or
Inf where the original has a finite value makes it infinite, so a broken
model can never pass as exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxprune.errors import VerificationError, describe

TOLERANCE = 1e-4  # |Δ| ≤ 1e-4 relative to the output scale (DESIGN.md, correctness contract)


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """All tensors of a model output: tuples/lists in order, dicts in key order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in flatten_outputs(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in flatten_outputs(value)]
    if hasattr(output, "to_tuple"):  # Hugging Face ModelOutput
        return flatten_outputs(output.to_tuple())
    return []  # None and plain values carry nothing to compare


def relative_error(expected: Any, actual: Any) -> float:
    """max |expected − actual| / max |expected| over all output tensors (floor 1e-12).

    Positions where both sides hold the same value (including the same Inf, or
    NaN on both sides) count as equal; any other NaN or Inf difference makes the
    result `inf`. Raises VerificationError when the outputs differ in structure
    or shape.
    """
    want, got = flatten_outputs(expected), flatten_outputs(actual)
    if len(want) != len(got):
        raise VerificationError(
            f"outputs differ in structure: returned {len(got)} tensors, expected {len(want)}"
        )
    scale, diff = 1e-12, 0.0
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if tuple(a.shape) != tuple(b.shape):
            raise VerificationError(
                f"output {i} has shape {tuple(b.shape)}, expected {tuple(a.shape)}"
            )
        if a.numel() == 0:
            continue
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        delta = torch.where(same, torch.zeros_like(a), (a - b).abs())
        diff = max(
            diff, float(torch.nan_to_num(delta, nan=float("inf"), posinf=float("inf")).max())
        )
        finite = a[torch.isfinite(a)]
        scale = max(scale, float(finite.abs().max()) if finite.numel() else 0.0)
    return diff / scale


def check_tolerance(error: float, what: str, rtol: float = TOLERANCE) -> float:
    """Return `error` if it is within `rtol` (NaN never is), else raise VerificationError."""
    if not error <= rtol:
        raise VerificationError(f"{what} differs from the original by {error:.3g} (> {rtol:g})")
    return error


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode for the block and restore its training flag after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def run_model(module: nn.Module, x: torch.Tensor) -> Any:
    """Eval-mode, no-grad forward pass (the module's training flag is restored)."""
    with eval_mode(module), torch.no_grad():
        return module(x)


def verification_inputs(example: torch.Tensor, count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """`example` and `count - 1` random inputs of its shape (the inputs every gate uses).

    A draw equal to `example` (an example made with the same generator seed) is
    skipped, so the gates that compare two inputs never compare one with itself."""
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = [example]
    while len(inputs) < count:
        x = torch.randn(example.shape, generator=gen)
        same = x.dtype == example.dtype and x.device == example.device
        if not (same and torch.equal(x, example)):
            inputs.append(x)
    return inputs[:count]


@dataclass
class Comparison:
    """`compare_outputs`' result: the worst relative error and both models' outputs, per
    input (so later checks on the same inputs need no forward pass of their own)."""

    error: float
    expected: list[Any]
    actual: list[Any]


def compare_outputs(
    original: nn.Module,
    compiled: nn.Module,
    inputs: Sequence[torch.Tensor],
    expected: Sequence[Any] | None = None,
) -> Comparison:
    """Max relative output error of `compiled` against `original` over `inputs`.
    `expected`: the outputs of `original` on `inputs`, when they are already known.

    A compiled model that fails to run is a VerificationError (one line), not a crash.
    """
    worst, wanted, got = 0.0, [], []
    for i, x in enumerate(inputs):
        want = expected[i] if expected is not None else run_model(original, x)
        try:
            actual = run_model(compiled, x)
        except (
            Exception
        ) as exc:  # the compiled graph is ours: any failure is a verification failure
            raise VerificationError(f"the compiled model fails to run: {describe(exc)}") from exc
        error = relative_error(want, actual)
        worst = error if not error <= worst else worst  # a NaN can never hide behind max()
        wanted.append(want)
        got.append(actual)
    return Comparison(worst, wanted, got)


def verify_equal(
    original: nn.Module, compiled: nn.Module, example: torch.Tensor, count: int = 3, seed: int = 0
) -> float:
    """Max relative output error over `example` and `count - 1` random inputs of its shape.

    A compiled model that fails to run is a VerificationError (one line), not a crash.
    """
    return compare_outputs(original, compiled, verification_inputs(example, count, seed)).error


__all__ = [
    "TOLERANCE",
    "Comparison",
    "check_tolerance",
    "compare_outputs",
    "eval_mode",
    "flatten_outputs",
    "relative_error",
    "run_model",
    "verification_inputs",
    "verify_equal",
]
