"""Files written whole or not at all, and output paths checked before any work is done.

``atomic_write`` writes to a temporary file beside the target, flushes it to disk, renames it over
the target and flushes the folder, so a crash at any moment leaves either the old file or the new
one, never a mix. Files get the permissions the user's umask gives (not a temporary file's 0600).
Temporary files a killed writer left behind are removed by the next write of the same target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]

_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def leftover_temporaries(path: PathLike) -> list[Path]:
    """Temporary files of ``atomic_write(path, ...)`` that a killed writer left behind."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"))


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes to a binary file, atomically.

    The folder is created if need be. On any error the target is left as it was and the
    temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in leftover_temporaries(path):
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``atomic_write`` of a text, UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_figure(path: PathLike, figure: Any) -> Path:
    """``atomic_write`` of a figure (anything with matplotlib's ``savefig(file, format=...)``), in the
    format its suffix names (``.png``, ``.svg``, ``.pdf``; PNG without one)."""
    path = Path(path)
    kind = path.suffix[1:].lower() or "png"
    return atomic_write(path, lambda f: figure.savefig(f, format=kind))


def check_writable(path: PathLike, what: str, folder: bool = False) -> Path:
    """Raise a ``ValueError`` naming ``what`` (``"--log"``, ``"checkpoint"``) unless ``path`` (a file,
    or a folder with ``folder=True``) can be created or replaced. Creates no file; may create the
    missing folders above it, as the writer would."""
    path = Path(path)
    target_folder = path if folder else path.parent
    if not folder and path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file path")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; give a folder")
    existing = target_folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r}: the folder {str(existing)!r} is not writable")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} exists and is not writable")
    return path
