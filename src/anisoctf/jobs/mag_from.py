"""``--mag-from SOURCE``: the refined magnification matrices of a refinement, per optics group.

A source is where a refinement wrote its matrices:

* a RELION STAR file with a ``data_optics`` table (a refined particles STAR of CtfRefine):
  each optics group's ``_rlnMagMat00..11`` (:func:`anisoctf.io.star_optics.from_relion_table`);
* a cryoSPARC particles ``.cs``: ``ctf/anisomag`` per ``ctf/exp_group_id``, converted with
  :func:`anisoctf.optics.magmat.from_cryosparc_anisomag` (``M = (I + anisomag)^-1``);
* a ``refine`` (``anisomag_group<N>.json``) or ``aniso detect`` JSON: its ``mag_matrix``
  (:func:`anisoctf.io.matrix_json.read_mag_matrix_json`), for ``optics_group`` when it says so.

Groups are numbered as RELION numbers optics groups (1, 2, …); cryoSPARC's 0-based exposure
group ``e`` is RELION group ``e + 1`` (the numbering of
:func:`anisoctf.io.cryosparc_ctf.ctf_results_array`, which writes group ``n`` as ``n - 1`` for
consecutive groups). :func:`assign_matrices` gives each micrograph optics group its matrix —
by optics-group name when both sides name every group, else by number — and one line per group
saying which matrix went to which micrographs. A micrograph group that the source has no matrix
for, or a source with several matrices but no group ids, is refused with a one-line
:class:`~anisoctf.errors.UsageError`, unless the source has exactly one matrix, which then goes
to every group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError, UsageError
from anisoctf.io import labels as L
from anisoctf.io.cryosparc import read_cs
from anisoctf.io.matrix_json import mag_matrix_of_document, read_json_document
from anisoctf.io.star_optics import from_relion_table, read_optics_group_names
from anisoctf.io.star_tables import read_star_file
from anisoctf.optics.magmat import MagMat, from_cryosparc_anisomag

__all__ = [
    "MagSource",
    "assign_matrices",
    "cs_exposure_groups",
    "read_mag_source",
    "single_matrix",
]

#: spread of ``ctf/anisomag`` within one exposure group that is still "one matrix"
_SAME = 1e-6


@dataclass(frozen=True)
class MagSource:
    """The matrices of one ``--mag-from`` source.

    Attributes
    ----------
    path
        The file.
    kind
        ``"RELION STAR"``, ``"cryoSPARC .cs"`` or ``"JSON"``.
    matrices
        ``M`` by RELION optics-group number (1-based; cryoSPARC exposure group + 1).
    names
        ``_rlnOpticsGroupName`` by group number (STAR sources that have them).
    grouped
        The group numbers come from the file (False: one matrix with no group id).
    """

    path: Path
    kind: str
    matrices: dict[int, MagMat]
    names: dict[int, str] = field(default_factory=dict)
    grouped: bool = True

    def label(self, group: int) -> str:
        """Where group ``group``'s matrix came from, for the provenance line."""
        if self.kind == "RELION STAR":
            name = f" '{self.names[group]}'" if group in self.names else ""
            return f"_rlnMagMat of optics group {group}{name} in {self.path}"
        if self.kind == "cryoSPARC .cs":
            if not self.grouped:
                return f"ctf/anisomag of {self.path}"
            return f"ctf/anisomag of exp_group_id {group - 1} in {self.path}"
        where = f" (optics group {group})" if self.grouped else ""
        return f"mag_matrix{where} of {self.path}"


def _read_star_source(p: Path) -> MagSource:
    _, blocks = read_star_file(p)
    if "optics" not in blocks:
        raise InputError(
            "has no data_optics table with _rlnMagMat; give a RELION 3.1+ refined particles STAR",
            path=p,
        )
    optics = blocks["optics"]
    if L.MAGMAT[0] not in optics.columns and "_" + L.MAGMAT[0] not in optics.columns:
        raise InputError(
            "its optics table has no _rlnMagMat columns; give the particles STAR that CtfRefine "
            "wrote with --fit_aniso",
            path=p,
        )
    try:
        mats = from_relion_table(optics)
    except ValueError as exc:
        raise InputError(f"{exc}; fix the optics table", path=p) from None
    return MagSource(p, "RELION STAR", mats, read_optics_group_names(p))


