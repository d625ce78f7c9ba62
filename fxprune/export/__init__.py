"""Stage 6, export: deployment artifacts (TorchScript, `.pt2`, ONNX, readable
Python), each written atomically and verified against the module it came from;
TorchScript artifacts are run in a fresh process that cannot import fxprune."""

from fxprune.export.formats import export_onnx, export_pt2
from fxprune.export.isolated import (
    IsolatedRun,
    IsolatedVerifier,
    run_artifact_isolated,
    verify_artifact,
)
from fxprune.export.metadata import METADATA_NAME, ExportResult, read_metadata
from fxprune.export.python import emit_python, flat_module
from fxprune.export.torchscript import export_torchscript

__all__ = [
    "METADATA_NAME",
    "ExportResult",
    "IsolatedRun",
    "IsolatedVerifier",
    "emit_python",
    "export_onnx",
    "export_pt2",
    "export_torchscript",
    "flat_module",
    "read_metadata",
    "run_artifact_isolated",
    "verify_artifact",
]
