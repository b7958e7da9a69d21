"""RELION STAR files: micrograph lists in, CTF results out.

Only this module touches pandas: STAR tables are parsed with ``starfile`` and turned into
plain frozen records (:class:`MicrographEntry`, :class:`MicrographCTFRow`) and
:class:`~anisoctf.optics.ctf.Optics` objects keyed by optics group number.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.io.atomic import atomic_write
from anisoctf.optics.ctf import Optics

__all__ = [
    "MicrographCTFRow",
    "MicrographEntry",
    "read_micrographs_ctf_star",
    "read_micrographs_star",
    "read_optics_group_names",
    "read_optics_star",
    "read_star_blocks",
    "write_micrographs_ctf_star",
]

_STAR_VERSION = "# version 30001"
_OPTICS_FIX = "add the column(s) or pass --apix/--kv/--cs/--ac"
_STRING_COLUMNS = [
    "rlnMicrographName",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
    "rlnOpticsGroupName",
    "rlnImageName",
    "rlnMtfFileName",
]
_MAG_COLUMNS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")
_PIXEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "micrographs": (
        "rlnMicrographPixelSize",
        "rlnImagePixelSize",
        "rlnMicrographOriginalPixelSize",
    ),
    "particles": ("rlnImagePixelSize", "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize"),
}
_BASE_OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")


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
    """

    name: str
    optics_group: int
    path: Path


@dataclass(frozen=True)
class MicrographCTFRow:
    """CTF result for one micrograph, as in RELION's ``micrographs_ctf.star``.

    Parameters
    ----------
    name
        ``_rlnMicrographName``.
    optics_group
        ``_rlnOpticsGroup``.
    ctf_image
        ``_rlnCtfImage`` (diagnostic power spectrum, e.g. ``x_PS.ctf:mrc``); "" when absent.
    defocus_u, defocus_v
        Defocus along the major and minor axes in Å, underfocus positive.
    defocus_angle
        Angle of the U axis in degrees.
    figure_of_merit
        ``_rlnCtfFigureOfMerit`` (NaN when the file has none).
    max_resolution
        ``_rlnCtfMaxResolution`` in Å (NaN when the file has none).
    phase_shift
        ``_rlnPhaseShift`` in degrees, or None when not estimated.
    tilt_angle, tilt_axis
        Specimen tilt and tilt axis angle in degrees (``_anisoctfTiltAngle``,
        ``_anisoctfTiltAxisAngle``; conventions in :mod:`anisoctf.local.tilt`), or None.
    thickness
        Sample thickness in Å (``_rlnCtfIceThickness``, RELION 5's label), or None.
    surface
        Path of the micrograph's defocus-surface JSON (``_anisoctfDefocusSurface``), or "".
    """

    name: str
    optics_group: int
    ctf_image: str
    defocus_u: float
    defocus_v: float
    defocus_angle: float
    figure_of_merit: float
    max_resolution: float
    phase_shift: float | None = None
    tilt_angle: float | None = None
    tilt_axis: float | None = None
    thickness: float | None = None
    surface: str = ""

    @property
    def astigmatism(self) -> float:
        """``_rlnCtfAstigmatism`` = U − V in Å."""
        return self.defocus_u - self.defocus_v


# --------------------------------------------------------------------------------------------
# reading helpers


def _columns(names: Iterable[str]) -> str:
    """Format column names the way they appear in a STAR file."""
    return ", ".join(f"_{n}" for n in names)


def read_star_blocks(
    path: str | os.PathLike[str], *, names_as_strings: bool = True
) -> dict[str, pd.DataFrame]:
    """Every block of a STAR file as a table (simple key/value blocks become one-row tables).

    Unreadable, missing or empty files raise a one-line :class:`InputError`. With
    ``names_as_strings`` the file-name columns are kept as text (never parsed as numbers).
    """
    return _read_blocks(path, names_as_strings=names_as_strings)[1]


def _read_blocks(
    path: str | os.PathLike[str], *, names_as_strings: bool = True
) -> tuple[Path, dict[str, pd.DataFrame]]:
    """Parse a STAR file into its loop tables (simple key/value blocks become one-row tables)."""
    p = Path(path)
    if not p.exists():
        raise InputError("file not found; check the path", path=p)
    if p.is_dir():
        raise InputError("is a directory, not a STAR file; give the .star file itself", path=p)
    try:
        import starfile

        strings = _STRING_COLUMNS if names_as_strings else []
        raw = starfile.read(p, always_dict=True, parse_as_string=strings)
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(
            f"not a readable STAR file ({type(exc).__name__}: {exc}); check the file", path=p
        ) from exc
    blocks: dict[str, pd.DataFrame] = {}
    for key, block in raw.items():
        if isinstance(block, pd.DataFrame):
            blocks[str(key)] = block
        elif isinstance(block, dict) and block:
            blocks[str(key)] = pd.DataFrame([block])
    if not blocks:
        raise InputError("no data blocks found: empty or not a STAR file; check the path", path=p)
    return p, blocks


