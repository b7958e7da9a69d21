"""``anisoctf aniso detect``: anisotropic magnification from per-micrograph CTF fits.

Input: one micrographs STAR file with CTF results (``micrographs_ctf.star`` from RELION/CTFFIND,
Gctf's ``micrographs_all_gctf.star`` or ``anisoctf estimate``), or CTFFIND ``.txt`` / Gctf
``_gctf.log`` result files, glob patterns and folders of them (e.g. a CtfFind job folder), or a
particle STAR (rows grouped by micrograph: one CTF per micrograph). The
astigmatism of every micrograph is fitted against its defocus
(:func:`anisoctf.magnification.detect.detect_anisomag`); a short summary is printed and,
on request, a JSON record (``--json``) and a plot (``--plot``) are written. The loading and the
detection are the job :mod:`anisoctf.jobs.detect`; this module parses and prints.

When the STAR's optics group already carries ``_rlnMagMat`` (the CTF was fitted with a
magnification matrix, so the defoci are true-frame values), the defoci are first moved back to
the observed frame with that matrix, and the matrix reported is the total one.

Every error ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from anisoctf.cli.errors import usage_exit
from anisoctf.errors import AnisoctfError
from anisoctf.jobs.detect import (
    DEFAULT_BOOTSTRAP,
    AnisoDetection,
    CTFTable,
    DetectRequest,
    format_p,
    run_detect,
)

__all__ = ["detect_command"]


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
        usage_exit(f"--bootstrap must be ≥ 0, got {bootstrap}")
    request = DetectRequest(tuple(inputs or []), group, bootstrap, seed, json_out, plot)
    try:
        outcome = run_detect(request)
    except AnisoctfError as exc:
        usage_exit(str(exc))
    except OSError as exc:
        usage_exit(f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}")
    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for w in outcome.table.warnings:
        err.print(f"warning: {w}", markup=False)
    _print_summary(console, outcome.detection, outcome.table)
    if residuals:
        _print_residuals(console, outcome.detection)
    for what, path in (("JSON", json_out), ("plot", plot)):
        if path is not None:
            console.print(f"{what}: {path}", markup=False)
