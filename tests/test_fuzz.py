"""The random-architecture fuzzer (fxprune.testing.fuzz) against the correctness contract.

A few hundred random CNNs, each zeroed, compiled with exact absorption and
compared to the zeroed reference with real forward passes; then the paper's
bias fold against exact absorption on a hand-built padded conv; then one
minimal reproducer per bug the fuzzer once found, kept as regressions
(`fuzz.KNOWN_BUGS` lists the open ones, which the fuzz run leaves out).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxprune.analysis import analyse
from fxprune.compile import CompileOptions, compile_model
from fxprune.testing import fuzz
from fxprune.trace import trace_model
from fxprune.verify import relative_error, run_model

CHUNKS, CHUNK_SIZE = 6, 50  # ~300 graphs, about a minute on 2 cores
MIN_SHRANK = 0.6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_models_compile_to_the_same_function(chunk):
    seeds = range(chunk * CHUNK_SIZE, (chunk + 1) * CHUNK_SIZE)
    summary = fuzz.run_fuzz(seeds, absorb="exact", skip=frozenset(fuzz.KNOWN_BUGS))
    failures = [f"seed {o.seed}: {o.status} {o.reason}" for o in summary.failures]
    assert not failures, "\n".join(failures)
    assert summary.shrank >= MIN_SHRANK * len(seeds), summary.line()


def test_fuzzer_catches_the_paper_fold():
    """The fuzzer is not vacuous: the inexact bias fold must show up as mismatches."""
    summary = fuzz.run_fuzz(range(20), absorb="bias", skip=frozenset(fuzz.KNOWN_BUGS))
    assert summary.count("mismatch") > 0, summary.line()
    assert summary.count("error") == 0, summary.line()


def test_random_model_is_deterministic():
    a, shape_a = fuzz.random_model(7)
    b, shape_b = fuzz.random_model(7)
    assert shape_a == shape_b and a.describe() == b.describe()
    x = torch.randn(shape_a)
    assert relative_error(run_model(a, x), run_model(b, x)) == 0.0


def test_cli_prints_summary(capsys):
    code = fuzz.main(["--graphs", "2", "--seed", "3", "--skip-known-bugs"])
    out = capsys.readouterr().out
    assert "graphs 2, mismatches" in out and "compiled-smaller" in out
    assert code in (0, 1)


# -- the paper's fold against exact absorption ---------------------------------


def _padded_consumer() -> tuple[nn.Module, torch.Tensor]:
    """conv1x1 -> BN (channel 0: γ=0, β=1, so ReLU gives 1) -> ReLU -> conv3x3 pad 1."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
    ).eval()
    with torch.no_grad():
        model[1].weight[0] = 0.0
        model[1].bias[0] = 1.0
    return model, torch.randn(2, 3, 9, 11)


def _border_and_interior_error(absorb: str) -> tuple[float, float]:
    model, x = _padded_consumer()
    traced = trace_model(model, x)
    analyse(traced.gm)
    result = compile_model(traced, CompileOptions(absorb=absorb))
    assert result.removed_classes >= 1
    diff = (run_model(traced.gm, x) - run_model(result.gm, x)).abs()
    interior = diff[..., 1:-1, 1:-1].max().item()
    border = torch.cat([diff[..., 0, :], diff[..., -1, :], diff[..., 0], diff[..., -1]], -1)
    return border.max().item(), interior


def test_bias_fold_is_wrong_only_at_the_border():
    border, interior = _border_and_interior_error("bias")
    assert interior <= 1e-5
    assert border > 1e-3


def test_exact_absorption_has_no_border_error():
    border, interior = _border_and_interior_error("exact")
    assert max(border, interior) <= 1e-5


# -- bugs the fuzzer found, one minimal reproducer each ------------------------


class _Net(nn.Module):
    """conv1x1 -> BN -> ReLU -> `tail`, with BN channels 0 and 2 zeroed (γ=0, β=1)."""

    def __init__(self, tail, cout: int = 6, consumer: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(4, cout, 1), nn.BatchNorm2d(cout), nn.ReLU())
        self.consumer = consumer or nn.Conv2d(4, 3, 1)
        self.tail = tail

    def forward(self, x):
        return self.consumer(self.tail(self.stem(x)))


def _max_error(model: nn.Module, shapes) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        for c in (0, 2):
            model.stem[1].weight[c] = 0.0
            model.stem[1].bias[c] = 1.0
    x = torch.randn(shapes[0])
    traced = trace_model(model.eval(), x)
    analyse(traced.gm)
    compact = compile_model(traced).gm
    inputs = [torch.randn(s) for s in shapes]
    return max(relative_error(run_model(traced.gm, y), run_model(compact, y)) for y in inputs)


SHAPES = [(2, 4, 8, 8)]
REPRODUCERS = {
    "divisor_override": lambda: _Net(
        nn.AvgPool2d(3, 1, 1, count_include_pad=False, divisor_override=9),
        consumer=nn.Conv2d(6, 3, 1),
    ),
    "computed_slice": lambda: _Net(lambda y: y[:, : y.size(1) // 2 + 1]),
    "sum_pool": lambda: _Net(lambda y: y.sum((2, 3), keepdim=True), consumer=nn.Conv2d(6, 3, 1)),
    "even_same": lambda: _Net(nn.Identity(), consumer=nn.Conv2d(6, 3, 2, padding="same")),
    "ellipsis_slice": lambda: _Net(lambda y: y[..., 1:5, :, :]),
    "narrow_negative_dim": lambda: _Net(lambda y: y.narrow(-3, 1, 4)),
    "narrow_kwargs": lambda: _Net(lambda y: torch.narrow(y, dim=1, start=1, length=4)),
}


@pytest.mark.parametrize("bug", sorted(REPRODUCERS))
def test_fixed_bug_reproducer(bug):
    shapes = SHAPES + [(2, 4, 11, 13)]  # a second resolution catches resolution-bound constants
    assert _max_error(REPRODUCERS[bug](), shapes) <= fuzz.TOLERANCE


def test_conv_after_border_term():
    """conv -> BN(γ=0) -> ReLU -> padded conv (gets a border term) -> conv: was a KeyError."""
    model = _Net(nn.Conv2d(6, 4, 3, padding=1), consumer=nn.Conv2d(4, 3, 3, padding=1))
    assert _max_error(model, SHAPES) <= fuzz.TOLERANCE


def test_even_kernel_same_padding_is_removed_exactly():
    """padding="same" with an even kernel pads asymmetrically; the border term must too."""
    model = _Net(nn.Identity(), consumer=nn.Conv2d(6, 3, 2, padding="same"))
    assert _max_error(model, SHAPES + [(1, 4, 7, 9)]) <= fuzz.TOLERANCE


def test_known_bugs_have_reproducers():
    assert set(fuzz.KNOWN_BUGS) <= set(REPRODUCERS)
