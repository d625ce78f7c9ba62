"""The stages as library calls: load → trace → analyse → zero → compile →
verify → export → report. Nothing here prints or exits.

- `load_model`: the one loader of every command (checkpoints are data: their
  compile steps are replayed, nothing read from a file runs).
- `open_source` / `open_module`: load → trace → analyse (an `Analysed`).
- `compile_analysed`: zero (threshold, sparsity or a test pattern) → compile →
  verify against the original (NaN-aware, `fxprune.verify.TOLERANCE`).
- `artifact_metadata`: the one `fxprune.json` schema every artifact embeds.
- `export_model`: write and verify an artifact in any of `EXPORT_FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

import fxprune
from fxprune.analysis import ChannelAnalysis, analyse, get_analysis
from fxprune.compile import (
    DEFAULT_MIN_KEEP,
    CompileOptions,
    CompileResult,
    apply_sparsity,
    apply_threshold,
    check_input_dependence,
    compile_model,
    dependence,
    replay_steps,
)
from fxprune.compile.dependence import probe_input
from fxprune.errors import UsageError, VerificationError
from fxprune.export import (
    ExportResult,
    export_onnx,
    export_pt2,
    export_torchscript,
)
from fxprune.files import check_target
from fxprune.load import Loaded, load_source
from fxprune.report import ModelCounts, count_model
from fxprune.trace import Traced, trace_model
from fxprune.verify import (
    TOLERANCE,
    compare_outputs,
    eval_mode,
    relative_error,
    run_model,
    verification_inputs,
)

EXPORT_FORMATS = ("torchscript", "pt2", "onnx")
Progress = Callable[[str], None]


@dataclass
class Analysed:
    """A model after load → trace → analyse."""

    loaded: Loaded
    traced: Traced
    analysis: ChannelAnalysis


def load_model(
    source: str,
    *,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
    arch: str | None = None,
) -> Loaded:
    """`fxprune.load.load_source` with the replay of a compiled checkpoint's steps.
    Only `source` and `arch` (the user's own words) may name code to import."""
    return load_source(source, weights=weights, input_shape=input_shape,
                       trust_pickle=trust_pickle, seed=seed, arch=arch,
                       replay=replay_steps)  # fmt: skip


def open_source(
    source: str,
    *,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    submodule: str | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
    arch: str | None = None,
    frontend: str = "auto",
) -> Analysed:
    """load → trace → analyse a source string (see `load_model`)."""
    loaded = load_model(source, weights=weights, input_shape=input_shape,
                        trust_pickle=trust_pickle, seed=seed, arch=arch)  # fmt: skip
    return open_module(loaded, submodule=submodule, owned=True, frontend=frontend)


def open_module(
    loaded: Loaded, *, submodule: str | None = None, owned: bool = False, frontend: str = "auto"
) -> Analysed:
    """trace → analyse an already loaded model (e.g. one just trained in memory);
    `frontend` is "auto", "fx" or "export" (`fxprune.trace.trace_model`).

    With `owned` the traced graph shares the model's layers instead of copying
    them (for a model nobody else holds): zeroing channels then edits them."""
    traced = trace_model(
        loaded.module, loaded.example, submodule, copy_module=not owned, frontend=frontend
    )
    return Analysed(loaded, traced, analyse(traced.gm))


def loaded_module(module: nn.Module, example: torch.Tensor, source: str = "<module>") -> Loaded:
    """Wrap an in-memory model and its example input as a `Loaded`."""
    return Loaded(module, example, source, tuple(example.shape))


@dataclass
class Compiled:
    """What `compile_analysed` did: the compact model, how many channels were zeroed
    first, how far zeroing moved the output (None if nothing was zeroed) and the
    verified max relative error of the compact model against the zeroed original.
    `inputs` are the verification inputs (the example first) and `outputs` the
    compact model's outputs on them, for later checks that need no forward pass."""

    result: CompileResult
    zeroed: int
    drift: float | None
    max_error: float
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list = field(default_factory=list)


def zero_channels(
    analysed: Analysed,
    *,
    threshold: float | None = None,
    sparsity: float | None = None,
    min_keep: float = DEFAULT_MIN_KEEP,
) -> int:
    """Zero |γ| ≤ threshold, or the `sparsity` fraction with the smallest |γ|·λ (Eq. 2),
    leaving every channel group `min_keep` of its channels (at least one; 0: no floor)."""
    if threshold is not None:
        return apply_threshold(analysed.traced.gm, threshold, min_keep)
    if sparsity is not None:
        return apply_sparsity(analysed.traced.gm, sparsity, min_keep)
    return 0


def compile_analysed(
    analysed: Analysed,
    *,
    options: CompileOptions | None = None,
    threshold: float | None = None,
    sparsity: float | None = None,
    verify: int = 3,
    seed: int = 0,
    min_keep: float = DEFAULT_MIN_KEEP,
    allow_constant: bool = False,
) -> Compiled:
    """zero → compile → verify. With exact absorption a compact model that differs
    from the (zeroed) original by more than TOLERANCE raises VerificationError; one
    whose output no longer depends on its input raises ConstantOutputError (a
    VerificationError) unless `allow_constant`.

    Each forward pass serves every check that needs it: the zeroed original's output
    on the example is the drift's and the verification's; the compact model's outputs
    on the first two verification inputs are the input-dependence check's. The
    unzeroed original runs on a second input only when a compact output is constant
    (from copies of the BatchNorm tensors zeroing writes, so the model is not copied).
    """
    options = options or CompileOptions()
    gm, example = analysed.traced.gm, analysed.traced.example
    zeroing = threshold is not None or sparsity is not None
    reference = run_model(gm, example) if zeroing else None
    unzeroed = _zeroable_state(gm) if zeroing else {}
    zeroed = zero_channels(analysed, threshold=threshold, sparsity=sparsity, min_keep=min_keep)
    result = compile_model(analysed.traced, options)
    inputs = verification_inputs(example, verify, seed)
    checked = compare_outputs(gm, result.gm, inputs)
    drift = None
    if zeroed:
        drift = relative_error(reference, checked.expected[0] if inputs else run_model(gm, example))
    if options.absorb == "exact" and not checked.error <= TOLERANCE:
        raise VerificationError(
            f"compiled model differs from the original by {checked.error:.2e} (> {TOLERANCE:g}); "
            "nothing was written — please report this model to the fxprune issue tracker"
        )
    if not allow_constant:
        pair = (example, inputs[1] if len(inputs) > 1 else probe_input(example, seed))
        known = (checked.actual[0], checked.actual[1]) if len(inputs) > 1 else None

        def before() -> list[float]:  # the unzeroed original's dependence on its input
            if not zeroed:
                outs = checked.expected[:2] if known else [run_model(gm, x) for x in pair]
                return dependence(*outs)
            return dependence(reference, _run_with(gm, unzeroed, pair[1]))

        check_input_dependence(before, result.gm, gm, pair, known)
    return Compiled(result, zeroed, drift, checked.error, inputs, checked.actual)


def _zeroable_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Copies of the tensors zeroing may write (weight and bias of every BatchNorm
    site, by qualified name), with every parameter's version, so `_run_with` can run
    the unzeroed model later."""
    sites = {s.module for g in get_analysis(gm).groups for s in g.bn_sites}
    state = {
        name: p.detach().clone()
        for name, p in gm.named_parameters()
        if name.rpartition(".")[0] in sites
    }
    state[_VERSIONS] = {name: p._version for name, p in gm.named_parameters()}
    return state


_VERSIONS = "__versions__"


def _run_with(gm: fx.GraphModule, state: dict, x: torch.Tensor):
    """`gm`'s output on `x` with the tensors of `state` (from `_zeroable_state`) in
    place of its own; refuses if zeroing wrote a tensor that `state` did not copy."""
    versions, saved = state[_VERSIONS], {k: v for k, v in state.items() if k != _VERSIONS}
    changed = {n for n, p in gm.named_parameters() if p._version != versions.get(n, -1)}
    if not changed <= saved.keys():
        raise VerificationError(
            f"internal error: zeroing wrote {sorted(changed - saved.keys())[:3]}, which the "
            "input-dependence check did not save; nothing was written"
        )
    with eval_mode(gm), torch.no_grad():
        return torch.func.functional_call(gm, saved, (x,))


def artifact_metadata(
    source: str,
    example: torch.Tensor,
    before: ModelCounts,
    after: ModelCounts | None = None,
    **extra: object,
) -> dict:
    """The `fxprune.json` embedded in every artifact: versions, source, input shape,
    per-layer output channels, parameters and FLOPs (before → after when compiled)."""
    after = after or before
    channels = {
        name: {
            "before": layer.out_channels,
            "after": after.layers[name].out_channels if name in after.layers else 0,
        }
        for name, layer in before.layers.items()
    }
    return {
        "fxprune_version": fxprune.__version__,
        "torch_version": torch.__version__,
        "source": source,
        "input_shape": list(example.shape),
        "channels": channels,
        "params": {"before": before.params, "after": after.params},
        "flops": {"before": before.flops, "after": after.flops},
        **extra,
    }


def export_model(
    module: nn.Module,
    example: torch.Tensor,
    out: Path,
    fmt: str,
    *,
    metadata: dict,
    opset: int = 18,
    force: bool = False,
    protect: list[Path] | tuple = (),
) -> ExportResult:
    """Write `module` as a verified artifact in `fmt` (one of EXPORT_FORMATS)."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        return export_onnx(module, example, out, opset=opset, metadata=metadata, force=force,
                           protect=protect)  # fmt: skip
    export = export_pt2 if fmt == "pt2" else export_torchscript
    return export(module, example, out, metadata=metadata, force=force, protect=protect)


