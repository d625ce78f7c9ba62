"""Write deployment artifacts atomically and prove each one loads without fxprune.

Every file fxprune writes goes through :func:`atomic_write`: a temp file in the
target's directory, fsync, ``os.replace``, fsync of the directory. A failed
write (or a failed verification, which runs on the temp file) leaves the old
target byte-identical and no temp litter behind.

TorchScript artifacts are verified in a fresh ``python -I`` process, so an
artifact that secretly needs fxprune (or anything on ``PYTHONPATH``) fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import ExportError, UsageError, VerificationError

TMP_MARKER = ".fxprune-tmp-"
METADATA_NAME = "fxprune.json"
CHILD_TIMEOUT_S = 600

PathLike = str | os.PathLike


@dataclass
class ExportResult:
    """What an exporter wrote and how far the artifact's outputs are from the module's."""

    path: Path
    format: str  # "torchscript" | "pt2" | "onnx"
    method: str  # "script" | "trace" | "export" | "dynamo" | "legacy"
    warnings: list[str] = field(default_factory=list)
    max_rel_error: float | None = None  # None: not verified (see warnings)
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- atomic writes


def check_target(path: PathLike, *, force: bool = False, protect: Sequence[PathLike] = ()) -> Path:
    """Return ``path`` as an absolute Path if fxprune may write it, else raise ExportError.

    Refuses the protected input files (also through symlinks and hard links), a missing
    directory, a directory as target, and an existing file unless ``force``.
    """
    target = Path(path).expanduser().absolute()
    for guarded in protect:
        if _same_file(target, Path(guarded).expanduser()):
            raise ExportError(
                f"refusing to overwrite the input file {guarded}: choose another output path"
            )
    if not target.parent.is_dir():
        raise ExportError(f"directory {target.parent} does not exist: create it first (mkdir -p)")
    if target.is_dir():
        raise ExportError(f"{target} is a directory: give a file name")
    if target.exists() and not force:
        raise ExportError(f"{target} already exists: pass --force to overwrite it")
    return target


def atomic_write(
    path: PathLike,
    writer: Callable[[Path], None],
    *,
    force: bool = False,
    protect: Sequence[PathLike] = (),
) -> Path:
    """Write ``path`` all-or-nothing: ``writer(tmp)`` fills a temp file, then it is renamed.

    On any exception from ``writer`` the temp file is removed and the exception re-raised;
    an existing target is untouched. Returns the absolute target path.
    """
    target = check_target(path, force=force, protect=protect)
    clean_stale_temps(target)  # what a killed earlier write of this target left behind
    tmp = _create_temp(target)
    try:
        writer(tmp)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(target.parent)
    return target


def clean_stale_temps(path: PathLike, *, min_age_s: float = 3600.0) -> list[Path]:
    """Delete temp files left by interrupted writes of ``path``: those whose writer
    (the pid in the name) is no longer running on this host, and any older than
    ``min_age_s``. A live concurrent writer's temp file is kept. Returns what was removed.
    """
    target = Path(path).absolute()
    removed = []
    now = time.time()
    for litter in target.parent.glob(f".{target.name}{TMP_MARKER}*"):
        with contextlib.suppress(FileNotFoundError):
            if _writer_gone(litter, target) or now - litter.stat().st_mtime >= min_age_s:
                litter.unlink()
                removed.append(litter)
    return removed


def _writer_gone(litter: Path, target: Path) -> bool:
    """True when the temp name `.NAME.fxprune-tmp-PID-HEX.SUFFIX` names a pid that
    no longer runs here (a name without a pid is left to the age rule)."""
    pid, sep, _ = litter.name[len(f".{target.name}{TMP_MARKER}") :].partition("-")
    if not (pid.isdigit() and sep):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, under another user
        return False
    return False


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def _create_temp(target: Path) -> Path:
    # os.open with 0o666 lets the umask decide the mode, as for any normal file; the
    # target's suffix is kept because some writers (torch.export.save) insist on it.
    for _ in range(100):
        name = f".{target.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"
        tmp = target.parent / name
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise ExportError(f"could not create a temp file next to {target}: clean {TMP_MARKER}* files")


def _fsync_path(path: Path) -> None:
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- outputs


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """All tensors in a model output, in order: tuples/lists in order, dicts in key order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in flatten_outputs(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in flatten_outputs(value)]
    return []  # None and non-tensor values carry nothing to compare


