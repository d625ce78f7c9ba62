"""Latency and throughput of an original model vs its compact version, in one run.

For every batch size and every variant (eager ``nn.Module``, frozen TorchScript) the
two models are timed *interleaved* (original, compact, original, ...) after a warm-up,
so machine load drifts hit both alike; the median latency is reported. The fvcore
FLOP ratio is printed beside the measured speed-up: a speed-up far below the FLOP
ratio means the compact model is memory- or overhead-bound at that batch size.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate
from torch import nn

from fxprune.errors import UsageError, first_line
from fxprune.report.counts import count_model
from fxprune.report.tables import format_count

BENCH_FORMATS = ("text", "github", "json")


@dataclass
class BenchConfig:
    """What to measure: batch sizes, timed repeats per model, warm-up runs, threads."""

    batches: tuple[int, ...] = (1, 8)
    repeats: int = 20
    warmup: int = 2
    threads: int | None = None  # None: torch's default
    torchscript: bool = True

    def __post_init__(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError(f"--batch needs positive sizes, not {self.batches}")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError("--repeats must be ≥ 1 and --warmup ≥ 0")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be ≥ 1, not {self.threads}")


@dataclass(frozen=True)
class BenchRow:
    """Median latencies (seconds) of one variant at one batch size."""

    variant: str  # "eager" | "torchscript"
    batch: int
    original_s: float
    compact_s: float

    @property
    def speedup(self) -> float:
        return self.original_s / self.compact_s

    def throughput(self) -> tuple[float, float]:
        """Samples per second of the original and the compact model."""
        return self.batch / self.original_s, self.batch / self.compact_s


@dataclass
class BenchResult:
    """All rows plus what they were measured under (threads, versions, FLOPs)."""

    rows: list[BenchRow]
    threads: int
    interop_threads: int
    torch_version: str
    flops: tuple[int, int]  # fvcore, batch 1: original, compact
    params: tuple[int, int]
    repeats: int
    notes: list[str] = field(default_factory=list)

    @property
    def flop_ratio(self) -> float:
        return self.flops[0] / self.flops[1] if self.flops[1] else float("inf")

    def table(self, fmt: str = "text") -> str:
        """Rendered rows: latency, speed-up beside the FLOP ratio, throughput."""
        if fmt not in BENCH_FORMATS:
            raise UsageError(f"unknown format {fmt!r}: choose one of {', '.join(BENCH_FORMATS)}")
        if fmt == "json":
            return json.dumps(self.to_json(), indent=2, sort_keys=True)
        headers = ["variant", "batch", "original ms", "compact ms", "speed-up", "FLOP ratio"]
        headers += ["original samples/s", "compact samples/s"]
        rows = [
            [r.variant, r.batch, f"{r.original_s * 1e3:.2f}", f"{r.compact_s * 1e3:.2f}"]
            + [f"{r.speedup:.2f}x", f"{self.flop_ratio:.2f}x"]
            + [f"{t:.1f}" for t in r.throughput()]
            for r in self.rows
        ]
        return tabulate(rows, headers=headers, tablefmt="simple" if fmt == "text" else fmt,
                        disable_numparse=True, colalign=["left"] + ["right"] * 7)  # fmt: skip

    def header(self) -> str:
        """One line: threads, torch version, FLOPs and parameters before → after."""
        f0, f1 = map(format_count, self.flops)
        p0, p1 = map(format_count, self.params)
        return (f"threads {self.threads} (inter-op {self.interop_threads}), torch "
                f"{self.torch_version}, median of {self.repeats} interleaved runs; fvcore FLOPs "
                f"{f0} → {f1} (ratio {self.flop_ratio:.2f}x), params {p0} → {p1}")  # fmt: skip

    def to_json(self) -> dict:
        data = asdict(self)
        data["flop_ratio"] = self.flop_ratio
        for row, record in zip(self.rows, data["rows"], strict=True):
            record["speedup"] = row.speedup
            record["original_per_s"], record["compact_per_s"] = row.throughput()
        return data


def bench_models(
    original: nn.Module, compact: nn.Module, example: torch.Tensor, config: BenchConfig
) -> BenchResult:
    """Time ``original`` against ``compact`` (eval, no_grad) on inputs shaped like ``example``."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    original, compact = original.eval(), compact.eval()
    single = example[:1]
    before, after = count_model(original, single), count_model(compact, single)
    variants = {"eager": (original, compact)}
    notes: list[str] = []
    if config.torchscript:
        scripted = [to_frozen_torchscript(m, single, notes) for m in (original, compact)]
        if all(m is not None for m in scripted):
            variants["torchscript"] = tuple(scripted)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in config.batches:
        x = torch.randn((batch, *example.shape[1:]), generator=gen)
        for variant, (a, b) in variants.items():
            times_a, times_b = time_interleaved(a, b, x, config.repeats, config.warmup)
            rows.append(BenchRow(variant, batch, statistics.median(times_a),
                                 statistics.median(times_b)))  # fmt: skip
    return BenchResult(rows, torch.get_num_threads(), torch.get_num_interop_threads(),
                       torch.__version__, (before.flops, after.flops),
                       (before.params, after.params), config.repeats, notes)  # fmt: skip


def time_interleaved(
    a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Seconds per forward pass of ``a`` and ``b``, alternating, after ``warmup`` pairs."""
    times_a, times_b = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for module, times in ((a, times_a), (b, times_b)):
                start = time.perf_counter()
                module(x)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    return times_a, times_b


def to_frozen_torchscript(
    module: nn.Module, example: torch.Tensor, notes: list[str]
) -> torch.jit.ScriptModule | None:
    """``torch.jit.freeze`` of script (or, failing that, trace); None with a note if both fail."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(module)
        except Exception:  # script rejects many fx-generated modules; trace is the fallback
            try:
                with torch.no_grad():
                    scripted = torch.jit.trace(module, example, check_trace=False)
            except Exception as err:
                notes.append(f"TorchScript skipped: {first_line(err, with_type=True, limit=200)}")
                return None
        return torch.jit.freeze(scripted.eval())


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8); UsageError otherwise."""
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--batch '{text}' is not a list of integers like 1,8") from None
    return batches


__all__ = [
    "BENCH_FORMATS",
    "BenchConfig",
    "BenchResult",
    "BenchRow",
    "bench_models",
    "parse_batches",
    "time_interleaved",
    "to_frozen_torchscript",
]