def _find_table(
    p: Path, blocks: dict[str, pd.DataFrame], required: Sequence[str], hint: str
) -> tuple[str, pd.DataFrame]:
    """The table holding ``required[0]``: 'micrographs' first, then unnamed, then any other."""
    order = ["micrographs", ""] + [k for k in blocks if k not in ("micrographs", "", "optics")]
    for key in order:
        df = blocks.get(key)
        if df is not None and required[0] in df.columns:
            missing = [c for c in required if c not in df.columns]
            if missing:
                block = f"data_{key}"
                raise InputError(f"{block} lacks {_columns(missing)}; {hint}", path=p)
            return key, df
    found = ", ".join(f"data_{k}" for k in blocks) or "none"
    raise InputError(
        f"no {_columns(required[:1])} column in any data block (found {found}); {hint}", path=p
    )


def _float_column(p: Path, df: pd.DataFrame, column: str, block: str) -> np.ndarray:
    """A numeric column as float64, with a clear error for text or missing values."""
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0]) + 1
        raise InputError(
            f"data_{block} row {row}: _{column} is missing or not a number "
            f"({df[column].iloc[bad[0]]!r}); the file is truncated or malformed",
            path=p,
        )
    return values


def _int_column(p: Path, df: pd.DataFrame, column: str, block: str) -> np.ndarray:
    """An integer column (e.g. optics group numbers)."""
    values = _float_column(p, df, column, block)
    if np.any(values != np.round(values)):
        raise InputError(f"data_{block}: _{column} must hold whole numbers; fix the file", path=p)
    return values.astype(np.int64)


def _string_column(p: Path, df: pd.DataFrame, column: str, block: str) -> list[str]:
    """A string column, refusing missing values."""
    out: list[str] = []
    for i, v in enumerate(df[column].tolist()):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or str(v) == "":
            raise InputError(
                f"data_{block} row {i + 1}: _{column} is empty; the file is truncated or malformed",
                path=p,
            )
        out.append(str(v))
    return out


def _make_optics(
    p: Path, group: int, pixel: float, kv: float, cs: float, ac: float, mag: tuple | None
) -> Optics:
    """Build an Optics, turning its ValueError into a one-line InputError."""
    pixel, kv, cs, ac = float(pixel), float(kv), float(cs), float(ac)
    if mag is not None:
        mag = tuple(tuple(float(v) for v in row) for row in mag)
    try:
        if mag is None:
            return Optics(pixel_size=pixel, voltage_kv=kv, cs_mm=cs, amplitude_contrast=ac)
        return Optics(
            pixel_size=pixel, voltage_kv=kv, cs_mm=cs, amplitude_contrast=ac, mag_matrix=mag
        )
    except ValueError as exc:
        raise InputError(f"optics group {group}: {exc}; fix the optics values", path=p) from exc


def _optics_table(
    p: Path, df: pd.DataFrame, kind: Literal["micrographs", "particles"] = "micrographs"
) -> dict[int, Optics]:
    """Optics groups from a RELION 3.1+ ``data_optics`` table."""
    pixel_col = next((c for c in _PIXEL_COLUMNS[kind] if c in df.columns), None)
    missing = [c for c in ("rlnOpticsGroup", *_BASE_OPTICS_COLUMNS) if c not in df.columns]
    if pixel_col is None:
        missing.append(_PIXEL_COLUMNS[kind][0])
    if missing:
        raise InputError(f"data_optics lacks {_columns(missing)}; {_OPTICS_FIX}", path=p)
    assert pixel_col is not None
    mag_present = [c for c in _MAG_COLUMNS if c in df.columns]
    if mag_present and len(mag_present) != 4:
        absent = [c for c in _MAG_COLUMNS if c not in df.columns]
        raise InputError(
            f"data_optics has only some magnification-matrix columns (lacks {_columns(absent)}); "
            "add all four or remove them",
            path=p,
        )
    groups = _int_column(p, df, "rlnOpticsGroup", "optics")
    pixel = _float_column(p, df, pixel_col, "optics")
    kv, cs, ac = (_float_column(p, df, c, "optics") for c in _BASE_OPTICS_COLUMNS)
    mags = [_float_column(p, df, c, "optics") for c in mag_present]
    optics: dict[int, Optics] = {}
    for i, g in enumerate(groups.tolist()):
        if g in optics:
            raise InputError(f"data_optics lists optics group {g} twice; fix the file", path=p)
        mag = ((mags[0][i], mags[1][i]), (mags[2][i], mags[3][i])) if mags else None
        optics[g] = _make_optics(p, g, pixel[i], kv[i], cs[i], ac[i], mag)
    return optics


