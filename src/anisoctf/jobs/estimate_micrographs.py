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
in input order, and ``micrographs_ctf.cs`` holds the same results for cryoSPARC. A micrograph
that fails is reported on one line and the batch goes on.

Batches are resumable (see :mod:`anisoctf.jobs.batch_state` and ``docs/production.md``): each
micrograph's outcome is stored in ``<stem>.record.json`` with a fingerprint of its parameters,
a rerun skips what is done, the output directory is locked while a run writes into it, and
``--watch`` keeps processing new inputs. Where the micrographs run (this process, local worker
processes, Dask) is :mod:`anisoctf.jobs.backends`' business.

Inputs are MRC files and/or glob patterns, one RELION micrographs STAR file (e.g.
``corrected_micrographs.star``) whose optics table gives the optics of every optics group, or
one cryoSPARC exposures/particles ``.cs`` file.

A magnification matrix (``--mag-matrix``, else the ``_rlnMagMat00..11`` of a STAR file's optics
group) is passed to the fit, which then works on true-frame frequencies: the defoci written are
true-frame values, and ``micrographs_ctf.star`` carries the matrix in its optics table.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
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
from anisoctf.io.cryosparc_ctf import read_cs_micrographs, write_ctf_cs
from anisoctf.io.ctffind import CTFFindRecord, CTFFindSearch, write_ctffind_txt
from anisoctf.io.mrc import read_micrograph, read_mrc_header, read_stack, write_mrc
from anisoctf.io.star import (
    MicrographCTFRow,
    read_micrographs_star,
    read_optics_group_names,
    write_micrographs_ctf_star,
)
from anisoctf.jobs.backends import Backend, BackendError, make_backend
from anisoctf.jobs.batch_state import (
    BatchLock,
    BatchLockedError,
    MicrographRecord,
    input_signature,
    process_and_record,
    read_record,
    record_path,
    remove_stray_temporaries,
    task_fingerprint,
    write_record,
)
from anisoctf.jobs.local_step import LocalOutcome, run_local_step
from anisoctf.jobs.process_memory import keep_freed_memory
from anisoctf.local.estimate import LocalSettings
from anisoctf.optics.ctf import Optics
from anisoctf.optics.magmat import MagMat
from anisoctf.report.diagnostic import full_plane, render_diagnostic
from anisoctf.spectrum.periodogram import stack_periodogram

