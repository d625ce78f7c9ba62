"""The `fxprune compile` and `fxprune prune` commands as library calls:
`compile_source` (load → compile → verify → write the artifacts, never
overwriting a user's file) and `prune_source` (in place, in the user's own
classes). Built on the stages in `fxprune.pipeline.stages`; nothing here prints
or exits.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fxprune
from fxprune.analysis import ChannelAnalysis
from fxprune.compile import (
    DEFAULT_MIN_KEEP,
    CompileOptions,
    CompileResult,
)
from fxprune.compile.fusions import fuse_for_deployment
from fxprune.compile.in_place import BORDER_MODES, PruneReport, prune_
from fxprune.compile.in_place_save import save_pruned
from fxprune.errors import ExportError, UsageError
from fxprune.export import (
    ExportResult,
    IsolatedVerifier,
    export_pt2,
    export_torchscript,
)
from fxprune.files import check_target
from fxprune.load import Loaded, checkpoint_dict, load_source, save_checkpoint
from fxprune.pipeline.stages import (
    Progress,
    artifact_metadata,
    compile_analysed,
    load_model,
    open_module,
)
from fxprune.report import ModelCounts, count_model, layer_table
from fxprune.trace import Traced
from fxprune.verify import (
    check_tolerance,
    compare_outputs,
    verification_inputs,
)


def _check_zeroing(threshold: float | None, sparsity: float | None) -> None:
    """UsageError unless at most one of `threshold` (finite, ≥ 0) and `sparsity`
    (in [0, 1)) is given: the zeroing options of `compile` and `prune`."""
    if threshold is not None and sparsity is not None:
        raise UsageError("give --threshold or --sparsity, not both")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:  # NaN fails too
        raise UsageError(f"--sparsity must be in [0, 1), not {sparsity}")
    if threshold is not None and not 0.0 <= threshold < math.inf:  # NaN fails too
        raise UsageError(f"--threshold must be a finite number ≥ 0, not {threshold}")


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
    fuse: bool = True  # fold BatchNorms into convs in the artifact (verified)
    channels_last: bool = False  # store the artifact's 4-D weights channels-last (verified)
    round_to: int = 1  # keep widths a multiple of this (keeps cheapest constant channels)
    min_width: int = 1  # keep at least this many channels per layer
    min_keep: float = DEFAULT_MIN_KEEP  # per-group floor of --threshold/--sparsity (0: none)
    allow_constant: bool = False  # write a model whose output ignores its input
    arch: str | None = None
    frontend: str = "auto"
    pt2_fallback: bool = False  # write x.pt2 beside --out x.ts when TorchScript cannot capture

    def __post_init__(self) -> None:
        _check_zeroing(self.threshold, self.sparsity)
        if not 0.0 <= self.min_keep <= 1.0:  # NaN fails too
            raise UsageError(f"--min-keep must be in [0, 1], not {self.min_keep}")
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
    fused_batchnorms: int = 0
    written: list[Path] = field(default_factory=list)
    # the compile's verification inputs (example first), the compact model's outputs on
    # them and the deployed (folded) model's: reused by later checks, never re-run
    verified_inputs: list = field(default_factory=list, repr=False)
    verified_outputs: list = field(default_factory=list, repr=False)
    deploy_outputs: list = field(default_factory=list, repr=False)

    def table(self, fmt: str = "text") -> str:
        return layer_table(self.before, self.after, fmt=fmt)

    def to_json(self) -> dict:
        return {
            "fxprune_version": fxprune.__version__,
            "source": self.loaded.source,
            "frontend": self.traced.frontend,
            "input_shape": list(self.traced.example.shape),
            "channels_removed": self.result.removed_classes,
            "channels_total": self.result.total_classes,
            "zeroed_by_threshold_or_sparsity": self.zeroed,
            "output_drift_from_zeroing": self.drift,
            "max_relative_error": self.max_error,
            "fused_batchnorms": self.fused_batchnorms,
            "params": {"before": self.before.params, "after": self.after.params},
            "flops": {"before": self.before.flops, "after": self.after.flops},
            "notes": self.result.notes,
            "written": [str(p) for p in self.written],
        }


def compile_source(
    config: CompileConfig, progress: Progress | None = None, loaded: Loaded | None = None
) -> CompileOutcome:
    """Run the whole pipeline; write the artifact only if it verifies. With
    `loaded` (a model already built, e.g. by a benchmark), skip loading."""
    say = progress or (lambda _msg: None)
    protect = _inputs(config)
    _check_outputs(config, protect)
    # the artifact's fresh-process check imports torch while we compile
    with IsolatedVerifier() as verifier:
        return _compile_and_write(config, protect, verifier, say, loaded)


def _compile_and_write(
    config: CompileConfig,
    protect: list[Path],
    verifier: IsolatedVerifier,
    say: Progress,
    loaded: Loaded | None = None,
) -> CompileOutcome:
    owned = loaded is None  # a model the caller handed in is not ours to edit
    if loaded is None:
        say(f"loading {config.source}")
        loaded = load_model(config.source, weights=config.weights, input_shape=config.input_shape,
                            trust_pickle=config.trust_pickle, seed=config.seed,
                            arch=config.arch)  # fmt: skip
    if config.save_checkpoint is not None and loaded.architecture is None:
        raise UsageError(
            f"--save-checkpoint writes data only, and {config.source} is a pickled module: "
            "compile zoo:NAME, torchvision:NAME or pkg.mod:factory with --weights instead"
        )
    say("tracing and analysing channels")
    analysed = open_module(
        loaded, submodule=config.submodule, owned=owned, frontend=config.frontend
    )
    say(f"front end: {analysed.traced.frontend}")
    say(f"compiling and verifying on {config.verify} random input(s)")
    compiled = compile_analysed(
        analysed,
        options=CompileOptions(
            absorb=config.absorb, round_to=config.round_to, min_width=config.min_width
        ),
        threshold=config.threshold,
        sparsity=config.sparsity,
        verify=config.verify,
        seed=config.seed,
        min_keep=config.min_keep,
        allow_constant=config.allow_constant,
    )
    say("counting FLOPs and parameters (fvcore's formulas, from the traced shapes)")
    traced, result = analysed.traced, compiled.result
    before = count_model(traced.gm, traced.example, from_shapes=True)
    after = count_model(result.gm, traced.example, from_shapes=True)
    outcome = CompileOutcome(
        loaded, traced, analysed.analysis, result, compiled.zeroed, compiled.drift,
        compiled.max_error, before, after, verified_inputs=compiled.inputs,
        verified_outputs=compiled.outputs,
    )  # fmt: skip
    _write_outputs(outcome, config, protect, say, verifier)
    return outcome


@dataclass
class PruneConfig:
    """Everything `fxprune prune` can be asked to do: prune in place and save the
    user's own model (its state_dict, or the whole pickled module if asked)."""

    source: str
    out: Path
    weights: Path | None = None
    input_shape: tuple[int, ...] | None = None
    threshold: float | None = None
    sparsity: float | None = None
    border: str = "keep"
    whole_module: bool = False
    trust_pickle: bool = False
    force: bool = False
    verify: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_zeroing(self.threshold, self.sparsity)
        if self.verify < 1:
            raise UsageError("--verify must be ≥ 1 (in-place pruning is always verified)")
        if self.border not in BORDER_MODES:
            raise UsageError(
                f"--border must be one of {', '.join(BORDER_MODES)}, not {self.border!r}"
            )


