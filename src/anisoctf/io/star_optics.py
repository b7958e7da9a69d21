"""RELION optics: ``data_optics`` tables (3.1+) and per-row optics (3.0), through :class:`MagMat`.

The one reader of RELION optics. A ``data_optics`` row becomes an
:class:`~anisoctf.optics.ctf.Optics` whose magnification matrix was built and validated as a
:class:`~anisoctf.optics.magmat.MagMat` from ``_rlnMagMat00..11`` (absent = identity, as in
RELION's ``relion_star_handler``). RELION 3.0 tables carry the optics on every row: rows with
the same optics form one group, numbered from 1 in order of appearance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.star_tables import (
    column_list,
    float_column,
    int_column,
    numbers,
    read_star_file,
    string_column,
)
from anisoctf.optics.aberrations import Aberrations
from anisoctf.optics.ctf import Optics
from anisoctf.optics.magmat import MagMat, from_relion

__all__ = [
    "OPTICS_FIX",
    "PIXEL_COLUMNS",
    "aberration_cells",
    "aberrations_from_table",
    "format_zernike_vector",
    "parse_zernike_vector",
    "read_optics_aberrations",
    "set_aberration_columns",
    "from_relion_row",
    "from_relion_table",
    "groups_and_optics",
    "optics_from_table",
    "optics_row_groups",
    "per_row_optics",
    "read_optics_group_names",
    "read_optics_star",
]

OPTICS_FIX = "add the column(s) or pass --apix/--kv/--cs/--ac"
#: pixel-size columns in order of preference, for micrographs and for particle images
PIXEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "micrographs": (
        L.MICROGRAPH_PIXEL_SIZE,
        L.IMAGE_PIXEL_SIZE,
        L.MICROGRAPH_ORIGINAL_PIXEL_SIZE,
    ),
    "particles": (L.IMAGE_PIXEL_SIZE, L.MICROGRAPH_PIXEL_SIZE, L.MICROGRAPH_ORIGINAL_PIXEL_SIZE),
}


# ============================================================================ the matrix
def from_relion_row(row: Mapping[str, Any]) -> MagMat:
    """``M`` of one optics-table row (a dict or a ``pandas.Series``).

    Labels may be spelled with or without the leading underscore (``starfile`` drops it). A
    row with none of the four labels has no anisomag and gives the identity, which is also what
    RELION assumes for such a group (``relion_star_handler`` fills in 1, 0, 0, 1). A row with only
    some of them is an error.
    """
    values: list[float | None] = []
    for label in L.MAGMAT:
        v = row.get(label, row.get("_" + label))
        values.append(None if v is None else float(v))
    if all(v is None for v in values):
        return MagMat.identity()
    if any(v is None for v in values):
        missing = [lab for lab, v in zip(L.MAGMAT, values, strict=True) if v is None]
        raise ValueError(f"optics row has only some magnification-matrix labels; missing {missing}")
    return from_relion(*values)  # type: ignore[arg-type]


def from_relion_table(optics: Any) -> dict[int, MagMat]:
    """``{optics group number: M}`` for a RELION optics table (``pandas.DataFrame``).

    Parameters
    ----------
    optics
        The ``data_optics`` block, e.g. ``starfile.read(path)["optics"]``. Groups are keyed by
        ``rlnOpticsGroup`` (1, 2, … by row when the column is absent).
    """
    out: dict[int, MagMat] = {}
    cols = set(optics.columns)
    group_col = next((c for c in (L.OPTICS_GROUP, "_" + L.OPTICS_GROUP) if c in cols), None)
    for n, (_, row) in enumerate(optics.iterrows(), start=1):
        key = int(row[group_col]) if group_col is not None else n
        out[key] = from_relion_row(row)
    return out


def optics_row_groups(optics: pd.DataFrame) -> NDArray[np.int64]:
    """Group number of every ``data_optics`` row (``_rlnOpticsGroup``, else 1, 2, … by row);
    NaN for a cell that is not a number (the callers check)."""
    if L.OPTICS_GROUP not in optics.columns:
        return np.arange(1, len(optics) + 1, dtype=np.int64)
    return numbers(optics[L.OPTICS_GROUP])  # type: ignore[return-value]


# ============================================================================ optics
def _make_optics(
    p: Path, group: int, pixel: float, base: tuple[float, float, float], mag: MagMat | None
) -> Optics:
    """Build an Optics, turning its ValueError into a one-line InputError."""
    kv, cs, ac = (float(v) for v in base)
    try:
        if mag is None:
            return Optics(pixel_size=float(pixel), voltage_kv=kv, cs_mm=cs, amplitude_contrast=ac)
        return Optics(
            pixel_size=float(pixel),
            voltage_kv=kv,
            cs_mm=cs,
            amplitude_contrast=ac,
            mag_matrix=mag.matrix,
        )
    except ValueError as exc:
        raise InputError(f"optics group {group}: {exc}; fix the optics values", path=p) from exc


def _magmat(p: Path, group: int, values: list[float]) -> MagMat:
    """The group's ``_rlnMagMat`` as a validated :class:`MagMat`."""
    try:
        return from_relion(*values)
    except ValueError as exc:
        raise InputError(f"optics group {group}: {exc}; fix the optics values", path=p) from exc


