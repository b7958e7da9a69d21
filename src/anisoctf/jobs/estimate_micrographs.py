"""The file-level job behind ``anisoctf estimate``: micrographs in, CTF results out.

This module only orchestrates; the science is in :mod:`anisoctf.fit`. For every micrograph it
reads the MRC file, runs :func:`~anisoctf.fit.estimate.estimate_ctf` and writes, into the
output directory (every file atomically):

* ``<stem>.txt``: CTFFIND-compatible result (defocus 1 = U, defocus 2 = V, azimuth = angle,
  phase shift in radians, cross correlation = figure of merit, fit resolution);
* ``<stem>_ctf.png``: the diagnostic picture;
* ``<stem>.ctf``: a float32 MRC image of the centred power spectrum, observed in the left half
  and the fitted CTF² in the right half (as CTFFIND's diagnostic), for RELION's ``_rlnCtfImage``.

At the end ``micrographs_ctf.star`` (RELION 3.1+ layout) lists the micrographs that succeeded,
in input order. A micrograph that fails is reported on one line and the batch goes on.

Inputs are MRC files and/or glob patterns, or one RELION micrographs STAR file (e.g.
``corrected_micrographs.star``) whose optics table gives the optics of every optics group.

A magnification matrix (``--mag-matrix``, else the ``_rlnMagMat00..11`` of a STAR file's optics
group) is passed to the fit, which then works on true-frame frequencies: the defoci written are
true-frame values, and ``micrographs_ctf.star`` carries the matrix in its optics table.
"""

from __future__ import annotations

import contextlib
import glob
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from anisoctf.errors import AnisoctfError, InputError
from anisoctf.fit.estimate import check_image, estimate_ctf, fit_spectrum
from anisoctf.fit.result import CTFEstimate, FitSettings
from anisoctf.io.ctffind import CTFFindRecord, write_ctffind_txt
from anisoctf.io.mrc import read_micrograph, read_mrc_header, read_stack, write_mrc
from anisoctf.io.star import (
    MicrographCTFRow,
    read_micrographs_star,
    read_optics_group_names,
    write_micrographs_ctf_star,
)
from anisoctf.magnification.matrix import MagMat
from anisoctf.optics.ctf import Optics
from anisoctf.report.diagnostic import full_plane, render_diagnostic
from anisoctf.spectrum.periodogram import stack_periodogram

__all__ = [
    "DEFAULT_AMPLITUDE_CONTRAST",
    "DEFAULT_CS_MM",
    "DEFAULT_VOLTAGE_KV",
    "STAR_NAME",
    "EstimateReport",
    "MicrographTask",
    "ResolvedInputs",
    "RowResult",
    "UsageError",
    "ctf_image_array",
    "process_one",
    "resolve_inputs",
    "run_estimate",
]

#: name of the results table written into the output directory
STAR_NAME = "micrographs_ctf.star"

# Defaults for plain MRC inputs: those of :class:`~anisoctf.optics.ctf.Optics`.
_OPTICS_DEFAULTS = Optics(pixel_size=1.0)
DEFAULT_VOLTAGE_KV = _OPTICS_DEFAULTS.voltage_kv
DEFAULT_CS_MM = _OPTICS_DEFAULTS.cs_mm
DEFAULT_AMPLITUDE_CONTRAST = _OPTICS_DEFAULTS.amplitude_contrast

#: header pixel size that is almost always a placeholder rather than a measurement
_PLACEHOLDER_PIXEL_SIZE = 1.0
_BLAS_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
_GLOB_CHARS = re.compile(r"[*?\[]")


class UsageError(AnisoctfError):
    """The command line (or the input list) cannot be used as given: exit status 2."""


# --------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class MicrographTask:
    """One micrograph to process.

    Attributes
    ----------
    index
        Position in the input order (rows of the STAR follow it).
    path
        The file to read.
    name
        ``_rlnMicrographName`` to write: the name in the input STAR file, else the path as given.
    optics_group
        Optics group number (key of :attr:`ResolvedInputs.optics`).
    stem
        Base name of the output files (unique within the job).
    error
        A one-line reason when the micrograph is known to fail before any work (e.g. its header
        cannot be read); None otherwise.
    """

    index: int
    path: str
    name: str
    optics_group: int
    stem: str
    error: str | None = None