def prune_source(config: PruneConfig, progress: Progress | None = None) -> PruneReport:
    """load → prune in place (verified) → save (verified by loading it back)."""
    say = progress or (lambda _msg: None)
    protect = _inputs(config)
    check_target(config.out, force=config.force, protect=protect)  # before any slow work

    def load(weights: Path | None) -> Loaded:
        return load_source(config.source, weights=weights, input_shape=config.input_shape,
                           trust_pickle=config.trust_pickle, seed=config.seed)  # fmt: skip

    say(f"loading {config.source}")
    loaded = load(config.weights)
    say(f"pruning in place and verifying on {config.verify} input(s)")
    report = prune_(loaded.module, loaded.example, threshold=config.threshold,
                    sparsity=config.sparsity, border=config.border, verify=config.verify,
                    seed=config.seed)  # fmt: skip
    say(f"writing {config.out} (verified by loading it back)")
    save_pruned(loaded.module, config.out, example=loaded.example,
                rebuild=lambda: load(None).module, whole_module=config.whole_module,
                force=config.force, protect=protect)  # fmt: skip
    return report


def _inputs(config: CompileConfig | PruneConfig) -> list[Path]:
    paths = [Path(config.source)] if Path(config.source).exists() else []
    return paths + ([Path(config.weights)] if config.weights else [])


