"""`.pt2` (torch.export) and ONNX artifacts, each verified before it replaces the target."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import ExportError, VerificationError, describe
from fxprune.export.metadata import METADATA_NAME, ExportResult, metadata_json, quiet_torch
from fxprune.files import PathLike, atomic_write, check_target
from fxprune.verify import TOLERANCE, check_tolerance, eval_mode, relative_error, run_model

# --------------------------------------------------------------------------- torch.export


def export_pt2(
    module: nn.Module,
    example: torch.Tensor,
    path: PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    protect: Sequence[PathLike] = (),
    rtol: float = TOLERANCE,
) -> ExportResult:
    """Write ``torch.export.export(module, (example,))`` as a ``.pt2`` file, verified.

    The temp file is loaded back with ``torch.export.load`` and compared in-process
    before it replaces ``path``. The program is specialised to ``example``'s shape.
    """
    check_target(path, force=force, protect=protect)
    meta_json = metadata_json(metadata or {})
    with eval_mode(module):
        expected = run_model(module, example)
        try:
            program = torch.export.export(module, (example,))
        except Exception as err:
            raise ExportError(f"torch.export could not capture the model: {describe(err)}") from err
    note = f"static shapes: the program accepts only inputs of shape {tuple(example.shape)}"
    result = ExportResult(Path(path), "pt2", "export", [note], None, dict(metadata or {}))

    def write(tmp: Path) -> None:
        torch.export.save(program, tmp, extra_files={METADATA_NAME: meta_json})
        extra = {METADATA_NAME: ""}
        loaded = torch.export.load(tmp, extra_files=extra)
        if json.loads(extra[METADATA_NAME] or "{}") != json.loads(meta_json):
            raise VerificationError(f"{path}: embedded metadata did not round-trip")
        with torch.no_grad():  # an exported program is in eval form already (no .eval())
            actual = loaded.module()(example)
        error = relative_error(expected, actual)
        result.max_rel_error = check_tolerance(error, str(path), rtol)

    result.path = atomic_write(path, write, force=force, protect=protect)
    return result


# --------------------------------------------------------------------------- ONNX


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: PathLike,
    *,
    opset: int = 18,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    protect: Sequence[PathLike] = (),
    rtol: float = TOLERANCE,
) -> ExportResult:
    """Write ``module`` as a single self-contained ``.onnx`` file (weights inline).

    Uses the dynamo exporter (needs onnx + onnxscript), falling back to the legacy
    TorchScript-based exporter with a warning. Verified with onnxruntime when it is
    installed; otherwise ``max_rel_error`` is None and a warning says so.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ExportError("ONNX export needs the onnx package: pip install fxprune[onnx]")
    check_target(path, force=force, protect=protect)
    meta_json = metadata_json(metadata or {})
    with eval_mode(module):
        expected = run_model(module, example)
        save, method, notes = _onnx_program(module, example, opset)
    notes.append(f"static shapes: the graph accepts only inputs of shape {tuple(example.shape)}")
    result = ExportResult(Path(path), "onnx", method, notes, None, dict(metadata or {}))

    def write(tmp: Path) -> None:
        save(tmp)
        _embed_onnx_metadata(tmp, meta_json)
        result.max_rel_error = _verify_onnx(tmp, example, expected, rtol, result.warnings)

    result.path = atomic_write(path, write, force=force, protect=protect)
    return result


def _onnx_program(
    module: nn.Module, example: torch.Tensor, opset: int
) -> tuple[Callable[[Path], None], str, list[str]]:
    """Capture the ONNX graph now; return a saver for the temp file, the method and notes."""
    reason = "onnxscript is not installed"
    if importlib.util.find_spec("onnxscript") is not None:
        try:
            with quiet_torch():
                program = torch.onnx.export(
                    module, (example,), dynamo=True, verbose=False, opset_version=opset
                )
            return (lambda tmp: program.save(tmp, external_data=False)), "dynamo", []
        except Exception as err:
            reason = f"the dynamo exporter failed ({describe(err)})"

    def save_legacy(tmp: Path) -> None:
        with quiet_torch():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # said once, in the note
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=opset)

    note = f"{reason}; used the legacy TorchScript-based ONNX exporter, which traces: it "
    return save_legacy, "legacy", [note + "records only the control flow taken for the example"]


def _embed_onnx_metadata(path: Path, meta_json: str) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = onnx.StringStringEntryProto(key=METADATA_NAME, value=meta_json)
    model.metadata_props.append(entry)
    try:
        onnx.save(model, str(path))
    except ValueError as err:  # protobuf's 2 GiB limit on a single file
        raise ExportError(f"ONNX model too large for a single file: {describe(err)}") from err


def _verify_onnx(
    path: Path, example: torch.Tensor, expected: Any, rtol: float, notes: list[str]
) -> float | None:
    if importlib.util.find_spec("onnxruntime") is None:
        notes.append("not verified: onnxruntime not installed (pip install fxprune[onnx])")
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    outputs = [torch.from_numpy(array) for array in session.run(None, feed)]
    return check_tolerance(relative_error(expected, outputs), str(path), rtol)


__all__ = [
    "export_onnx",
    "export_pt2",
]
