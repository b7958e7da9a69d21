"""The ``anisoctf aniso detect`` job: anisotropic magnification from per-micrograph CTF fits.

Input: one micrographs STAR file with CTF results (``micrographs_ctf.star`` from RELION/CTFFIND,
Gctf's ``micrographs_all_gctf.star`` or ``anisoctf estimate``), or CTFFIND ``.txt`` / Gctf
``_gctf.log`` result files, glob patterns and folders of them (e.g. a CtfFind job folder).
A particle STAR (``run_data.star``) repeats each micrograph's CTF on every
particle: its rows are grouped by ``_rlnMicrographName`` into one CTF per micrograph (a warning
counts the micrographs whose rows disagree; their median is used). The astigmatism of every
micrograph is fitted against its defocus
(:func:`anisoctf.magnification.detect.detect_anisomag`); on request a JSON record and a plot
are written.

When the STAR's optics group already carries ``_rlnMagMat`` (the CTF was fitted with a
magnification matrix, so the defoci are true-frame values), the defoci are first moved back to
the observed frame with that matrix, and the matrix reported is the total one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io.ctffind import read_ctffind_txt
from anisoctf.io.detection_json import write_detection_json
from anisoctf.io.gctf import read_gctf_log, read_gctf_star
from anisoctf.jobs.inputs import expand_patterns
from anisoctf.magnification.detect import (
    DEFAULT_BOOTSTRAP,
    AnisoDetection,
    detect_anisomag,
    format_p,
)
from anisoctf.magnification.tables import one_ctf_per_micrograph
from anisoctf.optics.frames import defocus_table_to_observed
from anisoctf.optics.magmat import MagMat
from anisoctf.report.detection_plot import plot_detection

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "AnisoDetection",
    "CTFTable",
    "DetectOutcome",
    "DetectRequest",
    "format_p",
    "load_ctf_table",
    "run_detect",
]


@dataclass(frozen=True)
class CTFTable:
    """Observed-frame CTF fits of the micrographs to analyse."""

    names: list[str]
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    angle_deg: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _from_star(path: str, group: int | None) -> CTFTable:
    rows, optics = read_gctf_star(path)
    if not rows:
        raise InputError("lists no micrographs", path=path)
    groups = sorted({r.optics_group for r in rows})
    if group is None:
        if len(groups) > 1:
            raise InputError(
                f"has optics groups {groups}; anisomag belongs to one optics group: choose one "
                "with --group",
                path=path,
            )
        group = groups[0]
    elif group not in groups:
        raise InputError(f"has no micrographs in optics group {group} (groups {groups})", path=path)
    rows = [r for r in rows if r.optics_group == group]
    names = [r.name for r in rows]
    u = np.array([r.defocus_u for r in rows])
    v = np.array([r.defocus_v for r in rows])
    a = np.array([r.defocus_angle for r in rows])
    notes: list[str] = []
    warnings: list[str] = []
    if len(set(names)) < len(names):
        first, (u, v, a), n_disagree = one_ctf_per_micrograph(u, v, a, np.array(names))
        names = [names[i] for i in first.tolist()]
        notes.append(
            f"{len(rows)} rows of {len(names)} micrographs: one CTF per micrograph is analysed"
        )
        if n_disagree:
            warnings.append(
                f"{n_disagree} of {len(names)} micrographs have rows with different CTFs "
                "(per-particle refinement?); each micrograph's median CTF is used"
            )
    o = optics.get(group)
    if o is not None and o.has_anisomag:
        u, v, a = defocus_table_to_observed(u, v, a, o.M)
        notes.append(
            f"the STAR's optics group {group} has a magnification matrix "
            f"({MagMat(o.M).describe()}); its true-frame defoci were moved back to the observed "
            "frame, so the matrix reported is the total one"
        )
    return CTFTable(names, u, v, a, f"{path} (optics group {group})", notes, warnings)


def _from_ctffind(paths: list[str]) -> CTFTable:
    names: list[str] = []
    u: list[float] = []
    v: list[float] = []
    a: list[float] = []
    for p in paths:
        if p.lower().endswith("_gctf.log") or p.lower().endswith(".log"):
            g = read_gctf_log(p)
            names.append(p)
            u.append(g.defocus_u)
            v.append(g.defocus_v)
            a.append(g.angle)
            continue
        records = read_ctffind_txt(p)
        for k, rec in enumerate(records, start=1):
            names.append(p if len(records) == 1 else f"{p}#{k}")
            u.append(rec.defocus_1)
            v.append(rec.defocus_2)
            a.append(rec.azimuth)
    source = paths[0] if len(paths) == 1 else f"{len(paths)} CTFFIND/Gctf files"
    return CTFTable(names, np.array(u), np.array(v), np.array(a), source)


def _result_files(folder: str) -> list[str]:
    """The CTF result files of a folder (recursively): CTFFIND ``.txt`` files (not the
    ``_avrot.txt`` rotational averages) and Gctf ``_gctf.log`` files, sorted."""
    root = Path(folder)
    found = [
        str(f)
        for f in root.rglob("*")
        if f.is_file()
        and (
            (f.suffix == ".txt" and not f.name.endswith("_avrot.txt"))
            or f.name.endswith("_gctf.log")
        )
    ]
    if not found:
        raise InputError(
            "holds no CTFFIND .txt or Gctf _gctf.log files; give the folder of a CTF job",
            path=root,
        )
    return sorted(found)


def load_ctf_table(inputs: list[str], group: int | None = None) -> CTFTable:
    """Read one CTF STAR file (RELION/CTFFIND, Gctf or anisoctf), or CTFFIND ``.txt`` / Gctf
    ``_gctf.log`` files, glob patterns and folders of them.

    Raises
    ------
    InputError
        No input, a STAR file mixed with other inputs, an unreadable file, a pattern that
        matches nothing, several optics groups without ``group``.
    """
    inputs = [str(x) for x in inputs]
    if not inputs:
        raise InputError("no input; give one micrographs_ctf.star or CTFFIND .txt files")
    stars = [x for x in inputs if x.lower().endswith(".star")]
    if stars:
        if len(inputs) > 1:
            raise InputError("give either one .star file or CTFFIND .txt files, not both/several")
        return _from_star(stars[0], group)
    if group is not None:
        raise InputError("--group applies to a STAR file only")
    paths: list[str] = []
    for x in inputs:
        if Path(x).is_dir():
            paths += _result_files(x)
        else:
            paths += expand_patterns([x], sort=False, error=InputError)
    return _from_ctffind(paths)


@dataclass(frozen=True)
class DetectRequest:
    """One ``anisoctf aniso detect`` job.

    Attributes
    ----------
    inputs
        One CTF STAR file, or CTFFIND/Gctf result files, patterns and folders.
    group
        Optics group to analyse (needed when the STAR file has several).
    bootstrap, seed
        Bootstrap resamples for the intervals and their seed.
    json_out, plot
        Where to write the JSON record and the plot (None: not written).
    """

    inputs: tuple[str, ...]
    group: int | None = None
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    json_out: Path | None = None
    plot: Path | None = None


@dataclass(frozen=True)
class DetectOutcome:
    """The table analysed and the detection."""

    table: CTFTable
    detection: AnisoDetection


def run_detect(request: DetectRequest) -> DetectOutcome:
    """Load the CTF table, detect anisotropic magnification, write the JSON and plot asked for.

    Raises
    ------
    AnisoctfError
        Unusable inputs (see :func:`load_ctf_table`) or too few / too similar micrographs.
    OSError
        The JSON or the plot could not be written.
    """
    table = load_ctf_table(list(request.inputs), request.group)
    det = detect_anisomag(
        table.defocus_u,
        table.defocus_v,
        table.angle_deg,
        table.names,
        n_bootstrap=request.bootstrap,
        seed=request.seed,
        notes=table.notes,
    )
    if request.json_out is not None:
        write_detection_json(det, request.json_out)
    if request.plot is not None:
        plot_detection(det, request.plot, title=f"anisotropic magnification: {table.source}")
    return DetectOutcome(table, det)