def _check_outputs(config: CompileConfig, protect: list[Path]) -> None:
    """Refuse bad output paths before any work is done: two outputs that are one file,
    an input file, a missing or read-only directory, a name too long, an existing file."""
    from fxprune.files import check_distinct

    outputs = {
        "--out": config.out,
        "--emit-py": config.emit_py,
        "--emit-py (its .weights.pt)": emitted_weights_path(config.emit_py)
        if config.emit_py
        else None,
        "--save-checkpoint": config.save_checkpoint,
        "--report": config.report_json,
    }
    check_distinct(outputs)
    for path in outputs.values():
        if path is not None:
            check_target(path, force=config.force, protect=protect)


def emitted_weights_path(py: Path) -> Path:
    """Where `--emit-py FILE.py` puts the state_dict: FILE.weights.pt."""
    return Path(py).with_suffix(".weights.pt")


def deployment_model(
    gm: nn.Module,
    example: torch.Tensor,
    outcome: CompileOutcome,
    *,
    fuse: bool = True,
    channels_last: bool = False,
) -> nn.Module:
    """The compact model as an artifact holds it: BatchNorms folded into convs
    (`compile.fusions`) and, with `channels_last`, 4-D weights stored channels-last
    (oneDNN's convolutions run faster on them; the outputs are the same). A copy,
    verified against the unfused compact model on the compile's verification inputs
    (at least three; the compact model's outputs on them are reused); notes land in
    the outcome, and the deployment model's outputs in `outcome.deploy_outputs`.
    With neither, `gm` itself."""
    if not (fuse or channels_last):
        outcome.deploy_outputs = outcome.verified_outputs
        return gm
    deploy, folded = fuse_for_deployment(gm) if fuse else (copy.deepcopy(gm), [])
    notes = folded + (["4-D weights stored channels-last"] if channels_last else [])
    if channels_last:
        deploy = deploy.to(memory_format=torch.channels_last)
    inputs, known = outcome.verified_inputs, outcome.verified_outputs
    if len(inputs) < 3 or len(known) != len(inputs):
        inputs, known = verification_inputs(example), None
    checked = compare_outputs(gm, deploy, inputs, expected=known)
    what = " and ".join(
        w for w, on in (("BN-folded", fuse), ("channels-last", channels_last)) if on
    )
    check_tolerance(checked.error, f"the {what} model")
    outcome.result.notes += notes
    outcome.fused_batchnorms = len(folded)
    outcome.deploy_outputs = checked.actual
    return deploy


def _write_outputs(
    outcome: CompileOutcome, config: CompileConfig, protect, say: Progress, verifier=None
) -> None:
    """Write every requested output all-or-nothing: each to a verified temp file, then
    all renamed; a failure on any leaves every existing file as it was."""
    from fxprune.files import staged_writes

    with staged_writes():
        _write_staged(outcome, config, protect, say, verifier)


