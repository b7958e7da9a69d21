"""Apply a magnification matrix to whole CTF tables (RELION STAR tables, cryoSPARC ``.cs`` arrays).

A CTF fitted on the recorded image without knowledge of the anisotropic magnification is an
*observed*-frame CTF: ``D_obs``. Programs that know the matrix evaluate the CTF at the true
frequency ``k_true = M k_obs`` and therefore want the *true*-frame defocus
``D_true = M^-T D_obs M^-1`` together with ``M`` (:mod:`anisoctf.optics.frames`). The
functions here make that change on every row of a table at once and store ``M`` where each
program expects it; the ``undo_*`` functions are their exact inverses.

Conventions (sources in ``docs/anisomag.md``):

RELION (3.1 and later)
    ``_rlnMagMat00..11`` in ``data_optics`` (one matrix per optics group, absent = identity) is
    ``M`` itself. RELION evaluates the defocus form at ``M k`` (``CTF::getLowOrderGamma``), so
    the per-row ``_rlnDefocusU/V/Angle`` of a group that carries a matrix are **true-frame**
    values. That is why a group that already has a non-identity matrix is refused: its defocus
    values are already in the true frame, and applying a second matrix on top would need a
    composition rule (``M_new @ M_old`` with the defocus transformed by ``M_new`` only) that this
    module does not guess. Defocus is written with ``U >= V`` and the angle in [0, 180) degrees
    (the normalisation of :func:`~anisoctf.optics.frames.defocus_table_to_true`);
    ``_rlnCtfAstigmatism`` is recomputed as ``U - V`` when the column exists. Every other column
    and every row of another optics group is returned exactly as it was (same values, same
    dtype, same column order). New ``_rlnMagMat`` columns go at the end of the optics table,
    with the identity for groups that are not rewritten.

RELION 3.0 (one table, no ``data_optics``)
    The layout has nowhere to keep a matrix. :func:`apply_to_relion` then returns ``None`` for
    the optics table and rewrites the defocus only; the caller must tell the user that the matrix
    was not stored. Such a table is right only for images that have themselves been resampled
    into the true frame (e.g. ``mag_distortion_correct`` or MotionCor2 ``-Mag``), with the true
    pixel size ``p / sqrt(det M)``; to keep the matrix, convert the file to the 3.1 layout first
    (``relion_convert_star``) and apply to that.

cryoSPARC
    ``ctf/df1_A``, ``ctf/df2_A`` and ``ctf/df_angle_rad`` are RELION's DefocusU, DefocusV and
    DefocusAngle with the angle in radians, measured the same way (from +x towards +y). Sources:
    pyem's ``csparc2star`` maps df1 → DefocusU, df2 → DefocusV and the angle with a plain
    rad → deg conversion; cryoDRGN feeds the three numbers (angle converted to degrees) to the
    same CTF formula it uses for RELION tables; and the real file ``empiar_10076_7.cs``
    (imported into cryoSPARC from ``empiar_10076_7.star``) holds df1 = DefocusU,
    df2 = DefocusV and ``df_angle_rad = radians(5.28)``. cryoSPARC does not normalise the angle:
    the real CTFFIND4-type particles (``cryosparc_P12_J24_001_particles.cs``) carry CTFFIND's
    (-90°, 90°) angles as negative radians, the imported ones [0, 180°); df1 >= df2 in every row
    of all three real files. Rewritten rows get ``df1 >= df2`` and the angle in [0, π) (before
    rounding to float32). ``ctf/anisomag`` holds ``(M^-1 - I)`` row-major
    (:func:`~anisoctf.optics.magmat.to_cryosparc_anisomag`), one per row; all zeros means
    no matrix. By analogy with RELION (cryoSPARC is closed source) the defocus of a row with a
    non-zero anisomag is taken to be in the true frame, so such rows are refused. A dataset
    without the field gets it (zeros for rows not rewritten), placed after its last ``ctf/``
    field; every other field keeps its dtype and bytes.

Shared astigmatism (``shared_astigmatism=True``)
    RELION's default, and CTFFIND's output, is one astigmatism per micrograph. After the exact
    per-row transform, the astigmatism of every particle of a micrograph is replaced by the
    micrograph's median astigmatism, while each particle keeps its own transformed mean defocus
    ``(U + V)/2``. The median is taken component-wise on the Cartesian astigmatism
    ``(h cos 2θ, h sin 2θ)``, ``h = (U - V)/2``: the axis is an orientation modulo 180°, so
    (U − V, angle) pairs cannot be averaged directly, and the Cartesian form is the one in which
    the defocus matrix is linear. Micrographs are ``_rlnMicrographName`` within an optics group
    (RELION) or ``location/micrograph_uid`` (else ``location/micrograph_path``) (cryoSPARC).
    This step discards per-particle astigmatism differences, so it has no exact inverse.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.optics.frames import defocus_table_to_observed, defocus_table_to_true
from anisoctf.optics.magmat import (
    RELION_MAGMAT_LABELS,
    MagMat,
    from_relion_row,
    matrices_from_cryosparc_anisomag,
    to_cryosparc_anisomag,
)

__all__ = [
    "CRYOSPARC_ANISOMAG_FIELD",
    "CRYOSPARC_DEFOCUS_FIELDS",
    "CRYOSPARC_GROUP_FIELD",
    "CRYOSPARC_MICROGRAPH_FIELDS",
    "RELION_ASTIGMATISM_COLUMN",
    "RELION_DEFOCUS_COLUMNS",
    "apply_to_cryosparc",
    "apply_to_relion",
    "cryosparc_row_mask",
    "existing_relion_mags",
    "relion_row_groups",
    "resolve_relion_mags",
    "share_astigmatism",
    "undo_cryosparc",
    "undo_relion",
    "with_anisomag_field",
]

#: RELION defocus columns rewritten by :func:`apply_to_relion` (starfile's names, no underscore).
RELION_DEFOCUS_COLUMNS: tuple[str, str, str] = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
#: Recomputed as ``U - V`` when present.
RELION_ASTIGMATISM_COLUMN = "rlnCtfAstigmatism"
_RELION_GROUP = "rlnOpticsGroup"
_RELION_MICROGRAPH = "rlnMicrographName"

#: cryoSPARC defocus fields rewritten by :func:`apply_to_cryosparc`.
CRYOSPARC_DEFOCUS_FIELDS: tuple[str, str, str] = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad")
#: cryoSPARC's anisotropic magnification, ``(M^-1 - I)`` row-major, 4 float32 per row.
CRYOSPARC_ANISOMAG_FIELD = "ctf/anisomag"
#: cryoSPARC's exposure group (its counterpart of RELION's optics group).
CRYOSPARC_GROUP_FIELD = "ctf/exp_group_id"
#: Fields naming a particle's micrograph, in order of preference.
CRYOSPARC_MICROGRAPH_FIELDS: tuple[str, str] = (
    "location/micrograph_uid",
    "location/micrograph_path",
)

_Mags = Mapping[int, MagMat] | MagMat | ArrayLike
_Arrays3 = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


# ============================================================================ shared helpers
def _as_magmat(m: MagMat | ArrayLike) -> MagMat:
    if isinstance(m, MagMat):
        return m
    try:
        return MagMat(m)
    except ValueError as exc:
        raise InputError(f"invalid magnification matrix: {exc}") from exc


def share_astigmatism(
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    angle_deg: ArrayLike,
    keys: ArrayLike | Sequence[ArrayLike],
) -> _Arrays3:
    """One astigmatism per micrograph: the median of its rows, each keeping its mean defocus.

    Parameters
    ----------
    defocus_u, defocus_v, angle_deg
        Per-row defocus (Å) and U-axis angle (degrees), same length.
    keys
        The micrograph of every row: one array, or a sequence of arrays whose combination
        identifies a micrograph (e.g. optics group and micrograph name).

    Returns
    -------
    (u, v, angle)
        ``(U + V)/2`` of every row unchanged; ``(U - V)/2`` and the angle replaced by those of
        the component-wise median of the Cartesian astigmatism ``(h cos 2θ, h sin 2θ)`` over the
        rows of the same micrograph. ``U >= V``, angle in [0, 180), 0 for no astigmatism.
    """
    u = np.asarray(defocus_u, dtype=float)
    v = np.asarray(defocus_v, dtype=float)
    t = np.deg2rad(2.0 * np.asarray(angle_deg, dtype=float))
    z = 0.5 * (u + v)
    h = 0.5 * (u - v)
    frame: dict[str, Any] = {"a1": h * np.cos(t), "a2": h * np.sin(t)}
    key_arrays = (
        [keys] if isinstance(keys, np.ndarray) or not _is_sequence_of_arrays(keys) else keys
    )
    key_names = []
    for i, k in enumerate(key_arrays):
        name = f"key{i}"
        frame[name] = np.asarray(k)
        key_names.append(name)
    df = pd.DataFrame(frame)
    med = df.groupby(key_names, sort=False, dropna=False)[["a1", "a2"]].transform("median")
    m1 = med["a1"].to_numpy(dtype=float)
    m2 = med["a2"].to_numpy(dtype=float)
    hm = np.hypot(m1, m2)
    tiny = hm <= 1e-12 * np.maximum(np.abs(z), 1.0)
    hm = np.where(tiny, 0.0, hm)
    ang = np.where(tiny, 0.0, np.mod(0.5 * np.rad2deg(np.arctan2(m2, m1)), 180.0))
    ang = np.where(ang >= 180.0, 0.0, ang)
    return z + hm, z - hm, ang


def _is_sequence_of_arrays(keys: Any) -> bool:
    """True for ``[array, array]``-like keys, False for one flat key array/list."""
    if isinstance(keys, (list, tuple)) and keys:
        return all(np.ndim(k) == 1 for k in keys)
    return False


def _transform_rows(
    u: NDArray[np.float64],
    v: NDArray[np.float64],
    ang: NDArray[np.float64],
    mats: NDArray[np.float64],
    to: str,
) -> _Arrays3:
    if to == "true":
        return defocus_table_to_true(u, v, ang, mats)
    return defocus_table_to_observed(u, v, ang, mats)


def _replace_values(series: pd.Series, mask: NDArray[np.bool_], values: ArrayLike) -> pd.Series:
    """``series`` with ``values`` at ``mask`` (float64 for numeric columns), index kept."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        out = series.to_numpy(dtype=np.float64, copy=True)
    else:
        out = series.to_numpy(dtype=object, copy=True)
    out[mask] = values
    return pd.Series(out, index=series.index, name=series.name)