def optics_from_table(
    p: Path, df: pd.DataFrame, kind: Literal["micrographs", "particles"] = "micrographs"
) -> dict[int, Optics]:
    """Optics groups from a RELION 3.1+ ``data_optics`` table (the matrix through MagMat).

    Parameters
    ----------
    p
        The STAR file (for messages).
    df
        Its ``data_optics`` table.
    kind
        Which pixel size to prefer (:data:`PIXEL_COLUMNS`).
    """
    pixel_col = next((c for c in PIXEL_COLUMNS[kind] if c in df.columns), None)
    missing = [c for c in (L.OPTICS_GROUP, *L.BASE_OPTICS) if c not in df.columns]
    if pixel_col is None:
        missing.append(PIXEL_COLUMNS[kind][0])
    if missing:
        raise InputError(f"data_optics lacks {column_list(missing)}; {OPTICS_FIX}", path=p)
    assert pixel_col is not None
    mag_present = [c for c in L.MAGMAT if c in df.columns]
    if mag_present and len(mag_present) != 4:
        absent = [c for c in L.MAGMAT if c not in df.columns]
        raise InputError(
            "data_optics has only some magnification-matrix columns (lacks "
            f"{column_list(absent)}); add all four or remove them",
            path=p,
        )
    groups = int_column(p, df, L.OPTICS_GROUP, "optics")
    pixel = float_column(p, df, pixel_col, "optics")
    kv, cs, ac = (float_column(p, df, c, "optics") for c in L.BASE_OPTICS)
    mags = [float_column(p, df, c, "optics") for c in mag_present]
    optics: dict[int, Optics] = {}
    for i, g in enumerate(groups.tolist()):
        if g in optics:
            raise InputError(f"data_optics lists optics group {g} twice; fix the file", path=p)
        mag = _magmat(p, g, [float(m[i]) for m in mags]) if mags else None
        optics[g] = _make_optics(p, g, pixel[i], (kv[i], cs[i], ac[i]), mag)
    return optics