def _per_row_optics(p: Path, df: pd.DataFrame, block: str) -> tuple[np.ndarray, dict[int, Optics]]:
    """Optics of a RELION 3.0 table (per-row columns). Returns group per row and the groups."""
    n = len(df)
    pixel_col = next((c for c in _PIXEL_COLUMNS["micrographs"] if c in df.columns), None)
    has_detector = "rlnDetectorPixelSize" in df.columns or "rlnMagnification" in df.columns
    present = [c for c in _BASE_OPTICS_COLUMNS if c in df.columns]
    if not present and pixel_col is None and not has_detector:
        groups = np.ones(n, dtype=np.int64)
        if "rlnOpticsGroup" in df.columns:
            groups = _int_column(p, df, "rlnOpticsGroup", block)
        return groups, {}
    missing = [c for c in _BASE_OPTICS_COLUMNS if c not in df.columns]
    if pixel_col is None:
        if not has_detector:
            missing.append("rlnMicrographPixelSize")
        else:
            missing += [c for c in ("rlnDetectorPixelSize", "rlnMagnification") if c not in df]
    if missing:
        raise InputError(
            f"data_{block} has per-micrograph optics but lacks {_columns(missing)}; {_OPTICS_FIX}",
            path=p,
        )
    if pixel_col is not None:
        pixel = _float_column(p, df, pixel_col, block)
    else:  # RELION 3.0: detector pixel in µm over magnification
        det = _float_column(p, df, "rlnDetectorPixelSize", block)
        mag = _float_column(p, df, "rlnMagnification", block)
        pixel = det * 1e4 / mag
    kv, cs, ac = (_float_column(p, df, c, block) for c in _BASE_OPTICS_COLUMNS)
    explicit = (
        _int_column(p, df, "rlnOpticsGroup", block) if "rlnOpticsGroup" in df.columns else None
    )
    key_to_group: dict[tuple[float, float, float, float], int] = {}
    group_key: dict[int, tuple[float, float, float, float]] = {}
    optics: dict[int, Optics] = {}
    groups = np.empty(n, dtype=np.int64)
    for i in range(n):
        key = (float(pixel[i]), float(kv[i]), float(cs[i]), float(ac[i]))
        if explicit is not None:
            g = int(explicit[i])
            if group_key.setdefault(g, key) != key:
                raise InputError(
                    f"data_{block}: rows of optics group {g} disagree on pixel size/kV/Cs/"
                    "amplitude contrast; split them into separate optics groups",
                    path=p,
                )
        else:
            g = key_to_group.setdefault(key, len(key_to_group) + 1)
        if g not in optics:
            optics[g] = _make_optics(p, g, *key, None)
        groups[i] = g
    return groups, optics


def _groups_and_optics(
    p: Path, blocks: dict[str, pd.DataFrame], key: str, df: pd.DataFrame
) -> tuple[np.ndarray, dict[int, Optics]]:
    """Optics group of every row of ``df`` and the optics of every group."""
    if "optics" not in blocks:
        return _per_row_optics(p, df, key)
    optics = _optics_table(p, blocks["optics"])
    if "rlnOpticsGroup" in df.columns:
        groups = _int_column(p, df, "rlnOpticsGroup", key)
    elif len(optics) == 1:
        groups = np.full(len(df), next(iter(optics)), dtype=np.int64)
    else:
        raise InputError(
            f"data_{key} lacks _rlnOpticsGroup but data_optics has {len(optics)} groups; "
            "add the column",
            path=p,
        )
    unknown = sorted(set(groups.tolist()) - set(optics))
    if unknown:
        raise InputError(
            f"data_{key} refers to optics group(s) {unknown} missing from data_optics; "
            "fix the STAR file",
            path=p,
        )
    return groups, optics


