"""RELION tables ↔ defocus records: the STAR side of ``aniso apply`` (and of its inverse).

Tables are ``pandas.DataFrame`` objects as :func:`~anisoctf.io.star_tables.read_star_blocks`
returns them (labels without the leading underscore). :func:`defocus_record` turns the table
with ``_rlnDefocusU/V/Angle`` into a :class:`~anisoctf.records.defocus.DefocusTable`;
:func:`with_defocus` and :func:`with_magmats` write new values back into copies, keeping every
other column, value and dtype as it was. Conventions are in :mod:`anisoctf.magnification.tables`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.star_optics import from_relion_row
from anisoctf.io.star_tables import column_list, find_block, find_table, numbers
from anisoctf.optics.magmat import MagMat
from anisoctf.records.defocus import DefocusTable

__all__ = [
    "check_defocus_columns",
    "defocus_record",
    "existing_relion_mags",
    "find_ctf_block",
    "optics_groups",
    "relion_row_groups",
    "with_defocus",
    "with_magmats",
]


def find_ctf_block(path: Path, blocks: Mapping[str, pd.DataFrame]) -> str:
    """Name of the block with the defocus columns: particles, micrographs, unnamed, any other."""
    prefer = ("particles", "micrographs", "")
    with_defocus = find_block(blocks, L.DEFOCUS_U, prefer)
    if len(with_defocus) > 1:
        raise InputError(
            f"{' and '.join(f'data_{k}' for k in with_defocus)} all carry _rlnDefocusU; give "
            "a file with one CTF table",
            path=path,
        )
    hint = "give a table with CTF values"
    if not with_defocus:
        hint += " (micrographs_ctf.star or a particles STAR file)"
    key, _ = find_table(path, blocks, L.DEFOCUS, hint, prefer=prefer)
    return key


def check_defocus_columns(table: pd.DataFrame) -> None:
    """The table must have ``_rlnDefocusU``, ``_rlnDefocusV`` and ``_rlnDefocusAngle``."""
    missing = [c for c in L.DEFOCUS if c not in table.columns]
    if missing:
        raise InputError(
            f"the table lacks {column_list(missing)}; give a table with CTF "
            "values (micrographs_ctf.star or a particles STAR file)"
        )


def optics_groups(optics: pd.DataFrame) -> NDArray[np.int64]:
    """Group number of every optics row (``rlnOpticsGroup``, else 1, 2, … by row)."""
    if L.OPTICS_GROUP not in optics.columns:
        return np.arange(1, len(optics) + 1, dtype=np.int64)
    values = numbers(optics[L.OPTICS_GROUP])
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise InputError("data_optics: _rlnOpticsGroup must hold whole numbers; fix the file")
    groups = values.astype(np.int64)
    if len(set(groups.tolist())) != len(groups):
        raise InputError("data_optics lists an optics group twice; fix the file")
    return groups


def relion_row_groups(optics: pd.DataFrame | None, table: pd.DataFrame) -> NDArray[np.int64]:
    """Optics group of every row of a RELION table.

    ``_rlnOpticsGroup`` when the table has it; otherwise the only group of a one-group optics
    table, or 1 for a RELION 3.0 table (``optics`` None).

    Raises
    ------
    InputError
        Non-integer group numbers, groups missing from ``data_optics``, or no group column
        while ``data_optics`` has several groups.
    """
    if L.OPTICS_GROUP in table.columns:
        values = numbers(table[L.OPTICS_GROUP])
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError("_rlnOpticsGroup must hold whole numbers in every row; fix the file")
        groups = values.astype(np.int64)
    elif optics is None:
        groups = np.ones(len(table), dtype=np.int64)
    else:
        known = optics_groups(optics)
        if len(known) != 1:
            raise InputError(
                f"the table lacks _rlnOpticsGroup but data_optics has {len(known)} groups; "
                "add the column"
            )
        groups = np.full(len(table), known[0], dtype=np.int64)
    if optics is not None:
        unknown = sorted(set(groups.tolist()) - set(optics_groups(optics).tolist()))
        if unknown:
            raise InputError(
                f"rows refer to optics group(s) {unknown} missing from data_optics; fix the file"
            )
    return groups


def existing_relion_mags(optics: pd.DataFrame | None) -> dict[int, MagMat]:
    """``{group: M}`` already stored in ``data_optics`` (identity where no matrix is stored)."""
    if optics is None:
        return {}
    out: dict[int, MagMat] = {}
    for g, (_, row) in zip(optics_groups(optics).tolist(), optics.iterrows(), strict=True):
        try:
            out[int(g)] = from_relion_row(row)
        except (ValueError, TypeError) as exc:
            raise InputError(f"data_optics, optics group {g}: {exc}; fix the file") from exc
    return out


def _float_values(table: pd.DataFrame, column: str, mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """A numeric column as float64; non-numbers in the ``mask`` rows are an InputError."""
    values = numbers(table[column])
    bad = np.flatnonzero(mask & ~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"row {i + 1}: _{column} is missing or not a number ({table[column].iloc[i]!r}); "
            "the table is truncated or malformed"
        )
    return values


def defocus_record(
    table: pd.DataFrame,
    row_groups: NDArray[np.int64],
    mask: NDArray[np.bool_],
    *,
    with_micrographs: bool = False,
) -> DefocusTable:
    """The defocus of a RELION table as a record; the ``mask`` rows must be numbers.

    With ``with_micrographs`` the ``_rlnMicrographName`` of every row is included (an
    InputError when the table has none: shared astigmatism needs it).
    """
    u, v, ang = (_float_values(table, c, mask) for c in L.DEFOCUS)
    names = None
    if with_micrographs:
        if L.MICROGRAPH_NAME not in table.columns:
            raise InputError(
                "shared astigmatism needs _rlnMicrographName to know which particles share a "
                "micrograph; the table has none (use per-particle astigmatism)"
            )
        names = table[L.MICROGRAPH_NAME].astype(str).to_numpy()
    return DefocusTable(u, v, ang, row_groups, names)


def _replace_values(series: pd.Series, mask: NDArray[np.bool_], values: ArrayLike) -> pd.Series:
    """``series`` with ``values`` at ``mask`` (float64 for numeric columns), index kept."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        out = series.to_numpy(dtype=np.float64, copy=True)
    else:
        out = series.to_numpy(dtype=object, copy=True)
    out[mask] = values
    return pd.Series(out, index=series.index, name=series.name)


