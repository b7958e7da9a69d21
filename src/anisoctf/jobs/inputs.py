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
from anisoctf.io.star import (
    StarPassthrough,
    read_micrographs_star,
    read_optics_group_names,
    read_passthrough,
)
from anisoctf.jobs.mag_from import assign_matrices, cs_exposure_groups, read_mag_source
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
#: relative difference between --apix and a header pixel size that is warned about
APIX_MISMATCH = 0.02
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
    non_dw
        ``path`` is the non-dose-weighted sum of the micrograph ``name`` names.
    """

    index: int
    path: str
    name: str
    optics_group: int
    stem: str
    error: str | None = None
    stack: bool = False  # a particle stack (pooled periodograms) whatever its suffix
    non_dw: bool = False


@dataclass(frozen=True)
class ResolvedInputs:
    """What the command line resolved to: micrographs, optics and remarks."""

    tasks: list[MicrographTask]
    optics: dict[int, Optics]
    optics_names: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    uids: dict[str, int] = field(default_factory=dict)  # cryoSPARC uid by name (.cs input)
    #: input STAR columns that ``micrographs_ctf.star`` keeps (STAR input only)
    passthrough: StarPassthrough | None = None
    #: where each optics value came from, one line per optics group (printed by the job)
    provenance: list[str] = field(default_factory=list)




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
    star: str,
    apix: float | None,
    kv: float | None,
    cs: float | None,
    ac: float | None,
    use_non_dw: bool = True,
) -> ResolvedInputs:
    entries, optics = read_micrographs_star(star)
    if not entries:
        raise UsageError(f"{star}: lists no micrographs")
    names = read_optics_group_names(star)
    found = "STAR optics table" if optics else None
    if not optics:
        missing = _missing_options(apix, kv, cs, ac)
        if missing:
            raise UsageError(
                f"{star} has no optics table; pass {', '.join(missing)} on the command line"
            )
        optics = {g: _optics(apix, kv, cs, ac) for g in sorted({e.optics_group for e in entries})}
    else:
        optics = _override_optics(optics, apix, kv, cs, ac)
    paths = [
        str(e.path_no_dw if use_non_dw and e.path_no_dw is not None else e.path) for e in entries
    ]
    stems = unique_stems([str(e.path) for e in entries])
    tasks = [
        MicrographTask(
            i, p, e.name, e.optics_group, s, _name_error(e.name), non_dw=p != str(e.path)
        )
        for i, (e, p, s) in enumerate(zip(entries, paths, stems, strict=True))
    ]
    n_dw = sum(e.path_no_dw is not None for e in entries)
    remarks = (
        [f"fitting the non-dose-weighted sums (_rlnMicrographNameNoDW) of {n_dw} micrographs"]
        if use_non_dw and n_dw
        else []
    )
    given = {"voltage": kv, "Cs": cs, "amplitude contrast": ac}
    return ResolvedInputs(
        tasks=tasks,
        optics=optics,
        optics_names=names,
        provenance=remarks + _provenance(optics, apix, given, {k: found for k in given}),
        passthrough=read_passthrough(star),
    )


def _provenance(
    optics: dict[int, Optics],
    apix: float | None,
    given: dict[str, float | None],
    found: dict[str, str | None],
) -> list[str]:
    """One line per optics group: each value and where it came from."""
    lines = []
    for g, o in sorted(optics.items()):
        values = (
            ("pixel size", o.pixel_size, " Å", apix),
            ("voltage", o.voltage_kv, " kV", given["voltage"]),
            ("Cs", o.cs_mm, " mm", given["Cs"]),
            ("amplitude contrast", o.amplitude_contrast, "", given["amplitude contrast"]),
        )
        where = found.get("voltage")
        parts = [
            _source(v, unit, what, opt, found.get(what, where)) for what, v, unit, opt in values
        ]
        lines.append(f"optics group {g}: " + ", ".join(parts))
    return lines


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
    path: str,
    apix: float | None,
    kv: float | None,
    cs: float | None,
    ac: float | None,
    use_non_dw: bool = True,
) -> ResolvedInputs:
    """Micrographs (or particle stacks) and optics of a cryoSPARC exposures/particles file."""
    found = read_cs_micrographs(path, kv=kv, cs=cs, use_non_dw=use_non_dw)
    optics = _override_optics(found.optics, apix, kv, cs, ac)
    paths = [str(m.path) for m in found.micrographs]
    stems = unique_stems([m.name if m.non_dw else str(m.path) for m in found.micrographs])
    tasks = [
        MicrographTask(
            i,
            p,
            m.name,
            m.optics_group,
            s,
            _name_error(m.name),
            found.kind == "particles",
            non_dw=m.non_dw,
        )
        for i, (m, p, s) in enumerate(zip(found.micrographs, paths, stems, strict=True))
    ]
    given = {"voltage": kv, "Cs": cs, "amplitude contrast": ac}
    where: dict[str, str | None] = {
        k: (None if v == "default" else v) for k, v in found.sources.items()
    }
    where["pixel size"] = ".cs psize_A"
    if where.get("amplitude contrast") is None and ac is None:
        where["amplitude contrast"] = "cryoSPARC's default"
    return ResolvedInputs(
        tasks=tasks,
        optics=optics,
        warnings=list(found.notes),
        uids={m.name: m.uid for m in found.micrographs},
        provenance=_provenance(optics, apix, given, where),
    )


def _header_optics(paths: Sequence[str]) -> tuple[list, list[str | None]]:
    """Each path's header (None where unreadable) and its one-line read error."""
    headers: list = []
    errors: list[str | None] = []
    for p in paths:
        try:
            headers.append(read_mrc_header(p))
            errors.append(None)
        except AnisoctfError as exc:  # reported as this micrograph's failure
            headers.append(None)
            errors.append(one_line(str(exc)))
    return headers, errors


