"""What every artifact carries: `fxprune.json` metadata, and the export result record."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxprune.errors import UsageError
from fxprune.files import PathLike

METADATA_NAME = "fxprune.json"


@dataclass
class ExportResult:
    """What an exporter wrote and how far the artifact's outputs are from the module's."""

    path: Path
    format: str  # "torchscript" | "pt2" | "onnx"
    method: str  # "script" | "trace" | "export" | "dynamo" | "legacy"
    warnings: list[str] = field(default_factory=list)
    max_rel_error: float | None = None  # None: not verified (see warnings)
    metadata: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation notices for TorchScript / legacy ONNX around our calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy")
        warnings.filterwarnings("ignore", message=r".*removed.*remove usage")
        warnings.filterwarnings("ignore", category=UserWarning, message=r"The TorchScript type")
        yield


def metadata_json(metadata: dict[str, Any]) -> str:
    try:
        return json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise UsageError(f"metadata must be JSON-serializable: {err}") from err


def read_metadata(path: PathLike) -> dict[str, Any] | None:
    """The ``fxprune.json`` metadata embedded in a TorchScript file, or None if absent."""
    extra = {METADATA_NAME: ""}
    with quiet_torch():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[METADATA_NAME]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return json.loads(raw) if raw else None


__all__ = [
    "ExportResult",
    "METADATA_NAME",
    "metadata_json",
    "quiet_torch",
    "read_metadata",
]