def per_row_optics(p: Path, df: pd.DataFrame, block: str) -> tuple[np.ndarray, dict[int, Optics]]:
    """Optics of a RELION 3.0 table (per-row columns). Returns group per row and the groups."""
    n = len(df)
    pixel_col = next((c for c in PIXEL_COLUMNS["micrographs"] if c in df.columns), None)
    has_detector = L.DETECTOR_PIXEL_SIZE in df.columns or L.MAGNIFICATION in df.columns
    present = [c for c in L.BASE_OPTICS if c in df.columns]
    if not present and pixel_col is None and not has_detector:
        groups = np.ones(n, dtype=np.int64)
        if L.OPTICS_GROUP in df.columns:
            groups = int_column(p, df, L.OPTICS_GROUP, block)
        return groups, {}
    missing = [c for c in L.BASE_OPTICS if c not in df.columns]
    if pixel_col is None:
        if not has_detector:
            missing.append(L.MICROGRAPH_PIXEL_SIZE)
        else:
            missing += [c for c in (L.DETECTOR_PIXEL_SIZE, L.MAGNIFICATION) if c not in df]
    if missing:
        raise InputError(
            f"data_{block} has per-micrograph optics but lacks {column_list(missing)}; "
            f"{OPTICS_FIX}",
            path=p,
        )
    if pixel_col is not None:
        pixel = float_column(p, df, pixel_col, block)
    else:  # RELION 3.0: detector pixel in µm over magnification
        det = float_column(p, df, L.DETECTOR_PIXEL_SIZE, block)
        mag = float_column(p, df, L.MAGNIFICATION, block)
        pixel = det * 1e4 / mag
    kv, cs, ac = (float_column(p, df, c, block) for c in L.BASE_OPTICS)
    explicit = int_column(p, df, L.OPTICS_GROUP, block) if L.OPTICS_GROUP in df.columns else None
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
            optics[g] = _make_optics(p, g, key[0], key[1:], None)
        groups[i] = g
    return groups, optics


def groups_and_optics(
    p: Path, blocks: Mapping[str, pd.DataFrame], key: str, df: pd.DataFrame
) -> tuple[np.ndarray, dict[int, Optics]]:
    """Optics group of every row of ``df`` and the optics of every group."""
    if "optics" not in blocks:
        return per_row_optics(p, df, key)
    optics = optics_from_table(p, blocks["optics"])
    if L.OPTICS_GROUP in df.columns:
        groups = int_column(p, df, L.OPTICS_GROUP, key)
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


# ============================================================================ public readers
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
    p, blocks = read_star_file(path)
    if "optics" not in blocks:
        raise InputError(f"no data_optics block (RELION 3.0 file?); {OPTICS_FIX}", path=p)
    return optics_from_table(p, blocks["optics"], kind)


def read_optics_group_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """``_rlnOpticsGroupName`` by group number (empty when the file has no such column).

    Parameters
    ----------
    path
        A RELION 3.1+ STAR file.

    Returns
    -------
    dict[int, str]
        Names to pass back to :func:`~anisoctf.io.star.write_micrographs_ctf_star`.
    """
    p, blocks = read_star_file(path)
    df = blocks.get("optics")
    if df is None or L.OPTICS_GROUP_NAME not in df.columns or L.OPTICS_GROUP not in df.columns:
        return {}
    groups = int_column(p, df, L.OPTICS_GROUP, "optics")
    names = string_column(p, df, L.OPTICS_GROUP_NAME, "optics")
    return dict(zip(groups.tolist(), names, strict=True))


# ============================================================================ aberrations
def parse_zernike_vector(value: object) -> tuple[float, ...]:
    """``_rlnOddZernike``/``_rlnEvenZernike`` text (RELION writes ``"[a,b,c]"``) as floats.

    A bare number (a one-entry vector a table reader parsed) and ``"[]"`` are accepted; anything
    else raises ``ValueError``.
    """
    if isinstance(value, int | float | np.integer | np.floating):
        return (float(value),)
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text.strip():
        return ()
    try:
        out = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"not a Zernike vector like [a,b,c]: {value!r}") from None
    if not all(np.isfinite(out)):
        raise ValueError(f"Zernike vector has a non-finite entry: {value!r}")
    return out


def format_zernike_vector(values: tuple[float, ...] | list[float]) -> str:
    """RELION's text of a Zernike vector: ``"[a,b,c]"``, 12 significant digits, no spaces."""
    return "[" + ",".join(f"{float(v):.12g}" for v in values) + "]"


