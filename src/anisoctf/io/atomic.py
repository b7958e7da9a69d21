"""Atomic file output: a file is either written completely or not touched at all.

Every writer in :mod:`anisoctf.io` goes through this module. Data is written to a hidden
temporary file in the target's directory (``.<name>.<random>.tmp``), flushed and fsynced, and
only then moved onto the target with :func:`os.replace`, which is atomic on POSIX and Windows
when source and target are on the same file system. If anything goes wrong before that, the
temporary file is removed and an existing target is left exactly as it was, so an interrupted
run never leaves a half-written STAR, MRC or text file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "write_bytes_atomic", "write_text_atomic"]

_ALLOWED_MODES = {"w", "wt", "wb"}


def _current_umask() -> int:
    """The process umask (read once; ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _fsync_directory(directory: Path) -> None:
    """Best-effort fsync of a directory so that a rename survives a crash."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _final_mode(target: Path) -> int:
    """Permissions for the new file: those of the file it replaces, else ``0o666 & ~umask``."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Give a temporary path that replaces ``path`` when the block succeeds.

    Use this for libraries that insist on opening the file themselves (e.g. ``mrcfile.new``).
    The temporary file already exists (empty) when the block starts.

    Parameters
    ----------
    path
        The file to create or replace. Its directory must exist.
    durable
        fsync the file (and its directory) so that it survives a crash of the machine, not
        only of the process. False for files that are cheap to make again (pictures): the
        rename is still atomic, so no reader ever sees a partial file.

    Yields
    ------
    pathlib.Path
        Hidden temporary file in the same directory, named ``.<name>.<random>.tmp``.

    Raises
    ------
    OSError
        When the temporary file cannot be created or moved into place. Any exception raised
        inside the block propagates unchanged after the temporary file has been removed.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if durable:  # make sure the bytes are on disk before the rename makes them visible
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, _final_mode(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync_directory(directory)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", durable: bool = True
) -> Iterator[IO[Any]]:
    """Open a file for writing so that it appears only once it is complete.

    Parameters
    ----------
    path
        The file to create or replace. Its directory must exist.
    mode
        ``"w"`` or ``"wt"`` for UTF-8 text with ``"\\n"`` line endings, ``"wb"`` for bytes.
    durable
        See :func:`atomic_path`.

    Yields
    ------
    IO
        An open file object on the temporary file.

    Raises
    ------
    ValueError
        For a mode other than ``"w"``, ``"wt"`` or ``"wb"``.

    Examples
    --------
    >>> with atomic_write("out.star") as fh:  # doctest: +SKIP
    ...     fh.write("data_\\n")
    """
    if mode not in _ALLOWED_MODES:
        raise ValueError(f"atomic_write mode must be one of {sorted(_ALLOWED_MODES)}, got {mode!r}")
    with atomic_path(path, durable) as tmp:
        if "b" in mode:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                yield fh
                fh.flush()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Parameters
    ----------
    path
        Target file.
    text
        The complete new contents.
    """
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path
        Target file.
    data
        The complete new contents.
    durable
        See :func:`atomic_path`.
    """
    with atomic_write(path, "wb", durable) as fh:
        fh.write(data)
