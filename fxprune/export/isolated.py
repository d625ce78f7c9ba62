"""Prove an artifact loads without fxprune: run it in a fresh `python -I`
process whose import system refuses fxprune, and compare its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxprune.errors import ExportError, VerificationError
from fxprune.export.metadata import metadata_json
from fxprune.files import PathLike
from fxprune.verify import TOLERANCE, check_tolerance, relative_error

CHILD_TIMEOUT_S = 600

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
# the arguments come on stdin, so the parent can start this process (and its
# torch import) early and hand over the artifact once it exists
artifact, inputs, outputs = sys.stdin.readline().rstrip("\n").split("\t")
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


class IsolatedVerifier:
    """A fresh `python -I` process that cannot import fxprune, started early so its
    torch import overlaps the caller's work; `run` hands it one artifact.

    Use as a context manager, or call `close()`; an unused process is killed.
    """

    def __init__(self) -> None:
        self._work = tempfile.TemporaryDirectory(prefix="fxprune-verify-")
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD_SOURCE],
            cwd=self._work.name,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, path: PathLike, example: torch.Tensor) -> IsolatedRun:
        """Run the TorchScript file at `path` on `example` in the child; once only."""
        inputs, outputs = Path(self._work.name, "inputs.pt"), Path(self._work.name, "outputs.pt")
        torch.save(example.detach().cpu(), inputs)
        line = "\t".join([str(Path(path).absolute()), str(inputs), str(outputs)]) + "\n"
        try:
            _, stderr = self._proc.communicate(line, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            self.close()
            raise ExportError(
                f"loading {path} in a fresh process timed out ({err.timeout}s)"
            ) from err
        if self._proc.returncode != 0:
            last = (stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise ExportError(f"{path} does not load in a fresh Python without fxprune: {last}")
        report = torch.load(outputs, weights_only=True)
        meta = report["metadata"]
        return IsolatedRun(
            report["output"], json.loads(meta) if meta else None, report["import_error"]
        )

    def close(self) -> None:
        """Stop the child if it still runs and remove its working directory."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        self._work.cleanup()

    def __enter__(self) -> IsolatedVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_artifact_isolated(
    path: PathLike, example: torch.Tensor, verifier: IsolatedVerifier | None = None
) -> IsolatedRun:
    """Load a TorchScript file in a fresh isolated Python, run ``example``, return what it saw.

    The child cannot import fxprune (checked before loading, and ``sys.modules`` is
    checked after running). Raises ExportError, with the child's last stderr line, if
    the child fails. `verifier` is a child started earlier (it is used up).
    """
    with verifier or IsolatedVerifier() as child:
        return child.run(path, example)


def verify_artifact(
    path: PathLike,
    example: torch.Tensor,
    expected: Any,
    *,
    rtol: float = TOLERANCE,
    metadata: dict[str, Any] | None = None,
    verifier: IsolatedVerifier | None = None,
) -> float:
    """Run a TorchScript artifact in a separate process; return its relative output error.

    The error is max |expected - actual| / max |expected| over all output tensors.
    Raises VerificationError beyond ``rtol`` or if the embedded metadata differs from
    ``metadata`` (when given), ExportError if the artifact does not load or run.
    """
    run = run_artifact_isolated(path, example, verifier)
    if metadata is not None and run.metadata != json.loads(metadata_json(metadata)):
        raise VerificationError(f"{path}: embedded metadata {run.metadata} != expected {metadata}")
    return check_tolerance(relative_error(expected, run.output), str(path), rtol)


__all__ = [
    "CHILD_TIMEOUT_S",
    "IsolatedRun",
    "run_artifact_isolated",
    "verify_artifact",
]
