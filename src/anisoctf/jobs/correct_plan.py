"""The plan of ``aniso correct``: the files to resample and the STAR tables to write.

Shared by :mod:`anisoctf.jobs.correct_images` (the job, MRC inputs) and
:mod:`anisoctf.jobs.correct_star` (STAR inputs): the picklable :class:`FileTask` of one file,
the resampling options, the typed :class:`CorrectPlan` and the path helpers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from anisoctf.errors import InputError
from anisoctf.io.star_tables import strip_type_tag
from anisoctf.jobs.inputs import expand_patterns
from anisoctf.magnification.resample import DEFAULT_METHOD, corrected_pixel_size
from anisoctf.optics.magmat import MagMat

__all__ = [
    "CorrectPlan",
    "FileTask",
    "ResampleOptions",
    "check_exists",
    "expand_inputs",
    "make_task",
    "out_path",
    "same_file",
    "star_name",
    "strip_mrc_tag",
]


@dataclass(frozen=True)
class FileTask:
    """One MRC file to correct (picklable, for the worker processes)."""

    src: str
    dst: str
    matrix: tuple[tuple[float, float], tuple[float, float]]
    pixel_size_in: float
    pixel_size: float  # of the output, written to its header
    method: str = DEFAULT_METHOD
    keep_pixel_size: bool = False


@dataclass(frozen=True)
class ResampleOptions:
    """How every file is resampled (:func:`~anisoctf.magnification.resample.correct_image`)."""

    method: str = DEFAULT_METHOD
    keep_pixel_size: bool = False


@dataclass(frozen=True)
class CorrectPlan:
    """Everything :func:`correct_images` will write, worked out before any image is read.

    Parameters
    ----------
    kind
        ``"images"``, ``"particles"`` or ``"micrographs"``.
    tasks
        One :class:`FileTask` per file to correct.
    star
        The STAR file to write (None for MRC inputs), with ``star_blocks``: its tables.
    n_rows, transformed, warnings
        As in :class:`CorrectSummary`.
    """

    kind: str
    tasks: tuple[FileTask, ...]
    star: str | None = None
    star_blocks: dict[str, Any] | None = None
    n_rows: int = 0
    transformed: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        """``(input, output)`` of every task."""
        return tuple((t.src, t.dst) for t in self.tasks)


# ============================================================================ helpers
def same_file(a: Path, b: Path) -> bool:
    if a.absolute() == b.absolute() or a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def out_path(name: str, out_dir: Path) -> Path:
    """Where the corrected copy of ``name`` goes: its relative path mirrored under ``out_dir``."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return out_dir / p.name
    return out_dir.joinpath(*p.parts)


def star_name(path: Path, project: Path) -> str:
    """A path as written in a STAR file: relative to the project directory when inside it."""
    try:
        return path.absolute().relative_to(project.absolute()).as_posix()
    except ValueError:
        return path.absolute().as_posix()


def strip_mrc_tag(name: str) -> str:
    return strip_type_tag(name, ("mrc", "mrcs"))


def _matrix_tuple(m: MagMat) -> tuple[tuple[float, float], tuple[float, float]]:
    a = m.array
    return ((float(a[0, 0]), float(a[0, 1])), (float(a[1, 0]), float(a[1, 1])))


def make_task(src: Path, dst: Path, m: MagMat, pixel: float, opts: ResampleOptions) -> FileTask:
    keep = bool(opts.keep_pixel_size)
    return FileTask(
        src=str(src),
        dst=str(dst),
        matrix=_matrix_tuple(m),
        pixel_size_in=float(pixel),
        pixel_size=corrected_pixel_size(pixel, m, keep_pixel_size=keep),
        method=str(opts.method),
        keep_pixel_size=keep,
    )


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The inputs with glob patterns expanded (the jobs' one expander), in the order given."""
    found = expand_patterns([str(i) for i in inputs], sort=False, error=InputError)
    return [Path(p) for p in found]


def check_exists(p: Path) -> None:
    if not p.exists():
        raise InputError("file not found; check the path", path=p)
    if p.is_dir():
        raise InputError("is a directory; give MRC or STAR files", path=p)

