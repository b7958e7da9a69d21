"""One micrograph of ``anisoctf estimate``: read it, fit its CTF, write its outputs.

For a micrograph (or a particle stack) :func:`process_one` runs
:func:`~anisoctf.fit.estimate.estimate_ctf` (or :func:`~anisoctf.fit.estimate.fit_spectrum` on
the pooled periodograms of a stack) and writes, into the output directory, every file
atomically:

* ``<stem>.txt``: CTFFIND-compatible result (defocus 1 = U, defocus 2 = V, azimuth = angle,
  phase shift in radians, cross correlation = figure of merit, fit resolution);
* ``<stem>_ctf.png``: the diagnostic picture (for a failed micrograph too: its spectrum and
  the reason, :mod:`anisoctf.report.failure`);
* ``<stem>.ctf``: the diagnostic power spectrum (:func:`~anisoctf.jobs.ctf_image.ctf_image_array`).

Pixel sizes: the micrograph's pixel size is ``optics.pixel_size`` (the ``.txt`` header); the
``.ctf`` image is the *fitted spectrum*, whose pixel size is the fit's
(``estimate.diagnostics.pixel_size``: the micrograph's, or the ``--fit-apix`` of a
Fourier-cropped fit). Both are read in one place, :func:`_pixel_sizes`.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anisoctf.errors import AnisoctfError, FitError, InputError
from anisoctf.fit.estimate import check_image, estimate_ctf, fit_spectrum
from anisoctf.fit.result import CTFEstimate, FitSettings
from anisoctf.io.ctffind import CTFFindRecord, CTFFindSearch, write_ctffind_txt
from anisoctf.io.mrc import read_micrograph, read_stack, write_mrc
from anisoctf.io.star import MicrographCTFRow
from anisoctf.jobs.ctf_image import ctf_image_array
from anisoctf.jobs.inputs import one_line
from anisoctf.jobs.local_step import LocalOutcome, run_local_step
from anisoctf.jobs.process_memory import keep_freed_memory
from anisoctf.local.estimate import LocalSettings
from anisoctf.optics.ctf import Optics
from anisoctf.records.flags import figure_of_merit_flag, is_flag, tilt_support_flag
from anisoctf.report.diagnostic import render_diagnostic
from anisoctf.report.failure import render_failure
from anisoctf.spectrum.periodogram import stack_periodogram, tile_periodogram
from anisoctf.version import __version__

__all__ = ["RowResult", "failure_message", "process_one"]


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



def failure_message(name: str, message: str) -> str:
    """One line that names the micrograph."""
    message = one_line(message)
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
    try:
        est, lo = _fit(path, name, optics, settings, out, stem, fft_workers, local, stack)
        p = est.params
        values = (p.defocus_u, p.defocus_v, p.angle_deg, p.phase_shift_deg)
        if not all(math.isfinite(v) for v in values):
            raise FitError(f"the fit returned non-finite values {values}")
        outputs = _write_outputs(est, lo, name, optics, settings, out, stem)
    except AnisoctfError as exc:
        msg = failure_message(name, str(exc))
    except OSError as exc:
        msg = failure_message(name, f"cannot write the outputs into {out}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - one bad micrograph must not stop the batch
        msg = failure_message(name, f"internal error: {type(exc).__name__}: {exc}")
        if debug:
            msg += "\n" + traceback.format_exc().rstrip()
    else:
        msg = ""
    if msg:
        _failure_picture(path, name, optics, settings, out, stem, msg, stack, fft_workers)
        return msg
    return RowResult(
        name=name,
        row=_star_row(est, lo, name, optics_group, settings, Path(outputs[2])),
        figure_of_merit=float(est.figure_of_merit),
        fit_resolution=float(est.fit_resolution),
        warnings=_all_warnings(est, lo),
        outputs=outputs + (lo.outputs if lo is not None else ()),
        seconds=time.perf_counter() - t0,
    )


def _all_warnings(est: CTFEstimate, lo: LocalOutcome | None) -> tuple[str, ...]:
    """The micrograph's warnings, flags of implausible numbers first
    (:mod:`anisoctf.records.flags`)."""
    more = [figure_of_merit_flag(est.figure_of_merit)]
    if lo is not None and lo.estimate is not None:
        more.append(tilt_support_flag(lo.estimate.patch_outliers))
    every = [w for w in more if w] + list(est.warnings) + list(lo.warnings if lo else ())
    return tuple(sorted(dict.fromkeys(every), key=lambda w: not is_flag(w)))


def _failure_picture(
    path: str,
    name: str,
    optics: Optics,
    settings: FitSettings,
    out: Path,
    stem: str,
    message: str,
    stack: bool,
    fft_workers: int,
) -> None:
    """``<stem>_ctf.png`` of a failed micrograph: its averaged periodogram and the reason.
    Best effort: a micrograph that cannot be read gets the reason alone, and nothing here
    can turn the failure into another."""
    power = None
    try:
        if stack or path.lower().endswith(".mrcs"):
            power = stack_periodogram(read_stack(path), optics.pixel_size, workers=fft_workers)
        else:
            image = np.asarray(read_micrograph(path).data)
            box = int(min(settings.box, 2 ** int(np.log2(max(min(image.shape), 2)))))
            if box >= 64:
                power = tile_periodogram(image, optics.pixel_size, box=box, workers=fft_workers)
    except Exception:  # noqa: BLE001 - the picture shows what could be read
        power = None
    try:
        render_failure(
            out / f"{stem}_ctf.png",
            name,
            message.splitlines()[0],
            power.power if power is not None else None,
            power.pixel_size if power is not None else optics.pixel_size,
        )
    except Exception:  # noqa: BLE001 - e.g. an unwritable folder: the message says it
        pass


def _fit(
    path: str,
    name: str,
    optics: Optics,
    settings: FitSettings,
    out: Path,
    stem: str,
    fft_workers: int,
    local: LocalSettings | None,
    stack: bool,
) -> tuple[CTFEstimate, LocalOutcome | None]:
    """The global CTF fit of one micrograph or stack, and its local fit when asked for."""
    if stack or path.lower().endswith(".mrcs"):  # a particle stack: pool periodograms
        est = _estimate_stack(path, optics, settings, fft_workers)
        if local is None:
            return est, None
        return est, LocalOutcome(None, "", (), ("local defocus needs a micrograph, not a stack",))
    image = read_micrograph(path).data  # checked there: finite, not blank
    est = estimate_ctf(
        image, optics, settings, diagnostics=True, workers=fft_workers, name=path, check=False
    )
    if local is None:
        return est, None
    lo = run_local_step(image, optics, est, settings, local, out, stem, name, fft_workers)
    return (lo.refit if lo.refit is not None else est), lo  # a tilt-corrected refit is reported


def _pixel_sizes(optics: Optics, est: CTFEstimate) -> tuple[float, float]:
    """(micrograph, fitted spectrum) pixel sizes in Å: the ``.txt`` header reports the first,
    the ``.ctf`` image (the fitted spectrum) carries the second. They differ only when the fit
    was Fourier-cropped (``FitSettings.fit_pixel_size``)."""
    assert est.diagnostics is not None  # process_one asks for them
    return optics.pixel_size, est.diagnostics.pixel_size


def _write_outputs(
    est: CTFEstimate,
    lo: LocalOutcome | None,
    name: str,
    optics: Optics,
    settings: FitSettings,
    out: Path,
    stem: str,
) -> tuple[str, str, str]:
    """Write ``<stem>.txt``, ``<stem>_ctf.png`` and ``<stem>.ctf``; return their paths."""
    loc = lo.estimate if lo is not None else None
    p = est.params
    fom = float(est.figure_of_merit)
    res = float(est.fit_resolution)
    micrograph_apix, spectrum_apix = _pixel_sizes(optics, est)
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
            thickness=(loc.reported_thickness or 0.0) if loc is not None else None,
        ),
        input_file=name,
        optics=optics.with_pixel_size(micrograph_apix),
        search=CTFFindSearch(
            settings.box, settings.min_res, settings.max_res, settings.df_min, settings.df_max
        ),
        version_line=f"anisoctf {__version__}",
    )
    render_diagnostic(est, png, title=name, warnings=_all_warnings(est, lo))
    write_mrc(ctf, ctf_image_array(est), pixel_size=spectrum_apix)
    return str(txt), str(png), str(ctf)


def _star_row(
    est: CTFEstimate,
    lo: LocalOutcome | None,
    name: str,
    optics_group: int,
    settings: FitSettings,
    ctf: Path,
) -> MicrographCTFRow:
    """The micrograph's row of ``micrographs_ctf.star``."""
    loc = lo.estimate if lo is not None else None
    p = est.params
    return MicrographCTFRow(
        name=name,
        optics_group=int(optics_group),
        ctf_image=f"{ctf.as_posix()}:mrc",
        defocus_u=float(p.defocus_u),
        defocus_v=float(p.defocus_v),
        defocus_angle=float(p.angle_deg),
        figure_of_merit=float(est.figure_of_merit),
        max_resolution=float(est.fit_resolution),
        phase_shift=float(p.phase_shift_deg) if settings.phase_plate else None,
        tilt_angle=loc.tilt_angle if loc is not None else None,
        tilt_axis=loc.tilt_axis if loc is not None else None,
        thickness=loc.reported_thickness if loc is not None else None,
        surface=lo.surface_path if lo is not None else "",
    )