def export_source(
    source: str,
    fmt: str,
    out: Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    weights: Path | None = None,
    opset: int = 18,
    force: bool = False,
    trust_pickle: bool = False,
    arch: str | None = None,
) -> ExportResult:
    """load → trace → export a model as it is (no pruning), with `fxprune.json`."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    protect = [p for p in (Path(source), weights) if p is not None and Path(p).exists()]
    check_target(out, force=force, protect=protect)  # before any slow work
    loaded = load_model(
        source, weights=weights, input_shape=input_shape, trust_pickle=trust_pickle, arch=arch
    )
    traced = trace_model(loaded.module, loaded.example)
    counts = count_model(traced.gm, traced.example)
    extra = {"format": fmt, **({"opset": opset} if fmt == "onnx" else {})}
    metadata = artifact_metadata(source, traced.example, counts, frontend=traced.frontend, **extra)
    return export_model(traced.gm, traced.example, out, fmt, metadata=metadata, opset=opset,
                        force=force, protect=protect)  # fmt: skip


__all__ = [
    "Analysed",
    "Compiled",
    "EXPORT_FORMATS",
    "Progress",
    "artifact_metadata",
    "compile_analysed",
    "export_model",
    "export_source",
    "load_model",
    "loaded_module",
    "open_module",
    "open_source",
    "zero_channels",
]