def _write_staged(
    outcome: CompileOutcome, config: CompileConfig, protect, say: Progress, verifier=None
) -> None:
    from fxprune.export import emit_python, flat_module
    from fxprune.files import atomic_write

    gm, example = outcome.result.gm, outcome.traced.example
    deploy = deployment_model(gm, example, outcome, fuse=config.fuse,
                              channels_last=config.channels_last)  # fmt: skip
    outputs = outcome.deploy_outputs
    expected = outputs[0] if outputs else None
    exported = _write_artifact(deploy, outcome, config, protect, say, verifier, expected)
    outcome.artifact_warnings += exported.warnings
    outcome.written.append(exported.path)
    if config.emit_py is not None:  # a readable export, never loaded back by fxprune
        py, weights = Path(config.emit_py), emitted_weights_path(Path(config.emit_py))
        code, flat = emit_python(gm, weights=weights.name), flat_module(gm)
        atomic_write(py, lambda tmp: tmp.write_text(code), force=config.force, protect=protect)
        atomic_write(weights, lambda tmp: torch.save(flat.state_dict(), tmp), force=config.force,
                     protect=protect)  # fmt: skip
        outcome.written += [py, weights]
    if config.save_checkpoint is not None:
        architecture = compiled_architecture(outcome, config.submodule)
        ckpt = checkpoint_dict(gm, input_shape=tuple(example.shape), architecture=architecture)
        save_checkpoint(config.save_checkpoint, ckpt, force=config.force, protect=protect)
        outcome.written.append(Path(config.save_checkpoint))
    if config.report_json is not None:
        text = json.dumps(outcome.to_json(), indent=2, sort_keys=True, default=_json_default)
        atomic_write(Path(config.report_json), lambda tmp: tmp.write_text(text + "\n"),
                     force=config.force, protect=protect)  # fmt: skip
        outcome.written.append(Path(config.report_json))


def _write_artifact(
    deploy: nn.Module,
    outcome: CompileOutcome,
    config: CompileConfig,
    protect,
    say,
    verifier,
    expected=None,
) -> ExportResult:
    """`--out x.pt2`: a torch.export program. Otherwise TorchScript; where TorchScript
    cannot capture the compact model, ExportError naming `--out x.pt2`, or with
    `--pt2-fallback` that `.pt2` written beside the requested path instead."""
    example = outcome.traced.example
    metadata = artifact_metadata(outcome.loaded.source, example, outcome.before, outcome.after,
                                 absorb=config.absorb, fused=config.fuse,
                                 channels_last=config.channels_last,
                                 frontend=outcome.traced.frontend)  # fmt: skip
    pt2 = Path(config.out).with_suffix(".pt2")
    if Path(config.out).suffix == ".pt2":
        say(f"writing {config.out} (torch.export, verified by loading it back)")
        return export_pt2(deploy, example, pt2, metadata=metadata, force=config.force,
                          protect=protect)  # fmt: skip
    say(f"writing {config.out} (TorchScript, verified in a separate process)")
    try:
        return export_torchscript(
            deploy, example, config.out, metadata=metadata, force=config.force, protect=protect,
            verifier=verifier, expected=expected,
        )  # fmt: skip
    except ExportError as err:
        why = str(err).splitlines()[0]
        if not config.pt2_fallback:
            raise ExportError(
                f"TorchScript cannot capture the compact model ({why}); nothing was written — "
                f"write a torch.export program instead with --out {pt2} (or add --pt2-fallback)"
            ) from err
        say(f"TorchScript cannot capture the compact model ({why}); writing {pt2} instead")
    return export_pt2(deploy, example, pt2, metadata=metadata, force=config.force,
                      protect=protect)  # fmt: skip


def compiled_architecture(outcome: CompileOutcome, submodule: str | None) -> dict:
    """The loaded model's architecture record plus this compile as one more step."""
    record = outcome.loaded.architecture
    step = {
        "input_shape": list(outcome.loaded.example.shape),
        "submodule": submodule,
        "plan": outcome.result.plan.to_dict(),
    }
    return {"kind": "plan", "base": record["base"], "steps": [*record["steps"], step]}


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


__all__ = [
    "CompileConfig",
    "CompileOutcome",
    "PruneConfig",
    "compiled_architecture",
    "compile_source",
    "emitted_weights_path",
    "prune_source",
]
