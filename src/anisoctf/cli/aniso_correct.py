"""``anisoctf aniso correct``: resample images into the true frame (registered by ``cli/aniso.py``).

::

    anisoctf aniso correct INPUT... (--mag-matrix M00 M01 M10 M11 | --from-json det.json)
                           --out DIR [--method sinc|fourier|spline|bilinear] [--keep-pixel-size]
                           [--jobs N] [--apix A] [--micrograph-size NX NY] [--project-dir D]

``INPUT`` is MRC files (micrographs, particle stacks; glob patterns are expanded) or one RELION
STAR file (particles or micrographs), whose images are found through ``_rlnImageName`` /
``_rlnMicrographName`` and which is rewritten into ``DIR`` with coordinates, origins, defocus
and pixel sizes in the corrected frame and ``_rlnMagMat`` set to the identity. For a STAR file
whose optics groups already carry ``_rlnMagMat``, the matrix options may be left out. The work is
done by :mod:`anisoctf.jobs.correct_images`; the geometry is in ``docs/correction.md``.

On success one summary line goes to stdout; bad input gives one ``error:`` line on stderr and
exit status 2. Inputs are never modified; every output is written atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from anisoctf.cli.errors import usage_exit
from anisoctf.cli.options import (
    FromJsonOption,
    MagFromOption,
    MagMatrixOption,
    SchedulerOption,
    SlurmOption,
)
from anisoctf.errors import AnisoctfError
from anisoctf.jobs.apply_tables import matrix_from_options
from anisoctf.jobs.cluster import parse_slurm_options
from anisoctf.jobs.correct_images import (
    DEFAULT_METHOD,
    METHODS,
    CorrectRequest,
    CorrectSummary,
    correct_images,
)
from anisoctf.optics.magmat import MagMat

__all__ = ["correct_command"]


def _summary_line(out: Path, s: CorrectSummary, mag: MagMat | None, method: str) -> str:
    what = {"images": "file(s)", "particles": "particle stack(s)", "micrographs": "micrograph(s)"}
    line = f"{out}: {len(s.files)} {what[s.kind]} ({s.n_images} images) corrected with {method}"
    if mag is not None:
        line += (
            f"; anisotropy {mag.anisotropy_percent:.3f} % along {mag.axis_deg:.1f} deg, "
            f"scale {mag.scale:.5f}"
        )
    pix = sorted({round(o, 6) for _, o in s.pixel_sizes})
    if pix:
        line += f"; pixel size {', '.join(f'{p:g}' for p in pix)} A"
    if s.star is not None:
        line += f"; {s.star}: {s.n_rows} rows"
    if s.n_skipped:
        line += f"; {s.n_skipped} file(s) already done by an earlier run (--overwrite redoes them)"
    return line


def _progress(quiet: bool) -> Progress:
    """A progress bar over the files (on a terminal only, and not with --quiet)."""
    err = Console(stderr=True)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    )


def correct_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT...",
            help="MRC micrographs / particle stacks (glob patterns allowed), or one RELION "
            "particles or micrographs STAR file.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (created if needed; never the inputs' own files).",
            show_default=False,
        ),
    ],
    mag_matrix: MagMatrixOption = None,
    from_json: FromJsonOption = None,
    mag_from: MagFromOption = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help=f"Resampling method: {', '.join(METHODS)} (see docs/correction.md).",
        ),
    ] = DEFAULT_METHOD,
    keep_pixel_size: Annotated[
        bool,
        typer.Option(
            "--keep-pixel-size",
            help="Keep the pixel size and resample with the full matrix (its isotropic scale "
            "too). Default: resample with M / sqrt(det M) and write the pixel size "
            "p / sqrt(det M).",
        ),
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Files corrected in parallel.")] = 1,
    apix: Annotated[
        float | None,
        typer.Option(
            "--apix",
            help="Pixel size (A) of the inputs; default from the STAR file or the MRC header.",
            show_default=False,
        ),
    ] = None,
    micrograph_size: Annotated[
        tuple[int, int] | None,
        typer.Option(
            "--micrograph-size",
            metavar="NX NY",
            help="Micrograph size for particle coordinates when the micrographs named in the "
            "STAR file cannot be read.",
            show_default=False,
        ),
    ] = None,
    project_dir: Annotated[
        Path | None,
        typer.Option(
            "--project-dir",
            help="Directory the STAR file's paths are relative to (default: the current one).",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
    scheduler: SchedulerOption = None,
    slurm: SlurmOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--continue/--overwrite",
            help="Skip files a previous (interrupted) run already completed with the same "
            "matrix and settings (--continue), or redo them all (--overwrite).",
        ),
    ] = True,
) -> None:
    """Resample micrographs or particle stacks into the true (corrected) frame.

    Reruns continue where a previous (interrupted, even killed) run stopped. Exit status: 0
    written, 2 bad options or input, or the output directory in use (one line on stderr),
    130 interrupted.
    """
    if sum(x is not None for x in (mag_matrix, from_json, mag_from)) > 1:
        usage_exit(
            "give only one of --mag-matrix M00 M01 M10 M11, --from-json FILE and "
            "--mag-from SOURCE"
        )
    try:
        mag = matrix_from_options(mag_matrix, from_json, mag_from)
        request = CorrectRequest(
            inputs=tuple(inputs),
            out_dir=out,
            mag=mag,
            method=method,
            keep_pixel_size=keep_pixel_size,
            jobs=jobs,
            apix=apix,
            micrograph_size=micrograph_size,
            project_dir=project_dir,
            scheduler=scheduler,
            cluster=parse_slurm_options(slurm),
            resume=resume,
        )
        with _progress(quiet) as bar:
            task = bar.add_task("correcting", total=None)
            request = dataclasses.replace(request, on_file=lambda t, n: bar.advance(task))
            summary = correct_images(request)
    except AnisoctfError as exc:
        usage_exit(str(exc))
    except KeyboardInterrupt:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"interrupted: the finished files are in {out}; run the same command again to "
            "finish the rest",
            markup=False,
        )
        raise typer.Exit(130) from None
    except OSError as exc:
        usage_exit(f"{exc.filename or out}: cannot write ({exc.strerror or exc})")
    if not quiet:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        for w in summary.warnings:
            err.print(f"warning: {w}", markup=False)
        Console(highlight=False, soft_wrap=True).print(
            _summary_line(out, summary, mag, method), markup=False
        )