def aberrations_from_table(p: Path, df: pd.DataFrame) -> dict[int, Aberrations]:
    """``{group: Aberrations}`` of a ``data_optics`` table (groups without any of the columns
    get an empty record; absent columns are zero, as RELION's ``ObservationModel`` reads them).

    ``_rlnBeamTiltX`` and ``_rlnBeamTiltY`` must come together.
    """
    tilt_cols = [c for c in (L.BEAM_TILT_X, L.BEAM_TILT_Y) if c in df.columns]
    if len(tilt_cols) == 1:
        other = L.BEAM_TILT_Y if tilt_cols[0] == L.BEAM_TILT_X else L.BEAM_TILT_X
        raise InputError(
            f"data_optics has _{tilt_cols[0]} but not _{other}; add both or remove it", path=p
        )
    groups = optics_row_groups(df)
    tilt = [float_column(p, df, c, "optics") for c in tilt_cols]
    vectors: dict[str, list[tuple[float, ...]]] = {}
    for col in (L.ODD_ZERNIKE, L.EVEN_ZERNIKE):
        if col not in df.columns:
            continue
        try:
            vectors[col] = [parse_zernike_vector(v) for v in df[col].tolist()]
        except ValueError as exc:
            raise InputError(f"data_optics _{col}: {exc}; fix the file", path=p) from exc
    out: dict[int, Aberrations] = {}
    for i, g in enumerate(groups.tolist()):
        out[int(g)] = Aberrations(
            beam_tilt_mrad=(float(tilt[0][i]), float(tilt[1][i])) if tilt else (0.0, 0.0),
            odd=vectors[L.ODD_ZERNIKE][i] if L.ODD_ZERNIKE in vectors else (),
            even=vectors[L.EVEN_ZERNIKE][i] if L.EVEN_ZERNIKE in vectors else (),
        )
    return out


def read_optics_aberrations(path: str | os.PathLike[str]) -> dict[int, Aberrations]:
    """Beam tilt and odd/even Zernike coefficients of every optics group of a RELION 3.1+ STAR.

    Raises
    ------
    InputError
        No ``data_optics`` block or unreadable aberration columns.
    """
    p, blocks = read_star_file(path)
    if "optics" not in blocks:
        raise InputError("no data_optics block (RELION 3.0 file?); aberrations need one", path=p)
    return aberrations_from_table(p, blocks["optics"])


def aberration_cells(aberrations: Aberrations) -> dict[str, object]:
    """The four ``data_optics`` cells of one group, as RELION writes them (vectors as text).

    An empty vector is written as zeros of RELION's default length (6 odd: n ≤ 3; 9 even:
    n ≤ 4), never as ``"[]"``.
    """
    tx, ty = aberrations.beam_tilt_mrad
    return {
        L.BEAM_TILT_X: float(tx),
        L.BEAM_TILT_Y: float(ty),
        L.ODD_ZERNIKE: format_zernike_vector(list(aberrations.odd) or [0.0] * 6),
        L.EVEN_ZERNIKE: format_zernike_vector(list(aberrations.even) or [0.0] * 9),
    }


def set_aberration_columns(
    optics: pd.DataFrame, aberrations: Mapping[int, Aberrations]
) -> pd.DataFrame:
    """A copy of a ``data_optics`` table with the groups' aberration columns set.

    Groups not in ``aberrations`` keep the values they have (zero tilt and ``"[]"`` where the
    columns are new). Write the table with :func:`~anisoctf.io.star_tables.write_star_tables`.
    """
    out = optics.copy()
    groups = optics_row_groups(out).tolist()
    rows = [aberration_cells(aberrations.get(int(g), Aberrations())) for g in groups]
    for col in L.ABERRATION_COLUMNS:
        new = [r[col] for r in rows]
        if col in out.columns:
            new = [
                r[col] if int(g) in aberrations else old
                for g, r, old in zip(groups, rows, out[col].tolist(), strict=True)
            ]
        out[col] = new
    return out