@dataclass(frozen=True)
class ResolvedInputs:
    """What the command line resolved to: micrographs, optics and remarks."""

    tasks: list[MicrographTask]
    optics: dict[int, Optics]
    optics_names: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RowResult:
    """A micrograph that succeeded.

    Attributes
    ----------
    name
        ``_rlnMicrographName``.
    row
        The row of ``micrographs_ctf.star``.
    figure_of_merit, fit_resolution
        Score and resolution (Å) of the fit.
    warnings
        The estimate's remarks.
    outputs
        Paths written (``.txt``, ``_ctf.png``, ``.ctf``).
    seconds
        Wall time of this micrograph.
    """

    name: str
    row: MicrographCTFRow
    figure_of_merit: float
    fit_resolution: float
    warnings: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def mean_defocus(self) -> float:
        """(U + V) / 2 in Å."""
        return 0.5 * (self.row.defocus_u + self.row.defocus_v)


@dataclass
class EstimateReport:
    """Outcome of :func:`run_estimate`.

    Attributes
    ----------
    results
        Successful micrographs in input order.
    failures
        ``(name, one-line message)`` per failed micrograph, in input order.
    star_path
        The STAR file written, or None when nothing succeeded (or it could not be written).
    seconds
        Wall time of the whole job.
    star_error
        Why the STAR file could not be written, if so.
    """

    results: list[RowResult]
    failures: list[tuple[str, str]]
    star_path: Path | None
    seconds: float
    star_error: str | None = None

    @property
    def n_ok(self) -> int:
        return len(self.results)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        """0 when every micrograph succeeded and the STAR file was written, else 1."""
        return 0 if not self.failures and self.star_path is not None else 1