def _read_cs_source(p: Path) -> MagSource:
    arr = read_cs(p).array
    names = arr.dtype.names or ()
    if L.CS_ANISOMAG not in names:
        raise InputError(
            "has no ctf/anisomag field; give the particles .cs of a Global CTF Refinement that "
            "fitted anisotropic magnification",
            path=p,
        )
    am = np.asarray(arr[L.CS_ANISOMAG], dtype=float).reshape(len(arr), 4)
    if len(am) == 0:
        raise InputError("holds no particles", path=p)
    groups = np.asarray(arr[L.CS_EXP_GROUP], dtype=np.int64) if L.CS_EXP_GROUP in names else None
    keys = np.zeros(len(am), dtype=np.int64) if groups is None else groups
    mats: dict[int, MagMat] = {}
    for e in np.unique(keys).tolist():
        rows = am[keys == e]
        if np.ptp(rows, axis=0).max() > _SAME:
            if groups is None:
                raise UsageError(
                    f"{p}: the particles carry different ctf/anisomag but no ctf/exp_group_id to "
                    "group them; export the particles with their exposure groups, or pass "
                    "--mag-matrix"
                )
            raise InputError(
                f"exposure group {e}: ctf/anisomag differs between particles; give the output "
                "of one Global CTF Refinement",
                path=p,
            )
        try:
            mats[int(e) + 1] = from_cryosparc_anisomag(rows[0])
        except ValueError as exc:
            raise InputError(f"exposure group {e}: {exc}", path=p) from None
    return MagSource(p, "cryoSPARC .cs", mats, grouped=groups is not None)


def _read_json_source(p: Path) -> MagSource:
    data = read_json_document(p)
    m = mag_matrix_of_document(data, p)
    g = data.get("optics_group")
    if isinstance(g, int) and not isinstance(g, bool) and g >= 1:
        return MagSource(p, "JSON", {g: m})
    return MagSource(p, "JSON", {1: m}, grouped=False)


def read_mag_source(path: str | os.PathLike[str]) -> MagSource:
    """The matrices of a ``--mag-from`` source (kind from the suffix: .star, .cs, .json).

    Raises
    ------
    UsageError
        An unknown suffix, or a ``.cs`` with different matrices and no group ids.
    InputError
        An unreadable file, or one without matrices.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".star":
        return _read_star_source(p)
    if suffix == ".cs":
        return _read_cs_source(p)
    if suffix == ".json":
        return _read_json_source(p)
    raise UsageError(
        f"--mag-from {p}: give a RELION refined particles .star, a cryoSPARC particles .cs or "
        "an anisoctf refine/detect .json"
    )


def cs_exposure_groups(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{micrograph path as listed: cryoSPARC exposure group id}`` of an exposures/particles
    ``.cs`` (``mscope_params/exp_group_id``, else ``ctf/exp_group_id``; empty when neither)."""
    arr = read_cs(path).array
    names = arr.dtype.names or ()
    gcol = next((c for c in ("mscope_params/exp_group_id", L.CS_EXP_GROUP) if c in names), None)
    pcol = next((c for c in ("micrograph_blob/path", "blob/path") if c in names), None)
    if gcol is None or pcol is None:
        return {}
    out: dict[str, int] = {}
    for v, g in zip(arr[pcol], arr[gcol], strict=True):
        name = (v.decode() if isinstance(v, bytes) else str(v)).lstrip(">")
        out.setdefault(name, int(g))
    return out


def single_matrix(path: str | os.PathLike[str]) -> tuple[MagMat, str]:
    """The one matrix of a source (and where it came from), for commands that take one.

    Raises
    ------
    UsageError
        The source holds several different matrices.
    """
    src = read_mag_source(path)
    distinct = {m.matrix for m in src.matrices.values()}
    if len(distinct) > 1:
        raise UsageError(
            f"--mag-from {src.path}: holds {len(src.matrices)} different matrices (optics groups "
            f"{', '.join(str(g) for g in sorted(src.matrices))}); this command takes one: pass "
            "--mag-matrix with the group's _rlnMagMat"
        )
    g = min(src.matrices)
    return src.matrices[g], src.label(g)