# ============================================================================ RELION
def _float_values(table: pd.DataFrame, column: str, mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """A numeric column as float64; non-numbers in the ``mask`` rows are an InputError."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(mask & ~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"row {i + 1}: _{column} is missing or not a number ({table[column].iloc[i]!r}); "
            "the table is truncated or malformed"
        )
    return values


def _check_relion_columns(table: pd.DataFrame) -> None:
    missing = [c for c in RELION_DEFOCUS_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            f"the table lacks {', '.join('_' + c for c in missing)}; give a table with CTF "
            "values (micrographs_ctf.star or a particles STAR file)"
        )


def _optics_groups(optics: pd.DataFrame) -> NDArray[np.int64]:
    """Group number of every optics row (``rlnOpticsGroup``, else 1, 2, … by row)."""
    if _RELION_GROUP not in optics.columns:
        return np.arange(1, len(optics) + 1, dtype=np.int64)
    values = pd.to_numeric(optics[_RELION_GROUP], errors="coerce").to_numpy(dtype=float)
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
    if _RELION_GROUP in table.columns:
        values = pd.to_numeric(table[_RELION_GROUP], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise InputError("_rlnOpticsGroup must hold whole numbers in every row; fix the file")
        groups = values.astype(np.int64)
    elif optics is None:
        groups = np.ones(len(table), dtype=np.int64)
    else:
        known = _optics_groups(optics)
        if len(known) != 1:
            raise InputError(
                f"the table lacks _rlnOpticsGroup but data_optics has {len(known)} groups; "
                "add the column"
            )
        groups = np.full(len(table), known[0], dtype=np.int64)
    if optics is not None:
        unknown = sorted(set(groups.tolist()) - set(_optics_groups(optics).tolist()))
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
    for g, (_, row) in zip(_optics_groups(optics).tolist(), optics.iterrows(), strict=True):
        try:
            out[int(g)] = from_relion_row(row)
        except (ValueError, TypeError) as exc:
            raise InputError(f"data_optics, optics group {g}: {exc}; fix the file") from exc
    return out


def resolve_relion_mags(
    optics: pd.DataFrame | None,
    table: pd.DataFrame,
    mags: _Mags,
    *,
    optics_groups: Collection[int] | None = None,
) -> dict[int, MagMat]:
    """The matrix to apply to each optics group that will be rewritten.

    Parameters
    ----------
    optics, table
        ``data_optics`` (None for RELION 3.0) and the table with the defocus columns.
    mags
        One matrix for every group, or ``{group: matrix}`` for some groups.
    optics_groups
        Restrict to these groups (default: every group of ``mags`` when it is a mapping,
        otherwise every group of ``data_optics`` and of the table).

    Raises
    ------
    InputError
        A requested group exists neither in ``data_optics`` nor in the table, or a matrix is
        invalid.
    """
    row_groups = relion_row_groups(optics, table)
    known = set(row_groups.tolist())
    if optics is not None:
        known |= set(_optics_groups(optics).tolist())
    if isinstance(mags, Mapping):
        per_group = {int(g): _as_magmat(m) for g, m in mags.items()}
    else:
        one = _as_magmat(mags)
        per_group = {g: one for g in sorted(known)}
    unknown = sorted(set(per_group) - known)
    if optics_groups is not None:
        wanted = {int(g) for g in optics_groups}
        unknown = sorted(set(unknown) | (wanted - known))
        without = sorted((wanted & known) - set(per_group))
        if without:
            raise InputError(f"no magnification matrix given for optics group(s) {without}")
        per_group = {g: m for g, m in per_group.items() if g in wanted}
    if unknown:
        raise InputError(
            f"optics group(s) {unknown} not in the table (it has group(s) {sorted(known)})"
        )
    return dict(sorted(per_group.items()))


def _refuse_relion_existing(optics: pd.DataFrame | None, groups: Collection[int]) -> None:
    existing = existing_relion_mags(optics)
    carrying = [g for g in sorted(groups) if g in existing and not existing[g].is_identity]
    if carrying:
        g = carrying[0]
        raise InputError(
            f"optics group(s) {carrying} already carry a magnification matrix (_rlnMagMat, "
            f"group {g}: {existing[g].describe()}); their defocus values are already in the "
            "true frame, so a second matrix is not applied on top"
        )


def _rewrite_relion_defocus(
    table: pd.DataFrame,
    row_groups: NDArray[np.int64],
    mats_by_group: Mapping[int, MagMat],
    to: str,
    shared_astigmatism: bool,
) -> tuple[pd.DataFrame, NDArray[np.bool_]]:
    mask = np.isin(row_groups, np.array(sorted(mats_by_group), dtype=np.int64))
    new = table.copy()
    if not mask.any():
        return new, mask
    u, v, ang = (_float_values(table, c, mask) for c in RELION_DEFOCUS_COLUMNS)
    order = np.array(sorted(mats_by_group), dtype=np.int64)
    stack = np.stack([mats_by_group[int(g)].array for g in order])
    mats = stack[np.searchsorted(order, row_groups[mask])]
    nu, nv, na = _transform_rows(u[mask], v[mask], ang[mask], mats, to)
    if shared_astigmatism:
        if _RELION_MICROGRAPH not in table.columns:
            raise InputError(
                "shared astigmatism needs _rlnMicrographName to know which particles share a "
                "micrograph; the table has none (use per-particle astigmatism)"
            )
        names = table[_RELION_MICROGRAPH].astype(str).to_numpy()[mask]
        nu, nv, na = share_astigmatism(nu, nv, na, [row_groups[mask], names])
    for column, values in zip(RELION_DEFOCUS_COLUMNS, (nu, nv, na), strict=True):
        new[column] = _replace_values(table[column], mask, values)
    if RELION_ASTIGMATISM_COLUMN in table.columns:
        new[RELION_ASTIGMATISM_COLUMN] = _replace_values(
            table[RELION_ASTIGMATISM_COLUMN], mask, nu - nv
        )
    return new, mask


def _set_relion_mags(
    optics: pd.DataFrame, mats_by_group: Mapping[int, MagMat], *, drop_if_identity: bool = False
) -> pd.DataFrame:
    """Optics table with ``_rlnMagMat`` of the given groups set (columns added if absent)."""
    new = optics.copy()
    present = [c for c in RELION_MAGMAT_LABELS if c in new.columns]
    if present and len(present) != 4:
        absent = [c for c in RELION_MAGMAT_LABELS if c not in new.columns]
        raise InputError(
            f"data_optics has only some magnification-matrix columns (lacks "
            f"{', '.join('_' + c for c in absent)}); add all four or remove them"
        )
    groups = _optics_groups(optics)
    existing = existing_relion_mags(optics)
    rows = np.isin(groups, np.array(sorted(mats_by_group), dtype=np.int64))
    final = {g: mats_by_group.get(g, existing.get(g, MagMat.identity())) for g in groups.tolist()}
    if drop_if_identity and all(m.is_identity for m in final.values()):
        return new.drop(columns=present)
    for k, label in enumerate(RELION_MAGMAT_LABELS):
        i, j = divmod(k, 2)
        values = np.array([final[g].array[i, j] for g in groups.tolist()], dtype=np.float64)
        if label in new.columns:
            new[label] = _replace_values(new[label], rows, values[rows])
        else:
            new[label] = values
    return new


def apply_to_relion(
    optics: pd.DataFrame | None,
    table: pd.DataFrame,
    mags: _Mags,
    *,
    shared_astigmatism: bool = False,
    optics_groups: Collection[int] | None = None,
) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """Rewrite a RELION table's defocus into the true frame and store ``M`` per optics group.

    Parameters
    ----------
    optics
        ``data_optics`` (``starfile`` names, no leading underscore), or None for a RELION 3.0
        table.
    table
        ``data_micrographs`` or ``data_particles`` (or the single 3.0 table) with
        ``rlnDefocusU``, ``rlnDefocusV`` and ``rlnDefocusAngle``.
    mags
        ``k_true = M k_obs`` (RELION's convention): one matrix for every optics group, or
        ``{group: M}``.
    shared_astigmatism
        Give every particle of a micrograph the micrograph's median astigmatism after the
        transform (see the module notes); default: each row keeps its own.
    optics_groups
        Only rewrite these groups; other rows and optics rows are left as they are.

    Returns
    -------
    (new_optics, new_table)
        Copies. ``new_optics`` has ``rlnMagMat00..11`` (appended, identity for groups not
        rewritten, if the columns were absent); it is None when ``optics`` is None (the 3.0
        layout cannot store the matrix). In ``new_table`` the rewritten rows have true-frame
        ``U >= V``, angle in [0, 180) and ``rlnCtfAstigmatism = U - V`` (when present). The
        three defocus columns (and the astigmatism column) become float64; everything else is
        untouched.

    Raises
    ------
    InputError
        Missing defocus columns, non-numeric defocus in a row to rewrite, unknown optics groups,
        or a group that already carries a non-identity ``_rlnMagMat`` (its defocus is already in
        the true frame).
    """
    _check_relion_columns(table)
    row_groups = relion_row_groups(optics, table)
    resolved = resolve_relion_mags(optics, table, mags, optics_groups=optics_groups)
    _refuse_relion_existing(optics, resolved)
    new_table, _ = _rewrite_relion_defocus(table, row_groups, resolved, "true", shared_astigmatism)
    new_optics = None if optics is None else _set_relion_mags(optics, resolved)
    return new_optics, new_table


def undo_relion(
    optics: pd.DataFrame | None,
    table: pd.DataFrame,
    mags: _Mags | None = None,
    *,
    optics_groups: Collection[int] | None = None,
    drop_identity_columns: bool = True,
) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """The exact inverse of :func:`apply_to_relion` (true frame → observed, matrix removed).

    Parameters
    ----------
    optics, table
        As returned by :func:`apply_to_relion`.
    mags
        The matrices to undo; default the ``_rlnMagMat`` stored in ``optics`` (required for a
        RELION 3.0 table, which cannot store them).
    optics_groups
        Only these groups (default: every group with a stored non-identity matrix, or every
        group of ``mags``).
    drop_identity_columns
        Remove the four ``rlnMagMat`` columns when every group is the identity afterwards
        (RELION reads missing columns as the identity), which restores a table that had none.

    Returns
    -------
    (new_optics, new_table)
        Defocus rows of the undone groups back in the observed frame (``U >= V``, angle in
        [0, 180)) and their matrices reset to the identity. Applying after shared astigmatism
        is not invertible: this returns the per-row observed values of the shared result.
    """
    _check_relion_columns(table)
    row_groups = relion_row_groups(optics, table)
    if mags is None:
        if optics is None:
            raise InputError("a RELION 3.0 table stores no matrix; pass the one that was applied")
        stored = existing_relion_mags(optics)
        wanted = None if optics_groups is None else {int(g) for g in optics_groups}
        resolved = {
            g: m for g, m in stored.items() if not m.is_identity and (wanted is None or g in wanted)
        }
    else:
        resolved = resolve_relion_mags(optics, table, mags, optics_groups=optics_groups)
    new_table, _ = _rewrite_relion_defocus(table, row_groups, resolved, "observed", False)
    if optics is None:
        return None, new_table
    identity = {g: MagMat.identity() for g in resolved}
    new_optics = _set_relion_mags(optics, identity, drop_if_identity=drop_identity_columns)
    return new_optics, new_table


# ============================================================================ cryoSPARC
def cryosparc_row_mask(
    arr: np.ndarray, exposure_groups: Collection[int] | None = None
) -> NDArray[np.bool_]:
    """Rows to rewrite: all, or those whose ``ctf/exp_group_id`` is in ``exposure_groups``."""
    n = int(arr.shape[0])
    if exposure_groups is None:
        return np.ones(n, dtype=bool)
    if CRYOSPARC_GROUP_FIELD not in (arr.dtype.names or ()):
        raise InputError(
            f"no {CRYOSPARC_GROUP_FIELD} field, so rows cannot be selected by group; "
            "leave out the group selection"
        )
    groups = arr[CRYOSPARC_GROUP_FIELD].astype(np.int64)
    wanted = np.array(sorted({int(g) for g in exposure_groups}), dtype=np.int64)
    missing = sorted(set(wanted.tolist()) - set(groups.tolist()))
    if missing:
        raise InputError(
            f"exposure group(s) {missing} not in the dataset (it has "
            f"{sorted(set(groups.tolist()))})"
        )
    return np.isin(groups, wanted)


def with_anisomag_field(arr: np.ndarray) -> np.ndarray:
    """A copy of ``arr`` that has ``ctf/anisomag`` (4 float32, zeros where it was absent).

    The new field goes right after the last ``ctf/`` field (at the end if there is none), in the
    byte order of ``ctf/df1_A``; every other field keeps its dtype and values.
    """
    names = list(arr.dtype.names or ())
    if CRYOSPARC_ANISOMAG_FIELD in names:
        return arr.copy()
    ref = arr.dtype.fields.get(CRYOSPARC_DEFOCUS_FIELDS[0]) if arr.dtype.fields else None
    order = ">" if ref is not None and ref[0].byteorder == ">" else "<"
    new_field = (CRYOSPARC_ANISOMAG_FIELD, np.dtype(f"{order}f4"), (4,))
    last_ctf = max((i for i, n in enumerate(names) if n.startswith("ctf/")), default=len(names) - 1)
    descr: list[tuple[Any, ...]] = []
    for i, name in enumerate(names):
        descr.append((name, arr.dtype.fields[name][0]))
        if i == last_ctf:
            descr.append(new_field)
    if not names:
        descr.append(new_field)
    out = np.zeros(arr.shape, dtype=np.dtype(descr))
    for name in names:
        out[name] = arr[name]
    return out


def _cs_defocus(arr: np.ndarray, mask: NDArray[np.bool_]) -> _Arrays3:
    u = arr[CRYOSPARC_DEFOCUS_FIELDS[0]].astype(np.float64)
    v = arr[CRYOSPARC_DEFOCUS_FIELDS[1]].astype(np.float64)
    ang = np.rad2deg(arr[CRYOSPARC_DEFOCUS_FIELDS[2]].astype(np.float64))
    for name, values in zip(CRYOSPARC_DEFOCUS_FIELDS, (u, v, ang), strict=True):
        bad = np.flatnonzero(mask & ~np.isfinite(values))
        if bad.size:
            raise InputError(f"row {int(bad[0]) + 1}: {name} is not a finite number")
    return u, v, ang


def _cs_store(
    out: np.ndarray, mask: NDArray[np.bool_], u: ArrayLike, v: ArrayLike, ang_deg: ArrayLike
) -> None:
    out[CRYOSPARC_DEFOCUS_FIELDS[0]][mask] = u
    out[CRYOSPARC_DEFOCUS_FIELDS[1]][mask] = v
    out[CRYOSPARC_DEFOCUS_FIELDS[2]][mask] = np.deg2rad(np.asarray(ang_deg, dtype=float))


def _cs_micrograph_keys(arr: np.ndarray) -> np.ndarray:
    names = arr.dtype.names or ()
    for field in CRYOSPARC_MICROGRAPH_FIELDS:
        if field in names:
            return arr[field]
    raise InputError(
        f"shared astigmatism needs {' or '.join(CRYOSPARC_MICROGRAPH_FIELDS)} to know which "
        "particles share a micrograph; the dataset has neither (use per-particle astigmatism)"
    )


def _require_cs_defocus(arr: np.ndarray) -> None:
    if arr.dtype.names is None or arr.ndim != 1:
        raise InputError("not a cryoSPARC dataset (expected a 1-D structured array)")
    missing = [f for f in CRYOSPARC_DEFOCUS_FIELDS if f not in arr.dtype.names]
    if missing:
        raise InputError(
            f"no {', '.join(missing)} field(s) in the dataset; give the .cs file that holds the "
            "CTF (for particles often the job's *_passthrough_particles.cs)"
        )


def apply_to_cryosparc(
    arr: np.ndarray,
    mag: MagMat | ArrayLike,
    *,
    shared_astigmatism: bool = False,
    exposure_groups: Collection[int] | None = None,
) -> np.ndarray:
    """Rewrite a cryoSPARC dataset's defocus into the true frame and set ``ctf/anisomag``.

    Parameters
    ----------
    arr
        Structured array of a ``.cs`` file (particles or exposures) with ``ctf/df1_A``,
        ``ctf/df2_A`` and ``ctf/df_angle_rad``.
    mag
        ``k_true = M k_obs`` (RELION's convention; stored as ``(M^-1 - I)``).
    shared_astigmatism
        Median astigmatism per micrograph (see the module notes).
    exposure_groups
        Only rewrite rows whose ``ctf/exp_group_id`` is listed.

    Returns
    -------
    numpy.ndarray
        A new array: the same dtype (plus ``ctf/anisomag`` after the last ``ctf/`` field if it
        was absent), rewritten rows with true-frame ``df1 >= df2``, angle in [0, π) rad, and
        ``ctf/anisomag = (M^-1 - I)`` row-major; every other value bit-identical.

    Raises
    ------
    InputError
        Missing defocus fields, non-finite defocus, unknown exposure groups, or rows to rewrite
        that already carry a non-zero ``ctf/anisomag``.
    """
    _require_cs_defocus(arr)
    m = _as_magmat(mag)
    mask = cryosparc_row_mask(arr, exposure_groups)
    if CRYOSPARC_ANISOMAG_FIELD in arr.dtype.names:
        am = np.asarray(arr[CRYOSPARC_ANISOMAG_FIELD], dtype=np.float64).reshape(len(arr), -1)
        carrying = np.flatnonzero(mask & np.any(am != 0.0, axis=1))
        if carrying.size:
            first = am[carrying[0]]
            raise InputError(
                f"{carrying.size} row(s) already carry a non-zero {CRYOSPARC_ANISOMAG_FIELD} "
                f"(row {int(carrying[0]) + 1}: {[float(f'{x:.6g}') for x in first]}); their "
                "defocus values are already in the true frame, so a second matrix is not "
                "applied on top"
            )
    u, v, ang = _cs_defocus(arr, mask)
    out = with_anisomag_field(arr)
    if not mask.any():
        return out
    nu, nv, na = defocus_table_to_true(u[mask], v[mask], ang[mask], m)
    if shared_astigmatism:
        keys = _cs_micrograph_keys(arr)[mask]
        nu, nv, na = share_astigmatism(nu, nv, na, keys)
    _cs_store(out, mask, nu, nv, na)
    out[CRYOSPARC_ANISOMAG_FIELD][mask] = to_cryosparc_anisomag(m)
    return out


def undo_cryosparc(
    arr: np.ndarray,
    mag: MagMat | ArrayLike | None = None,
    *,
    exposure_groups: Collection[int] | None = None,
    drop_anisomag: bool = False,
) -> np.ndarray:
    """The exact inverse of :func:`apply_to_cryosparc` (to float32 precision).

    Parameters
    ----------
    arr
        A dataset written by :func:`apply_to_cryosparc`.
    mag
        The matrix to undo; default each row's own ``ctf/anisomag`` (rows with zeros are left
        alone).
    exposure_groups
        Only these ``ctf/exp_group_id`` values.
    drop_anisomag
        Remove the ``ctf/anisomag`` field when it is all zeros afterwards (for datasets that did
        not have it).

    Returns
    -------
    numpy.ndarray
        Rows back in the observed frame (``df1 >= df2``, angle in [0, π)), ``ctf/anisomag``
        zeroed.
    """
    _require_cs_defocus(arr)
    mask = cryosparc_row_mask(arr, exposure_groups)
    names = arr.dtype.names
    out = arr.copy()
    if mag is not None:
        mats: NDArray[np.float64] = _as_magmat(mag).array
    else:
        if CRYOSPARC_ANISOMAG_FIELD not in names:
            raise InputError(f"no {CRYOSPARC_ANISOMAG_FIELD} field: nothing to undo")
        am = np.asarray(arr[CRYOSPARC_ANISOMAG_FIELD], dtype=np.float64).reshape(len(arr), 4)
        mask = mask & np.any(am != 0.0, axis=1)
        mats = matrices_from_cryosparc_anisomag(am[mask])
    if mask.any():
        u, v, ang = _cs_defocus(arr, mask)
        nu, nv, na = defocus_table_to_observed(u[mask], v[mask], ang[mask], mats)
        _cs_store(out, mask, nu, nv, na)
        if CRYOSPARC_ANISOMAG_FIELD in names:
            out[CRYOSPARC_ANISOMAG_FIELD][mask] = 0.0
    if (
        drop_anisomag
        and CRYOSPARC_ANISOMAG_FIELD in names
        and not np.any(out[CRYOSPARC_ANISOMAG_FIELD] != 0.0)
    ):
        kept = [(n, out.dtype.fields[n][0]) for n in names if n != CRYOSPARC_ANISOMAG_FIELD]
        slim = np.zeros(out.shape, dtype=np.dtype(kept))
        for n, _ in kept:
            slim[n] = out[n]
        out = slim
    return out
