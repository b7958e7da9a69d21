"""The job behind ``anisoctf aniso apply``: a CTF table's defocus in the true frame, with ``M``.

``TABLE`` is a RELION STAR file (micrographs or particles, 3.0 or 3.1+ layout) or a cryoSPARC
``.cs`` file (recognised by its content). The matrix is RELION's ``_rlnMagMat``
(``k_true = M k_obs``). The science is :mod:`anisoctf.magnification.tables` (conventions
there); the tables are read and written by :mod:`anisoctf.io.relion_defocus`,
:mod:`anisoctf.io.cryosparc_defocus`, :mod:`anisoctf.io.star_patch` and
:mod:`anisoctf.io.cryosparc`.

STAR output keeps the input's text: every line of every block is copied as it was, except the
rewritten values (``_rlnDefocusU/V/Angle`` and ``_rlnCtfAstigmatism`` of the rewritten rows,
6 decimals like RELION) and the ``_rlnMagMat00..11`` columns, which are added at the end of
``data_optics`` (or replaced for the selected groups) with full double precision. The tokens of
each rewritten row are checked against the values the table was read with before anything is
written. A RELION 3.0 file (no ``data_optics``) cannot store a matrix: its defocus is rewritten
and a warning says so. ``.cs`` output keeps the input's dtype and header bytes
(:mod:`anisoctf.io.cryosparc`); a dataset without ``ctf/anisomag`` gets the field.

The input is never modified and the output may not name it. The output is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.cryosparc import is_cryosparc_file, read_cs, write_cs
from anisoctf.io.cryosparc_csg import group_type, write_cs_with_group
from anisoctf.io.cryosparc_defocus import (
    anisomag_rows,
    cryosparc_row_mask,
    cs_defocus,
    cs_micrograph_keys,
    cs_store,
    refuse_carrying_anisomag,
    require_cs_defocus,
    with_anisomag_field,
    without_anisomag_field,
)
from anisoctf.io.detection_json import read_detection_verdict
from anisoctf.io.matrix_json import read_mag_matrix_json
from anisoctf.io.relion_defocus import (
    check_defocus_columns,
    defocus_record,
    existing_relion_mags,
    find_ctf_block,
    relion_row_groups,
    with_defocus,
    with_magmats,
)
from anisoctf.io.relion_defocus import (
    optics_groups as optics_table_groups,
)
from anisoctf.io.star_patch import patch_defocus_star
from anisoctf.io.star_tables import StarTable, read_star_blocks
from anisoctf.jobs.mag_from import single_matrix
from anisoctf.magnification.tables import (
    Mags,
    as_magmat,
    group_mask,
    resolve_group_mags,
    rewrite_defocus,
    share_astigmatism,
)
from anisoctf.optics.frames import defocus_table_to_observed, defocus_table_to_true
from anisoctf.optics.magmat import (
    MagMat,
    matrices_from_cryosparc_anisomag,
    to_cryosparc_anisomag,
)

__all__ = [
    "CRYOSPARC_ANISOMAG_FIELD",
    "CRYOSPARC_DEFOCUS_FIELDS",
    "RELION_ASTIGMATISM_COLUMN",
    "RELION_DEFOCUS_COLUMNS",
    "ApplyRequest",
    "ApplySummary",
    "apply_tables",
    "apply_to_cryosparc",
    "apply_to_relion",
    "cryosparc_row_mask",
    "matrix_from_options",
    "refuse_not_significant",
    "resolve_relion_mags",
    "run_apply",
    "share_astigmatism",
    "undo_cryosparc",
    "undo_relion",
    "with_anisomag_field",
]

#: RELION defocus columns rewritten by :func:`apply_to_relion` (starfile's names, no underscore).
RELION_DEFOCUS_COLUMNS = L.DEFOCUS
#: Recomputed as ``U - V`` when present.
RELION_ASTIGMATISM_COLUMN = L.ASTIGMATISM
#: cryoSPARC defocus fields rewritten by :func:`apply_to_cryosparc`.
CRYOSPARC_DEFOCUS_FIELDS = L.CS_DEFOCUS
#: cryoSPARC's anisotropic magnification, ``(M^-1 - I)`` row-major, 4 float32 per row.
CRYOSPARC_ANISOMAG_FIELD = L.CS_ANISOMAG


# ============================================================================ RELION tables
def resolve_relion_mags(
    optics: StarTable | None,
    table: StarTable,
    mags: Mags,
    *,
    optics_groups: Collection[int] | None = None,
) -> dict[int, MagMat]:
    """The matrix to apply to each optics group that will be rewritten
    (:func:`~anisoctf.magnification.tables.resolve_group_mags` on a RELION table)."""
    row_groups = relion_row_groups(optics, table)
    known = () if optics is None else optics_table_groups(optics).tolist()
    return resolve_group_mags(row_groups, known, mags, optics_groups=optics_groups)


def _refuse_existing(optics: StarTable | None, groups: Collection[int]) -> None:
    existing = existing_relion_mags(optics)
    carrying = [g for g in sorted(groups) if g in existing and not existing[g].is_identity]
    if carrying:
        g = carrying[0]
        raise InputError(
            f"optics group(s) {carrying} already carry a magnification matrix (_rlnMagMat, "
            f"group {g}: {existing[g].describe()}); their defocus values are already in the "
            "true frame, so a second matrix is not applied on top"
        )


def _rewrite_table(
    table: StarTable,
    row_groups: np.ndarray,
    mats_by_group: dict[int, MagMat],
    to: str,
    shared: bool,
) -> StarTable:
    mask = group_mask(row_groups, mats_by_group)
    if not mask.any():
        return table.copy()
    record = defocus_record(table, row_groups, mask, with_micrographs=shared)
    mask, values = rewrite_defocus(
        record,
        mats_by_group,
        to="true" if to == "true" else "observed",
        shared_astigmatism=shared,
    )
    return with_defocus(table, mask, values)


def apply_to_relion(
    optics: StarTable | None,
    table: StarTable,
    mags: Mags,
    *,
    shared_astigmatism: bool = False,
    optics_groups: Collection[int] | None = None,
) -> tuple[StarTable | None, StarTable]:
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
        transform (see :mod:`anisoctf.magnification.tables`); default: each row keeps its own.
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
    check_defocus_columns(table)
    row_groups = relion_row_groups(optics, table)
    resolved = resolve_relion_mags(optics, table, mags, optics_groups=optics_groups)
    _refuse_existing(optics, resolved)
    new_table = _rewrite_table(table, row_groups, resolved, "true", shared_astigmatism)
    new_optics = None if optics is None else with_magmats(optics, resolved)
    return new_optics, new_table


def undo_relion(
    optics: StarTable | None,
    table: StarTable,
    mags: Mags | None = None,
    *,
    optics_groups: Collection[int] | None = None,
    drop_identity_columns: bool = True,
) -> tuple[StarTable | None, StarTable]:
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
    check_defocus_columns(table)
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
    new_table = _rewrite_table(table, row_groups, resolved, "observed", False)
    if optics is None:
        return None, new_table
    identity = {g: MagMat.identity() for g in resolved}
    new_optics = with_magmats(optics, identity, drop_if_identity=drop_identity_columns)
    return new_optics, new_table


# ============================================================================ cryoSPARC datasets
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
        Median astigmatism per micrograph (see :mod:`anisoctf.magnification.tables`).
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
    require_cs_defocus(arr)
    m = as_magmat(mag)
    mask = cryosparc_row_mask(arr, exposure_groups)
    refuse_carrying_anisomag(arr, mask)
    u, v, ang = cs_defocus(arr, mask)
    out = with_anisomag_field(arr)
    if not mask.any():
        return out
    nu, nv, na = defocus_table_to_true(u[mask], v[mask], ang[mask], m)
    if shared_astigmatism:
        keys = cs_micrograph_keys(arr)[mask]
        nu, nv, na = share_astigmatism(nu, nv, na, keys)
    cs_store(out, mask, nu, nv, na)
    out[L.CS_ANISOMAG][mask] = to_cryosparc_anisomag(m)
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
    require_cs_defocus(arr)
    mask = cryosparc_row_mask(arr, exposure_groups)
    names = arr.dtype.names
    out = arr.copy()
    if mag is not None:
        mats: np.ndarray = as_magmat(mag).array
    else:
        if L.CS_ANISOMAG not in names:
            raise InputError(f"no {L.CS_ANISOMAG} field: nothing to undo")
        am = anisomag_rows(arr)
        mask = mask & np.any(am != 0.0, axis=1)
        mats = matrices_from_cryosparc_anisomag(am[mask])
    if mask.any():
        u, v, ang = cs_defocus(arr, mask)
        nu, nv, na = defocus_table_to_observed(u[mask], v[mask], ang[mask], mats)
        cs_store(out, mask, nu, nv, na)
        if L.CS_ANISOMAG in names:
            out[L.CS_ANISOMAG][mask] = 0.0
    if drop_anisomag:
        out = without_anisomag_field(out)
    return out


# ============================================================================ the job
def matrix_from_options(
    mag_matrix: Sequence[float] | None,
    from_json: str | os.PathLike[str] | None,
    mag_from: str | os.PathLike[str] | None = None,
) -> MagMat | None:
    """The matrix of ``--mag-matrix M00 M01 M10 M11``, ``--from-json FILE`` or ``--mag-from
    SOURCE`` (None: none of them).

    ``--mag-from`` takes a refined particles STAR, a cryoSPARC particles ``.cs`` or a
    refine/detect JSON holding one matrix (:func:`anisoctf.jobs.mag_from.single_matrix`); a
    source with several different matrices is refused (one command per group, with
    ``--mag-matrix``).

    Raises
    ------
    InputError
        Not a valid matrix (``--mag-matrix: …``), or an unreadable JSON file.
    """
    if mag_matrix is not None:
        try:
            return MagMat(((mag_matrix[0], mag_matrix[1]), (mag_matrix[2], mag_matrix[3])))
        except ValueError as exc:
            raise InputError(f"--mag-matrix: {exc}") from exc
    if from_json is not None:
        return read_mag_matrix_json(from_json)
    if mag_from is not None:
        return single_matrix(mag_from)[0]
    return None


def refuse_not_significant(from_json: str | os.PathLike[str], force: bool) -> None:
    """A detection JSON whose test was not significant is refused unless ``force``.

    Applying a matrix that the data do not support only adds its noise to every defocus; the
    JSON of ``aniso detect`` says ``"significant": false`` then. A file without the key (a
    hand-written ``mag_matrix``) is accepted.

    Raises
    ------
    InputError
        ``significant`` is false and ``force`` is not set.
    """
    significant, p_value = read_detection_verdict(from_json)
    if significant is False and not force:
        p = f"p = {p_value:.2g}" if p_value is not None else "p unknown"
        raise InputError(
            f"the detection was not significant (Wald {p}); its matrix is noise. "
            "Pass --force to apply it anyway",
            path=Path(from_json),
        )


@dataclass(frozen=True)
class ApplyRequest:
    """What ``aniso apply`` is asked to do.

    Parameters
    ----------
    table
        The RELION STAR or cryoSPARC ``.cs`` file to read (never modified).
    out
        The new file to write.
    mag
        ``M`` (``k_true = M k_obs``).
    shared_astigmatism
        One (median) astigmatism per micrograph after the transform.
    optics_groups
        Only rewrite these optics groups (cryoSPARC: ``ctf/exp_group_id``); None: all.
    """

    table: Path
    out: Path
    mag: MagMat
    shared_astigmatism: bool = False
    optics_groups: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ApplySummary:
    """What :func:`apply_tables` did (for the summary line and for tests)."""

    kind: str  # "relion" or "cryosparc"
    n_rows: int
    n_rewritten: int
    groups: tuple[int, ...]
    matrix: MagMat
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _apply_star(
    src: Path, dst: Path, mag: MagMat, shared: bool, groups: Sequence[int] | None
) -> ApplySummary:
    blocks = read_star_blocks(src, names_as_strings=False)
    key = find_ctf_block(src, blocks)
    table = blocks[key]
    optics = blocks.get("optics")
    resolved = resolve_relion_mags(optics, table, mag, optics_groups=groups)
    new_optics, new_table = apply_to_relion(
        optics, table, mag, shared_astigmatism=shared, optics_groups=groups
    )
    mask = group_mask(relion_row_groups(optics, table), resolved)
    defocus = (
        new_table[L.DEFOCUS_U].to_numpy(),
        new_table[L.DEFOCUS_V].to_numpy(),
        new_table[L.DEFOCUS_ANGLE].to_numpy(),
    )
    warnings: list[str] = []
    if optics is None or new_optics is None:
        warnings.append(
            "RELION 3.0 layout (no data_optics): the defocus was rewritten into the true frame "
            "but the matrix could not be stored, so the table is right only for images "
            f"resampled into the true frame (true pixel size = pixel size / {mag.scale:.5f}); "
            "convert the file with relion_convert_star and apply to that to keep the matrix"
        )
        patch_defocus_star(src, dst, key, table, mask, defocus)
    else:
        patch_defocus_star(src, dst, key, table, mask, defocus, optics, resolved)
    return ApplySummary(
        kind="relion",
        n_rows=len(table),
        n_rewritten=int(mask.sum()),
        groups=tuple(sorted(resolved)),
        matrix=mag,
        warnings=tuple(warnings),
    )


def _apply_cs(
    src: Path, dst: Path, mag: MagMat, shared: bool, groups: Sequence[int] | None
) -> ApplySummary:
    cs = read_cs(src)
    try:
        new = apply_to_cryosparc(cs.array, mag, shared_astigmatism=shared, exposure_groups=groups)
    except InputError as exc:
        raise InputError(str(exc), path=src) from exc
    mask = cryosparc_row_mask(cs.array, groups)
    notes: list[str] = []
    if L.CS_ANISOMAG not in cs.fields:
        notes.append(f"added the {L.CS_ANISOMAG} field")
    try:
        group_type(new)
    except ValueError:  # e.g. a passthrough file with ctf/* only: no result group to describe
        write_cs(dst, new, header=cs.header)
        notes.append("no .csg written: the dataset has no blob or micrograph_blob fields")
    else:
        csg = write_cs_with_group(dst, new, header=cs.header)
        notes.append(f"wrote {csg.name} for cryoSPARC's Import Result Group job")
    return ApplySummary(
        kind="cryosparc",
        n_rows=len(cs),
        n_rewritten=int(mask.sum()),
        groups=tuple(sorted({int(g) for g in groups})) if groups else (),
        matrix=mag,
        notes=tuple(notes),
    )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def apply_tables(request: ApplyRequest) -> ApplySummary:
    """Rewrite ``request.table`` into ``request.out`` (see the module notes).

    Raises
    ------
    InputError
        Anything wrong with the input, the options or the output path (one line).
    """
    src, dst = Path(request.table), Path(request.out)
    if not src.exists():
        raise InputError("file not found; check the path", path=src)
    if src.is_dir():
        raise InputError("is a directory; give a STAR or .cs file", path=src)
    if _same_file(src, dst):
        raise InputError("--out names the input file; give a new file name", path=dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise InputError("the output directory does not exist; create it first", path=dst)
    if dst.is_dir():
        raise InputError("--out is a directory; give a file name", path=dst)
    groups = list(request.optics_groups) if request.optics_groups else None
    shared = request.shared_astigmatism
    if is_cryosparc_file(src):
        if dst.suffix.lower() == ".star":
            raise InputError("the input is a cryoSPARC .cs file; --out must not be a .star", dst)
        return _apply_cs(src, dst, request.mag, shared, groups)
    if dst.suffix.lower() == ".cs":
        raise InputError("the input is a STAR file; --out must not be a .cs file", path=dst)
    try:
        return _apply_star(src, dst, request.mag, shared, groups)
    except InputError as exc:
        if exc.path is None:
            raise InputError(str(exc), path=src) from exc
        raise


def run_apply(
    table: str | os.PathLike[str],
    out: str | os.PathLike[str],
    mag: MagMat,
    *,
    shared_astigmatism: bool = False,
    optics_groups: Sequence[int] | None = None,
) -> ApplySummary:
    """:func:`apply_tables` with the request given as arguments."""
    return apply_tables(
        ApplyRequest(
            table=Path(table),
            out=Path(out),
            mag=mag,
            shared_astigmatism=shared_astigmatism,
            optics_groups=tuple(optics_groups) if optics_groups else None,
        )
    )