def _pixel_and_source(h) -> tuple[float | None, str]:
    """The header's pixel size when it is a measurement (not none, not the 1.0 placeholder):
    the MRC header's own (``cella / mx``, the file's geometry) first, else the FEI/EPU
    metadata's; with where it came from."""
    if h is None:
        return None, ""
    for v, where in ((h.pixel_size, "MRC header"), (h.metadata_pixel_size, "FEI/EPU metadata")):
        if v is not None:
            v = float(f"{v:.6g}")  # the header holds float32: 1.2999999523 means 1.3
            if v > 0 and v != _PLACEHOLDER_PIXEL_SIZE:
                return v, where
    return None, ""


def _usable_pixel(h) -> float | None:
    """The header's plausible pixel size (:func:`_pixel_and_source`), or None."""
    return _pixel_and_source(h)[0]


def _header_pixel(path: str, h) -> float:
    """The pixel size of an MRC header (:func:`_pixel_and_source`), or a UsageError."""
    v = _usable_pixel(h)
    if v is None:
        raise UsageError(
            f"--apix is required: the MRC header of {path} has no usable pixel size "
            f"(none, or the placeholder {_PLACEHOLDER_PIXEL_SIZE:g} Å)"
        )
    return v


def _apix_check(paths: Sequence[str], headers: list, apix: float) -> list[str]:
    """A warning when ``--apix`` differs by more than 2 % from a plausible header pixel size."""
    for p, h in zip(paths, headers, strict=True):
        v = _usable_pixel(h)
        if v is not None and abs(apix / v - 1.0) > APIX_MISMATCH:
            return [
                f"--apix {apix:g} Å differs by {100 * abs(apix / v - 1):.1f} % from the pixel "
                f"size in the header of {p} ({v:.4g} Å); check which one is right"
            ]
    return []


def _no_voltage(path: str) -> UsageError:
    return UsageError(
        f"{path}: no voltage in the file's metadata (no FEI/EPU extended header); pass the "
        "optics with --kv, --cs and --ac (e.g. --kv 300 --cs 2.7 --ac 0.07)"
    )


