"""TorchScript artifacts: script (or trace) a compact model, embed `fxprune.json`,
write atomically and verify the temp file in a fresh process that cannot import
fxprune (see `fxprune.export.isolated`) before it replaces the target.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import ExportError, describe
from fxprune.export.isolated import IsolatedVerifier, verify_artifact
from fxprune.export.metadata import METADATA_NAME, ExportResult, metadata_json, quiet_torch
from fxprune.files import PathLike, atomic_write, check_target
from fxprune.verify import TOLERANCE, eval_mode, run_model

# --------------------------------------------------------------------------- TorchScript


def export_torchscript(
    module: nn.Module,
    example: torch.Tensor,
    path: PathLike,
    *,
    metadata: dict[str, Any],
    force: bool = False,
    protect: Sequence[PathLike] = (),
    verify: bool = True,
    rtol: float = TOLERANCE,
    verifier: IsolatedVerifier | None = None,
    expected: Any = None,
) -> ExportResult:
    """Write ``module`` as a TorchScript file with ``metadata`` embedded as ``fxprune.json``.

    Tries ``torch.jit.script``; if that fails, falls back to ``torch.jit.trace`` on
    ``example`` and says why in ``warnings``. With ``verify`` the temp file is run in a
    fresh Python process without fxprune before it replaces ``path``; a failed check
    raises VerificationError/ExportError and leaves ``path`` untouched. `verifier`
    is a verification process started earlier (see `IsolatedVerifier`); `expected`
    is ``module``'s output on ``example`` when the caller already has it.
    """
    check_target(path, force=force, protect=protect)
    meta_json = metadata_json(metadata)
    with eval_mode(module):
        expected = run_model(module, example) if expected is None else expected
        compiled, method, notes = _to_torchscript(module, example)
    if not verify:
        notes.append("not verified: verify=False")
    result = ExportResult(Path(path), "torchscript", method, notes, None, dict(metadata))

    def write(tmp: Path) -> None:
        with quiet_torch():
            torch.jit.save(compiled, str(tmp), _extra_files={METADATA_NAME: meta_json})
        if verify:
            result.max_rel_error = verify_artifact(
                tmp, example, expected, rtol=rtol, metadata=metadata, verifier=verifier
            )

    result.path = atomic_write(path, write, force=force, protect=protect)
    return result


def _untensored(err: BaseException) -> str:
    """`describe(err)` without the tensor values torch.jit prints; for a
    non-tensor output (a dict from a detection head), say what to do."""
    line = describe(err)
    if "cannot infer type of" in line:
        return (
            "an output is not a tensor or a tuple of tensors (e.g. a dict); "
            "--frontend export flattens the outputs"
        )
    return line.split("(tensor(")[0].strip()


def _to_torchscript(
    module: nn.Module, example: torch.Tensor
) -> tuple[torch.jit.ScriptModule, str, list[str]]:
    with quiet_torch():
        try:
            return torch.jit.script(module), "script", []
        except Exception as err:  # script fails in many ways; trace is the documented fallback
            reason = describe(err)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            try:
                # check_trace re-runs the model twice; the fresh-process check covers it.
                traced = torch.jit.trace(module, example, strict=False, check_trace=False)
            except Exception as err:
                raise ExportError(
                    f"torch.jit.script and torch.jit.trace both failed: {_untensored(err)}"
                ) from err
    notes = [
        f"torch.jit.script failed ({reason}); used torch.jit.trace, which records only the "
        "control flow taken for the example input"
    ]
    tracer = {
        str(w.message).splitlines()[0]
        for w in caught
        if issubclass(w.category, torch.jit.TracerWarning)
    }
    notes += [f"trace: {message}" for message in sorted(tracer)]
    return traced, "trace", notes


__all__ = [
    "export_torchscript",
]
