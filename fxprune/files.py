"""Every file fxprune writes goes through `atomic_write`: a temp file in the
target's directory, fsync, `os.replace`, fsync of the directory. A failed
write (or a failed verification, which runs on the temp file) leaves the old
target byte-identical and no temp litter behind. `check_target` says up front
whether a path may be written.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from fxprune.errors import ExportError, UsageError

TMP_MARKER = ".fxprune-tmp-"

PathLike = str | os.PathLike


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
    _check_writable(target)
    return target


def _check_writable(target: Path) -> None:
    """Create and remove the temp file a write of ``target`` uses: a name too long for
    the file system, a read-only or foreign directory fail here, before any work."""
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    needed = len(_temp_name(target, "0" * 8).encode())
    if needed > limit:
        spare = limit - (needed - len(target.name.encode()))
        raise ExportError(
            f"output name {target.name[:40]}… is {len(target.name.encode())} bytes long: at most "
            f"{spare} fit in {target.parent} (fxprune writes a longer temp name beside it first)"
        )
    try:
        _create_temp(target).unlink()
    except OSError as exc:
        raise ExportError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None


def check_distinct(outputs: Mapping[str, PathLike | None]) -> None:
    """Refuse two outputs of one command that are the same file (also through symlinks
    and hard links): one would silently replace the other. ``outputs`` maps an option
    name to its path (None: not asked for)."""
    seen: list[tuple[str, Path]] = []
    for label, path in outputs.items():
        if path is None:
            continue
        target = Path(path).expanduser().absolute()
        for other_label, other in seen:
            if _same_file(target, other):
                raise UsageError(f"{other_label} and {label} are the same file ({path}): "
                                 "give each output its own path")  # fmt: skip
        seen.append((label, target))


_STAGE: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "fxprune_staged_writes", default=None
)


@contextlib.contextmanager
def staged_writes() -> Iterator[None]:
    """All-or-nothing for the outputs of one command. Inside, :func:`atomic_write` only
    fills (and verifies) temp files; when the block ends cleanly they replace their
    targets one after the other; when it raises, every temp file is removed and no
    target has been touched. (Only a crash between two renames can split the set.)"""
    stage: list[tuple[Path, Path]] = []
    token = _STAGE.set(stage)
    try:
        yield
    except BaseException:
        _discard(stage)
        raise
    finally:
        _STAGE.reset(token)
    try:
        while stage:
            tmp, target = stage[0]
            os.replace(tmp, target)
            stage.pop(0)
            _fsync_path(target.parent)
    finally:
        _discard(stage)


def _discard(stage: list[tuple[Path, Path]]) -> None:
    for tmp, _target in stage:
        tmp.unlink(missing_ok=True)
    stage.clear()


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
    stage = _STAGE.get()
    if stage is not None and any(_same_file(target, staged) for _tmp, staged in stage):
        raise ExportError(f"{target} is written twice by one command")
    clean_stale_temps(target)  # what a killed earlier write of this target left behind
    tmp = _create_temp(target)
    try:
        writer(tmp)
        _fsync_path(tmp)
        if stage is not None:  # staged_writes() renames it with the others
            stage.append((tmp, target))
            return target
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
    prefix = f".{target.name}{TMP_MARKER}"  # compared as text: the name may hold * or [
    for litter in [p for p in target.parent.iterdir() if p.name.startswith(prefix)]:
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
        tmp = target.parent / _temp_name(target, secrets.token_hex(4))
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise ExportError(f"could not create a temp file next to {target}: clean {TMP_MARKER}* files")


def _temp_name(target: Path, token: str) -> str:
    return f".{target.name}{TMP_MARKER}{os.getpid()}-{token}{target.suffix}"


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


__all__ = [
    "TMP_MARKER",
    "PathLike",
    "atomic_write",
    "check_distinct",
    "check_target",
    "clean_stale_temps",
    "staged_writes",
]