def _source(value: float, unit: str, what: str, given: float | None, found: str | None) -> str:
    if given is not None:
        return f"{what} {given:g}{unit} (command line)"
    if found is not None:
        return f"{what} {value:g}{unit} ({found})"
    return f"{what} {value:g}{unit} (default; pass --{_OPTION[what]} if not)"


_OPTION = {"pixel size": "apix", "voltage": "kv", "Cs": "cs", "amplitude contrast": "ac"}


def _resolve_mrcs(
    paths: Sequence[str],
    apix: float | None,
    kv: float | None,
    cs: float | None,
    ac: float | None,
) -> ResolvedInputs:
    """Micrographs given as MRC files: pixel size and voltage from the option or the header.

    The voltage comes from ``--kv`` or the FEI/EPU extended header (``HT``); without either
    the inputs are refused (a 200 kV micrograph fitted at 300 kV is 26 % off in defocus with a
    good-looking fit). Cs and amplitude contrast, which no MRC header carries, come from
    ``--cs/--ac`` or the defaults 2.7 mm / 0.07, stated in the optics provenance.
    """
    cs_v = DEFAULT_CS_MM if cs is None else cs
    ac_v = DEFAULT_AMPLITUDE_CONTRAST if ac is None else ac
    headers, errors = _header_optics(paths)
    warnings: list[str] = []
    if apix is not None:
        warnings += _apix_check(paths, headers, apix)
    key_of: dict[tuple[float, float], int] = {}
    optics: dict[int, Optics] = {}
    provenance: list[str] = []
    from_header: list[float] = []
    tasks: list[MicrographTask] = []
    stems = unique_stems(paths)
    for i, (p, h, err, s) in enumerate(zip(paths, headers, errors, stems, strict=True)):
        group = next(iter(key_of.values()), 1)
        if h is not None:
            a = apix if apix is not None else _header_pixel(p, h)
            if apix is None:
                from_header.append(a)
            v = kv if kv is not None else h.voltage_kv
            if v is None:
                raise _no_voltage(p)
            if (a, v) not in key_of:
                key_of[(a, v)] = group = len(key_of) + 1
                optics[group] = _optics(a, v, cs_v, ac_v)
                where = _pixel_and_source(h)[1]
                provenance.append(
                    f"optics group {group}: "
                    + ", ".join(
                        (
                            _source(a, " Å", "pixel size", apix, where),
                            _source(v, " kV", "voltage", kv, "FEI/EPU extended header"),
                            _source(cs_v, " mm", "Cs", cs, None),
                            _source(ac_v, "", "amplitude contrast", ac, None),
                        )
                    )
                )
            group = key_of[(a, v)]
        tasks.append(MicrographTask(i, p, p, group, s, err or _name_error(p)))
    if from_header:
        sizes = ", ".join(f"{v:.4g}" for v in sorted(set(from_header)))
        warnings.append(
            f"no --apix given: using the pixel size from the MRC header ({sizes} Å); "
            "pass --apix if that is wrong"
        )
    if not optics:  # every header unreadable: any group will do, nothing gets written
        optics[1] = _optics(1.0 if apix is None else apix, kv or DEFAULT_VOLTAGE_KV, cs_v, ac_v)
    return ResolvedInputs(tasks=tasks, optics=optics, warnings=warnings, provenance=provenance)


