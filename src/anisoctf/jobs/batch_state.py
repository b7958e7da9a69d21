"""State of a resumable batch: parameter fingerprints, per-micrograph records and the lock.

A batch job (``anisoctf estimate``) keeps, for every micrograph it has finished, one small JSON
*record* in the output directory, ``<stem>.record.json``, written atomically **after** the
micrograph's other outputs. A record holds

* the *fingerprint* of everything that determines the result: the fit settings, the optics of
  the micrograph, its name, optics group and output stem, and the size and modification time of
  the input file (:func:`task_fingerprint`);
* the outcome: the STAR row and scores of a success, or the one-line message of a failure.

With ``--continue`` (the default) a micrograph whose record has the same fingerprint, status
"ok" and whose output files still exist is not processed again; failures are retried.
``--overwrite`` ignores the records. ``micrographs_ctf.star`` is rebuilt from the records at the
end of every run, in input order, so however often a run is killed and restarted the table has
exactly one row per micrograph.

:class:`BatchLock` is an exclusive ``fcntl.flock`` on ``.anisoctf.lock`` in the output
directory: the kernel drops it when the process ends, however it ends (SIGKILL included), so a
killed run never leaves a stale lock. A second run on the same directory fails with one line.

:func:`remove_stray_temporaries` deletes the hidden temporary files of :mod:`anisoctf.io.atomic`
(``.<name>.<random>.tmp``) that a killed run may leave; it is called while the lock is held, when
no other writer can be active in the directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from anisoctf.errors import AnisoctfError, UsageError
from anisoctf.io.batch_records import (
    RECORD_SUFFIX,
    MicrographRecord,
    read_record,
    record_path,
    write_record,
)
from anisoctf.records.flags import flag_kind, flags_of

__all__ = [
    "LOCK_NAME",
    "RECORD_SUFFIX",
    "BatchLock",
    "BatchLockedError",
    "MicrographRecord",
    "canonical_json",
    "flag_summary",
    "input_signature",
    "read_record",
    "record_path",
    "process_and_record",
    "lock_output",
    "remove_stray_temporaries",
    "task_fingerprint",
    "write_record",
]

#: file name of the lock in the output directory
LOCK_NAME = ".anisoctf.lock"
# temporary names made by anisoctf.io.atomic: ".<name>.<8 random chars>.tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


class BatchLockedError(AnisoctfError):
    """Another run holds the lock of the output directory."""


# --------------------------------------------------------------------------------------------
# fingerprints


def _plain(obj: Any) -> Any:
    """JSON-able form of settings/optics objects (dataclasses, numpy values, paths)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            "__type__": type(obj).__name__,
            **{f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)},
        }
    if isinstance(obj, np.ndarray):
        return [_plain(x) for x in obj.tolist()]
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_plain(x) for x in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text of ``obj`` (sorted keys, dataclasses and arrays expanded)."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))


def input_signature(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """Size and modification time (ns) of an input file; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def task_fingerprint(**parts: Any) -> str:
    """SHA-256 of the canonical JSON of the keyword arguments.

    Pass everything the outputs depend on (settings, optics, name, stem, input signature, ...);
    two runs give the same fingerprint exactly when those agree.
    """
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# records


# --------------------------------------------------------------------------------------------
# temporaries and the lock


def remove_stray_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the atomic writers' leftover temporary files in ``directory`` (not recursive).

    Call only while holding the directory's :class:`BatchLock`.

    Returns
    -------
    list of Path
        The files removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        if e.is_file(follow_symlinks=False) and _TMP_NAME.match(e.name):
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass
    return removed


class BatchLock:
    """Exclusive lock of an output directory (``fcntl.flock`` on ``.anisoctf.lock``).

    Use as a context manager. The kernel releases the lock when the holder's file descriptor is
    closed, including when the process is killed, so no stale lock survives a crash. Child
    processes must not keep the descriptor (see :meth:`close_in_child`).

    Parameters
    ----------
    directory
        The output directory (must exist).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`BatchLockedError` at once (never waits)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise BatchLockedError(
                f"another anisoctf run{who} is writing into this directory; wait for it to "
                "finish or choose another --out",
                path=self.directory,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (the lock file stays; it is harmless)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    def close_in_child(self) -> None:
        """In a forked child: close the inherited descriptor so that only the parent holds the
        lock (an orphaned child would otherwise keep it after the parent was killed)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def __enter__(self) -> BatchLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def process_and_record(
    fn: Any, record_file: str, fingerprint: str, args: tuple, kwargs: dict
) -> Any:
    """Run ``fn(*args, **kwargs)`` (a ``process_one``) and store its outcome as a record.

    The record is written after the micrograph's own outputs, so its presence means they are
    complete. A result is either a one-line failure message (``str``) or an object with the
    attributes ``row``, ``figure_of_merit``, ``fit_resolution``, ``warnings``, ``outputs`` and
    ``seconds`` (a :class:`~anisoctf.jobs.estimate_micrographs.RowResult`).

    Returns
    -------
    The result of ``fn``, unchanged.
    """
    result = fn(*args, **kwargs)
    if isinstance(result, str):
        record = MicrographRecord(fingerprint=fingerprint, ok=False, message=result)
    else:
        record = MicrographRecord(
            fingerprint=fingerprint,
            ok=True,
            row=result.row,
            figure_of_merit=float(result.figure_of_merit),
            fit_resolution=float(result.fit_resolution),
            warnings=tuple(result.warnings),
            outputs=tuple(result.outputs),
            seconds=float(result.seconds),
        )
    try:
        write_record(record_file, record)
    except OSError as exc:
        if isinstance(result, str):
            return result
        return f"{result.row.name}: cannot write {record_file}: {exc.strerror or exc}"
    return result


def flag_summary(results: Iterable[Any]) -> str | None:
    """The summary line of the micrographs whose results are flagged as implausible
    (:mod:`anisoctf.records.flags`), or None when none is; ``results`` have ``name`` and
    ``warnings`` (:class:`~anisoctf.jobs.micrograph.RowResult`)."""
    flagged = [(r.name, flags_of(r.warnings)) for r in results]
    flagged = [(n, f) for n, f in flagged if f]
    if not flagged:
        return None
    kinds: dict[str, int] = {}
    for _, fl in flagged:
        for kind in dict.fromkeys(flag_kind(f) for f in fl):
            kinds[kind] = kinds.get(kind, 0) + 1
    what = ", ".join(f"{k}: {v}" for k, v in kinds.items())
    n = len(flagged)
    return (
        f"{n} micrograph{'s' if n > 1 else ''} flagged as implausible ({what}); "
        "the record and picture of each say why"
    )


def existing_records(out_dir: str | os.PathLike[str], stems: Iterable[str]) -> int:
    """How many of ``stems`` have a record file in ``out_dir`` (for messages)."""
    return sum(record_path(out_dir, s).is_file() for s in stems)


def lock_output(directory: str | os.PathLike[str]) -> BatchLock:
    """The held :class:`BatchLock` of ``directory``; a run already writing there is a
    :class:`~anisoctf.errors.UsageError` (one line, exit status 2). Release it when done."""
    lock = BatchLock(directory)
    try:
        lock.acquire()
    except BatchLockedError as exc:
        raise UsageError(str(exc)) from None
    return lock
