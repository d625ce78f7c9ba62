"""The front door as a library call: load → trace → analyse → zero → compile →
verify → export → report. The CLI's `compile` command fills a `CompileConfig`
and calls `compile_source`; nothing here prints or exits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fxprune
from fxprune.channels import ChannelAnalysis, analyse
from fxprune.compile import (
    CompileOptions,
    CompileResult,
    compile_model,
    max_relative_error,
    run_model,
)
from fxprune.errors import UsageError, VerificationError
from fxprune.load import Loaded, checkpoint_dict, load_source, save_checkpoint
from fxprune.report import ModelCounts, count_model, layer_table
from fxprune.trace import Traced, trace_model

TOLERANCE = 1e-4


@dataclass
class CompileConfig:
    """Everything `fxprune compile` can be asked to do (defaults that work)."""

    source: str
    out: Path
    weights: Path | None = None
    input_shape: tuple[int, ...] | None = None
    submodule: str | None = None
    threshold: float | None = None
    sparsity: float | None = None
    absorb: str = "exact"
    emit_py: Path | None = None
    save_checkpoint: Path | None = None
    report_json: Path | None = None
    trust_pickle: bool = False
    force: bool = False
    verify: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.threshold is not None and self.sparsity is not None:
            raise UsageError("give --threshold or --sparsity, not both")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1), not {self.sparsity}")
        if self.threshold is not None and self.threshold < 0:
            raise UsageError(f"--threshold must be ≥ 0, not {self.threshold}")
        if self.verify < 0:
            raise UsageError("--verify must be ≥ 0")


@dataclass
class CompileOutcome:
    """What `compile_source` did, for the CLI and the JSON report."""

    loaded: Loaded
    traced: Traced
    analysis: ChannelAnalysis
    result: CompileResult
    zeroed: int
    drift: float | None
    max_error: float
    before: ModelCounts
    after: ModelCounts
    artifact_warnings: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def table(self, fmt: str = "text") -> str:
        return layer_table(self.before, self.after, fmt=fmt)

    def to_json(self) -> dict:
        return {
            "fxprune_version": fxprune.__version__,
            "source": self.loaded.source,
            "input_shape": list(self.traced.example.shape),
            "channels_removed": self.result.removed_classes,
            "channels_total": self.result.total_classes,
            "zeroed_by_threshold_or_sparsity": self.zeroed,
            "output_drift_from_zeroing": self.drift,
            "max_relative_error": self.max_error,
            "params": {"before": self.before.params, "after": self.after.params},
            "flops": {"before": self.before.flops, "after": self.after.flops},
            "notes": self.result.notes,
            "written": [str(p) for p in self.written],
        }


Progress = Callable[[str], None]


def compile_source(config: CompileConfig, progress: Progress | None = None) -> CompileOutcome:
    """Run the whole pipeline; write the artifact only if it verifies."""
    say = progress or (lambda _msg: None)
    options = CompileOptions(absorb=config.absorb)
    protect = _inputs(config)
    _check_outputs(config, protect)
    say(f"loading {config.source}")
    loaded = load_source(
        config.source,
        weights=config.weights,
        input_shape=config.input_shape,
        trust_pickle=config.trust_pickle,
        seed=config.seed,
    )
    submodule = config.submodule
    say("tracing and analysing channels")
    traced = trace_model(loaded.module, loaded.example, submodule)
    analysis = analyse(traced.gm)
    reference = run_model(traced.gm, traced.example)
    zeroed = _zero_channels(traced, config)
    drift = max_relative_error(reference, run_model(traced.gm, traced.example)) if zeroed else None
    say("compiling")
    result = compile_model(traced, options)
    say(f"verifying on {config.verify} random input(s)")
    max_error = verify_equal(traced.gm, result.gm, traced.example, config.verify, config.seed)
    if options.absorb == "exact" and max_error > TOLERANCE:
        raise VerificationError(
            f"compiled model differs from the original by {max_error:.2e} (> {TOLERANCE:g}); "
            "nothing was written — please report this model to the fxprune issue tracker"
        )
    say("counting FLOPs and parameters (fvcore)")
    before, after = count_model(traced.gm, traced.example), count_model(result.gm, traced.example)
    outcome = CompileOutcome(
        loaded, traced, analysis, result, zeroed, drift, max_error, before, after
    )
    _write_outputs(outcome, config, protect, say)
    return outcome


def _inputs(config: CompileConfig) -> list[Path]:
    paths = [Path(config.source)] if Path(config.source).exists() else []
    return paths + ([Path(config.weights)] if config.weights else [])


def _check_outputs(config: CompileConfig, protect: list[Path]) -> None:
    """Refuse bad output paths before any work is done."""
    from fxprune.export import check_target

    emitted_weights = emitted_weights_path(config.emit_py) if config.emit_py else None
    outputs = (
        config.out,
        config.emit_py,
        emitted_weights,
        config.save_checkpoint,
        config.report_json,
    )
    for path in outputs:
        if path is not None:
            check_target(path, force=config.force, protect=protect)


def emitted_weights_path(py: Path) -> Path:
    """Where `--emit-py FILE.py` puts the state_dict: FILE.weights.pt."""
    return Path(py).with_suffix(".weights.pt")


def _zero_channels(traced: Traced, config: CompileConfig) -> int:
    from fxprune.sparsify import apply_sparsity, apply_threshold

    if config.threshold is not None:
        return apply_threshold(traced.gm, config.threshold)
    if config.sparsity is not None:
        return apply_sparsity(traced.gm, config.sparsity)
    return 0


def verify_equal(original, compiled, example: torch.Tensor, count: int, seed: int) -> float:
    """Max relative output error over the example and `count - 1` random inputs."""
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = [example] + [torch.randn(example.shape, generator=gen) for _ in range(count - 1)]
    return (
        max(
            max_relative_error(run_model(original, x), run_model(compiled, x))
            for x in inputs[:count]
        )
        if count
        else 0.0
    )


def artifact_metadata(outcome: CompileOutcome, absorb: str) -> dict:
    """The `fxprune.json` embedded in every artifact."""
    layers = {
        name: {
            "before": layer.out_channels,
            "after": outcome.after.layers[name].out_channels if name in outcome.after.layers else 0,
        }
        for name, layer in outcome.before.layers.items()
    }
    return {
        "fxprune_version": fxprune.__version__,
        "torch_version": torch.__version__,
        "source": outcome.loaded.source,
        "input_shape": list(outcome.traced.example.shape),
        "channels": layers,
        "params": {"before": outcome.before.params, "after": outcome.after.params},
        "flops": {"before": outcome.before.flops, "after": outcome.after.flops},
        "absorb": absorb,
    }


def _write_outputs(outcome: CompileOutcome, config: CompileConfig, protect, say: Progress) -> None:
    from fxprune.emit import emit_python, flat_module
    from fxprune.export import atomic_write, export_torchscript

    gm, example = outcome.result.gm, outcome.traced.example
    say(f"writing {config.out} (TorchScript, verified in a separate process)")
    exported = export_torchscript(
        gm, example, config.out, metadata=artifact_metadata(outcome, config.absorb),
        force=config.force, protect=protect,
    )  # fmt: skip
    outcome.artifact_warnings += exported.warnings
    outcome.written.append(exported.path)
    if config.emit_py is not None or config.save_checkpoint is not None:
        weights = emitted_weights_path(Path(config.emit_py or "model.py"))
        code = emit_python(gm, weights=weights.name)
        flat = flat_module(gm)
    if config.emit_py is not None:
        py = Path(config.emit_py)
        atomic_write(py, lambda tmp: tmp.write_text(code), force=config.force, protect=protect)
        atomic_write(weights, lambda tmp: torch.save(flat.state_dict(), tmp), force=config.force,
                     protect=protect)  # fmt: skip
        outcome.written += [py, weights]
    if config.save_checkpoint is not None:
        ckpt = checkpoint_dict(flat, input_shape=tuple(example.shape), code=code)
        save_checkpoint(config.save_checkpoint, ckpt, force=config.force, protect=protect)
        outcome.written.append(Path(config.save_checkpoint))
    if config.report_json is not None:
        text = json.dumps(outcome.to_json(), indent=2, sort_keys=True, default=_json_default)
        atomic_write(Path(config.report_json), lambda tmp: tmp.write_text(text + "\n"),
                     force=config.force, protect=protect)  # fmt: skip
        outcome.written.append(Path(config.report_json))


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)