def resolve_inputs(
    inputs: Sequence[str],
    *,
    apix: float | None = None,
    kv: float | None = None,
    cs: float | None = None,
    ac: float | None = None,
    mag_matrix: ArrayLike | None = None,
    use_non_dw: bool = True,
    mag_from: str | os.PathLike[str] | None = None,
) -> ResolvedInputs:
    """Turn the command line's inputs into micrographs with optics.

    Parameters
    ----------
    inputs
        MRC paths and/or glob patterns (expanded, sorted, de-duplicated), one ``.star`` file,
        or one cryoSPARC exposures/particles ``.cs`` file.
    apix, kv, cs, ac
        Optics from the command line. For a STAR or ``.cs`` file they replace the file's
        values. For MRC files ``apix`` falls back to a plausible header pixel size (the MRC
        header's, else the FEI/EPU metadata's) and ``kv`` to the FEI/EPU extended header's
        voltage; without either voltage the inputs are refused. ``cs`` and ``ac`` fall back
        to 2.7 mm and 0.07 (MRC; stated in :attr:`ResolvedInputs.provenance`) and, for
        ``.cs`` files without ``ctf/amp_contrast``, ``ac`` to cryoSPARC's 0.1.
    mag_matrix
        Magnification matrix ``M`` (``k_true = M k_obs``, 2×2) given to every micrograph's
        optics; it replaces the ``_rlnMagMat`` of a STAR file's optics groups. Without it, a
        STAR file's optics groups keep their own matrices (identity when absent) and MRC files
        get the identity. With a matrix the fits, and the defoci written, are true-frame.
    use_non_dw
        Fit the non-dose-weighted sums (``_rlnMicrographNameNoDW``,
        ``micrograph_blob_non_dw/path``) where the input lists them; the names written stay
        the dose-weighted micrographs'.
    mag_from
        A refinement's output whose matrices go to the optics groups
        (:mod:`anisoctf.jobs.mag_from`); not together with ``mag_matrix``.

    Raises
    ------
    UsageError
        No inputs, a STAR file together with other inputs, a pattern that matches nothing,
        missing or invalid optics.
    InputError
        An unreadable STAR file.
    """
    inputs = [str(x) for x in inputs]
    if mag_from is not None and mag_matrix is not None:
        raise UsageError("give only one of --mag-matrix and --mag-from")
    if mag_from is not None:
        resolved = resolve_inputs(inputs, apix=apix, kv=kv, cs=cs, ac=ac, use_non_dw=use_non_dw)
        return with_mag_from(resolved, inputs, mag_from)
    if not inputs:
        raise UsageError("no input micrographs; give MRC files, glob patterns or one .star file")
    css = [x for x in inputs if x.lower().endswith(".cs")]
    if css:
        if len(inputs) > 1:
            raise UsageError("give either one .cs file or MRC files, not both or several")
        return _with_mag_matrix(_resolve_cs(css[0], apix, kv, cs, ac, use_non_dw), mag_matrix)
    stars = [x for x in inputs if x.lower().endswith(".star")]
    if stars:
        if len(inputs) > 1:
            raise UsageError("give either one .star file or MRC files, not both or several")
        resolved = _resolve_star(stars[0], apix, kv, cs, ac, use_non_dw)
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



def with_mag_from(
    resolved: ResolvedInputs, inputs: Sequence[str], source: str | os.PathLike[str]
) -> ResolvedInputs:
    """``resolved`` with each optics group's matrix from ``--mag-from`` ``source``, and a
    provenance line per group (:func:`anisoctf.jobs.mag_from.assign_matrices`)."""
    src = read_mag_source(source)
    exposure: dict[int, int] | None = None
    if len(inputs) == 1 and inputs[0].lower().endswith(".cs"):
        by_name = cs_exposure_groups(inputs[0])
        exposure = {}
        for t in resolved.tasks:
            exposure.setdefault(t.optics_group, by_name.get(t.name, 0))
    elif not (len(inputs) == 1 and inputs[0].lower().endswith(".star")):
        exposure = {}  # MRC files: no optics groups to match
    mats, lines = assign_matrices(
        src,
        [t.optics_group for t in resolved.tasks],
        resolved.optics_names,
        exposure,
        [t.name for t in resolved.tasks],
    )
    optics = {
        g: replace(o, mag_matrix=mats[g].matrix) if g in mats else o
        for g, o in resolved.optics.items()
    }
    return replace(resolved, optics=optics, provenance=[*resolved.provenance, *lines])
