"""The file-level job behind ``anisoctf aniso correct``: images resampled into the true frame.

Inputs are either MRC files (micrographs ``.mrc``, particle stacks ``.mrcs``; glob patterns are
expanded) or one RELION STAR file:

* a **particles** STAR (``_rlnImageName`` = ``N@stack.mrcs``): every stack it names is corrected
  as a whole (each image about its own box centre), and the STAR is rewritten with the new stack
  names, ``_rlnCoordinateX/Y`` in the corrected micrograph frame (about the micrograph centre,
  so the micrograph size is needed: from the header of ``_rlnMicrographName`` when that file
  exists, else ``micrograph_size``), ``_rlnOriginXAngst/YAngst`` (or ``_rlnOriginX/Y``) and the
  defocus in the true frame;
* a **micrographs** STAR (``_rlnMicrographName``, no ``_rlnImageName``): every micrograph is
  corrected; defocus and coordinate columns, when present, are transformed likewise.

The science is in :mod:`anisoctf.magnification.resample`; conventions there and in
``docs/correction.md``. Every output file is written atomically into the output directory, which
mirrors the relative paths of the inputs (absolute paths keep only their file name). Nothing is
ever written over an input.

STAR bookkeeping, per optics group:

* the matrix is the given one; without one, the group's own ``_rlnMagMat``. A group that already
  carries a different non-identity ``_rlnMagMat`` is refused;
* defocus (``_rlnDefocusU/V/Angle``, ``_rlnCtfAstigmatism``) is transformed with
  :func:`~anisoctf.optics.frames.defocus_table_to_true` only when the group had no
  ``_rlnMagMat`` (RELION's defocus of a group with a matrix is already a true-frame value);
* pixel sizes (``_rlnImagePixelSize``, ``_rlnMicrographPixelSize``,
  ``_rlnMicrographOriginalPixelSize``) become ``p / sqrt(det M)`` (unchanged with
  ``keep_pixel_size``); in a RELION 3.0 table without them, ``_rlnMagnification`` is multiplied
  by ``sqrt(det M)`` instead;
* ``_rlnMagMat00..11`` are set to the identity (added when absent; a RELION 3.0 file has no
  optics table, where the identity is implied).

Columns that refer to other, uncorrected files (``_rlnCtfImage``, the micrograph names of a
particles STAR, movies) are left as they are. STAR values are written with 6 decimals.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anisoctf.errors import AnisoctfError, InputError, UsageError
from anisoctf.io.atomic import atomic_path
from anisoctf.io.mrc import read_mrc_header, read_stack, write_mrc
from anisoctf.io.star_tables import write_star_tables
from anisoctf.jobs.backends import Backend, BackendError, make_backend, process_pool
from anisoctf.jobs.batch_state import lock_output, remove_stray_temporaries
from anisoctf.jobs.cluster import ClusterSpec
from anisoctf.jobs.correct_plan import (
    CorrectPlan,
    FileTask,
    ResampleOptions,
    check_exists,
    expand_inputs,
    make_task,
    same_file,
)
from anisoctf.jobs.correct_star import plan_star
from anisoctf.jobs.correct_state import done_images, mark_done
from anisoctf.magnification.resample import DEFAULT_METHOD, METHODS, correct_image
from anisoctf.optics.magmat import MagMat

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "CorrectPlan",
    "CorrectRequest",
    "CorrectSummary",
    "FileTask",
    "ResampleOptions",
    "correct_file",
    "correct_images",
    "run_correct",
]

_MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".map", ".ali")
# pixels per chunk when a stack is corrected (bounds the memory of one worker)
_CHUNK_PIXELS = 1 << 24


# ============================================================================ one file
def correct_file(task: FileTask) -> int:
    """Correct one MRC file (image or stack) into ``task.dst``; returns the number of images.

    Raises
    ------
    InputError
        Unreadable file, NaN/Inf pixels, or a matrix the method cannot handle.
    """
    src = Path(task.src)
    header = read_mrc_header(src)
    stack = read_stack(src)
    ny, nx = header.ny, header.nx
    try:
        if header.nz == 1:
            image = np.asarray(stack[0], dtype=np.float32)
            out = correct_image(
                image, task.matrix, method=task.method, keep_pixel_size=task.keep_pixel_size
            )
            write_mrc(task.dst, out, task.pixel_size)
            return 1
        import mrcfile

        chunk = max(1, _CHUNK_PIXELS // (ny * nx))
        with atomic_path(task.dst) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                with mrcfile.new_mmap(
                    tmp, shape=(header.nz, ny, nx), mrc_mode=2, overwrite=True
                ) as mrc:
                    for i0 in range(0, header.nz, chunk):
                        i1 = min(header.nz, i0 + chunk)
                        part = np.asarray(stack[i0:i1], dtype=np.float32)
                        try:
                            mrc.data[i0:i1] = correct_image(
                                part,
                                task.matrix,
                                method=task.method,
                                keep_pixel_size=task.keep_pixel_size,
                            )
                        except ValueError as exc:
                            raise ValueError(f"images {i0 + 1}-{i1}: {exc}") from exc
                    mrc.set_image_stack()
                    mrc.voxel_size = float(task.pixel_size)
                    mrc.update_header_stats()
        return header.nz
    except ValueError as exc:
        raise InputError(str(exc), path=src) from exc
    finally:
        del stack


# ============================================================================ results
@dataclass(frozen=True)
class CorrectSummary:
    """What :func:`run_correct` wrote (for the summary line and for tests)."""

    kind: str  # "images", "particles" or "micrographs"
    files: tuple[tuple[str, str], ...]  # (input, output) per corrected file
    n_images: int
    star: str | None = None
    n_rows: int = 0
    transformed: tuple[str, ...] = ()  # STAR columns rewritten in the corrected frame
    warnings: tuple[str, ...] = ()
    pixel_sizes: tuple[tuple[float, float], ...] = ()  # (input, output) pixel sizes seen
    n_skipped: int = 0  # files already complete from an earlier run (resumed)


# ============================================================================ MRC inputs
def _plan_images(
    paths: list[Path], out_dir: Path, mag: MagMat, opts: ResampleOptions, apix: float | None
) -> CorrectPlan:
    tasks: list[FileTask] = []
    dst_of: dict[str, Path] = {}
    for p in paths:
        check_exists(p)
        if p.suffix.lower() not in _MRC_SUFFIXES:
            raise InputError(
                f"not an MRC file name (expected {', '.join(_MRC_SUFFIXES)} or one .star)", path=p
            )
        header = read_mrc_header(p)
        pixel = apix if apix is not None else header.pixel_size
        if pixel is None:
            raise InputError("the header has no pixel size; give --apix", path=p)
        dst = out_dir / p.name
        if same_file(p, dst):
            raise InputError("--out would overwrite this input; choose another directory", path=p)
        if p.name in dst_of:
            raise InputError(
                f"two inputs are named {p.name} ({dst_of[p.name]} and {p}); correct them into "
                "separate output directories",
                path=p,
            )
        dst_of[p.name] = p
        tasks.append(make_task(p, dst, mag, pixel, opts))
    return CorrectPlan(kind="images", tasks=tuple(tasks))


# ============================================================================ the job
def _run_on_backend(
    tasks: list[FileTask], backend: Backend, on_file: Callable[[FileTask, int], None]
) -> int:
    """The files as work items of ``backend`` (Dask, SLURM); the first failure stops the run."""
    total = 0
    try:
        items = ((i, correct_file, (t,), {}) for i, t in enumerate(tasks))
        for key, outcome in backend.run(items):
            t = tasks[key]
            if isinstance(outcome, AnisoctfError):
                raise outcome
            if isinstance(outcome, BaseException):
                raise InputError(
                    f"internal error: {type(outcome).__name__}: {outcome}", t.src
                ) from outcome
            total += int(outcome)
            on_file(t, int(outcome))
    finally:
        backend.close()
    return total


def _run_tasks(
    tasks: list[FileTask],
    jobs: int,
    on_file: Callable[[FileTask, int], None],
    scheduler: str | None = None,
    cluster: ClusterSpec | None = None,
) -> int:
    if scheduler is not None:
        try:
            backend = make_backend(jobs, scheduler, cluster=cluster)
        except BackendError as exc:
            raise UsageError(str(exc)) from None
        return _run_on_backend(tasks, backend, on_file)
    total = 0
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            n = correct_file(t)
            total += n
            on_file(t, n)
        return total
    with process_pool(min(jobs, len(tasks))) as pool:
        futures = {pool.submit(correct_file, t): t for t in tasks}
        try:
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    n = fut.result()
                except AnisoctfError:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OS
                    raise InputError(f"internal error: {type(exc).__name__}: {exc}", t.src) from exc
                total += n
                on_file(t, n)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return total


@dataclass(frozen=True)
class CorrectRequest:
    """What ``aniso correct`` is asked to do.

    Parameters
    ----------
    inputs
        MRC files and/or glob patterns, or exactly one ``.star`` file.
    out_dir
        Output directory (created when missing).
    mag
        ``M`` (``k_true = M k_obs``); None takes each optics group's ``_rlnMagMat`` (STAR only).
    method, keep_pixel_size
        As :func:`~anisoctf.magnification.resample.correct_image`.
    jobs
        Files corrected in parallel (worker processes; Dask workers with
        ``scheduler="local"``).
    scheduler
        Dask scheduler address, ``"local"`` or ``"slurm"`` (see
        :mod:`anisoctf.jobs.backends`); None: local worker processes.
    cluster
        SLURM resources for ``scheduler="slurm"``.
    resume
        Skip files whose output a previous (interrupted) run completed, as recorded by
        :mod:`~anisoctf.jobs.correct_state` (``--continue``, the default); False redoes all.
    apix
        Pixel size (Å) of the inputs, overriding the STAR file and the headers.
    micrograph_size
        ``(nx, ny)`` of the micrographs, for particle coordinates when the micrograph files
        cannot be read.
    project_dir
        Directory the STAR file's paths are relative to (default: the current directory).
    on_file
        Called with each task and its number of images when its file is written.
    """

    inputs: tuple[str | os.PathLike[str], ...]
    out_dir: str | os.PathLike[str]
    mag: MagMat | None
    method: str = DEFAULT_METHOD
    keep_pixel_size: bool = False
    jobs: int = 1
    apix: float | None = None
    micrograph_size: tuple[int, int] | None = None
    project_dir: str | os.PathLike[str] | None = None
    on_file: Callable[[FileTask, int], None] | None = None
    scheduler: str | None = None
    cluster: ClusterSpec | None = None
    resume: bool = True


def _check_request(r: CorrectRequest) -> None:
    if r.method not in METHODS:
        raise InputError(f"unknown --method {r.method!r}; choose one of {', '.join(METHODS)}")
    if r.jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {r.jobs}")
    if r.apix is not None and not (math.isfinite(r.apix) and r.apix > 0):
        raise InputError(f"--apix must be a positive number of Å, got {r.apix}")
    if r.micrograph_size is not None and min(r.micrograph_size) < 1:
        raise InputError(f"--micrograph-size must be positive, got {r.micrograph_size}")


def _plan(r: CorrectRequest) -> CorrectPlan:
    """Check the request and work out what will be written (nothing is written yet)."""
    _check_request(r)
    paths = expand_inputs(r.inputs)
    if not paths:
        raise InputError("no input files; give MRC files, glob patterns or one .star file")
    out = Path(r.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a directory", path=out)
    opts = ResampleOptions(method=r.method, keep_pixel_size=bool(r.keep_pixel_size))
    stars = [p for p in paths if p.suffix.lower() == ".star"]
    if stars:
        if len(paths) != 1:
            raise InputError("give one STAR file on its own (not with other inputs)")
        check_exists(stars[0])
        project = Path(r.project_dir) if r.project_dir is not None else Path.cwd()
        return plan_star(stars[0], out, r.mag, opts, r.apix, r.micrograph_size, project)
    if r.mag is None:
        raise InputError("give the matrix: --mag-matrix M00 M01 M10 M11 or --from-json FILE")
    return _plan_images(paths, out, r.mag, opts, r.apix)


def correct_images(request: CorrectRequest) -> CorrectSummary:
    """Correct MRC files, or the files of one STAR file, into ``request.out_dir``.

    See the module notes for what is written.

    Raises
    ------
    InputError
        Anything wrong with the inputs or the options (one line); nothing has been written when
        the problem is found before the images are read (missing files, mismatched STAR).
    """
    plan = _plan(request)
    out = Path(request.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for t in plan.tasks:
            Path(t.dst).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the output directory ({exc.strerror or exc})", out
        ) from exc
    lock = lock_output(out)
    try:
        for folder in {out, *(Path(t.dst).parent for t in plan.tasks)}:
            remove_stray_temporaries(folder)  # of a killed run, under the lock
        n_images, n_skipped = _run_resumable(plan, request, out)
        if plan.star is not None and plan.star_blocks is not None:
            write_star_tables(plan.star, plan.star_blocks)
    finally:
        lock.release()
    return CorrectSummary(
        kind=plan.kind,
        files=plan.files,
        n_images=n_images,
        star=plan.star,
        n_rows=plan.n_rows,
        transformed=plan.transformed,
        warnings=plan.warnings,
        pixel_sizes=tuple(sorted({(t.pixel_size_in, t.pixel_size) for t in plan.tasks})),
        n_skipped=n_skipped,
    )


def _run_resumable(plan: CorrectPlan, request: CorrectRequest, out: Path) -> tuple[int, int]:
    """Correct the files not already complete (:mod:`~anisoctf.jobs.correct_state`); returns
    (images in all outputs, files skipped as already complete)."""
    on_file = request.on_file or (lambda t, n: None)
    todo: list[FileTask] = []
    n_done = n_skipped = 0
    for t in plan.tasks:
        n = done_images(t, out) if request.resume else None
        if n is None:
            todo.append(t)
        else:
            n_done += n
            n_skipped += 1
            on_file(t, n)

    def finished(t: FileTask, n: int) -> None:
        mark_done(t, n, out)
        on_file(t, n)

    n_new = _run_tasks(todo, request.jobs, finished, request.scheduler, request.cluster)
    return n_done + n_new, n_skipped


def run_correct(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    mag: MagMat | None,
    *,
    method: str = DEFAULT_METHOD,
    keep_pixel_size: bool = False,
    jobs: int = 1,
    apix: float | None = None,
    micrograph_size: tuple[int, int] | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    on_file: Callable[[FileTask, int], None] | None = None,
) -> CorrectSummary:
    """:func:`correct_images` with the request given as arguments (:class:`CorrectRequest`)."""
    return correct_images(
        CorrectRequest(
            inputs=tuple(inputs),
            out_dir=out_dir,
            mag=mag,
            method=method,
            keep_pixel_size=keep_pixel_size,
            jobs=jobs,
            apix=apix,
            micrograph_size=micrograph_size,
            project_dir=project_dir,
            on_file=on_file,
        )
    )