def with_defocus(
    table: pd.DataFrame,
    mask: NDArray[np.bool_],
    values: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
) -> pd.DataFrame:
    """A copy of ``table`` with new ``(U, V, angle)`` in the ``mask`` rows (and
    ``_rlnCtfAstigmatism = U - V`` when the column exists)."""
    new = table.copy()
    if not mask.any():
        return new
    nu, nv, na = values
    for column, vals in zip(L.DEFOCUS, (nu, nv, na), strict=True):
        new[column] = _replace_values(table[column], mask, vals)
    if L.ASTIGMATISM in table.columns:
        new[L.ASTIGMATISM] = _replace_values(table[L.ASTIGMATISM], mask, nu - nv)
    return new


def with_magmats(
    optics: pd.DataFrame, mats_by_group: Mapping[int, MagMat], *, drop_if_identity: bool = False
) -> pd.DataFrame:
    """Optics table with ``_rlnMagMat`` of the given groups set (columns added if absent)."""
    new = optics.copy()
    present = [c for c in L.MAGMAT if c in new.columns]
    if present and len(present) != 4:
        absent = [c for c in L.MAGMAT if c not in new.columns]
        raise InputError(
            "data_optics has only some magnification-matrix columns (lacks "
            f"{column_list(absent)}); add all four or remove them"
        )
    groups = optics_groups(optics)
    existing = existing_relion_mags(optics)
    rows = np.isin(groups, np.array(sorted(mats_by_group), dtype=np.int64))
    final = {g: mats_by_group.get(g, existing.get(g, MagMat.identity())) for g in groups.tolist()}
    if drop_if_identity and all(m.is_identity for m in final.values()):
        return new.drop(columns=present)
    for k, label in enumerate(L.MAGMAT):
        i, j = divmod(k, 2)
        values = np.array([final[g].array[i, j] for g in groups.tolist()], dtype=np.float64)
        if label in new.columns:
            new[label] = _replace_values(new[label], rows, values[rows])
        else:
            new[label] = values
    return new
