"""``anisoctf convert``: the magnification matrix and optics-group numbers in other tools' forms.

Each form is written in its tool's own convention (the converters and their sources are in
:mod:`anisoctf.optics.magmat`; ``docs/anisomag.md`` has the details):

========== ============================================ ====================================
form       numbers                                      ``M`` (``k_true = M k_obs``)
========== ============================================ ====================================
relion     ``_rlnMagMat00 01 10 11``                    the same four numbers
cryosparc  ``ctf/anisomag`` (4, row-major, ``A - I``)   ``M = (I + anisomag)^-1``
cistem     ``angle major minor`` (mag_distortion_…)     ``R^T diag(1/major, 1/minor) R``
motioncor2 ``-Mag major minor angle``                   as cisTEM
========== ============================================ ====================================

Optics groups: RELION's ``_rlnOpticsGroup`` counts from 1, cryoSPARC's ``ctf/exp_group_id``
from 0; group ``n`` is exposure group ``n - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anisoctf.errors import UsageError
from anisoctf.jobs.mag_from import read_mag_source
from anisoctf.optics.magmat import (
    MagMat,
    from_cistem,
    from_cryosparc_anisomag,
    from_motioncor2,
    from_relion,
    to_cistem,
    to_cryosparc_anisomag,
    to_motioncor2,
    to_relion,
)

__all__ = [
    "FORMS",
    "cryosparc_group",
    "mag_forms",
    "mag_forms_text",
    "matrix_from_form",
    "relion_group",
    "source_forms_text",
]

#: the forms ``convert mag`` reads and writes, with the order of their numbers
FORMS: dict[str, str] = {
    "relion": "M00 M01 M10 M11",
    "cryosparc": "a00 a01 a10 a11 (ctf/anisomag)",
    "cistem": "ANGLE MAJOR MINOR",
    "motioncor2": "MAJOR MINOR ANGLE",
}
_COUNT = {"relion": 4, "cryosparc": 4, "cistem": 3, "motioncor2": 3}


def matrix_from_form(form: str, values: Sequence[float]) -> MagMat:
    """``M`` from the numbers of one form (:data:`FORMS`).

    Raises
    ------
    UsageError
        An unknown form, the wrong count of numbers, or numbers that are no valid matrix.
    """
    form = form.lower()
    if form not in FORMS:
        raise UsageError(f"unknown form {form!r}; use one of {', '.join(FORMS)}")
    v = [float(x) for x in values]
    if len(v) != _COUNT[form]:
        raise UsageError(f"--{form} takes {_COUNT[form]} numbers ({FORMS[form]}), got {len(v)}")
    try:
        if form == "relion":
            return from_relion(*v)
        if form == "cryosparc":
            return from_cryosparc_anisomag(v)
        if form == "cistem":
            return from_cistem(v[0], v[1], v[2])
        return from_motioncor2(v[0], v[1], v[2])
    except ValueError as exc:
        raise UsageError(f"--{form} {' '.join(f'{x:g}' for x in v)}: {exc}") from None


def mag_forms(m: MagMat) -> dict[str, Any]:
    """Every form of ``m``; cisTEM/MotionCor2 are None (with a reason) when ``M`` has a
    rotation they cannot express."""
    out: dict[str, Any] = {
        "relion": list(to_relion(m).values()),
        "cryosparc": [float(x) for x in to_cryosparc_anisomag(m)],
    }
    try:
        out["cistem"] = list(to_cistem(m))
        out["motioncor2"] = list(to_motioncor2(m))
    except ValueError as exc:
        out["cistem"] = out["motioncor2"] = None
        out["note"] = str(exc)
    return out


def mag_forms_text(m: MagMat) -> list[str]:
    """One line per form (and the matrix's description)."""
    f = mag_forms(m)
    lines = [m.describe()]
    lines.append("relion      _rlnMagMat00..11  " + " ".join(f"{x:.8g}" for x in f["relion"]))
    lines.append("cryosparc   ctf/anisomag      " + " ".join(f"{x:.8g}" for x in f["cryosparc"]))
    if f["cistem"] is None:
        lines.append(f"cistem/motioncor2: not expressible ({f['note']})")
    else:
        a, ma, mi = f["cistem"]
        lines.append(f"cistem      angle major minor {a:.6g} {ma:.8g} {mi:.8g}")
        lines.append(f"motioncor2  -Mag {ma:.8g} {mi:.8g} {a:.6g}")
    return lines


def source_forms_text(path: str) -> list[str]:
    """:func:`mag_forms_text` of every matrix of a ``--mag-from`` source, per group."""
    src = read_mag_source(path)
    lines: list[str] = []
    for g in sorted(src.matrices):
        lines.append(f"# {src.label(g)}")
        lines += mag_forms_text(src.matrices[g])
    return lines


def cryosparc_group(relion_group: int) -> int:
    """cryoSPARC ``ctf/exp_group_id`` (0-based) of RELION optics group ``relion_group`` (>= 1)."""
    if relion_group < 1:
        raise UsageError(f"RELION optics groups count from 1, got {relion_group}")
    return relion_group - 1


def relion_group(exp_group_id: int) -> int:
    """RELION ``_rlnOpticsGroup`` (1-based) of cryoSPARC ``ctf/exp_group_id`` (>= 0)."""
    if exp_group_id < 0:
        raise UsageError(f"cryoSPARC exposure groups count from 0, got {exp_group_id}")
    return exp_group_id + 1