def _strip_type_tag(name: str) -> str:
    """Drop RELION's trailing file-type tag (``x.ctf:mrc`` -> ``x.ctf``)."""
    head, sep, tail = name.rpartition(":")
    return head if sep and tail in ("mrc", "mrcs", "tif", "tiff", "eer", "spi") else name


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
    p, blocks = _read_blocks(path)
    key, df = _find_table(
        p,
        blocks,
        ["rlnMicrographName"],
        "give a micrographs STAR file (e.g. corrected_micrographs)",
    )
    names = _string_column(p, df, "rlnMicrographName", key)
    groups, optics = _groups_and_optics(p, blocks, key, df)
    root = Path.cwd() if project_dir is None else Path(project_dir)
    root = root.absolute()
    entries: list[MicrographEntry] = []
    seen: set[str] = set()
    for name, group in zip(names, groups.tolist(), strict=True):
        if name in seen:
            continue
        seen.add(name)
        entries.append(MicrographEntry(name, int(group), root / _strip_type_tag(name)))
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
    p, blocks = _read_blocks(path)
    required = ["rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    key, df = _find_table(
        p, blocks, required, "give the output of a CTF job (e.g. micrographs_ctf.star)"
    )
    if "rlnDefocusU" not in df.columns:  # pragma: no cover - _find_table guarantees it
        raise InputError("no defocus columns", path=p)
    names = _string_column(p, df, "rlnMicrographName", key)
    du, dv, angle = (_float_column(p, df, c, key) for c in required[1:])
    n = len(df)
    nan = np.full(n, np.nan)
    fom = pd.to_numeric(df.get("rlnCtfFigureOfMerit", nan), errors="coerce")
    maxres = pd.to_numeric(df.get("rlnCtfMaxResolution", nan), errors="coerce")
    fom = np.asarray(fom, dtype=np.float64)
    maxres = np.asarray(maxres, dtype=np.float64)
    phase = _float_column(p, df, "rlnPhaseShift", key) if "rlnPhaseShift" in df.columns else None
    ctf_images = (
        [str(v) for v in df["rlnCtfImage"].fillna("").tolist()]
        if "rlnCtfImage" in df.columns
        else [""] * n
    )
    groups, optics = _groups_and_optics(p, blocks, key, df)

    def optional(col: str) -> NDArray | None:
        if col not in df.columns:
            return None
        return np.asarray(pd.to_numeric(df[col], errors="coerce"), dtype=np.float64)

    def maybe(a: NDArray | None, i: int) -> float | None:
        return None if a is None or not math.isfinite(a[i]) else float(a[i])

    tilt, axis = optional(_TILT_COLUMNS[0]), optional(_TILT_COLUMNS[1])
    thick = optional(_THICKNESS_COLUMN)
    surfaces = (
        [("" if str(v) in ("None", "nan") else str(v)) for v in df[_SURFACE_COLUMN].fillna("")]
        if _SURFACE_COLUMN in df.columns
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


def read_optics_star(
    path: str | os.PathLike[str], kind: Literal["micrographs", "particles"] = "micrographs"
) -> dict[int, Optics]:
    """Read the ``data_optics`` table of any RELION 3.1+ STAR file, magnification matrix included.

    Parameters
    ----------
    path
        A micrographs or particles STAR file with a ``data_optics`` block.
    kind
        Which pixel size to use when both are present: ``"micrographs"`` prefers
        ``_rlnMicrographPixelSize``, ``"particles"`` prefers ``_rlnImagePixelSize`` (the
        pixel size of the extracted particle images).

    Returns
    -------
    dict[int, Optics]
        Optics by group number.

    Raises
    ------
    InputError
        No ``data_optics`` block or incomplete columns.
    """
    p, blocks = _read_blocks(path)
    if "optics" not in blocks:
        raise InputError(f"no data_optics block (RELION 3.0 file?); {_OPTICS_FIX}", path=p)
    return _optics_table(p, blocks["optics"], kind)


def read_optics_group_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """``_rlnOpticsGroupName`` by group number (empty when the file has no such column).

    Parameters
    ----------
    path
        A RELION 3.1+ STAR file.

    Returns
    -------
    dict[int, str]
        Names to pass back to :func:`write_micrographs_ctf_star`.
    """
    p, blocks = _read_blocks(path)
    df = blocks.get("optics")
    if df is None or "rlnOpticsGroupName" not in df.columns or "rlnOpticsGroup" not in df.columns:
        return {}
    groups = _int_column(p, df, "rlnOpticsGroup", "optics")
    names = _string_column(p, df, "rlnOpticsGroupName", "optics")
    return dict(zip(groups.tolist(), names, strict=True))


# --------------------------------------------------------------------------------------------
# writer


def _fmt_float(x: float) -> str:
    """Shortest text that reads back as exactly the same float."""
    return repr(float(x))


def _token(value: str, what: str) -> str:
    """A STAR string value; RELION cannot read empty or whitespace-containing tokens."""
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot be written to a STAR file (empty or has spaces)")
    return value


def _loop(block: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of one ``data_<block>`` loop table, columns right-aligned as RELION does."""
    lines = ["", _STAR_VERSION, "", f"data_{block}", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(columns, start=1)]
    widths = [max(len(r[j]) for r in rows) for j in range(len(columns))] if rows else []
    for r in rows:
        cells = [
            v.ljust(w) if j == 0 else v.rjust(w)
            for j, (v, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append(" ".join(cells).rstrip())
    lines.append("")
    return lines


#: anisoctf's own labels for the specimen tilt (RELION keeps unknown labels as they are)
_TILT_COLUMNS = ("anisoctfTiltAngle", "anisoctfTiltAxisAngle")
#: RELION 5's label for the sample thickness estimated by CTFFIND 5
_THICKNESS_COLUMN = "rlnCtfIceThickness"
#: the JSON file of a micrograph's defocus surface (see docs/local.md)
_SURFACE_COLUMN = "anisoctfDefocusSurface"


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def write_micrographs_ctf_star(
    path: str | os.PathLike[str],
    rows: Sequence[MicrographCTFRow],
    optics: dict[int, Optics],
    optics_names: dict[int, str] | None = None,
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
        "rlnOpticsGroupName",
        "rlnOpticsGroup",
        "rlnMicrographOriginalPixelSize",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnMicrographPixelSize",
    ]
    if with_mag:
        o_cols += list(_MAG_COLUMNS)
    o_rows: list[list[str]] = []
    for g in groups:
        o = optics[g]
        row = [
            _token(names.get(g, f"opticsGroup{g}"), "optics group name"),
            str(int(g)),
            _fmt_float(o.pixel_size),
            _fmt_float(o.voltage_kv),
            _fmt_float(o.cs_mm),
            _fmt_float(o.amplitude_contrast),
            _fmt_float(o.pixel_size),
        ]
        if with_mag:
            row += [_fmt_float(v) for r in o.mag_matrix for v in r]
        o_rows.append(row)

    with_image = any(r.ctf_image for r in rows)
    with_phase = any(r.phase_shift is not None for r in rows)
    m_cols = ["rlnMicrographName", "rlnOpticsGroup"]
    m_cols += ["rlnCtfImage"] if with_image else []
    m_cols += [
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnCtfAstigmatism",
        "rlnDefocusAngle",
        "rlnCtfFigureOfMerit",
        "rlnCtfMaxResolution",
    ]
    m_cols += ["rlnPhaseShift"] if with_phase else []
    with_tilt = any(r.tilt_angle is not None for r in rows)
    with_thick = any(r.thickness is not None for r in rows)
    with_surface = any(r.surface for r in rows)
    m_cols += list(_TILT_COLUMNS) if with_tilt else []
    m_cols += [_THICKNESS_COLUMN] if with_thick else []
    m_cols += [_SURFACE_COLUMN] if with_surface else []
    m_rows: list[list[str]] = []
    for r in rows:
        checks = (
            ("defocus U", r.defocus_u),
            ("defocus V", r.defocus_v),
            ("angle", r.defocus_angle),
        )
        for label, v in checks:
            if not math.isfinite(v):
                raise ValueError(f"{r.name}: {label} is {v}; only finite values can be written")
        line = [_token(r.name, "micrograph name"), str(int(r.optics_group))]
        if with_image:
            line.append(_token(r.ctf_image, f"{r.name}: CTF image"))
        line += [
            _fmt_float(r.defocus_u),
            _fmt_float(r.defocus_v),
            _fmt_float(r.astigmatism),
            _fmt_float(r.defocus_angle),
            _fmt_float(r.figure_of_merit),
            _fmt_float(r.max_resolution),
        ]
        if with_phase:
            line.append(_fmt_float(0.0 if r.phase_shift is None else r.phase_shift))
        if with_tilt:
            line += [_fmt_float(_nan_if_none(r.tilt_angle)), _fmt_float(_nan_if_none(r.tilt_axis))]
        if with_thick:
            line.append(_fmt_float(_nan_if_none(r.thickness)))
        if with_surface:
            line.append(_token(r.surface, f"{r.name}: surface file") if r.surface else "None")
        m_rows.append(line)

    lines = _loop("optics", o_cols, o_rows) + _loop("micrographs", m_cols, m_rows)
    text = "\n".join(lines) + "\n"
    with atomic_write(path, "w") as fh:
        fh.write(text)
