"""``anisoctf aniso detect``: anisotropic magnification from per-micrograph CTF fits.

Input: one micrographs STAR file with CTF results (``micrographs_ctf.star`` from RELION/CTFFIND,
Gctf's ``micrographs_all_gctf.star`` or ``anisoctf estimate``), or CTFFIND ``.txt`` / Gctf
``_gctf.log`` result files, glob patterns and folders of them (e.g. a CtfFind job folder). The
astigmatism of every micrograph is fitted against its defocus
(:func:`anisoctf.magnification.detect.detect_anisomag`); a short summary is printed and,
on request, a JSON record (``--json``) and a plot (``--plot``) are written.

When the STAR's optics group already carries ``_rlnMagMat`` (the CTF was fitted with a
magnification matrix, so the defoci are true-frame values), the defoci are first moved back to
the observed frame with that matrix, and the matrix reported is the total one.

Every error ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from anisoctf.errors import AnisoctfError, InputError
from anisoctf.io.ctffind import read_ctffind_txt
from anisoctf.io.detection_json import write_detection_json
from anisoctf.io.gctf import read_gctf_log, read_gctf_star
from anisoctf.magnification.detect import (
    DEFAULT_BOOTSTRAP,
    AnisoDetection,
    detect_anisomag,
    format_p,
)
from anisoctf.optics.frames import defocus_table_to_observed
from anisoctf.optics.magmat import MagMat
from anisoctf.report.detection_plot import plot_detection

__all__ = ["CTFTable", "detect_command", "load_ctf_table"]

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class CTFTable:
    """Observed-frame CTF fits of the micrographs to analyse."""

    names: list[str]
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    angle_deg: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)


def _expand(patterns: list[str]) -> list[str]:
    """Plain paths and the sorted matches of glob patterns (duplicates removed)."""
    out: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern) and not Path(pattern).exists():
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"no file matches {pattern!r}; check the pattern")
            out += matches
        else:
            out.append(pattern)
    seen: set[str] = set()
    unique = []
    for p in out:
        key = str(Path(p).absolute())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


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
    o = optics.get(group)
    if o is not None and o.has_anisomag:
        u, v, a = defocus_table_to_observed(u, v, a, o.M)
        notes.append(
            f"the STAR's optics group {group} has a magnification matrix "
            f"({MagMat(o.M).describe()}); its true-frame defoci were moved back to the observed "
            "frame, so the matrix reported is the total one"
        )
    return CTFTable(names, u, v, a, f"{path} (optics group {group})", notes)


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
        paths += _result_files(x) if Path(x).is_dir() else _expand([x])
    return _from_ctffind(paths)


def _err_exit(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"error: {' '.join(str(message).split())}", markup=False
    )
    raise typer.Exit(2)


def _interval(lo: float, hi: float, digits: int, pct: str) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "(no bootstrap interval)"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}] ({pct})"


def _print_summary(console: Console, det: AnisoDetection, table: CTFTable) -> None:
    m = det.mag_matrix.matrix
    pct = f"{100 * det.confidence:.0f} % CI"
    t = Table(title=Text(f"anisotropic magnification: {table.source}"), show_header=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("matrix M (k_true = M k_obs)", f"[[{m[0][0]:.6f}, {m[0][1]:.6f}],"),
        ("", f" [{m[1][0]:.6f}, {m[1][1]:.6f}]]"),
        (
            "anisotropy",
            f"{det.anisotropy_percent:.3f} %  {_interval(*det.anisotropy_ci, 3, pct)}",
        ),
        ("axis", f"{det.axis_deg:.1f}°  {_interval(*det.axis_ci, 1, pct)}"),
        (
            "real astigmatism",
            f"{det.real_astigmatism:.0f} Å at {det.real_astigmatism_angle:.1f}° "
            f"(scatter {det.astigmatism_scatter:.0f} Å per component)",
        ),
    ]
    for key, value in rows:
        t.add_row(key, Text(value))  # Text: no markup in numbers or names
    verdict = Text("yes", style="bold green") if det.significant else Text("no", style="bold")
    test = f"Wald p {format_p(det.p_value)}; threshold {det.p_threshold:g}"
    t.add_row("significant", Text.assemble(verdict, f" ({test})"))
    t.add_row(
        "micrographs",
        Text(
            f"{det.n_used} used, {det.n_rejected} rejected; mean defocus "
            f"{det.defocus_range[0]:.0f}–{det.defocus_range[1]:.0f} Å"
        ),
    )
    console.print(t)
    for name in det.rejected:
        console.print(f"rejected: {name}", markup=False)
    for note in det.notes:
        console.print(f"note: {note}", markup=False)
    if det.significant:
        args = " ".join(f"{x:.6f}" for row in m for x in row)
        console.print(f"use it with: anisoctf estimate ... --mag-matrix {args}", markup=False)


def _print_residuals(console: Console, det: AnisoDetection) -> None:
    t = Table(title="astigmatism: observed vs predicted (observed frame, Å / degrees)")
    for col in ("micrograph", "defocus", "U−V obs", "angle obs", "U−V fit", "angle fit", "resid"):
        if col == "micrograph":
            t.add_column(col, overflow="fold")
        else:
            t.add_column(col, justify="right", no_wrap=True)
    for r in det.residuals:
        ou, oa = r.observed_astigmatism
        pu, pa = r.predicted_astigmatism
        t.add_row(
            Text(r.name),
            f"{r.mean_defocus:.0f}",
            f"{ou:.0f}",
            f"{oa:.1f}",
            f"{pu:.0f}",
            f"{pa:.1f}",
            f"{r.residual:.0f}" + (" rejected" if r.rejected else ""),
            style="red" if r.rejected else "",
        )
    console.print(t)


def detect_command(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="INPUT...",
            help="One micrographs_ctf.star (RELION/CTFFIND, Gctf, anisoctf), or CTFFIND .txt / "
            "Gctf _gctf.log files, glob patterns (quoted) and folders of them.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the result as JSON to this file.", show_default=False),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Write the astigmatism-vs-defocus plot (PNG).", show_default=False
        ),
    ] = None,
    group: Annotated[
        int | None,
        typer.Option(
            "--group",
            help="Optics group to analyse (needed when the STAR file has several).",
            show_default=False,
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap resamples for the intervals.")
    ] = DEFAULT_BOOTSTRAP,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    residuals: Annotated[
        bool, typer.Option("--residuals", help="Also print the per-micrograph table.")
    ] = False,
) -> None:
    """Detect anisotropic magnification from the astigmatism of many micrographs' CTF fits.

    Astigmatism that grows linearly with defocus along a fixed axis is anisomag. Needs at
    least 6 micrographs (better 20+) spread over a range of defocus (e.g. 0.5–3 µm), fitted
    without a magnification matrix. Exit status: 0 done (significant or not), 2 bad input.
    """
    if bootstrap < 0:
        _err_exit(f"--bootstrap must be ≥ 0, got {bootstrap}")
    try:
        table = load_ctf_table(inputs or [], group)
        det = detect_anisomag(
            table.defocus_u,
            table.defocus_v,
            table.angle_deg,
            table.names,
            n_bootstrap=bootstrap,
            seed=seed,
            notes=table.notes,
        )
        if json_out is not None:
            write_detection_json(det, json_out)
        if plot is not None:
            plot_detection(det, plot, title=f"anisotropic magnification: {table.source}")
    except AnisoctfError as exc:
        _err_exit(str(exc))
    except OSError as exc:
        _err_exit(f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}")
    console = Console(highlight=False, soft_wrap=True)
    _print_summary(console, det, table)
    if residuals:
        _print_residuals(console, det)
    for what, path in (("JSON", json_out), ("plot", plot)):
        if path is not None:
            console.print(f"{what}: {path}", markup=False)
