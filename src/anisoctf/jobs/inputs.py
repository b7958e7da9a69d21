"""Input resolution of ``anisoctf estimate``: the command line's inputs as micrographs with optics.

Inputs are MRC files and/or glob patterns, one RELION micrographs STAR file (e.g.
``corrected_micrographs.star``) whose optics table gives the optics of every optics group, or
one cryoSPARC exposures/particles ``.cs`` file. The command line's ``--apix/--kv/--cs/--ac``
override the file's optics; ``--mag-matrix`` replaces every group's ``_rlnMagMat``.

:func:`expand_patterns` is the one glob expander of the jobs (plain paths and glob matches,
de-duplicated by absolute path).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from anisoctf.errors import AnisoctfError, UsageError
from anisoctf.io.cryosparc_ctf import read_cs_micrographs
from anisoctf.io.mrc import read_mrc_header
from anisoctf.io.star import read_micrographs_star, read_optics_group_names
from anisoctf.optics.ctf import Optics
from anisoctf.optics.magmat import MagMat

__all__ = [
    "DEFAULT_AMPLITUDE_CONTRAST",
    "DEFAULT_CS_MM",
    "DEFAULT_VOLTAGE_KV",
    "MicrographTask",
    "ResolvedInputs",
    "expand_patterns",
    "one_line",
    "resolve_inputs",
    "unique_stems",
]

# Defaults for plain MRC inputs: those of :class:`~anisoctf.optics.ctf.Optics`.
_OPTICS_DEFAULTS = Optics(pixel_size=1.0)
DEFAULT_VOLTAGE_KV = _OPTICS_DEFAULTS.voltage_kv
DEFAULT_CS_MM = _OPTICS_DEFAULTS.cs_mm
DEFAULT_AMPLITUDE_CONTRAST = _OPTICS_DEFAULTS.amplitude_contrast

#: header pixel size that is almost always a placeholder rather than a measurement
_PLACEHOLDER_PIXEL_SIZE = 1.0
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class MicrographTask:
    """One micrograph to process.

    Attributes
    ----------
    index
        Position in the input order (rows of the STAR follow it).
    path
        The file to read.
    name
        ``_rlnMicrographName`` to write: the name in the input STAR file, else the path as given.
    optics_group
        Optics group number (key of :attr:`ResolvedInputs.optics`).
    stem
        Base name of the output files (unique within the job).
    error
        A one-line reason when the micrograph is known to fail before any work (e.g. its header
        cannot be read); None otherwise.
    stack
        The file is a stack of particle images (cryoSPARC's ``_particles.mrc``), estimated
        from its pooled periodograms like a ``.mrcs`` file.
    """

    index: int
    path: str
    name: str
    optics_group: int
    stem: str
    error: str | None = None
    stack: bool = False  # a particle stack (pooled periodograms) whatever its suffix


@dataclass(frozen=True)
class ResolvedInputs:
    """What the command line resolved to: micrographs, optics and remarks."""

    tasks: list[MicrographTask]
    optics: dict[int, Optics]
    optics_names: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    uids: dict[str, int] = field(default_factory=dict)  # cryoSPARC uid by name (.cs input)




def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())



def expand_patterns(
    patterns: Sequence[str],
    *,
    sort: bool = True,
    error: type[AnisoctfError] = UsageError,
) -> list[str]:
    """Paths of plain arguments and glob matches, without duplicates.

    A pattern (``*``, ``?`` or ``[``) that is not itself an existing path is expanded with
    :func:`glob.glob` (``**`` recursive); folders among its matches are dropped. Paths are
    de-duplicated by their absolute, case-normalised path, the first occurrence kept.

    Parameters
    ----------
    patterns
        Paths and glob patterns.
    sort
        True: the whole list sorted (``anisoctf estimate``). False: the arguments in the order
        given, each pattern's matches sorted (``anisoctf aniso detect``).
    error
        Exception raised for a pattern that matches nothing.

    Raises
    ------
    AnisoctfError
        ``error``, when a pattern matches no file.
    """
    found: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern) and not Path(pattern).exists():
            matches = [m for m in glob.glob(pattern, recursive=True) if not Path(m).is_dir()]
            if not matches:
                raise error(f"no file matches {pattern!r}; check the pattern")
            found += matches if sort else sorted(matches)
        else:
            found.append(pattern)
    unique: list[str] = []
    seen: set[str] = set()
    for p in sorted(found) if sort else found:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def unique_stems(paths: Sequence[str]) -> list[str]:
    """Output base names: the file stem, prefixed by parent folders where stems collide."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    stems = [Path(p).stem for p in paths]
    for depth in range(1, max((len(x) for x in parts), default=1)):
        counts: dict[str, int] = {}
        for s in stems:
            counts[s] = counts.get(s, 0) + 1
        clashes = [i for i, s in enumerate(stems) if counts[s] > 1]
        if not clashes:
            break
        for i in clashes:
            folders = parts[i][-1 - depth : -1]
            stems[i] = "_".join([*folders, Path(paths[i]).stem])
    return stems


def _missing_options(apix, kv, cs, ac) -> list[str]:
    given = {"--apix": apix, "--kv": kv, "--cs": cs, "--ac": ac}
    return [k for k, v in given.items() if v is None]


def _optics(apix: float, kv: float, cs: float, ac: float, mag=None) -> Optics:
    try:
        if mag is None:
            return Optics(pixel_size=apix, voltage_kv=kv, cs_mm=cs, amplitude_contrast=ac)
        return Optics(
            pixel_size=apix, voltage_kv=kv, cs_mm=cs, amplitude_contrast=ac, mag_matrix=mag
        )
    except ValueError as exc:
        raise UsageError(f"bad optics: {exc}") from None


def _name_error(name: str) -> str | None:
    if not name or any(c.isspace() for c in name):
        return (
            f"{name}: the name contains whitespace, which RELION STAR files cannot hold; "
            "rename the file"
        )
    return None


def _resolve_star(
    star: str, apix: float | None, kv: float | None, cs: float | None, ac: float | None
) -> ResolvedInputs:
    entries, optics = read_micrographs_star(star)
    if not entries:
        raise UsageError(f"{star}: lists no micrographs")
    names = read_optics_group_names(star)
    if not optics:
        missing = _missing_options(apix, kv, cs, ac)
        if missing:
            raise UsageError(
                f"{star} has no optics table; pass {', '.join(missing)} on the command line"
            )
        optics = {g: _optics(apix, kv, cs, ac) for g in sorted({e.optics_group for e in entries})}
    else:
        optics = _override_optics(optics, apix, kv, cs, ac)
    paths = [str(e.path) for e in entries]
    stems = unique_stems(paths)
    tasks = [
        MicrographTask(i, p, e.name, e.optics_group, s, _name_error(e.name))
        for i, (e, p, s) in enumerate(zip(entries, paths, stems, strict=True))
    ]
    return ResolvedInputs(tasks=tasks, optics=optics, optics_names=names)


def _override_optics(
    optics: dict[int, Optics],
    apix: float | None,
    kv: float | None,
    cs: float | None,
    ac: float | None,
) -> dict[int, Optics]:
    """``optics`` with the command line's ``--apix/--kv/--cs/--ac`` (those given) replacing the
    file's values in every group."""
    overrides = {
        k: v
        for k, v in (
            ("pixel_size", apix),
            ("voltage_kv", kv),
            ("cs_mm", cs),
            ("amplitude_contrast", ac),
        )
        if v is not None
    }
    if not overrides:
        return optics
    try:
        return {g: replace(o, **overrides) for g, o in optics.items()}
    except ValueError as exc:
        raise UsageError(f"bad optics: {exc}") from None


def _resolve_cs(
    path: str, apix: float | None, kv: float | None, cs: float | None, ac: float | None
) -> ResolvedInputs:
    """Micrographs (or particle stacks) and optics of a cryoSPARC exposures/particles file."""
    found = read_cs_micrographs(path)
    optics = _override_optics(found.optics, apix, kv, cs, ac)
    paths = [str(m.path) for m in found.micrographs]
    stems = unique_stems(paths)
    tasks = [
        MicrographTask(
            i, p, m.name, m.optics_group, s, _name_error(m.name), found.kind == "particles"
        )
        for i, (m, p, s) in enumerate(zip(found.micrographs, paths, stems, strict=True))
    ]
    return ResolvedInputs(
        tasks=tasks,
        optics=optics,
        warnings=list(found.notes),
        uids={m.name: m.uid for m in found.micrographs},
    )


def _resolve_mrcs(
    paths: Sequence[str],
    apix: float | None,
    kv: float | None,
    cs: float | None,
    ac: float | None,
) -> ResolvedInputs:
    kv = DEFAULT_VOLTAGE_KV if kv is None else kv
    cs = DEFAULT_CS_MM if cs is None else cs
    ac = DEFAULT_AMPLITUDE_CONTRAST if ac is None else ac
    warnings: list[str] = []
    pixel: list[float | None] = []
    errors: list[str | None] = []
    if apix is not None:
        _optics(apix, kv, cs, ac)  # check the values once, before any work
        pixel = [apix] * len(paths)
        errors = [None] * len(paths)
    else:
        no_pixel: list[str] = []
        from_header: list[float] = []
        for p in paths:
            try:
                h = read_mrc_header(p).pixel_size
            except AnisoctfError as exc:  # reported as this micrograph's failure
                pixel.append(None)
                errors.append(one_line(str(exc)))
                continue
            if h is not None:
                h = float(f"{h:.6g}")  # the header holds float32: 1.2999999523 means 1.3
            errors.append(None)
            pixel.append(h)
            if h is None or not h > 0 or h == _PLACEHOLDER_PIXEL_SIZE:
                no_pixel.append(p)
            else:
                from_header.append(h)
        if no_pixel:
            more = f" (and {len(no_pixel) - 1} more)" if len(no_pixel) > 1 else ""
            raise UsageError(
                f"--apix is required: the MRC header of {no_pixel[0]}{more} has no usable "
                f"pixel size (none, or the placeholder {_PLACEHOLDER_PIXEL_SIZE:g} Å)"
            )
        if from_header:
            sizes = ", ".join(f"{v:.4g}" for v in sorted(set(from_header)))
            warnings.append(
                f"no --apix given: using the pixel size from the MRC header ({sizes} Å); "
                "pass --apix if that is wrong"
            )
    # one optics group per distinct pixel size, numbered in order of appearance
    group_of: dict[float, int] = {}
    optics: dict[int, Optics] = {}
    stems = unique_stems(paths)
    tasks: list[MicrographTask] = []
    for i, (p, a, err, s) in enumerate(zip(paths, pixel, errors, stems, strict=True)):
        if a is None:
            group = next(iter(group_of.values()), 1)
        else:
            if a not in group_of:
                group_of[a] = len(group_of) + 1
                optics[group_of[a]] = _optics(a, kv, cs, ac)
            group = group_of[a]
        tasks.append(MicrographTask(i, p, p, group, s, err or _name_error(p)))
    if not optics:  # every header unreadable: any group will do, nothing gets written
        optics[1] = _optics(1.0, kv, cs, ac)
    return ResolvedInputs(tasks=tasks, optics=optics, warnings=warnings)


def resolve_inputs(
    inputs: Sequence[str],
    *,
    apix: float | None = None,
    kv: float | None = None,
    cs: float | None = None,
    ac: float | None = None,
    mag_matrix: ArrayLike | None = None,
) -> ResolvedInputs:
    """Turn the command line's inputs into micrographs with optics.

    Parameters
    ----------
    inputs
        MRC paths and/or glob patterns (expanded, sorted, de-duplicated), one ``.star`` file,
        or one cryoSPARC exposures/particles ``.cs`` file.
    apix, kv, cs, ac
        Optics from the command line. For a STAR file they replace the optics table's values;
        for MRC files ``apix`` falls back to a plausible header pixel size and the others to
        300 kV, 2.7 mm and 0.07.
    mag_matrix
        Magnification matrix ``M`` (``k_true = M k_obs``, 2×2) given to every micrograph's
        optics; it replaces the ``_rlnMagMat`` of a STAR file's optics groups. Without it, a
        STAR file's optics groups keep their own matrices (identity when absent) and MRC files
        get the identity. With a matrix the fits, and the defoci written, are true-frame.

    Raises
    ------
    UsageError
        No inputs, a STAR file together with other inputs, a pattern that matches nothing,
        missing or invalid optics.
    InputError
        An unreadable STAR file.
    """
    inputs = [str(x) for x in inputs]
    if not inputs:
        raise UsageError("no input micrographs; give MRC files, glob patterns or one .star file")
    css = [x for x in inputs if x.lower().endswith(".cs")]
    if css:
        if len(inputs) > 1:
            raise UsageError("give either one .cs file or MRC files, not both or several")
        return _with_mag_matrix(_resolve_cs(css[0], apix, kv, cs, ac), mag_matrix)
    stars = [x for x in inputs if x.lower().endswith(".star")]
    if stars:
        if len(inputs) > 1:
            raise UsageError("give either one .star file or MRC files, not both or several")
        resolved = _resolve_star(stars[0], apix, kv, cs, ac)
    else:
        resolved = _resolve_mrcs(expand_patterns(inputs), apix, kv, cs, ac)
    return _with_mag_matrix(resolved, mag_matrix)


def _with_mag_matrix(resolved: ResolvedInputs, mag_matrix: ArrayLike | None) -> ResolvedInputs:
    """Every optics group of ``resolved`` with ``mag_matrix`` (unchanged when None)."""
    if mag_matrix is None:
        return resolved
    try:
        m = MagMat(np.asarray(mag_matrix, dtype=float).reshape(2, 2))
    except ValueError as exc:
        raise UsageError(f"bad --mag-matrix: {exc}") from None
    optics = {g: replace(o, mag_matrix=m.matrix) for g, o in resolved.optics.items()}
    return replace(resolved, optics=optics)

