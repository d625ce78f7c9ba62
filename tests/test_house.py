"""The house rules of issue 13, checked: one NaN-aware correctness gate, and
`fxprune compile --sparsity` working (or refusing in one line) across the
torchvision models with BatchNorm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fxprune import pipeline, zoo
from fxprune.cli.main import app
from fxprune.errors import FxpruneError, VerificationError
from fxprune.verify import TOLERANCE, check_tolerance, relative_error, verify_equal

INF = float("inf")


@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
def test_relative_error_is_infinite_for_nan_or_inf(bad):
    expected = torch.ones(2, 3)
    actual = expected.clone()
    actual[1, 2] = bad
    assert relative_error(expected, actual) == INF
    with pytest.raises(VerificationError):
        check_tolerance(relative_error(expected, actual), "planted")


def test_equal_non_finite_values_count_as_equal():
    a = torch.tensor([1.0, INF, float("nan")])
    assert relative_error(a, a.clone()) == 0.0


def test_check_tolerance_refuses_nan():
    with pytest.raises(VerificationError):
        check_tolerance(float("nan"), "nan")
    assert check_tolerance(TOLERANCE / 2, "fine") == TOLERANCE / 2


class _NanTail(nn.Module):
    """Wraps a model and poisons one output value: a 'compiled' model gone wrong."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x).clone()
        out.view(-1)[0] = float("nan")
        return out


def test_planted_nan_fails_the_compile_gate(monkeypatch):
    analysed = pipeline.open_source("zoo:resnet20")
    real_compile = pipeline.stages.compile_model

    def poisoned(traced, options=None):
        result = real_compile(traced, options)
        result.gm = _NanTail(result.gm)
        return result

    monkeypatch.setattr(pipeline.stages, "compile_model", poisoned)
    with pytest.raises(VerificationError, match="differs from the original by inf"):
        pipeline.compile_analysed(analysed)
    assert (
        verify_equal(analysed.traced.gm, _NanTail(analysed.traced.gm), analysed.traced.example)
        == INF
    )


# Reported crashing with "truth value of an array is ambiguous" before one Eq. 2 cost.
FAST = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5",
        "efficientnet_b0"]  # fmt: skip


def _bn_classifiers() -> list[str]:
    return [
        n.split(":", 1)[1] if ":" in n else n
        for n in zoo.list_models(kind="classification")
        if n not in ("convnet", "resnet20", "resnet56")
    ]


def _params():
    slow = [n for n in _bn_classifiers() if n not in FAST]
    return [pytest.param(n, id=n) for n in FAST] + [
        pytest.param(n, id=n, marks=pytest.mark.slow) for n in slow
    ]


def _has_batchnorm(name: str) -> bool:
    module = zoo.create_model(name)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.mark.parametrize("name", _params())
def test_compile_with_sparsity_across_torchvision(name, tmp_path):
    if not _has_batchnorm(name):
        pytest.skip(f"{name} has no BatchNorm: --sparsity has no γ to rank")
    shape = "1,3,299,299" if name == "inception_v3" else "1,3,64,64"
    out = tmp_path / "x.ts"
    result = CliRunner().invoke(
        app,
        ["compile", f"torchvision:{name}", "--sparsity", "0.5", "--out", str(out),
         "--input-shape", shape, "--verify", "1"],
    )  # fmt: skip
    if result.exit_code == 0:
        assert out.exists()
        return
    assert result.exit_code in (1, 2), result.output
    if isinstance(result.exception, FxpruneError):  # CliRunner bypasses run(): raised, not printed
        assert "\n" not in str(result.exception), result.exception  # e.g. a constant model
    else:
        lines = [line for line in result.output.splitlines() if line.startswith("error")]
        assert len(lines) == 1 and "internal error" not in result.output, result.output
    assert not out.exists()


def test_installed_command_compiles_with_sparsity(tmp_path):
    fxprune = Path(sys.executable).with_name("fxprune")
    out = tmp_path / "m.ts"
    proc = subprocess.run(
        [str(fxprune), "compile", "torchvision:mobilenet_v2", "--sparsity", "0.5", "--out",
         str(out), "--input-shape", "1,3,64,64", "--verify", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "Traceback" not in proc.stderr


def test_verification_inputs_never_repeat_the_example():
    """An example drawn from the verification generator's own seed (seed + 1) must not
    come back as a 'random' input: the input-dependence gate would compare it with
    itself and refuse every model as constant."""
    from fxprune.verify import verification_inputs

    example = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    inputs = verification_inputs(example, 3, seed=0)
    assert len(inputs) == 3 and inputs[0] is example
    assert not any(torch.equal(example, x) for x in inputs[1:])
    assert not torch.equal(inputs[1], inputs[2])
    assert verification_inputs(example, 0) == []


def test_seed_draws_the_initial_weights_of_a_built_model():
    """`--seed` covers a registry model's random init too (it did only the example),
    and loading leaves the caller's global random state alone."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, again = pipeline.load_model("zoo:convnet"), pipeline.load_model("zoo:convnet")
    assert torch.equal(torch.rand(1), before)
    other = pipeline.load_model("zoo:convnet", seed=1)
    weights = [m.module.state_dict()["features.0.weight"] for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
