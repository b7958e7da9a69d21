"""cryoSPARC datasets ↔ defocus arrays: the ``.cs`` side of ``aniso apply`` (and its inverse).

A dataset is the structured array of a ``.cs`` file (:func:`~anisoctf.io.cryosparc.read_cs`).
``ctf/df1_A``, ``ctf/df2_A`` and ``ctf/df_angle_rad`` are RELION's DefocusU, DefocusV and
DefocusAngle with the angle in radians; ``ctf/anisomag`` holds ``(M^-1 - I)`` row-major
(conventions and sources in :mod:`anisoctf.magnification.tables`). Every field that is not
rewritten keeps its dtype and bytes.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.errors import InputError
from anisoctf.io import labels as L

__all__ = [
    "anisomag_rows",
    "cryosparc_row_mask",
    "cs_defocus",
    "cs_micrograph_keys",
    "cs_store",
    "refuse_carrying_anisomag",
    "require_cs_defocus",
    "without_anisomag_field",
    "with_anisomag_field",
]

_Arrays3 = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


def cryosparc_row_mask(
    arr: np.ndarray, exposure_groups: Collection[int] | None = None
) -> NDArray[np.bool_]:
    """Rows to rewrite: all, or those whose ``ctf/exp_group_id`` is in ``exposure_groups``."""
    n = int(arr.shape[0])
    if exposure_groups is None:
        return np.ones(n, dtype=bool)
    if L.CS_EXP_GROUP not in (arr.dtype.names or ()):
        raise InputError(
            f"no {L.CS_EXP_GROUP} field, so rows cannot be selected by group; "
            "leave out the group selection"
        )
    groups = arr[L.CS_EXP_GROUP].astype(np.int64)
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
    if L.CS_ANISOMAG in names:
        return arr.copy()
    ref = arr.dtype.fields.get(L.CS_DEFOCUS[0]) if arr.dtype.fields else None
    order = ">" if ref is not None and ref[0].byteorder == ">" else "<"
    new_field = (L.CS_ANISOMAG, np.dtype(f"{order}f4"), (4,))
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


def cs_defocus(arr: np.ndarray, mask: NDArray[np.bool_]) -> _Arrays3:
    u = arr[L.CS_DEFOCUS[0]].astype(np.float64)
    v = arr[L.CS_DEFOCUS[1]].astype(np.float64)
    ang = np.rad2deg(arr[L.CS_DEFOCUS[2]].astype(np.float64))
    for name, values in zip(L.CS_DEFOCUS, (u, v, ang), strict=True):
        bad = np.flatnonzero(mask & ~np.isfinite(values))
        if bad.size:
            raise InputError(f"row {int(bad[0]) + 1}: {name} is not a finite number")
    return u, v, ang


def cs_store(
    out: np.ndarray, mask: NDArray[np.bool_], u: ArrayLike, v: ArrayLike, ang_deg: ArrayLike
) -> None:
    out[L.CS_DEFOCUS[0]][mask] = u
    out[L.CS_DEFOCUS[1]][mask] = v
    out[L.CS_DEFOCUS[2]][mask] = np.deg2rad(np.asarray(ang_deg, dtype=float))


def cs_micrograph_keys(arr: np.ndarray) -> np.ndarray:
    names = arr.dtype.names or ()
    for field in L.CS_MICROGRAPH:
        if field in names:
            return arr[field]
    raise InputError(
        f"shared astigmatism needs {' or '.join(L.CS_MICROGRAPH)} to know which "
        "particles share a micrograph; the dataset has neither (use per-particle astigmatism)"
    )


def require_cs_defocus(arr: np.ndarray) -> None:
    if arr.dtype.names is None or arr.ndim != 1:
        raise InputError("not a cryoSPARC dataset (expected a 1-D structured array)")
    missing = [f for f in L.CS_DEFOCUS if f not in arr.dtype.names]
    if missing:
        raise InputError(
            f"no {', '.join(missing)} field(s) in the dataset; give the .cs file that holds the "
            "CTF (for particles often the job's *_passthrough_particles.cs)"
        )


def anisomag_rows(arr: np.ndarray) -> NDArray[np.float64]:
    """``ctf/anisomag`` of every row as float64, shape ``(n, 4)``."""
    return np.asarray(arr[L.CS_ANISOMAG], dtype=np.float64).reshape(len(arr), -1)


def refuse_carrying_anisomag(arr: np.ndarray, mask: NDArray[np.bool_]) -> None:
    """Rows to rewrite must not carry a non-zero ``ctf/anisomag`` already."""
    if L.CS_ANISOMAG not in (arr.dtype.names or ()):
        return
    am = anisomag_rows(arr)
    carrying = np.flatnonzero(mask & np.any(am != 0.0, axis=1))
    if carrying.size:
        first = am[carrying[0]]
        raise InputError(
            f"{carrying.size} row(s) already carry a non-zero {L.CS_ANISOMAG} "
            f"(row {int(carrying[0]) + 1}: {[float(f'{x:.6g}') for x in first]}); their "
            "defocus values are already in the true frame, so a second matrix is not "
            "applied on top"
        )


def without_anisomag_field(out: np.ndarray) -> np.ndarray:
    """``out`` without ``ctf/anisomag`` when that field is all zeros (else ``out`` itself)."""
    names = out.dtype.names or ()
    if L.CS_ANISOMAG not in names or np.any(out[L.CS_ANISOMAG] != 0.0):
        return out
    kept = [(n, out.dtype.fields[n][0]) for n in names if n != L.CS_ANISOMAG]
    slim = np.zeros(out.shape, dtype=np.dtype(kept))
    for n, _ in kept:
        slim[n] = out[n]
    return slim