# --------------------------------------------------------------------------------------------
# inputs


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _expand(patterns: Sequence[str]) -> list[str]:
    """Paths of plain arguments and glob matches: sorted, without duplicates."""
    found: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern) and not Path(pattern).exists():
            matches = [m for m in glob.glob(pattern, recursive=True) if not Path(m).is_dir()]
            if not matches:
                raise UsageError(f"no file matches {pattern!r}; check the pattern")
            found += matches
        else:
            found.append(pattern)
    unique: list[str] = []
    seen: set[str] = set()
    for p in sorted(found):
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _unique_stems(paths: Sequence[str]) -> list[str]:
    """Output base names: the file stem, prefixed by parent folders where stems collide."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    stems = [Path(p).stem for p in paths]
    for depth in range(1, max((len(x) for x in parts), default=1)):
        counts: dict[str, int] = {}
        for s in stems:
            counts[s] = counts.get(s, 0) + 1
        clashes = [i for i, s in enumerate(stems) if counts[s] > 1]
        if not clashes:
            break
        for i in clashes:
            folders = parts[i][-1 - depth : -1]
            stems[i] = "_".join([*folders, Path(paths[i]).stem])
    return stems


def _missing_options(apix, kv, cs, ac) -> list[str]:
    given = {"--apix": apix, "--kv": kv, "--cs": cs, "--ac": ac}
    return [k for k, v in given.items() if v is None]


def _optics(apix: float, kv: float, cs: float, ac: float, mag=None) -> Optics:
    try:
        if mag is None:
            return Optics(pixel_size=apix, voltage_kv=kv, cs_mm=cs, amplitude_contrast=ac)
        return Optics(
            pixel_size=apix, voltage_kv=kv, cs_mm=cs, amplitude_contrast=ac, mag_matrix=mag
        )
    except ValueError as exc:
        raise UsageError(f"bad optics: {exc}") from None


def _name_error(name: str) -> str | None:
    if not name or any(c.isspace() for c in name):
        return (
            f"{name}: the name contains whitespace, which RELION STAR files cannot hold; "
            "rename the file"
        )
    return None


def _resolve_star(
    star: str, apix: float | None, kv: float | None, cs: float | None, ac: float | None
) -> ResolvedInputs:
    entries, optics = read_micrographs_star(star)
    if not entries:
        raise UsageError(f"{star}: lists no micrographs")
    names = read_optics_group_names(star)
    if not optics:
        missing = _missing_options(apix, kv, cs, ac)
        if missing:
            raise UsageError(
                f"{star} has no optics table; pass {', '.join(missing)} on the command line"
            )
        optics = {g: _optics(apix, kv, cs, ac) for g in sorted({e.optics_group for e in entries})}
    else:
        overrides = {
            k: v
            for k, v in (
                ("pixel_size", apix),
                ("voltage_kv", kv),
                ("cs_mm", cs),
                ("amplitude_contrast", ac),
            )
            if v is not None
        }
        if overrides:
            try:
                optics = {g: replace(o, **overrides) for g, o in optics.items()}
            except ValueError as exc:
                raise UsageError(f"bad optics: {exc}") from None
    paths = [str(e.path) for e in entries]
    stems = _unique_stems(paths)
    tasks = [
        MicrographTask(i, p, e.name, e.optics_group, s, _name_error(e.name))
        for i, (e, p, s) in enumerate(zip(entries, paths, stems, strict=True))
    ]
    return ResolvedInputs(tasks=tasks, optics=optics, optics_names=names)


def _resolve_mrcs(
    paths: Sequence[str],
    apix: float | None,
    kv: float | None,
    cs: float | None,
    ac: float | None,
) -> ResolvedInputs:
    kv = DEFAULT_VOLTAGE_KV if kv is None else kv
    cs = DEFAULT_CS_MM if cs is None else cs
    ac = DEFAULT_AMPLITUDE_CONTRAST if ac is None else ac
    warnings: list[str] = []
    pixel: list[float | None] = []
    errors: list[str | None] = []
    if apix is not None:
        _optics(apix, kv, cs, ac)  # check the values once, before any work
        pixel = [apix] * len(paths)
        errors = [None] * len(paths)
    else:
        no_pixel: list[str] = []
        from_header: list[float] = []
        for p in paths:
            try:
                h = read_mrc_header(p).pixel_size
            except AnisoctfError as exc:  # reported as this micrograph's failure
                pixel.append(None)
                errors.append(_one_line(str(exc)))
                continue
            if h is not None:
                h = float(f"{h:.6g}")  # the header holds float32: 1.2999999523 means 1.3
            errors.append(None)
            pixel.append(h)
            if h is None or not h > 0 or h == _PLACEHOLDER_PIXEL_SIZE:
                no_pixel.append(p)
            else:
                from_header.append(h)
        if no_pixel:
            more = f" (and {len(no_pixel) - 1} more)" if len(no_pixel) > 1 else ""
            raise UsageError(
                f"--apix is required: the MRC header of {no_pixel[0]}{more} has no usable "
                f"pixel size (none, or the placeholder {_PLACEHOLDER_PIXEL_SIZE:g} Å)"
            )
        if from_header:
            sizes = ", ".join(f"{v:.4g}" for v in sorted(set(from_header)))
            warnings.append(
                f"no --apix given: using the pixel size from the MRC header ({sizes} Å); "
                "pass --apix if that is wrong"
            )
    # one optics group per distinct pixel size, numbered in order of appearance
    group_of: dict[float, int] = {}
    optics: dict[int, Optics] = {}
    stems = _unique_stems(paths)
    tasks: list[MicrographTask] = []
    for i, (p, a, err, s) in enumerate(zip(paths, pixel, errors, stems, strict=True)):
        if a is None:
            group = next(iter(group_of.values()), 1)
        else:
            if a not in group_of:
                group_of[a] = len(group_of) + 1
                optics[group_of[a]] = _optics(a, kv, cs, ac)
            group = group_of[a]
        tasks.append(MicrographTask(i, p, p, group, s, err or _name_error(p)))
    if not optics:  # every header unreadable: any group will do, nothing gets written
        optics[1] = _optics(1.0, kv, cs, ac)
    return ResolvedInputs(tasks=tasks, optics=optics, warnings=warnings)


def resolve_inputs(
    inputs: Sequence[str],
    *,
    apix: float | None = None,
    kv: float | None = None,
    cs: float | None = None,
    ac: float | None = None,
    mag_matrix: ArrayLike | None = None,
) -> ResolvedInputs:
    """Turn the command line's inputs into micrographs with optics.

    Parameters
    ----------
    inputs
        MRC paths and/or glob patterns (expanded, sorted, de-duplicated), or one ``.star`` file.
    apix, kv, cs, ac
        Optics from the command line. For a STAR file they replace the optics table's values;
        for MRC files ``apix`` falls back to a plausible header pixel size and the others to
        300 kV, 2.7 mm and 0.07.
    mag_matrix
        Magnification matrix ``M`` (``k_true = M k_obs``, 2×2) given to every micrograph's
        optics; it replaces the ``_rlnMagMat`` of a STAR file's optics groups. Without it, a
        STAR file's optics groups keep their own matrices (identity when absent) and MRC files
        get the identity. With a matrix the fits, and the defoci written, are true-frame.

    Raises
    ------
    UsageError
        No inputs, a STAR file together with other inputs, a pattern that matches nothing,
        missing or invalid optics.
    InputError
        An unreadable STAR file.
    """
    inputs = [str(x) for x in inputs]
    if not inputs:
        raise UsageError("no input micrographs; give MRC files, glob patterns or one .star file")
    stars = [x for x in inputs if x.lower().endswith(".star")]
    if stars:
        if len(inputs) > 1:
            raise UsageError("give either one .star file or MRC files, not both or several")
        resolved = _resolve_star(stars[0], apix, kv, cs, ac)
    else:
        resolved = _resolve_mrcs(_expand(inputs), apix, kv, cs, ac)
    return _with_mag_matrix(resolved, mag_matrix)


def _with_mag_matrix(resolved: ResolvedInputs, mag_matrix: ArrayLike | None) -> ResolvedInputs:
    """Every optics group of ``resolved`` with ``mag_matrix`` (unchanged when None)."""
    if mag_matrix is None:
        return resolved
    try:
        m = MagMat(np.asarray(mag_matrix, dtype=float).reshape(2, 2))
    except ValueError as exc:
        raise UsageError(f"bad --mag-matrix: {exc}") from None
    optics = {g: replace(o, mag_matrix=m.matrix) for g, o in resolved.optics.items()}
    return replace(resolved, optics=optics)


# --------------------------------------------------------------------------------------------
# one micrograph


def _robust_scale(values: np.ndarray) -> tuple[float, float]:
    """Centre and spread of ``values`` insensitive to a few extreme pixels."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    lo, med, hi = np.percentile(v, [16.0, 50.0, 84.0])
    spread = 0.5 * float(hi - lo)
    if not spread > 0:
        spread = float(np.std(v)) or 1.0
    return float(med), spread


