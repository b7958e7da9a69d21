"""Apply a magnification matrix to whole CTF tables: the science, on defocus arrays.

This module works on :class:`~anisoctf.records.defocus.DefocusTable` records and plain arrays
and knows no file layout; the formats layer turns RELION tables
(:mod:`anisoctf.io.relion_defocus`) and cryoSPARC datasets
(:mod:`anisoctf.io.cryosparc_defocus`) into these records and back, and
:mod:`anisoctf.jobs.apply_tables` puts the steps together (``apply_to_relion``,
``apply_to_cryosparc`` and their ``undo_*`` inverses, the ``aniso apply`` job).

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
    The layout has nowhere to keep a matrix.
    :func:`~anisoctf.jobs.apply_tables.apply_to_relion` then returns ``None`` for the optics
    table and rewrites the defocus only; the caller must tell the user that the matrix was not
    stored. Such a table is right only for images that have themselves been resampled
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
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.errors import InputError
from anisoctf.optics.frames import defocus_table_to_observed, defocus_table_to_true
from anisoctf.optics.magmat import MagMat
from anisoctf.records.defocus import DefocusTable

__all__ = [
    "as_magmat",
    "group_mask",
    "one_ctf_per_micrograph",
    "resolve_group_mags",
    "rewrite_defocus",
    "share_astigmatism",
]

Mags = Mapping[int, MagMat] | MagMat | ArrayLike
_Arrays3 = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


def as_magmat(m: MagMat | ArrayLike) -> MagMat:
    """``m`` as a :class:`MagMat`; an invalid matrix is a one-line InputError."""
    if isinstance(m, MagMat):
        return m
    try:
        return MagMat(m)
    except ValueError as exc:
        raise InputError(f"invalid magnification matrix: {exc}") from exc


# ============================================================================ shared astigmatism
def _factorize(values: ArrayLike) -> NDArray[np.int64]:
    """Integer code of every value (equal values, equal codes; NaN one value)."""
    a = np.asarray(values)
    try:
        return np.unique(a, return_inverse=True)[1].reshape(-1).astype(np.int64)
    except TypeError:  # unorderable objects: codes by first appearance
        lookup: dict[Any, int] = {}
        return np.array([lookup.setdefault(x, len(lookup)) for x in a.tolist()], dtype=np.int64)


def _group_codes(key_arrays: Sequence[ArrayLike], n: int) -> NDArray[np.int64]:
    """One code per combination of the key arrays."""
    if not key_arrays:
        return np.zeros(n, dtype=np.int64)
    codes = np.stack([_factorize(k) for k in key_arrays], axis=1)
    return np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _group_median(values: NDArray[np.float64], codes: NDArray[np.int64]) -> NDArray[np.float64]:
    """The median of every row's group, per row: the middle value, or the mean of the two
    middle values ``(a + b) / 2`` (as ``pandas`` ``groupby().median()``)."""
    n = values.size
    if n == 0:
        return values.copy()
    order = np.lexsort((values, codes))
    sc = codes[order]
    sv = values[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    counts = np.diff(np.r_[starts, n])
    hi = sv[starts + counts // 2]
    lo = sv[starts + (counts - 1) // 2]
    med = np.where(counts % 2 == 1, hi, (hi + lo) / 2)
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat(med, counts)
    return out


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
    a1, a2 = h * np.cos(t), h * np.sin(t)
    key_arrays = (
        [keys] if isinstance(keys, np.ndarray) or not _is_sequence_of_arrays(keys) else keys
    )
    codes = _group_codes(list(key_arrays), u.size)
    m1 = _group_median(a1, codes)
    m2 = _group_median(a2, codes)
    hm = np.hypot(m1, m2)
    tiny = hm <= 1e-12 * np.maximum(np.abs(z), 1.0)
    hm = np.where(tiny, 0.0, hm)
    ang = np.where(tiny, 0.0, np.mod(0.5 * np.rad2deg(np.arctan2(m2, m1)), 180.0))
    ang = np.where(ang >= 180.0, 0.0, ang)
    return z + hm, z - hm, ang


def one_ctf_per_micrograph(
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    angle_deg: ArrayLike,
    keys: ArrayLike,
    tolerance: float = 0.5,
) -> tuple[NDArray[np.int64], _Arrays3, int]:
    """Collapse a table whose rows are particles to one CTF per micrograph.

    A CTF fit (CTFFIND, Gctf, anisoctf) gives one defocus per micrograph; a particle table
    repeats it on every particle of the micrograph, and counting each particle as a separate
    measurement would make a detection on it far too confident. Rows with equal ``keys`` are one
    micrograph: its mean defocus is the median of the rows' ``(U + V)/2`` and its astigmatism
    the component-wise median of the Cartesian astigmatism (as :func:`share_astigmatism`), so
    rows that all agree give exactly their common value.

    Parameters
    ----------
    defocus_u, defocus_v, angle_deg
        Per-row defocus (Å) and angle (degrees).
    keys
        The micrograph of every row.
    tolerance
        Rows of one micrograph "disagree" when ``(U + V)/2`` or a Cartesian astigmatism
        component spans more than this (Å); STAR files print defocus to 0.01–1 Å.

    Returns
    -------
    (first, (u, v, angle), n_disagreeing)
        Index of each micrograph's first row (in order of first appearance), its CTF
        (``U >= V``, angle in [0, 180)), and how many micrographs had rows that disagree
        (e.g. after per-particle CTF refinement).
    """
    u = np.asarray(defocus_u, dtype=float)
    v = np.asarray(defocus_v, dtype=float)
    t = np.deg2rad(2.0 * np.asarray(angle_deg, dtype=float))
    codes = _group_codes([keys], u.size)
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    comps = (0.5 * (u + v), 0.5 * (u - v) * np.cos(t), 0.5 * (u - v) * np.sin(t))
    medians = [_group_median(c, codes)[first] for c in comps]
    spread = np.zeros(first.size)
    for c in comps:
        hi = np.full(first.size, -np.inf)
        lo = np.full(first.size, np.inf)
        np.maximum.at(hi, inverse.reshape(-1), c)
        np.minimum.at(lo, inverse.reshape(-1), c)
        spread = np.maximum(spread, hi - lo)
    order = np.argsort(first, kind="stable")
    z, a1, a2 = (m[order] for m in medians)
    h = np.hypot(a1, a2)
    ang = np.mod(0.5 * np.rad2deg(np.arctan2(a2, a1)), 180.0)
    ang = np.where((h == 0.0) | (ang >= 180.0), 0.0, ang)
    n_disagree = int(np.count_nonzero(spread[order] > tolerance))
    return first[order].astype(np.int64), (z + h, z - h, ang), n_disagree


def _is_sequence_of_arrays(keys: Any) -> bool:
    """True for ``[array, array]``-like keys, False for one flat key array/list."""
    if isinstance(keys, (list, tuple)) and keys:
        return all(np.ndim(k) == 1 for k in keys)
    return False


# ============================================================================ per-group matrices
def resolve_group_mags(
    row_groups: NDArray[np.int64],
    table_groups: Collection[int],
    mags: Mags,
    *,
    optics_groups: Collection[int] | None = None,
) -> dict[int, MagMat]:
    """The matrix to apply to each optics group that will be rewritten.

    Parameters
    ----------
    row_groups
        The group of every row.
    table_groups
        Groups of the optics table (empty when there is none).
    mags
        One matrix for every group, or ``{group: matrix}`` for some groups.
    optics_groups
        Restrict to these groups (default: every group of ``mags`` when it is a mapping,
        otherwise every group of the optics table and of the rows).

    Raises
    ------
    InputError
        A requested group exists neither in the optics table nor in the rows, or a matrix is
        invalid.
    """
    known = set(row_groups.tolist()) | set(table_groups)
    if isinstance(mags, Mapping):
        per_group = {int(g): as_magmat(m) for g, m in mags.items()}
    else:
        one = as_magmat(mags)
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


def group_mask(groups: NDArray[np.int64], selected: Collection[int]) -> NDArray[np.bool_]:
    """Rows whose group is one of ``selected``."""
    return np.isin(groups, np.array(sorted(selected), dtype=np.int64))


# ============================================================================ the rewrite
def rewrite_defocus(
    table: DefocusTable,
    mats_by_group: Mapping[int, MagMat],
    *,
    to: Literal["true", "observed"] = "true",
    shared_astigmatism: bool = False,
) -> tuple[NDArray[np.bool_], _Arrays3]:
    """Move the defocus of the rows of the given groups to the true (or observed) frame.

    Parameters
    ----------
    table
        The rows; those of a group in ``mats_by_group`` must have finite defocus.
    mats_by_group
        ``{group: M}`` (``k_true = M k_obs``).
    to
        ``"true"`` (:func:`~anisoctf.optics.frames.defocus_table_to_true`) or ``"observed"``.
    shared_astigmatism
        Then give every row of a micrograph (``table.micrograph`` within a group) the median
        astigmatism (:func:`share_astigmatism`).

    Returns
    -------
    (mask, (u, v, angle))
        The rewritten rows and their new values (``U >= V``, angle in [0, 180)), one entry per
        row of the mask.
    """
    mask = group_mask(table.group, mats_by_group)
    empty = np.empty(0, dtype=np.float64)
    if not mask.any():
        return mask, (empty, empty.copy(), empty.copy())
    order = np.array(sorted(mats_by_group), dtype=np.int64)
    stack = np.stack([mats_by_group[int(g)].array for g in order])
    mats = stack[np.searchsorted(order, table.group[mask])]
    u, v, ang = table.defocus_u[mask], table.defocus_v[mask], table.angle_deg[mask]
    if to == "true":
        nu, nv, na = defocus_table_to_true(u, v, ang, mats)
    else:
        nu, nv, na = defocus_table_to_observed(u, v, ang, mats)
    if shared_astigmatism:
        if table.micrograph is None:
            raise ValueError("shared astigmatism needs the micrograph of every row")
        nu, nv, na = share_astigmatism(
            nu, nv, na, [table.group[mask], np.asarray(table.micrograph)[mask]]
        )
    return mask, (nu, nv, na)
