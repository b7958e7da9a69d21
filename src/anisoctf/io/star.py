"""RELION STAR files: micrograph lists in, CTF results out.

STAR tables are parsed by :mod:`anisoctf.io.star_tables` and turned here into plain frozen
records (:class:`MicrographEntry`, :class:`~anisoctf.records.micrograph.MicrographCTFRow`) and
:class:`~anisoctf.optics.ctf.Optics` objects keyed by optics group number
(:mod:`anisoctf.io.star_optics`).

Both layouts are understood:

* RELION 3.1 and later: a ``data_optics`` table (one row per optics group) plus a
  ``data_micrographs`` table whose rows carry ``_rlnOpticsGroup``;
* RELION 3.0: a single table, optionally with per-row ``_rlnVoltage``,
  ``_rlnSphericalAberration``, ``_rlnAmplitudeContrast`` and a pixel size (either a pixel-size
  column or ``_rlnDetectorPixelSize`` [µm] with ``_rlnMagnification``). Rows with the same
  optics are put in one group, numbered from 1 in order of appearance. When none of these
  columns is present the optics dictionary is empty and the caller must supply the optics.

Units follow RELION: defocus in Å, angles and ``_rlnPhaseShift`` in degrees, pixel sizes in Å.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.atomic import atomic_write
from anisoctf.io.star_optics import groups_and_optics, read_optics_group_names, read_optics_star
from anisoctf.io.star_passthrough import StarPassthrough, read_passthrough
from anisoctf.io.star_tables import (
    find_table,
    float_column,
    fmt_float,
    format_loop,
    numbers,
    optional_floats,
    read_star_blocks,
    read_star_file,
    star_token,
    string_column,
    strip_type_tag,
)
from anisoctf.optics.ctf import Optics
from anisoctf.records.micrograph import MicrographCTFRow

__all__ = [
    "MicrographCTFRow",
    "MicrographEntry",
    "StarPassthrough",
    "read_passthrough",
    "read_micrographs_ctf_star",
    "read_micrographs_star",
    "read_optics_group_names",
    "read_optics_star",
    "read_star_blocks",
    "relion_micrograph_columns",
    "relion_micrograph_row",
    "write_micrographs_ctf_star",
]

#: anisoctf's own labels for the specimen tilt (RELION keeps unknown labels as they are)
_TILT_COLUMNS = (L.TILT_ANGLE, L.TILT_AXIS_ANGLE)


@dataclass(frozen=True)
class MicrographEntry:
    """One micrograph listed in a STAR file.

    Parameters
    ----------
    name
        ``_rlnMicrographName`` exactly as written in the STAR file.
    optics_group
        ``_rlnOpticsGroup`` (1 for RELION 3.0 files without optics columns).
    path
        Absolute path of the image: ``name`` joined to the project directory (RELION paths are
        relative to the directory RELION runs in). A trailing ``:mrc`` type tag is dropped;
        symbolic links are not resolved.
    path_no_dw
        Absolute path of the sum without dose weighting (``_rlnMicrographNameNoDW``), or None.
    """

    name: str
    optics_group: int
    path: Path
    path_no_dw: Path | None = None


# --------------------------------------------------------------------------------------------
# public readers


def read_micrographs_star(
    path: str | os.PathLike[str], project_dir: str | os.PathLike[str] | None = None
) -> tuple[list[MicrographEntry], dict[int, Optics]]:
    """Read a list of micrographs (e.g. ``corrected_micrographs.star``).

    Parameters
    ----------
    path
        RELION 3.0 or 3.1+ STAR file with a ``_rlnMicrographName`` column.
    project_dir
        Directory the micrograph names are relative to; default the current directory
        (RELION runs every job from the project directory).

    Returns
    -------
    entries
        One entry per distinct micrograph, in file order.
    optics
        Optics by group number; empty for a RELION 3.0 file without optics columns, in which
        case every entry has group 1 and the caller must supply the optics.

    Raises
    ------
    InputError
        Unreadable file, no ``_rlnMicrographName`` column, or incomplete optics.
    """
    p, blocks = read_star_file(path)
    key, df = find_table(
        p,
        blocks,
        [L.MICROGRAPH_NAME],
        "give a micrographs STAR file (e.g. corrected_micrographs)",
    )
    names = string_column(p, df, L.MICROGRAPH_NAME, key)
    groups, optics = groups_and_optics(p, blocks, key, df)
    root = Path.cwd() if project_dir is None else Path(project_dir)
    root = root.absolute()
    no_dw = (
        string_column(p, df, L.MICROGRAPH_NAME_NO_DW, key)
        if L.MICROGRAPH_NAME_NO_DW in df.columns
        else [""] * len(names)
    )
    entries: list[MicrographEntry] = []
    seen: set[str] = set()
    for name, group, nd in zip(names, groups.tolist(), no_dw, strict=True):
        if name in seen:
            continue
        seen.add(name)
        nd_path = root / strip_type_tag(nd) if nd and nd != "None" else None
        entries.append(MicrographEntry(name, int(group), root / strip_type_tag(name), nd_path))
    return entries, optics


def read_micrographs_ctf_star(
    path: str | os.PathLike[str],
) -> tuple[list[MicrographCTFRow], dict[int, Optics]]:
    """Read CTF results (``micrographs_ctf.star`` from RELION/CTFFIND, gctf, or anisoctf).

    Parameters
    ----------
    path
        RELION 3.0 or 3.1+ STAR file with micrograph names and defocus columns.

    Returns
    -------
    rows
        One record per row, in file order.
    optics
        Optics by group number; empty for a RELION 3.0 file without optics columns.

    Raises
    ------
    InputError
        Unreadable file, missing name/defocus columns, non-numeric values, incomplete optics.
    """
    p, blocks = read_star_file(path)
    required = [L.MICROGRAPH_NAME, L.DEFOCUS_U, L.DEFOCUS_V, L.DEFOCUS_ANGLE]
    key, df = find_table(
        p, blocks, required, "give the output of a CTF job (e.g. micrographs_ctf.star)"
    )
    if L.DEFOCUS_U not in df.columns:  # pragma: no cover - _find_table guarantees it
        raise InputError("no defocus columns", path=p)
    names = string_column(p, df, L.MICROGRAPH_NAME, key)
    du, dv, angle = (float_column(p, df, c, key) for c in required[1:])
    n = len(df)
    nan = np.full(n, np.nan)
    fom = numbers(df.get(L.FIGURE_OF_MERIT, nan))
    maxres = numbers(df.get(L.MAX_RESOLUTION, nan))
    phase = float_column(p, df, L.PHASE_SHIFT, key) if L.PHASE_SHIFT in df.columns else None
    ctf_images = (
        [str(v) for v in df[L.CTF_IMAGE].fillna("").tolist()]
        if L.CTF_IMAGE in df.columns
        else [""] * n
    )
    groups, optics = groups_and_optics(p, blocks, key, df)

    def maybe(a: np.ndarray | None, i: int) -> float | None:
        return None if a is None or not math.isfinite(a[i]) else float(a[i])

    tilt, axis = optional_floats(df, _TILT_COLUMNS[0]), optional_floats(df, _TILT_COLUMNS[1])
    thick = optional_floats(df, L.ICE_THICKNESS)
    surfaces = (
        [("" if str(v) in ("None", "nan") else str(v)) for v in df[L.DEFOCUS_SURFACE].fillna("")]
        if L.DEFOCUS_SURFACE in df.columns
        else [""] * n
    )
    rows = [
        MicrographCTFRow(
            name=names[i],
            optics_group=int(groups[i]),
            ctf_image=ctf_images[i],
            defocus_u=float(du[i]),
            defocus_v=float(dv[i]),
            defocus_angle=float(angle[i]),
            figure_of_merit=float(fom[i]),
            max_resolution=float(maxres[i]),
            phase_shift=None if phase is None else float(phase[i]),
            tilt_angle=maybe(tilt, i),
            tilt_axis=maybe(axis, i),
            thickness=maybe(thick, i),
            surface=surfaces[i],
        )
        for i in range(n)
    ]
    return rows, optics


# --------------------------------------------------------------------------------------------
# writer


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def relion_micrograph_columns(rows: Sequence[MicrographCTFRow]) -> list[str]:
    """The ``data_micrographs`` labels of a ``micrographs_ctf.star`` holding ``rows``.

    ``_rlnCtfImage`` when any row has one, ``_rlnPhaseShift`` when any row has one, the tilt,
    thickness and surface columns when any row has them.
    """
    m_cols = [L.MICROGRAPH_NAME, L.OPTICS_GROUP]
    m_cols += [L.CTF_IMAGE] if any(r.ctf_image for r in rows) else []
    m_cols += [
        L.DEFOCUS_U,
        L.DEFOCUS_V,
        L.ASTIGMATISM,
        L.DEFOCUS_ANGLE,
        L.FIGURE_OF_MERIT,
        L.MAX_RESOLUTION,
    ]
    m_cols += [L.PHASE_SHIFT] if any(r.phase_shift is not None for r in rows) else []
    m_cols += list(_TILT_COLUMNS) if any(r.tilt_angle is not None for r in rows) else []
    m_cols += [L.ICE_THICKNESS] if any(r.thickness is not None for r in rows) else []
    m_cols += [L.DEFOCUS_SURFACE] if any(r.surface for r in rows) else []
    return m_cols


def relion_micrograph_row(r: MicrographCTFRow, columns: Sequence[str]) -> list[str]:
    """The cells of one micrograph's row of ``micrographs_ctf.star`` (``columns`` from
    :func:`relion_micrograph_columns`): shortest exact float text, ``nan`` for unknown values,
    0 for a row without a phase shift in a table with one, ``None`` for a missing surface.

    Raises
    ------
    ValueError
        A defocus value is not finite, or a name is empty or contains whitespace.
    """
    checks = (
        ("defocus U", r.defocus_u),
        ("defocus V", r.defocus_v),
        ("angle", r.defocus_angle),
    )
    for label, v in checks:
        if not math.isfinite(v):
            raise ValueError(f"{r.name}: {label} is {v}; only finite values can be written")
    line = [star_token(r.name, "micrograph name"), str(int(r.optics_group))]
    if L.CTF_IMAGE in columns:
        line.append(star_token(r.ctf_image, f"{r.name}: CTF image"))
    line += [
        fmt_float(r.defocus_u),
        fmt_float(r.defocus_v),
        fmt_float(r.astigmatism),
        fmt_float(r.defocus_angle),
        fmt_float(r.figure_of_merit),
        fmt_float(r.max_resolution),
    ]
    if L.PHASE_SHIFT in columns:
        line.append(fmt_float(0.0 if r.phase_shift is None else r.phase_shift))
    if L.TILT_ANGLE in columns:
        line += [fmt_float(_nan_if_none(r.tilt_angle)), fmt_float(_nan_if_none(r.tilt_axis))]
    if L.ICE_THICKNESS in columns:
        line.append(fmt_float(_nan_if_none(r.thickness)))
    if L.DEFOCUS_SURFACE in columns:
        line.append(star_token(r.surface, f"{r.name}: surface file") if r.surface else "None")
    return line


def _merge(
    cols: list[str],
    rows: list[list[str]],
    keys: Sequence[object],
    extra: Sequence[str],
    values: dict,
) -> None:
    """Put the ``extra`` columns (cells ``values[key]``) into ``cols``/``rows``, in place: a
    column already there gets the input's value, others are appended ("None" where a row has
    no input values)."""
    for j, c in enumerate(extra):
        at = cols.index(c) if c in cols else None
        if at is None:
            cols.append(c)
        for key, row in zip(keys, rows, strict=True):
            cells = values.get(key)
            if cells is None:
                if at is None:
                    row.append("None")
            elif at is None:
                row.append(cells[j])
            else:
                row[at] = cells[j]


def write_micrographs_ctf_star(
    path: str | os.PathLike[str],
    rows: Sequence[MicrographCTFRow],
    optics: dict[int, Optics],
    optics_names: dict[int, str] | None = None,
    passthrough: StarPassthrough | None = None,
) -> None:
    """Write CTF results as a RELION 3.1+ ``micrographs_ctf.star``, atomically.

    Parameters
    ----------
    path
        Output STAR file.
    rows
        One record per micrograph, written in the given order.
    optics
        Optics of every group used by ``rows`` (others are written too).
    optics_names
        ``_rlnOpticsGroupName`` per group; default ``opticsGroup<N>``.
    passthrough
        Columns of the input micrographs STAR to keep, with their values
        (:func:`~anisoctf.io.star_passthrough.read_passthrough`), as RELION's CTF job does:
        appended after the CTF columns; an input ``_rlnMicrographOriginalPixelSize`` replaces
        the one written here.

    Notes
    -----
    ``data_optics`` gets ``_rlnMagMat00..11`` only when some group has a non-identity matrix;
    ``_rlnMicrographOriginalPixelSize`` is written equal to the pixel size. ``data_micrographs``
    gets ``_rlnCtfImage`` when any row has one (then all must) and ``_rlnPhaseShift`` when any
    row has one (0 for rows without). NaN figure of merit or resolution is written as ``nan``.

    Raises
    ------
    ValueError
        A row refers to an optics group not in ``optics``, a defocus value is not finite,
        or a name is empty or contains whitespace.
    """
    names = optics_names or {}
    unknown = sorted({r.optics_group for r in rows} - set(optics))
    if unknown:
        raise ValueError(f"rows refer to optics group(s) {unknown} that are not in `optics`")
    groups = sorted(optics)
    with_mag = any(optics[g].has_anisomag for g in groups)
    o_cols = [
        L.OPTICS_GROUP_NAME,
        L.OPTICS_GROUP,
        L.MICROGRAPH_ORIGINAL_PIXEL_SIZE,
        L.VOLTAGE,
        L.SPHERICAL_ABERRATION,
        L.AMPLITUDE_CONTRAST,
        L.MICROGRAPH_PIXEL_SIZE,
    ]
    if with_mag:
        o_cols += list(L.MAGMAT)
    o_rows: list[list[str]] = []
    for g in groups:
        o = optics[g]
        row = [
            star_token(names.get(g, f"opticsGroup{g}"), "optics group name"),
            str(int(g)),
            fmt_float(o.pixel_size),
            fmt_float(o.voltage_kv),
            fmt_float(o.cs_mm),
            fmt_float(o.amplitude_contrast),
            fmt_float(o.pixel_size),
        ]
        if with_mag:
            row += [fmt_float(v) for r in o.mag_matrix for v in r]
        o_rows.append(row)

    m_cols = relion_micrograph_columns(rows)
    m_rows = [relion_micrograph_row(r, m_cols) for r in rows]
    if passthrough is not None:
        _merge(o_cols, o_rows, groups, passthrough.optics_columns, passthrough.optics_values)
        names = [r.name for r in rows]
        _merge(m_cols, m_rows, names, passthrough.micrograph_columns, passthrough.micrograph_values)

    lines = format_loop("optics", o_cols, o_rows) + format_loop("micrographs", m_cols, m_rows)
    text = "\n".join(lines) + "\n"
    with atomic_write(path, "w") as fh:
        fh.write(text)