def _by_name(src: MagSource, names: Mapping[int, str], groups: Sequence[int]) -> dict[int, int]:
    """Source group of each micrograph group, matched by optics-group name."""
    of_name = {n: g for g, n in src.names.items()}
    out = {}
    for g in groups:
        if names[g] not in of_name:
            raise UsageError(
                f"--mag-from {src.path}: no optics group named '{names[g]}' (micrographs' optics "
                f"group {g}); its groups are {', '.join(sorted(of_name))}: rename the group or "
                "pass --mag-matrix"
            )
        out[g] = of_name[names[g]]
    return out


def _which(g: int, n: int, groups: Sequence[int], names: Sequence[str] | None) -> str:
    """``"12 micrographs: a.mrc, b.mrc, …"`` for group ``g``."""
    if not names:
        return f"{n} micrographs"
    mine = [nm for gg, nm in zip(groups, names, strict=True) if gg == g]
    more = ", …" if len(mine) > 2 else ""
    return f"{n} micrographs: {', '.join(mine[:2])}{more}"


def assign_matrices(
    src: MagSource,
    task_groups: Sequence[int],
    names: Mapping[int, str] | None = None,
    exposure_groups: Mapping[int, int] | None = None,
    task_names: Sequence[str] | None = None,
) -> tuple[dict[int, MagMat], list[str]]:
    """Each micrograph optics group's matrix, and one line per group saying which it got.

    Parameters
    ----------
    src
        The source (:func:`read_mag_source`).
    task_groups
        The optics group of every micrograph (repeats count the micrographs).
    names
        ``_rlnOpticsGroupName`` of the micrographs' groups (STAR inputs); matching is by name
        when these and the source's names cover every group.
    exposure_groups
        cryoSPARC exposure group id of each micrograph optics group (``.cs`` inputs): the
        group matched is ``id + 1``. None: by the micrographs' own group numbers. An empty
        mapping means the micrographs have no meaningful group numbers (plain MRC files).
    task_names
        The micrographs' names, in the order of ``task_groups``: the first two of each group
        are named in its line.

    Raises
    ------
    UsageError
        A group the source has no matrix for (unless it has exactly one matrix).
    """
    counts: dict[int, int] = {}
    for g in task_groups:
        counts[g] = counts.get(g, 0) + 1
    groups = sorted(counts)
    names = dict(names or {})
    one = len(src.matrices) == 1
    if one:
        only = next(iter(src.matrices))
        key = {g: only for g in groups}
        how = "the source's only matrix"
    elif src.names and groups and all(g in names for g in groups):
        key = _by_name(src, names, groups)
        how = "matched by optics-group name"
    elif exposure_groups is not None and not exposure_groups and groups:
        raise UsageError(
            f"--mag-from {src.path}: holds {len(src.matrices)} matrices but MRC inputs have no "
            "optics groups to match; give the micrographs STAR or .cs, or pass --mag-matrix"
        )
    else:
        key = {g: (exposure_groups[g] + 1 if exposure_groups is not None else g) for g in groups}
        how = (
            "matched by exposure group id + 1"
            if exposure_groups is not None
            else "matched by optics-group number"
        )
    out: dict[int, MagMat] = {}
    lines: list[str] = []
    for g in groups:
        k = key[g]
        if k not in src.matrices:
            have = ", ".join(str(x) for x in sorted(src.matrices))
            raise UsageError(
                f"--mag-from {src.path}: no matrix for the micrographs' optics group {g} "
                f"(source groups {have}); pass --mag-matrix or give the refinement of that group"
            )
        m = src.matrices[k]
        out[g] = m
        nm = f" '{names[g]}'" if g in names else ""
        lines.append(
            f"optics group {g}{nm} ({_which(g, counts[g], task_groups, task_names)}): "
            "magnification matrix from "
            f"{src.label(k)}, {how}: {m.describe()}"
        )
    return out, lines