__all__ = [
    "DEFAULT_AMPLITUDE_CONTRAST",
    "DEFAULT_CS_MM",
    "DEFAULT_VOLTAGE_KV",
    "CS_NAME",
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
#: the same results as a cryoSPARC dataset (``ctf/*`` fields)
CS_NAME = "micrographs_ctf.cs"

# Defaults for plain MRC inputs: those of :class:`~anisoctf.optics.ctf.Optics`.
_OPTICS_DEFAULTS = Optics(pixel_size=1.0)
DEFAULT_VOLTAGE_KV = _OPTICS_DEFAULTS.voltage_kv
DEFAULT_CS_MM = _OPTICS_DEFAULTS.cs_mm
DEFAULT_AMPLITUDE_CONTRAST = _OPTICS_DEFAULTS.amplitude_contrast

#: header pixel size that is almost always a placeholder rather than a measurement
_PLACEHOLDER_PIXEL_SIZE = 1.0
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
    stack
        The file is a stack of particle images (cryoSPARC's ``_particles.mrc``), estimated
        from its pooled periodograms like a ``.mrcs`` file.
    """

    index: int
    path: str
    name: str
    optics_group: int
    stem: str
    error: str | None = None
    stack: bool = False  # a particle stack (pooled periodograms) whatever its suffix


@dataclass(frozen=True)
class ResolvedInputs:
    """What the command line resolved to: micrographs, optics and remarks."""

    tasks: list[MicrographTask]
    optics: dict[int, Optics]
    optics_names: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    uids: dict[str, int] = field(default_factory=dict)  # cryoSPARC uid by name (.cs input)


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
    n_skipped
        Micrographs not processed again because an earlier run had finished them with the
        same parameters (their results are in ``results``).
    """

    results: list[RowResult]
    failures: list[tuple[str, str]]
    star_path: Path | None
    seconds: float
    star_error: str | None = None
    n_skipped: int = 0

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
        optics = _override_optics(optics, apix, kv, cs, ac)
    paths = [str(e.path) for e in entries]
    stems = _unique_stems(paths)
    tasks = [
        MicrographTask(i, p, e.name, e.optics_group, s, _name_error(e.name))
        for i, (e, p, s) in enumerate(zip(entries, paths, stems, strict=True))
    ]
    return ResolvedInputs(tasks=tasks, optics=optics, optics_names=names)


def _override_optics(
    optics: dict[int, Optics],
    apix: float | None,
    kv: float | None,
    cs: float | None,
    ac: float | None,
) -> dict[int, Optics]:
    """``optics`` with the command line's ``--apix/--kv/--cs/--ac`` (those given) replacing the
    file's values in every group."""
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
    if not overrides:
        return optics
    try:
        return {g: replace(o, **overrides) for g, o in optics.items()}
    except ValueError as exc:
        raise UsageError(f"bad optics: {exc}") from None


def _resolve_cs(
    path: str, apix: float | None, kv: float | None, cs: float | None, ac: float | None
) -> ResolvedInputs:
    """Micrographs (or particle stacks) and optics of a cryoSPARC exposures/particles file."""
    found = read_cs_micrographs(path)
    optics = _override_optics(found.optics, apix, kv, cs, ac)
    paths = [str(m.path) for m in found.micrographs]
    stems = _unique_stems(paths)
    tasks = [
        MicrographTask(
            i, p, m.name, m.optics_group, s, _name_error(m.name), found.kind == "particles"
        )
        for i, (m, p, s) in enumerate(zip(found.micrographs, paths, stems, strict=True))
    ]
    return ResolvedInputs(
        tasks=tasks,
        optics=optics,
        warnings=list(found.notes),
        uids={m.name: m.uid for m in found.micrographs},
    )


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
        MRC paths and/or glob patterns (expanded, sorted, de-duplicated), one ``.star`` file,
        or one cryoSPARC exposures/particles ``.cs`` file.
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
    css = [x for x in inputs if x.lower().endswith(".cs")]
    if css:
        if len(inputs) > 1:
            raise UsageError("give either one .cs file or MRC files, not both or several")
        return _with_mag_matrix(_resolve_cs(css[0], apix, kv, cs, ac), mag_matrix)
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
    local: LocalSettings | None = None,
    stack: bool = False,
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
    local
        Also fit the local defocus (patches, tilt, thickness) and write
        ``<stem>_surface.json`` and ``<stem>_defocus.png``; None for the global fit only.
    stack
        Treat the file as a particle stack whatever its suffix (``.mrcs`` always is one).

    Returns
    -------
    RowResult | str
        The result, or a one-line failure message naming the micrograph.
    """
    keep_freed_memory()  # the next micrograph reuses this one's pages (see process_memory)
    t0 = time.perf_counter()
    path = str(path)
    stem = stem or Path(path).stem
    out = Path(out_dir)
    lo: LocalOutcome | None = None
    try:
        if stack or path.lower().endswith(".mrcs"):  # a particle stack: pool periodograms
            est = _estimate_stack(path, optics, settings, fft_workers)
            if local is not None:
                lo = LocalOutcome(None, "", (), ("local defocus needs a micrograph, not a stack",))
        else:
            image = read_micrograph(path).data  # checked there: finite, not blank
            est = estimate_ctf(
                image,
                optics,
                settings,
                diagnostics=True,
                workers=fft_workers,
                name=path,
                check=False,
            )
            if local is not None:
                lo = run_local_step(
                    image, optics, est, settings, local, out, stem, name, fft_workers
                )
        loc = lo.estimate if lo is not None else None
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
                tilt_axis=loc.tilt_axis if loc is not None else None,
                tilt_angle=loc.tilt_angle if loc is not None else None,
                thickness=(loc.thickness or 0.0) if loc is not None else None,
            ),
            input_file=name,
            optics=optics,
            search=CTFFindSearch(
                settings.box, settings.min_res, settings.max_res, settings.df_min, settings.df_max
            ),
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
        tilt_angle=loc.tilt_angle if loc is not None else None,
        tilt_axis=loc.tilt_axis if loc is not None else None,
        thickness=loc.thickness if loc is not None else None,
        surface=lo.surface_path if lo is not None else "",
    )
    return RowResult(
        name=name,
        row=row,
        figure_of_merit=fom,
        fit_resolution=res,
        warnings=tuple(est.warnings) + (lo.warnings if lo is not None else ()),
        outputs=(str(txt), str(png), str(ctf)) + (lo.outputs if lo is not None else ()),
        seconds=time.perf_counter() - t0,
    )


def _version() -> str:
    from anisoctf import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# the batch


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def _path_key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _from_record(name: str, rec: MicrographRecord) -> RowResult:
    assert rec.row is not None
    return RowResult(
        name=name,
        row=rec.row,
        figure_of_merit=rec.figure_of_merit,
        fit_resolution=rec.fit_resolution,
        warnings=rec.warnings,
        outputs=rec.outputs,
        seconds=rec.seconds,
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block (main thread only), so that a killed
    run removes its temporary files and releases its workers as on Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resolve_for_watch(inputs, **kw) -> ResolvedInputs:
    """:func:`resolve_inputs`, but a pattern that matches nothing yet gives no micrographs."""
    try:
        return resolve_inputs(inputs, **kw)
    except UsageError as exc:
        if "no file matches" in str(exc):
            return ResolvedInputs(tasks=[], optics={})
        raise


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
    local: LocalSettings | None = None,
    overwrite: bool = False,
    watch: float | None = None,
    scheduler: str | None = None,
    backend: Backend | None = None,
    process_fn: Callable[..., RowResult | str] | None = None,
    poll_seconds: float | None = None,
) -> EstimateReport:
    """Run the whole ``anisoctf estimate`` job (resumable, locked, every output atomic).

    Parameters
    ----------
    inputs
        MRC files / glob patterns, one RELION micrographs ``.star`` file or one cryoSPARC
        exposures ``.cs`` file.
    out_dir
        Output directory (created if needed). It is locked for the duration of the run.
    settings
        Fit settings.
    apix, kv, cs, ac, mag_matrix
        Optics from the command line (see :func:`resolve_inputs`).
    jobs
        Micrographs processed at once (separate processes when > 1; Dask workers of a local
        cluster with ``scheduler="local"``).
    quiet
        No progress bar, warnings or summary; failures are still printed.
    debug
        Print tracebacks of unexpected errors.
    console, err_console
        Where the summary and the progress/failure lines go (default stdout and stderr).
    local
        Also fit each micrograph's local defocus (``--patches``, ``--tilt``, ``--thickness``).
    overwrite
        Redo every micrograph. By default (``--continue``) a micrograph whose record in the
        output directory has the same parameters and input file is not processed again.
    watch
        Keep polling the inputs for new micrographs and stop after this many seconds without
        any (None: one pass).
    scheduler
        Dask scheduler address, or ``"local"`` for a local Dask cluster; None for local
        processes.
    backend
        A ready backend (see :mod:`anisoctf.jobs.backends`); overrides ``jobs``/``scheduler``.
    process_fn
        Replacement for :func:`process_one` (same signature); for benchmarks of the batch
        machinery only.
    poll_seconds
        Watch mode: time between polls (default min(2 s, watch / 4)).

    Returns
    -------
    EstimateReport
        Results and failures; its ``exit_code`` is 0 when all micrographs succeeded, else 1.

    Raises
    ------
    UsageError
        Bad inputs or options, or the output directory is locked by another run (exit 2).
    KeyboardInterrupt
        On Ctrl-C or SIGTERM, after the finished micrographs were written to the STAR file.
    """

    t_start = time.perf_counter()
    console = console or Console(highlight=False, soft_wrap=True)
    err = err_console or Console(stderr=True, highlight=False, soft_wrap=True)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if watch is not None and not watch >= 0:
        raise UsageError(f"--watch must be a number of seconds >= 0, got {watch}")
    out = Path(out_dir)
    if any(c.isspace() for c in str(out)):
        raise UsageError(
            f"output directory {str(out)!r} contains whitespace, which RELION cannot read"
        )
    resolve_kw = {"apix": apix, "kv": kv, "cs": cs, "ac": ac, "mag_matrix": mag_matrix}
    try:
        if watch is None:
            resolved = resolve_inputs(inputs, **resolve_kw)
        else:
            resolved = _resolve_for_watch(inputs, **resolve_kw)
    except InputError as exc:  # the STAR file itself is unreadable
        raise UsageError(str(exc)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    if not quiet:
        for w in resolved.warnings:
            err.print(f"warning: {w}", markup=False)

    lock = BatchLock(out)
    try:
        lock.acquire()
    except BatchLockedError as exc:
        raise UsageError(str(exc)) from None
    own_backend = backend is None
    try:
        remove_stray_temporaries(out)
        if backend is None:
            backend = make_backend(jobs, scheduler, close_fds=() if lock.fd is None else (lock.fd,))
    except BackendError as exc:
        lock.release()
        raise UsageError(str(exc)) from None
    except BaseException:
        lock.release()
        raise
    fn = process_fn or process_one

    outcome: dict[str, RowResult | str] = {}  # by input path, for this run
    n_skipped = 0
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

    def fingerprint(t: MicrographTask, optics: dict[int, Optics]) -> str:
        return task_fingerprint(
            settings=settings,
            optics=optics[t.optics_group],
            name=t.name,
            optics_group=t.optics_group,
            stem=t.stem,
            input=input_signature(t.path),
            out=str(out),  # the rows name their .ctf files by this path
            local=local,  # --patches/--tilt/--thickness change the outputs
        )

    def write_star(current: ResolvedInputs) -> tuple[Path | None, str | None]:
        rows = [
            r for t in current.tasks if isinstance(r := outcome.get(_path_key(t.path)), RowResult)
        ]
        if not rows:
            return None, None
        used = {r.row.optics_group for r in rows}
        try:
            write_micrographs_ctf_star(
                out / STAR_NAME,
                [r.row for r in rows],
                {g: o for g, o in current.optics.items() if g in used},
                current.optics_names,
            )
        except (OSError, ValueError) as exc:
            message = _one_line(f"cannot write {out / STAR_NAME}: {exc}")
            return None, message
        try:  # the same results for cryoSPARC
            write_ctf_cs(out / CS_NAME, [r.row for r in rows], current.optics, uids=current.uids)
        except (OSError, ValueError) as exc:
            return out / STAR_NAME, _one_line(f"cannot write {out / CS_NAME}: {exc}")
        return out / STAR_NAME, None

    def one_pass(current: ResolvedInputs, bar, ready: Callable[[MicrographTask], bool]) -> int:
        """Process the tasks of ``current`` not handled yet in this run; return how many."""
        nonlocal n_skipped
        todo: list[tuple[MicrographTask, str]] = []
        for t in current.tasks:
            key = _path_key(t.path)
            if key in outcome or not ready(t):
                continue
            if t.error is not None:
                outcome[key] = t.error
                with contextlib.suppress(OSError):
                    write_record(
                        record_path(out, t.stem),
                        MicrographRecord(fingerprint="", ok=False, message=t.error),
                    )
                progress.console.print(f"FAILED {t.error}", markup=False, highlight=False)
                progress.advance(bar)
                continue
            fp = fingerprint(t, current.optics)
            rec_file = record_path(out, t.stem)
            if not overwrite:
                rec = read_record(rec_file)
                if rec is not None and rec.ok and rec.fingerprint == fp and rec.outputs_exist():
                    outcome[key] = _from_record(t.name, rec)
                    n_skipped += 1
                    progress.advance(bar)
                    continue
            todo.append((t, fp))
        if not todo:
            return 0
        by_key = {_path_key(t.path): t for t, _ in todo}

        def items():
            for t, fp in todo:
                args = (t.path, t.name, current.optics[t.optics_group], settings, str(out))
                kwargs = {"stem": t.stem, "fft_workers": 1, "debug": debug}
                if t.stack:
                    kwargs["stack"] = True
                if local is not None:
                    kwargs["local"] = local
                yield (
                    _path_key(t.path),
                    process_and_record,
                    (fn, str(record_path(out, t.stem)), fp, (*args, t.optics_group), kwargs),
                    {},
                )

        def handle(key: str, result: object) -> None:
            t = by_key[key]
            if isinstance(result, BaseException):
                result = _failure(t.name, f"internal error: {type(result).__name__}: {result}")
                with contextlib.suppress(OSError):
                    write_record(
                        record_path(out, t.stem),
                        MicrographRecord(fingerprint="", ok=False, message=result),
                    )
            outcome[key] = result
            if isinstance(result, str):
                progress.console.print(f"FAILED {result}", markup=False, highlight=False)
            elif not quiet:
                for w in result.warnings:
                    progress.console.print(f"warning: {t.name}: {w}", markup=False)
            progress.advance(bar)

        results = backend.run(items())
        try:
            for key, result in results:
                handle(key, result)
        finally:
            results.close()  # on an interrupt the backend stops its workers here
        return len(todo)

    star_path: Path | None = None
    star_error: str | None = None
    try:
        with _sigterm_as_interrupt(), progress:
            bar = progress.add_task("CTF estimation", total=len(resolved.tasks))
            try:
                one_pass(resolved, bar, lambda t: True)
                star_path, star_error = write_star(resolved)
                if watch is not None:
                    poll = poll_seconds if poll_seconds is not None else min(2.0, watch / 4)
                    poll = max(poll, 0.01)
                    last_new = time.monotonic()
                    seen: dict[str, object] = {}

                    def settled(t: MicrographTask) -> bool:
                        # a file is taken once its size and mtime did not change between polls
                        sig = input_signature(t.path)
                        key = _path_key(t.path)
                        old = seen.get(key)
                        seen[key] = sig
                        return sig is not None and old == sig

                    while time.monotonic() - last_new < watch:
                        time.sleep(poll)
                        current = _resolve_for_watch(inputs, **resolve_kw)
                        progress.update(bar, total=len(current.tasks))
                        news = [t for t in current.tasks if _path_key(t.path) not in outcome]
                        if news:
                            last_new = time.monotonic()
                        if one_pass(current, bar, settled):
                            resolved = current
                            star_path, star_error = write_star(resolved)
            except KeyboardInterrupt:
                # micrographs whose record was written just before the interrupt count too
                for t in resolved.tasks:
                    key = _path_key(t.path)
                    if key in outcome or t.error is not None:
                        continue
                    rec = read_record(record_path(out, t.stem))
                    if rec is not None and rec.ok and rec.outputs_exist():
                        if rec.fingerprint == fingerprint(t, resolved.optics):
                            outcome[key] = _from_record(t.name, rec)
                write_star(resolved)
                raise
    finally:
        if own_backend:
            backend.close()
        remove_stray_temporaries(out)  # left by workers stopped mid-write; we still hold the lock
        lock.release()

    results = [
        r for t in resolved.tasks if isinstance(r := outcome.get(_path_key(t.path)), RowResult)
    ]
    failures = [
        (t.name, r) for t in resolved.tasks if isinstance(r := outcome.get(_path_key(t.path)), str)
    ]
    if star_error:
        err.print(f"error: {star_error}", markup=False)
    report = EstimateReport(
        results=results,
        failures=failures,
        star_path=star_path,
        seconds=time.perf_counter() - t_start,
        star_error=star_error,
        n_skipped=n_skipped,
    )
    if not quiet:
        _print_summary(console, report)
    return report


def _print_summary(console: Console, report: EstimateReport) -> None:
    n = report.n_ok + report.n_failed
    line = (
        f"{report.n_ok} of {n} micrographs ok, {report.n_failed} failed in {report.seconds:.1f} s"
    )
    if report.n_skipped:
        line += f" ({report.n_skipped} done by an earlier run, not redone)"
    if report.results:
        df = _median([r.mean_defocus for r in report.results])
        res = _median([r.fit_resolution for r in report.results])
        line += f"; median defocus {df:,.0f} Å, median fit resolution {res:.2f} Å"
    console.print(line, markup=False)
    if report.star_path is not None:
        console.print(f"results: {report.star_path}", markup=False)
    elif not report.results:
        console.print(f"no micrograph succeeded; {STAR_NAME} was not written", markup=False)
