"""Every file fxprune writes goes through `atomic_write`: a temp file in the
target's directory, fsync, `os.replace`, fsync of the directory. A failed
write (or a failed verification, which runs on the temp file) leaves the old
target byte-identical and no temp litter behind. `check_target` says up front
whether a path may be written.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fxprune.errors import ExportError

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


__all__ = ["TMP_MARKER", "PathLike", "atomic_write", "check_target", "clean_stale_temps"]