def relative_error(expected: Any, actual: Any) -> float:
    """max |expected - actual| over all output tensors / max |expected| (floor 1e-12).

    Raises VerificationError if the outputs do not have the same tensors and shapes.
    """
    want, got = flatten_outputs(expected), flatten_outputs(actual)
    if len(want) != len(got):
        raise VerificationError(f"artifact returned {len(got)} tensors, expected {len(want)}")
    scale, diff = 1e-12, 0.0
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if tuple(a.shape) != tuple(b.shape):
            raise VerificationError(
                f"output {i} has shape {tuple(b.shape)}, expected {tuple(a.shape)}"
            )
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.numel() == 0:
            continue
        both_nan = torch.isnan(a) & torch.isnan(b)
        delta = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
        diff = max(diff, float(torch.nan_to_num(delta, nan=float("inf")).max()))
        scale = max(scale, float(torch.nan_to_num(a.abs(), nan=0.0).max()))
    return diff / scale


def _check_tolerance(error: float, rtol: float, what: str) -> float:
    if not error <= rtol:
        raise VerificationError(f"{what} differs from the module: {error:.3g} > rtol {rtol:g}")
    return error


def _eval_outputs(module: nn.Module, example: torch.Tensor) -> Any:
    with torch.no_grad():
        return module(example)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore its training flag after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation notices for TorchScript / legacy ONNX around our calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy")
        warnings.filterwarnings("ignore", message=r".*removed.*remove usage")
        warnings.filterwarnings("ignore", category=UserWarning, message=r"The TorchScript type")
        yield


def _metadata_json(metadata: dict[str, Any]) -> str:
    try:
        return json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise UsageError(f"metadata must be JSON-serializable: {err}") from err


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch.onnx colours its messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else '(no message)'}"


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
    rtol: float = 1e-4,
) -> ExportResult:
    """Write ``module`` as a TorchScript file with ``metadata`` embedded as ``fxprune.json``.

    Tries ``torch.jit.script``; if that fails, falls back to ``torch.jit.trace`` on
    ``example`` and says why in ``warnings``. With ``verify`` the temp file is run in a
    fresh Python process without fxprune before it replaces ``path``; a failed check
    raises VerificationError/ExportError and leaves ``path`` untouched.
    """
    check_target(path, force=force, protect=protect)
    meta_json = _metadata_json(metadata)
    with _eval_mode(module):
        expected = _eval_outputs(module, example)
        compiled, method, notes = _to_torchscript(module, example)
    if not verify:
        notes.append("not verified: verify=False")
    result = ExportResult(Path(path), "torchscript", method, notes, None, dict(metadata))

    def write(tmp: Path) -> None:
        with _quiet_torch():
            torch.jit.save(compiled, str(tmp), _extra_files={METADATA_NAME: meta_json})
        if verify:
            result.max_rel_error = verify_artifact(
                tmp, example, expected, rtol=rtol, metadata=metadata
            )

    result.path = atomic_write(path, write, force=force, protect=protect)
    return result


def _to_torchscript(
    module: nn.Module, example: torch.Tensor
) -> tuple[torch.jit.ScriptModule, str, list[str]]:
    with _quiet_torch():
        try:
            return torch.jit.script(module), "script", []
        except Exception as err:  # script fails in many ways; trace is the documented fallback
            reason = _first_line(err)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            try:
                # check_trace re-runs the model twice; the fresh-process check covers it.
                traced = torch.jit.trace(module, example, strict=False, check_trace=False)
            except Exception as err:
                raise ExportError(
                    f"torch.jit.script and torch.jit.trace both failed: {_first_line(err)}"
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


# The child runs with -I (no PYTHONPATH, user site or current directory) and a meta-path
# hook that makes fxprune unimportable even where it is installed: the artifact must
# load with torch alone.
_CHILD_SOURCE = r"""
import importlib, importlib.abc, sys, warnings
class NoFxprune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fxprune" or name.startswith("fxprune."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by fxprune verify)")
sys.meta_path.insert(0, NoFxprune())
try:
    importlib.import_module("fxprune")
    raise AssertionError("fxprune is importable in the verification process")
except ImportError as err:
    import_error = str(err)
warnings.simplefilter("ignore")
import torch
artifact, inputs, outputs = sys.argv[1:4]
extra = {"fxprune.json": ""}
module = torch.jit.load(artifact, map_location="cpu", _extra_files=extra)
def plain(value):  # namedtuples and custom classes would not pass weights_only loading
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return None
with torch.no_grad():
    out = plain(module(torch.load(inputs, weights_only=True)))
assert "fxprune" not in sys.modules, "loading the artifact imported fxprune"
meta = extra["fxprune.json"]
meta = meta.decode() if isinstance(meta, bytes) else meta
torch.save({"output": out, "metadata": meta, "import_error": import_error}, outputs)
"""


@dataclass
class IsolatedRun:
    """What a fresh ``python -I`` process, unable to import fxprune, saw running an artifact."""

    output: Any
    metadata: dict[str, Any] | None
    fxprune_import_error: str  # the child's proof that ``import fxprune`` failed


def run_artifact_isolated(path: PathLike, example: torch.Tensor) -> IsolatedRun:
    """Load a TorchScript file in a fresh isolated Python, run ``example``, return what it saw.

    The child cannot import fxprune (checked before loading, and ``sys.modules`` is
    checked after running). Raises ExportError, with the child's last stderr line, if
    the child fails.
    """
    with tempfile.TemporaryDirectory(prefix="fxprune-verify-") as work:
        inputs, outputs = Path(work, "inputs.pt"), Path(work, "outputs.pt")
        torch.save(example.detach().cpu(), inputs)
        argv = [str(Path(path).absolute()), str(inputs), str(outputs)]
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD_SOURCE, *argv],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as err:
            raise ExportError(
                f"loading {path} in a fresh process timed out ({err.timeout}s)"
            ) from err
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise ExportError(f"{path} does not load in a fresh Python without fxprune: {last}")
        report = torch.load(outputs, weights_only=True)
    meta = report["metadata"]
    return IsolatedRun(report["output"], json.loads(meta) if meta else None, report["import_error"])


