"""One exception family for everything a user can get wrong.

The library raises these with a one-line message that names the problem and
the fix; only the CLI turns them into a line on stderr and an exit code.
"""

from __future__ import annotations

import re


class FxpruneError(Exception):
    """Base class: a user-facing error with a one-line message."""

    exit_code = 1


class UsageError(FxpruneError):
    """A bad option or a conflicting combination of options (exit code 2)."""

    exit_code = 2


class LoadError(FxpruneError):
    """A source (file, zoo name, factory) could not be turned into a model."""


class CheckpointError(LoadError):
    """A checkpoint or state_dict is corrupt, untrusted or does not fit the model."""


class TraceError(FxpruneError):
    """torch.fx could not trace the model, or the example input does not run."""


class CompileError(FxpruneError):
    """The compiler pass could not produce a model equal to the original."""


class VerificationError(CompileError):
    """A compiled model or artifact differs from the original beyond tolerance."""


class ExportError(FxpruneError):
    """An artifact could not be written or did not load back."""


class DataError(FxpruneError):
    """A data set is missing or not laid out as expected."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (ANSI colours removed),
    cut to `limit` characters; `with_type` prefixes the exception's class name."""
    text = _ANSI.sub("", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = (lines[0] if lines else type(exc).__name__)[:limit]
    return f"{type(exc).__name__}: {line}" if with_type else line


def describe(exc: BaseException) -> str:
    """`ExceptionType: first line of its message`, for one-line error reports."""
    return first_line(exc, with_type=True)


__all__ = [
    "CheckpointError",
    "CompileError",
    "DataError",
    "ExportError",
    "FxpruneError",
    "LoadError",
    "TraceError",
    "UsageError",
    "VerificationError",
    "describe",
    "first_line",
]