def ctf_image_array(estimate: CTFEstimate) -> np.ndarray:
    """The centred diagnostic power spectrum as a float32 image (CTFFIND's ``.ctf`` layout).

    The observed spectrum fills the left half and the fitted CTF² the right half, both scaled
    to zero median and unit spread within the fitted band and clipped at ±4, so that the rings
    of the two halves continue into each other across the centre line when the fit is right.
    Frequencies below the band are set to 0.
    """
    diag = estimate.diagnostics
    if diag is None:
        raise ValueError("the CTF estimate carries no diagnostics")
    spec = np.asarray(diag.spectrum, dtype=np.float64)
    model = np.asarray(diag.model, dtype=np.float64)
    n = spec.shape[0]
    ky = np.fft.fftfreq(n, d=diag.pixel_size)[:, None]
    kx = np.fft.rfftfreq(n, d=diag.pixel_size)[None, :]
    kr = np.sqrt(kx * kx + ky * ky)
    k_lo, k_hi = diag.fit_band
    band = (kr >= k_lo) & (kr <= k_hi)
    inside = kr >= k_lo
    halves = []
    for a in (spec, model):
        centre, spread = _robust_scale(a[band] if band.sum() >= 16 else a.ravel())
        scaled = np.clip((a - centre) / spread, -4.0, 4.0)
        scaled[~inside] = 0.0
        halves.append(full_plane(scaled))
    c0 = n // 2
    out = np.empty((n, n), dtype=np.float32)
    out[:, :c0] = halves[0][:, :c0]
    out[:, c0:] = halves[1][:, c0:]
    return out