def verify_artifact(
    path: PathLike,
    example: torch.Tensor,
    expected: Any,
    *,
    rtol: float = 1e-4,
    metadata: dict[str, Any] | None = None,
) -> float:
    """Run a TorchScript artifact in a separate process; return its relative output error.

    The error is max |expected - actual| / max |expected| over all output tensors.
    Raises VerificationError beyond ``rtol`` or if the embedded metadata differs from
    ``metadata`` (when given), ExportError if the artifact does not load or run.
    """
    run = run_artifact_isolated(path, example)
    if metadata is not None and run.metadata != json.loads(_metadata_json(metadata)):
        raise VerificationError(f"{path}: embedded metadata {run.metadata} != expected {metadata}")
    return _check_tolerance(relative_error(expected, run.output), rtol, str(path))


def read_metadata(path: PathLike) -> dict[str, Any] | None:
    """The ``fxprune.json`` metadata embedded in a TorchScript file, or None if absent."""
    extra = {METADATA_NAME: ""}
    with _quiet_torch():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[METADATA_NAME]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return json.loads(raw) if raw else None


# --------------------------------------------------------------------------- torch.export


def export_pt2(
    module: nn.Module,
    example: torch.Tensor,
    path: PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    protect: Sequence[PathLike] = (),
    rtol: float = 1e-4,
) -> ExportResult:
    """Write ``torch.export.export(module, (example,))`` as a ``.pt2`` file, verified.

    The temp file is loaded back with ``torch.export.load`` and compared in-process
    before it replaces ``path``. The program is specialised to ``example``'s shape.
    """
    check_target(path, force=force, protect=protect)
    meta_json = _metadata_json(metadata or {})
    with _eval_mode(module):
        expected = _eval_outputs(module, example)
        try:
            program = torch.export.export(module, (example,))
        except Exception as err:
            raise ExportError(
                f"torch.export could not capture the model: {_first_line(err)}"
            ) from err
    note = f"static shapes: the program accepts only inputs of shape {tuple(example.shape)}"
    result = ExportResult(Path(path), "pt2", "export", [note], None, dict(metadata or {}))

    def write(tmp: Path) -> None:
        torch.export.save(program, tmp, extra_files={METADATA_NAME: meta_json})
        extra = {METADATA_NAME: ""}
        loaded = torch.export.load(tmp, extra_files=extra)
        if json.loads(extra[METADATA_NAME] or "{}") != json.loads(meta_json):
            raise VerificationError(f"{path}: embedded metadata did not round-trip")
        error = relative_error(expected, _eval_outputs(loaded.module(), example))
        result.max_rel_error = _check_tolerance(error, rtol, str(path))

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
    rtol: float = 1e-4,
) -> ExportResult:
    """Write ``module`` as a single self-contained ``.onnx`` file (weights inline).

    Uses the dynamo exporter (needs onnx + onnxscript), falling back to the legacy
    TorchScript-based exporter with a warning. Verified with onnxruntime when it is
    installed; otherwise ``max_rel_error`` is None and a warning says so.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ExportError("ONNX export needs the onnx package: pip install fxprune[onnx]")
    check_target(path, force=force, protect=protect)
    meta_json = _metadata_json(metadata or {})
    with _eval_mode(module):
        expected = _eval_outputs(module, example)
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
            with _quiet_torch():
                program = torch.onnx.export(
                    module, (example,), dynamo=True, verbose=False, opset_version=opset
                )
            return (lambda tmp: program.save(tmp, external_data=False)), "dynamo", []
        except Exception as err:
            reason = f"the dynamo exporter failed ({_first_line(err)})"

    def save_legacy(tmp: Path) -> None:
        with _quiet_torch():
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
        raise ExportError(f"ONNX model too large for a single file: {_first_line(err)}") from err


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
    return _check_tolerance(relative_error(expected, outputs), rtol, str(path))
