"""Production commands: ``anisoctf relion-external`` (a RELION External job) and
``anisoctf report`` (one self-contained HTML page about a CTF output folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["relion_external_command", "relion_external_refine_command", "report_command"]

RELION_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def relion_external_command(
    ctx: typer.Context,
    in_mics: Annotated[
        str,
        typer.Option(
            "--in_mics", help="Micrographs STAR file (RELION's input node).", show_default=False
        ),
    ],
    o: Annotated[
        str, typer.Option("--o", help="The job directory (External/jobNNN/).", show_default=False)
    ],
    j: Annotated[int, typer.Option("--j", help="Micrographs processed at once.")] = 1,
) -> None:
    """Run as a RELION 4/5 External job: --in_mics X.star --o External/jobNNN/ [--label value].

    Writes micrographs_ctf.star into the job directory, RELION_OUTPUT_NODES.star and
    RELION_JOB_EXIT_SUCCESS (or _FAILURE / _ABORTED). Extra '--label value' pairs are
    anisoctf estimate options: apix kv cs ac box min_res max_res df_min df_max max_astig
    astig_restraint fit_apix phase_plate overwrite.
    """
    from anisoctf.jobs.relion_external import run_relion_external

    code = run_relion_external(
        in_mics,
        o,
        jobs=j,
        params=list(ctx.args),
        console=Console(highlight=False, soft_wrap=True),
        err_console=_err(),
    )
    raise typer.Exit(code)


def relion_external_refine_command(
    ctx: typer.Context,
    in_parts: Annotated[
        str,
        typer.Option(
            "--in_parts", help="Particles STAR with 3D poses (RELION's input node).",
            show_default=False,
        ),
    ],
    o: Annotated[
        str, typer.Option("--o", help="The job directory (External/jobNNN/).", show_default=False)
    ],
    in_3dref: Annotated[
        str | None,
        typer.Option("--in_3dref", help="Reference map of the refinement.", show_default=False),
    ] = None,
    in_mask: Annotated[
        str | None, typer.Option("--in_mask", help="Mask for the reference.", show_default=False)
    ] = None,
    j: Annotated[int, typer.Option("--j", help="Threads.")] = 1,
) -> None:
    """Run refine as a RELION 4/5 External job (CtfRefine-like): --in_parts X.star --in_3dref
    MAP --o External/jobNNN/ [--label value].

    Writes particles_ctf_refine.star (true-frame defocus and _rlnMagMat), the per-group JSON
    and PNG, RELION_OUTPUT_NODES.star and RELION_JOB_EXIT_SUCCESS (or _FAILURE / _ABORTED).
    Parameters: fit (defocus,astigmatism,anisomag) min_res max_res rounds defocus_range
    ref_apix.
    """
    from anisoctf.jobs.relion_external_refine import run_relion_external_refine

    code = run_relion_external_refine(
        in_parts, o, in_3dref=in_3dref, in_mask=in_mask, threads=j, params=list(ctx.args),
        err_console=_err(),
    )  # fmt: skip
    raise typer.Exit(code)


def report_command(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Output folder of anisoctf estimate (micrographs_ctf.star, records, PNGs).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="HTML file [default: DIR/report.html].", show_default=False
        ),
    ] = None,
    max_thumbnails: Annotated[
        int, typer.Option(help="Diagnostic thumbnails embedded at most (worst fits first).")
    ] = 400,
) -> None:
    """Write one self-contained HTML report: distributions, astigmatism vs defocus with the
    anisomag fit, a sortable table with thumbnails, and the failures."""
    from anisoctf.cli.errors import usage_exit
    from anisoctf.errors import AnisoctfError
    from anisoctf.jobs.report_job import run_report

    try:
        path = run_report(directory, out, max_thumbnails=max_thumbnails)
    except AnisoctfError as exc:
        usage_exit(exc)
    print(f"report: {path}")
