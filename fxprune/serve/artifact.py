"""The artifact `fxprune serve` feeds: a TorchScript or .pt2 file, its embedded
`fxprune.json`, and the batch size it accepts (a fixed-batch export is probed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxprune.errors import ExportError, UsageError, describe
from fxprune.export import METADATA_NAME
from fxprune.export.metadata import quiet_torch
from fxprune.load import check_input_shape
from fxprune.serve.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from fxprune.verify import flatten_outputs


@dataclass
class Artifact:
    """A loaded TorchScript or .pt2 artifact with what the server needs to feed it."""

    path: Path
    format: str  # "torchscript" | "pt2"
    module: Any
    metadata: dict[str, Any]
    input_shape: tuple[int, ...]  # (N, C, H, W) the artifact was exported with
    fixed_batch: int | None  # None: any batch size; else inputs must come in chunks of it
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.input_shape[1:]

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All output tensors for the batch ``x`` (chunked for fixed-batch artifacts)."""
        with torch.inference_mode():
            if self.fixed_batch is None:
                return flatten_outputs(self.module(x))
            chunks = [flatten_outputs(self.module(c)) for c in x.split(self.fixed_batch)]
            return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def load_artifact(path: Path, input_shape: tuple[int, ...] | None = None) -> Artifact:
    """Load ``path`` (.pt2 via torch.export, anything else as TorchScript) for serving.

    The input shape comes from ``input_shape`` or the embedded metadata. A probe with
    a batch of two tells whether the artifact accepts other batch sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such artifact file (write one with fxprune compile)")
    fmt = "pt2" if path.suffix == ".pt2" else "torchscript"
    module, metadata = _load_pt2(path) if fmt == "pt2" else _load_torchscript(path)
    if not (input_shape or metadata.get("input_shape")):
        raise UsageError(f"{path} records no input shape (no fxprune.json): pass --input-shape")
    shape = input_shape or check_input_shape(metadata["input_shape"], f"{path}'s input_shape")
    pre = metadata.get("preprocessing") or {}
    artifact = Artifact(path, fmt, module, metadata, shape, None)
    artifact.mean = tuple(pre.get("mean", IMAGENET_MEAN))
    artifact.std = tuple(pre.get("std", IMAGENET_STD))
    artifact.fixed_batch = _probe_fixed_batch(artifact)
    return artifact


def _load_torchscript(path: Path) -> tuple[Any, dict[str, Any]]:
    extra = {METADATA_NAME: ""}
    try:
        with quiet_torch():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise ExportError(f"{path} is not a loadable TorchScript file: {describe(err)}") from None
    raw = extra[METADATA_NAME]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return module.eval(), _metadata(path, raw)


def _load_pt2(path: Path) -> tuple[Any, dict[str, Any]]:
    extra = {METADATA_NAME: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:
        raise ExportError(f"{path} is not a loadable torch.export file: {describe(err)}") from None
    return program.module(), _metadata(path, extra[METADATA_NAME])


def _metadata(path: Path, raw: str | bytes) -> dict[str, Any]:
    """The embedded fxprune.json as a dict ({} when absent), or a one-line ExportError."""
    try:
        metadata = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as err:
        raise ExportError(
            f"{path}: its {METADATA_NAME} is not valid JSON: {describe(err)}"
        ) from None
    if not isinstance(metadata, dict):
        raise ExportError(f"{path}: its {METADATA_NAME} is not a JSON object")
    return metadata


def _probe_fixed_batch(artifact: Artifact) -> int | None:
    """None if a batch of two equals two single runs, else the exported batch size."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(artifact.input_shape, generator=gen)
    try:
        artifact.run(base)
    except Exception as err:
        raise ExportError(
            f"{artifact.path} does not run on its input shape {artifact.input_shape}: "
            f"{describe(err)}"
        ) from None
    pair = torch.randn((2, *artifact.sample_shape), generator=gen)
    try:
        together = artifact.run(pair)
        alone = [torch.cat(parts) for parts in zip(*map(artifact.run, pair.split(1)), strict=True)]
        same = all(
            torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(together, alone, strict=True)
        )
    except Exception:  # static shapes (torch.export, traced views): keep the exported batch
        same = False
    return None if same else artifact.input_shape[0]


__all__ = ["Artifact", "load_artifact"]