def _failure(name: str, message: str) -> str:
    """One line that names the micrograph."""
    message = _one_line(message)
    return message if name in message else f"{name}: {message}"


def _estimate_stack(
    path: str, optics: Optics, settings: FitSettings, fft_workers: int
) -> CTFEstimate:
    """CTF of the pooled periodograms of all images of a stack (e.g. one micrograph's
    particles, RELION's ``.mrcs``)."""
    stack = read_stack(path)
    if stack.ndim != 3 or stack.shape[0] == 0 or min(stack.shape[1:]) < 64:
        raise InputError(f"expected a stack of images of at least 64 px, got {stack.shape}", path)
    for start in range(0, stack.shape[0], 256):  # validate in chunks (the stack is mapped)
        check_image(np.asarray(stack[start : start + 256], dtype=np.float32).reshape(-1, 1), path)
    spectrum = stack_periodogram(stack, optics.pixel_size, workers=fft_workers)
    return fit_spectrum(spectrum, optics, settings, diagnostics=True, name=path)


def process_one(
    path: str | os.PathLike[str],
    name: str,
    optics: Optics,
    settings: FitSettings,
    out_dir: str | os.PathLike[str],
    optics_group: int,
    *,
    stem: str | None = None,
    fft_workers: int = 1,
    debug: bool = False,
) -> RowResult | str:
    """Estimate the CTF of one micrograph and write its output files.

    Parameters
    ----------
    path
        The MRC file: a micrograph (a multi-frame ``.mrc`` is summed), or a ``.mrcs`` stack of
        particle images whose periodograms are pooled.
    name
        ``_rlnMicrographName`` for the STAR row (and the name in messages).
    optics, settings
        Optics of the micrograph and fit settings.
    out_dir
        Existing output directory; ``<stem>.txt``, ``<stem>_ctf.png`` and ``<stem>.ctf`` are
        written there atomically.
    optics_group
        ``_rlnOpticsGroup`` of the row.
    stem
        Base name of the outputs; default the file's stem.
    fft_workers
        Threads for the FFTs.
    debug
        Append the traceback to the message of an unexpected error.

    Returns
    -------
    RowResult | str
        The result, or a one-line failure message naming the micrograph.
    """
    t0 = time.perf_counter()
    path = str(path)
    stem = stem or Path(path).stem
    out = Path(out_dir)
    try:
        if path.lower().endswith(".mrcs"):  # a particle stack: pool its periodograms
            est = _estimate_stack(path, optics, settings, fft_workers)
        else:
            image = read_micrograph(path).data
            est = estimate_ctf(
                image, optics, settings, diagnostics=True, workers=fft_workers, name=path
            )
        p = est.params
        values = (p.defocus_u, p.defocus_v, p.angle_deg, p.phase_shift_deg)
        if not all(math.isfinite(v) for v in values):
            return _failure(name, f"the fit returned non-finite values {values}")
        fom = float(est.figure_of_merit)
        res = float(est.fit_resolution)
        txt, png, ctf = out / f"{stem}.txt", out / f"{stem}_ctf.png", out / f"{stem}.ctf"
        write_ctffind_txt(
            txt,
            CTFFindRecord(
                defocus_1=p.defocus_u,
                defocus_2=p.defocus_v,
                azimuth=p.angle_deg,
                phase_shift_rad=math.radians(p.phase_shift_deg) if settings.phase_plate else 0.0,
                cross_correlation=fom if math.isfinite(fom) else 0.0,
                fit_resolution=res if math.isfinite(res) else 0.0,
            ),
            input_file=name,
            pixel_size=optics.pixel_size,
            voltage_kv=optics.voltage_kv,
            cs_mm=optics.cs_mm,
            amplitude_contrast=optics.amplitude_contrast,
            box=settings.box,
            min_res=settings.min_res,
            max_res=settings.max_res,
            df_min=settings.df_min,
            df_max=settings.df_max,
            version_line=f"anisoctf {_version()}",
        )
        render_diagnostic(est, png, title=name)
        assert est.diagnostics is not None  # requested above
        write_mrc(ctf, ctf_image_array(est), pixel_size=est.diagnostics.pixel_size)
    except AnisoctfError as exc:
        return _failure(name, str(exc))
    except OSError as exc:
        return _failure(name, f"cannot write the outputs into {out}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - one bad micrograph must not stop the batch
        msg = _failure(name, f"internal error: {type(exc).__name__}: {exc}")
        if debug:
            msg += "\n" + traceback.format_exc().rstrip()
        return msg
    row = MicrographCTFRow(
        name=name,
        optics_group=int(optics_group),
        ctf_image=f"{ctf.as_posix()}:mrc",
        defocus_u=float(p.defocus_u),
        defocus_v=float(p.defocus_v),
        defocus_angle=float(p.angle_deg),
        figure_of_merit=fom,
        max_resolution=res,
        phase_shift=float(p.phase_shift_deg) if settings.phase_plate else None,
    )
    return RowResult(
        name=name,
        row=row,
        figure_of_merit=fom,
        fit_resolution=res,
        warnings=tuple(est.warnings),
        outputs=(str(txt), str(png), str(ctf)),
        seconds=time.perf_counter() - t0,
    )


def _version() -> str:
    from anisoctf import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# the batch


def _blas_single_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread inside the block when threadpoolctl is installed (else no change).

    The fit does many small linear-algebra calls, for which BLAS threads only add overhead
    (and spin-wait badly on a busy machine).
    """
    if _STARTED_SINGLE_THREADED:  # nothing to do (and importing threadpoolctl is not free)
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _init_worker() -> None:
    """Pool initializer: one BLAS thread per worker (only when threadpoolctl is installed).

    Environment variables would come too late here (numpy is already imported when the
    initializer runs); they are set for the workers when they start instead, see
    :func:`_single_threaded_children`.
    """
    if _STARTED_SINGLE_THREADED:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="blas")


#: OpenBLAS and OpenMP read these once, when numpy loads them (before any code here runs):
#: when the process started with both at 1, BLAS is single-threaded already (forked workers
#: inherit that; spawned ones start with them set, see :func:`_single_threaded_children`)
_STARTED_SINGLE_THREADED = all(os.environ.get(k) == "1" for k in _BLAS_THREAD_VARS[:2])


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Environment inherited by worker processes started inside the block: 1 BLAS thread."""
    saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
    os.environ.update({k: "1" for k in _BLAS_THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_tasks(
    tasks: Sequence[MicrographTask],
    optics: dict[int, Optics],
    settings: FitSettings,
    out_dir: Path,
    jobs: int,
    debug: bool,
    on_done: Callable[[MicrographTask, RowResult | str], None],
) -> None:
    """Process the tasks (in a process pool when ``jobs > 1``), reporting each as it ends."""
    todo = []
    for t in tasks:
        if t.error is not None:
            on_done(t, t.error)
        else:
            todo.append(t)
    if not todo:
        return

    def args(t: MicrographTask, fft_workers: int) -> tuple[tuple, dict]:
        return (
            (t.path, t.name, optics[t.optics_group], settings, str(out_dir), t.optics_group),
            {"stem": t.stem, "fft_workers": fft_workers, "debug": debug},
        )

    if jobs <= 1 or len(todo) == 1:
        # --jobs N means N single-threaded workers: one here, FFTs included
        with _blas_single_thread():
            for t in todo:
                a, kw = args(t, 1)
                on_done(t, process_one(*a, **kw))
        return

    # fork (Linux) starts workers at once with everything imported; spawn elsewhere. Workers
    # only compute and write files (no terminal output), so forking beside the progress-bar
    # thread is safe.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context(
        "fork" if sys.platform == "linux" and "fork" in methods else "spawn"
    )
    n = min(jobs, len(todo))
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker) as pool:
        futures: dict[Future, MicrographTask] = {}
        try:
            with _single_threaded_children():
                for t in todo:
                    a, kw = args(t, 1)
                    futures[pool.submit(process_one, *a, **kw)] = t
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OS
                    result = _failure(t.name, f"internal error: {type(exc).__name__}: {exc}")
                on_done(t, result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def run_estimate(
    inputs: Sequence[str],
    out_dir: str | os.PathLike[str],
    settings: FitSettings,
    *,
    apix: float | None = None,
    kv: float | None = None,
    cs: float | None = None,
    ac: float | None = None,
    mag_matrix: ArrayLike | None = None,
    jobs: int = 1,
    quiet: bool = False,
    debug: bool = False,
    console: Console | None = None,
    err_console: Console | None = None,
) -> EstimateReport:
    """Run the whole ``anisoctf estimate`` job.

    Parameters
    ----------
    inputs
        MRC files / glob patterns, or one RELION micrographs ``.star`` file.
    out_dir
        Output directory (created if needed).
    settings
        Fit settings.
    apix, kv, cs, ac, mag_matrix
        Optics from the command line (see :func:`resolve_inputs`).
    jobs
        Micrographs processed at once (separate processes when > 1).
    quiet
        No progress bar, warnings or summary; failures are still printed.
    debug
        Print tracebacks of unexpected errors.
    console, err_console
        Where the summary and the progress/failure lines go (default stdout and stderr).

    Returns
    -------
    EstimateReport
        Results and failures; its ``exit_code`` is 0 when all micrographs succeeded, else 1.

    Raises
    ------
    UsageError
        Bad inputs or options (exit status 2).
    """
    t_start = time.perf_counter()
    console = console or Console(highlight=False, soft_wrap=True)
    err = err_console or Console(stderr=True, highlight=False, soft_wrap=True)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out_dir)
    if any(c.isspace() for c in str(out)):
        raise UsageError(
            f"output directory {str(out)!r} contains whitespace, which RELION cannot read"
        )
    try:
        resolved = resolve_inputs(inputs, apix=apix, kv=kv, cs=cs, ac=ac, mag_matrix=mag_matrix)
    except InputError as exc:  # the STAR file itself is unreadable
        raise UsageError(str(exc)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    if not quiet:
        for w in resolved.warnings:
            err.print(f"warning: {w}", markup=False)

    tasks = resolved.tasks
    outcome: dict[int, RowResult | str] = {}
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    )
    with progress:
        bar = progress.add_task("CTF estimation", total=len(tasks))

        def on_done(task: MicrographTask, result: RowResult | str) -> None:
            outcome[task.index] = result
            if isinstance(result, str):
                progress.console.print(f"FAILED {result}", markup=False, highlight=False)
            elif not quiet:
                for w in result.warnings:
                    progress.console.print(f"warning: {task.name}: {w}", markup=False)
            progress.advance(bar)

        _run_tasks(tasks, resolved.optics, settings, out, jobs, debug, on_done)

    results = [r for i in sorted(outcome) if isinstance(r := outcome[i], RowResult)]
    failures = [(t.name, r) for t in tasks if isinstance(r := outcome[t.index], str)]
    star_path: Path | None = None
    star_error: str | None = None
    if results:
        used = {r.row.optics_group for r in results}
        try:
            write_micrographs_ctf_star(
                out / STAR_NAME,
                [r.row for r in results],
                {g: o for g, o in resolved.optics.items() if g in used},
                resolved.optics_names,
            )
            star_path = out / STAR_NAME
        except (OSError, ValueError) as exc:
            star_error = _one_line(f"cannot write {out / STAR_NAME}: {exc}")
            err.print(f"error: {star_error}", markup=False)
    report = EstimateReport(
        results=results,
        failures=failures,
        star_path=star_path,
        seconds=time.perf_counter() - t_start,
        star_error=star_error,
    )
    if not quiet:
        _print_summary(console, report)
    return report


def _print_summary(console: Console, report: EstimateReport) -> None:
    n = report.n_ok + report.n_failed
    line = (
        f"{report.n_ok} of {n} micrographs ok, {report.n_failed} failed in {report.seconds:.1f} s"
    )
    if report.results:
        df = _median([r.mean_defocus for r in report.results])
        res = _median([r.fit_resolution for r in report.results])
        line += f"; median defocus {df:,.0f} Å, median fit resolution {res:.2f} Å"
    console.print(line, markup=False)
    if report.star_path is not None:
        console.print(f"results: {report.star_path}", markup=False)
    elif not report.results:
        console.print(f"no micrograph succeeded; {STAR_NAME} was not written", markup=False)
