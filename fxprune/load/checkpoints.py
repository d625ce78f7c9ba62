"""Checkpoints as data: what an fxprune checkpoint holds and how it is read.

A checkpoint is a dict written with `torch.save` and read only with
`torch.load(weights_only=True)` (tensors, numbers, strings, lists, dicts):

  format          "fxprune-checkpoint"
  format_version  2
  architecture    {"kind": "plan", "base": BASE, "steps": [STEP, ...]}
  input_shape     [N, C, ...]: the input of the model the state_dict belongs to
  state_dict      name -> tensor
  extra           plain data (training state, snapshot information)

BASE is `zoo:NAME` or `torchvision:NAME`, honoured from the file, or
`pkg.mod:factory`, honoured only when the user names the same factory on the
command line (`--arch`). Each STEP is one compile: the input shape and
submodule it traced and the compiler's plan (`fxprune.compile.ChannelPlan`).
Nothing read from the file is executed, imported or called: the loader
rebuilds BASE, the pipeline re-applies each step with the same compiler, and
the state_dict is loaded strictly.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from torch import nn

import fxprune
from fxprune.errors import CheckpointError
from fxprune.files import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "REGISTRY_PREFIXES",
    "architecture_for",
    "checkpoint_base",
    "checkpoint_dict",
    "checked_shape",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "fxprune-checkpoint"
FORMAT_VERSION = 2
REGISTRY_PREFIXES = ("zoo:", "torchvision:")
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SAFE_WAY = (
    "rebuild it from its base model (fxprune compile zoo:NAME --weights W.pt "
    "--save-checkpoint new.pt) or use the .ts artifact"
)


def architecture_for(source: str) -> dict | None:
    """The architecture record for a model built from the command-line `source`
    (`zoo:`, `torchvision:` or `pkg.mod:factory`); None for anything else."""
    if source.startswith(REGISTRY_PREFIXES) or FACTORY.match(source):
        return {"kind": "plan", "base": source, "steps": []}
    return None


def checkpoint_dict(
    module: nn.Module,
    *,
    input_shape: tuple[int, ...],
    architecture: dict,
    extra: dict | None = None,
) -> dict:
    """The checkpoint fxprune writes for `module` (data only, see module docstring)."""
    if not isinstance(architecture, dict) or architecture.get("kind") != "plan":
        raise ValueError("architecture must be a plan record (see architecture_for)")
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "fxprune_version": fxprune.__version__,
        "architecture": {
            "kind": "plan",
            "base": str(architecture["base"]),
            "steps": list(architecture.get("steps") or []),
        },
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "input_shape": [int(d) for d in input_shape],
        "extra": extra or {},
    }


def save_checkpoint(path: Path, checkpoint: dict, *, force: bool = False, protect=()) -> Path:
    """Write a checkpoint atomically (temp file in the target directory, then rename)."""

    def writer(tmp: Path) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp.write_bytes(buffer.getvalue())

    return atomic_write(Path(path), writer, force=force, protect=protect)


def checked_shape(value, origin: str) -> tuple[int, ...]:
    """An input shape read from a file, checked like every input shape
    (`sources.check_input_shape`); a bad one is a CheckpointError."""
    from fxprune.load.sources import check_input_shape  # sources imports this module

    return check_input_shape(value, f"{origin}: input_shape", error=CheckpointError)


def checkpoint_base(ckpt: dict, origin: str, arch: str | None) -> tuple[str, list[dict]]:
    """(base, steps) of a checkpoint read from a file, after the trust policy:
    registry bases are honoured, a factory only if `arch` names it, code never."""
    record = ckpt.get("architecture")
    if not isinstance(record, dict):
        raise CheckpointError(f"{origin}: checkpoint names no architecture")
    kind = record.get("kind")
    if kind == "python":
        raise CheckpointError(
            f"{origin} is an old fxprune checkpoint that stores Python source, which fxprune "
            f"no longer runs: {SAFE_WAY}"
        )
    if kind == "source":  # format 1: a source string and no compile steps
        base, steps = record.get("source"), []
    elif kind == "plan":
        base, steps = record.get("base"), record.get("steps")
    else:
        raise CheckpointError(f"{origin}: unknown architecture kind {str(kind)[:40]!r}")
    return _trusted_base(base, origin, arch), _checked_steps(steps, origin)


def _trusted_base(base, origin: str, arch: str | None) -> str:
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{origin}: checkpoint names no base architecture")
    if base.startswith(REGISTRY_PREFIXES):
        if arch is not None:
            raise CheckpointError(f"{origin} is built on {base}: --arch {arch} does not apply")
        return base
    if not FACTORY.match(base):
        raise CheckpointError(
            f"{origin}: base architecture {base[:80]!r} is not zoo:NAME, torchvision:NAME "
            "or pkg.mod:factory"
        )
    if arch is None:
        raise CheckpointError(
            f"{origin} is built on the factory {base}; fxprune imports and calls code only "
            f"when you name it: add --arch {base} if you trust that code"
        )
    if arch != base:
        raise CheckpointError(f"{origin} is built on {base}, not on --arch {arch}")
    return base


def _checked_steps(steps, origin: str) -> list[dict]:
    if not isinstance(steps, list) or len(steps) > 64:
        raise CheckpointError(f"{origin}: checkpoint steps are not a list of compile steps")
    checked = []
    for step in steps:
        if not isinstance(step, dict) or not isinstance(step.get("plan"), dict):
            raise CheckpointError(f"{origin}: a compile step is not a record with a plan")
        submodule = step.get("submodule")
        if submodule is not None and not (isinstance(submodule, str) and len(submodule) < 200):
            raise CheckpointError(f"{origin}: a compile step names a bad submodule")
        shape = checked_shape(step.get("input_shape"), origin)
        checked.append({"input_shape": list(shape), "submodule": submodule, "plan": step["plan"]})
    return checked
