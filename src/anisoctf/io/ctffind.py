"""CTFFIND-compatible per-micrograph result files (``<stem>.txt``).

Layout written and read here (CTFFIND 4.1 and 5)::

    # Output from <program and version>, run on <YYYY-MM-DD HH:MM:SS>
    # Input file: <image> ; Number of micrographs: <N>
    # Pixel size: <Å> Angstroms ; acceleration voltage: <kV> keV ; spherical aberration: <mm> mm
      ; amplitude contrast: <w>                                          (one line in the file)
    # Box size: <px> pixels ; min. res.: <Å> Angstroms ; max. res.: <Å> Angstroms
      ; min. def.: <Å> um; max. def. <Å> um                              (one line in the file)
    # Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; ... #7 - spacing ...
    <one row of numbers per micrograph>

Data columns: 1 micrograph number (1-based); 2 defocus 1 [Å]; 3 defocus 2 [Å]; 4 azimuth of
astigmatism [degrees]; 5 additional phase shift [radians]; 6 cross correlation; 7 spacing [Å]
up to which the CTF rings were fit successfully. CTFFIND 5 adds 8 estimated tilt axis angle
[degrees]; 9 estimated tilt angle [degrees]; 10 estimated sample thickness [Å]. Note that
CTFFIND labels the defocus search range "um" although the values are in Å; the same wording is
kept so that tools which parse the header by position keep working.

Tilt columns 8–9 are written in CTFFIND 5's own convention and read back into ours
(:func:`tilt_to_ctffind`, :func:`tilt_from_ctffind`). CTFFIND 5 writes the axis in [0°, 360°)
and an unsigned tilt, with the specimen height ``tan(tilt)·(x·sin φ + y·cos φ)`` (cisTEM
``ctffind_tilt.cpp``); anisoctf keeps the axis in [0°, 180°) and a signed tilt, height
``tan(tilt)·(−x·sin α + y·cos α)`` (docs/local.md). So a positive tilt about our axis α is
CTFFIND's ``(360° − α, tilt)`` and a negative one ``(180° − α, |tilt|)``. Pinned against the
file CTFFIND 5.0.1 itself wrote (``../shared/data/ctffind5``: our 130° is its 231.15° ≈
360° − 130°) by ``tests/test_io_ctffind.py::test_real_ctffind5_tilt_convention``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from anisoctf.errors import InputError
from anisoctf.io.atomic import write_text_atomic
from anisoctf.optics.ctf import Optics
from anisoctf.records.micrograph import MicrographCTFRow
from anisoctf.version import __version__

__all__ = [
    "CTFFindRecord",
    "CTFFindSearch",
    "ctffind_record",
    "read_ctffind_txt",
    "tilt_from_ctffind",
    "tilt_to_ctffind",
    "write_ctffind_txt",
]

_COLUMNS_4 = (
    "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
    "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; "
    "#6 - cross correlation; "
    "#7 - spacing (in Angstroms) up to which CTF rings were fit successfully"
)
_COLUMNS_5_EXTRA = (
    "; #8 - Estimated tilt axis angle; #9 - Estimated tilt angle ; "
    "#10 Estimated sample thickness (in Angstroms)"
)


@dataclass(frozen=True)
class CTFFindRecord:
    """One data row of a CTFFIND result file.

    Parameters
    ----------
    defocus_1, defocus_2
        Defocus along the two principal axes in Å (underfocus positive; CTFFIND writes
        defocus 1 >= defocus 2).
    azimuth
        Azimuth of astigmatism (the defocus-1 axis) in degrees from the x axis.
    phase_shift_rad
        Additional phase shift in radians.
    cross_correlation
        Score of the fit.
    fit_resolution
        Spacing in Å up to which the CTF rings were fit successfully.
    tilt_axis, tilt_angle
        Estimated tilt axis angle and tilt angle in degrees, in anisoctf's convention (axis in
        [0, 180), signed tilt); the file holds CTFFIND 5's (see the module notes), converted
        on writing and reading. None for CTFFIND 4.
    thickness
        CTFFIND 5 estimated sample thickness in Å; None for CTFFIND 4.
    """

    defocus_1: float
    defocus_2: float
    azimuth: float
    phase_shift_rad: float
    cross_correlation: float
    fit_resolution: float
    tilt_axis: float | None = None
    tilt_angle: float | None = None
    thickness: float | None = None

    @property
    def has_ctffind5_columns(self) -> bool:
        """True when any of the CTFFIND 5 columns (tilt, thickness) is set."""
        return any(v is not None for v in (self.tilt_axis, self.tilt_angle, self.thickness))


@dataclass(frozen=True)
class CTFFindSearch:
    """The fit settings a CTFFIND header reports.

    Parameters
    ----------
    box
        Size of the amplitude spectrum in pixels.
    min_res, max_res
        Resolution range of the fit in Å.
    df_min, df_max
        Defocus search range in Å.
    """

    box: int
    min_res: float
    max_res: float
    df_min: float
    df_max: float


def tilt_to_ctffind(axis_deg: float, tilt_deg: float) -> tuple[float, float]:
    """CTFFIND 5's ``(axis in [0, 360), unsigned tilt)`` for anisoctf's ``(axis, signed tilt)``.

    Both describe the same height ``tan(tilt)·(−x·sin α + y·cos α) =
    tan|tilt|·(x·sin φ + y·cos φ)``: ``φ = −α`` for a positive tilt, ``φ = 180° − α`` for a
    negative one (modulo 360°).
    """
    phi = (-axis_deg if tilt_deg >= 0 else 180.0 - axis_deg) % 360.0
    return (0.0 if phi >= 360.0 else phi), abs(tilt_deg)


def tilt_from_ctffind(axis_deg: float, tilt_deg: float) -> tuple[float, float]:
    """anisoctf's ``(axis in [0, 180), signed tilt)`` for CTFFIND 5's ``(axis, tilt)``.

    The inverse of :func:`tilt_to_ctffind`; a (non-standard) negative CTFFIND tilt is read as
    the same height too.
    """
    alpha = (-axis_deg) % 360.0
    alpha = 0.0 if alpha >= 360.0 else alpha
    if alpha >= 180.0:
        return alpha - 180.0, -tilt_deg
    return alpha, tilt_deg


def ctffind_record(row: MicrographCTFRow) -> CTFFindRecord:
    """The CTFFIND line of one micrograph's CTF result.

    Defocus U/V/angle become defocus 1/2/azimuth, the phase shift is converted to radians (0
    when not estimated), a NaN figure of merit or resolution is written as 0, and the tilt and
    thickness (CTFFIND 5 columns) are kept when known.
    """
    fom, res = row.figure_of_merit, row.max_resolution
    return CTFFindRecord(
        defocus_1=row.defocus_u,
        defocus_2=row.defocus_v,
        azimuth=row.defocus_angle,
        phase_shift_rad=math.radians(row.phase_shift) if row.phase_shift is not None else 0.0,
        cross_correlation=fom if math.isfinite(fom) else 0.0,
        fit_resolution=res if math.isfinite(res) else 0.0,
        tilt_axis=row.tilt_axis,
        tilt_angle=row.tilt_angle,
        thickness=row.thickness,
    )


def write_ctffind_txt(
    path: str | os.PathLike[str],
    record: CTFFindRecord | Sequence[CTFFindRecord],
    *,
    input_file: str,
    optics: Optics,
    search: CTFFindSearch,
    version_line: str = f"anisoctf {__version__}",
    run_on: str | None = None,
) -> None:
    """Write a CTFFIND-style result file atomically.

    Parameters
    ----------
    path
        Output ``.txt`` file.
    record
        One record, or one per image of a stack (numbered from 1).
    input_file
        The micrograph the results belong to (written in the header).
    optics
        Optics used for the fit: pixel size (Å), voltage (kV), Cs (mm), amplitude contrast.
    search
        Spectrum box, resolution range and defocus search range of the fit.
    version_line
        Program and version, written as ``# Output from <version_line>, run on <date>``.
    run_on
        Timestamp text for the first line; default the current local time.

    Notes
    -----
    The 10-column CTFFIND 5 layout is written when any record has a tilt or thickness value;
    missing values in that layout are written as 0, as CTFFIND 5 does when it does not
    estimate them.

    Raises
    ------
    ValueError
        No records, a name containing a line break, or a non-finite value.
    """
    records = [record] if isinstance(record, CTFFindRecord) else list(record)
    if not records:
        raise ValueError("write_ctffind_txt needs at least one record")
    if "\n" in input_file or "\r" in input_file:
        raise ValueError(f"input file name {input_file!r} contains a line break")
    ctffind5 = any(r.has_ctffind5_columns for r in records)
    when = run_on or _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    pixel_size, voltage_kv = optics.pixel_size, optics.voltage_kv
    cs_mm, amplitude_contrast = optics.cs_mm, optics.amplitude_contrast
    box, min_res, max_res = search.box, search.min_res, search.max_res
    df_min, df_max = search.df_min, search.df_max
    lines = [
        f"# Output from {version_line}, run on {when}",
        f"# Input file: {input_file} ; Number of micrographs: {len(records)}",
        f"# Pixel size: {pixel_size:.3f} Angstroms ; acceleration voltage: {voltage_kv:.1f} keV ; "
        f"spherical aberration: {cs_mm:.2f} mm ; amplitude contrast: {amplitude_contrast:.2f}",
        f"# Box size: {int(box)} pixels ; min. res.: {min_res:.1f} Angstroms ; "
        f"max. res.: {max_res:.1f} Angstroms ; min. def.: {df_min:.1f} um; "
        f"max. def. {df_max:.1f} um",
        _COLUMNS_4 + (_COLUMNS_5_EXTRA if ctffind5 else ""),
    ]
    for number, r in enumerate(records, start=1):
        values = [
            float(number),
            r.defocus_1,
            r.defocus_2,
            r.azimuth,
            r.phase_shift_rad,
            r.cross_correlation,
            r.fit_resolution,
        ]
        if ctffind5:
            axis, tilt = (
                tilt_to_ctffind(r.tilt_axis, r.tilt_angle)
                if r.tilt_axis is not None and r.tilt_angle is not None
                else (0.0, 0.0)
            )
            values += [axis, tilt, r.thickness if r.thickness is not None else 0.0]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"record {number} has a non-finite value: {values}")
        lines.append(" ".join(f"{v:.6f}" for v in values))
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_ctffind_txt(path: str | os.PathLike[str]) -> list[CTFFindRecord]:
    """Read a CTFFIND 4 (7 columns) or CTFFIND 5 (10 columns) result file.

    Parameters
    ----------
    path
        The ``.txt`` file CTFFIND (or :func:`write_ctffind_txt`) wrote.

    Returns
    -------
    list[CTFFindRecord]
        One record per data row (per image of the input), in file order.

    Raises
    ------
    InputError
        Missing or unreadable file, no data rows, a row with the wrong number of columns or
        with text or NaN where numbers belong.
    """
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a CTFFIND .txt file" if p.is_dir() else "file not found"
        raise InputError(f"{what}; check the path", path=p)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("not a CTFFIND result file (binary data); check the path", p) from exc
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror or exc}); check permissions", p) from exc
    records: list[CTFFindRecord] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) not in (7, 10):
            raise InputError(
                f"line {lineno} has {len(fields)} columns, expected 7 (CTFFIND 4) or 10 "
                "(CTFFIND 5); the file is truncated or not CTFFIND output — re-run the fit",
                path=p,
            )
        try:
            values = [float(f) for f in fields]
        except ValueError as exc:
            raise InputError(
                f"line {lineno} holds text where numbers belong; not CTFFIND output or corrupt",
                path=p,
            ) from exc
        if not all(math.isfinite(v) for v in values[1:7]):
            raise InputError(
                f"line {lineno} holds NaN/Inf results; the fit failed — re-run CTF estimation",
                path=p,
            )
        extra: list[float | None] = [None] * 3
        if len(values) == 10:
            extra = [*tilt_from_ctffind(values[7], values[8]), values[9]]
        records.append(
            CTFFindRecord(
                defocus_1=values[1],
                defocus_2=values[2],
                azimuth=values[3],
                phase_shift_rad=values[4],
                cross_correlation=values[5],
                fit_resolution=values[6],
                tilt_axis=extra[0],
                tilt_angle=extra[1],
                thickness=extra[2],
            )
        )
    if not records:
        raise InputError(
            "no result rows (only comments or empty); the fit did not finish — re-run it", path=p
        )
    return records
