"""The ``anisoctf`` command line: a thin typer layer over :mod:`anisoctf.jobs`.

Commands: ``estimate`` (CTF of micrographs), ``simulate`` (micrographs with a known CTF),
``simulate-particles`` and ``refine`` (particles against a reference, :mod:`anisoctf.cli.refine`)
and ``demo`` (simulate three micrographs, estimate them and compare with the truth). Every default
of ``estimate`` comes from :class:`~anisoctf.fit.result.FitSettings` and every default of
``simulate`` from :class:`~anisoctf.simulate.micrograph.MicrographSpec`, so the numbers live in
one place. Option values the jobs reject (e.g. min-res below max-res, no inputs) end with one
line on stderr and exit status 2; typer's own parse errors (an unknown option, text where a
number belongs) print typer's usage message, also with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from anisoctf.cli.aniso import aniso_app
from anisoctf.cli.assign import assign_command
from anisoctf.cli.convert import convert_app
from anisoctf.cli.errors import error_exit, usage_exit
from anisoctf.cli.options import (
    DebugOption,
    MagFromOption,
    QuietOption,
    SchedulerOption,
    SlurmOption,
    mag_matrix_option,
)
from anisoctf.cli.production import (
    RELION_CONTEXT,
    relion_external_command,
    relion_external_refine_command,
    report_command,
)
from anisoctf.cli.refine import refine_command, simulate_particles_command
from anisoctf.errors import AnisoctfError, UsageError
from anisoctf.jobs.cluster import parse_slurm_options
from anisoctf.jobs.demo import (
    DEMO_APIX,
    DEMO_CASES,
    DEMO_KV,
    DEMO_SIZE,
    DEMO_TOLERANCE,
    DemoReport,
    DemoRequest,
    run_demo,
)
from anisoctf.jobs.estimate_batch import STAR_NAME, run_batch
from anisoctf.jobs.inputs import DEFAULT_AMPLITUDE_CONTRAST, DEFAULT_CS_MM
from anisoctf.jobs.process_exit import fast_exit
from anisoctf.jobs.requests import EstimateRequest, FitSettings, LocalSettings, mag_matrix_rows
from anisoctf.jobs.simulate_micrographs import SimulationOptions, run_simulate
from anisoctf.version import __version__

__all__ = ["app", "main"]


app = typer.Typer(
    name="anisoctf",
    help="CTF estimation for cryo-EM micrographs that takes anisotropic magnification "
    "into account.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_FIT = FitSettings()  # the defaults of every fit option
_SIM = SimulationOptions()  # the defaults of every simulation option

def _err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _out_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        print(f"anisoctf {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Show the version and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """CTF estimation for cryo-EM micrographs that takes anisotropic magnification into account."""


# --------------------------------------------------------------------------------------------
# estimate


def _settings(**kwargs) -> FitSettings:
    try:
        return FitSettings(**kwargs)
    except ValueError as exc:
        usage_exit(str(exc))


InputsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="INPUT...",
        help="MRC micrographs and/or glob patterns (quoted), or one RELION micrographs "
        ".star file (e.g. corrected_micrographs.star).",
        show_default=False,
    ),
]
ApixOption = Annotated[
    float | None,
    typer.Option(
        help="Pixel size (Å). Required for MRC files without a plausible header pixel size; "
        "overrides the STAR optics table.",
        show_default=False,
    ),
]
KvOption = Annotated[
    float | None,
    typer.Option(
        help="Voltage (kV). Required for MRC files without an FEI/EPU extended header; "
        "overrides the STAR/.cs optics.",
        show_default=False,
    ),
]
CsOption = Annotated[
    float | None,
    typer.Option(
        help=f"Spherical aberration (mm) [MRC: {DEFAULT_CS_MM:g} when not given, as printed].",
        show_default=False,
    ),
]
AcOption = Annotated[
    float | None,
    typer.Option(
        help=f"Amplitude contrast [MRC: {DEFAULT_AMPLITUDE_CONTRAST:g} when not given, as "
        "printed; .cs without ctf/amp_contrast: 0.1].",
        show_default=False,
    ),
]
NonDwOption = Annotated[
    bool,
    typer.Option(
        "--use-non-dw/--no-use-non-dw",
        help="Fit the non-dose-weighted sums a STAR (_rlnMicrographNameNoDW) or .cs "
        "(micrograph_blob_non_dw/path) lists; the output names the dose-weighted ones.",
    ),
]
AstigRestraintOption = Annotated[
    float | None,
    typer.Option(help="Restrain |U−V| with a Gaussian of this width (Å).", show_default=False),
]
FitApixOption = Annotated[
    float | None,
    typer.Option(help="Fourier-crop to this pixel size (Å) before fitting.", show_default=False),
]
EstimateMagMatrix = mag_matrix_option(
    "Magnification matrix (k_true = M k_obs, RELION's _rlnMagMat) for every "
    "micrograph; overrides a STAR file's _rlnMagMat. Defoci are then true-frame."
)
PatchesOption = Annotated[
    str | None,
    typer.Option(
        metavar="NxM",
        help="Local defocus: N×M overlapping patches (x by y) sharing the astigmatism, a "
        "fitted plane (specimen tilt) plus smooth residual; writes <stem>_surface.json and "
        "<stem>_defocus.png.",
        show_default=False,
    ),
]
TiltOption = Annotated[
    bool,
    typer.Option(
        "--tilt",
        help="Report specimen tilt and tilt axis (local fit, 5x5 patches unless "
        "--patches is given).",
    ),
]
ThicknessOption = Annotated[
    bool,
    typer.Option(
        "--thickness",
        help="Also estimate the sample thickness from the Thon-ring "
        "modulation (implies the local fit).",
    ),
]
ResumeOption = Annotated[
    bool,
    typer.Option(
        "--continue/--overwrite",
        help="Skip micrographs already done with the same parameters (--continue), or "
        "redo them all (--overwrite).",
    ),
]
WatchOption = Annotated[
    float | None,
    typer.Option(
        metavar="SECONDS",
        help="Keep watching the inputs for new micrographs; stop after SECONDS without any.",
        show_default=False,
    ),
]



@app.command()
def estimate(
    inputs: InputsArg = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory (created if needed).")
    ] = Path("anisoctf_ctf"),
    apix: ApixOption = None,
    kv: KvOption = None,
    cs: CsOption = None,
    ac: AcOption = None,
    box: Annotated[int, typer.Option(help="Tile / spectrum size (pixels).")] = _FIT.box,
    min_res: Annotated[float, typer.Option(help="Lowest resolution fitted (Å).")] = _FIT.min_res,
    max_res: Annotated[float, typer.Option(help="Highest resolution fitted (Å).")] = _FIT.max_res,
    df_min: Annotated[float, typer.Option(help="Smallest mean defocus searched (Å).")] = (
        _FIT.df_min
    ),
    df_max: Annotated[float, typer.Option(help="Largest mean defocus searched (Å).")] = (
        _FIT.df_max
    ),
    max_astig: Annotated[
        float, typer.Option(help="Largest astigmatism |U−V| searched (Å).")
    ] = _FIT.max_astig,
    phase_plate: Annotated[
        bool, typer.Option("--phase-plate", help="Also fit a phase shift (Volta phase plate).")
    ] = _FIT.phase_plate,
    astig_restraint: AstigRestraintOption = _FIT.astig_restraint,
    fit_apix: FitApixOption = _FIT.fit_pixel_size,
    mag_matrix: EstimateMagMatrix = None,
    mag_from: MagFromOption = None,
    patches: PatchesOption = None,
    tilt: TiltOption = False,
    thickness: ThicknessOption = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Micrographs processed at once.")] = 1,
    quiet: QuietOption = False,
    debug: DebugOption = False,
    resume: ResumeOption = True,
    watch: WatchOption = None,
    scheduler: SchedulerOption = None,
    use_non_dw: NonDwOption = True,
    slurm: SlurmOption = None,
) -> None:
    """Estimate the CTF of micrographs; write micrographs_ctf.star, <stem>.txt, _ctf.png, .ctf.

    Reruns continue where a previous (interrupted) run stopped. Exit status: 0 all succeeded,
    1 some failed, 2 bad options or inputs (or the output directory is in use), 130 interrupted.
    """
    local = _local_settings(patches, tilt, thickness, box)
    settings = _settings(
        box=box,
        min_res=min_res,
        max_res=max_res,
        df_min=df_min,
        df_max=df_max,
        max_astig=max_astig,
        phase_plate=phase_plate,
        astig_restraint=astig_restraint,
        fit_pixel_size=fit_apix,
    )
    try:
        request = EstimateRequest.of(
            inputs or [],
            out,
            settings,
            apix=apix,
            kv=kv,
            cs=cs,
            ac=ac,
            mag_matrix=mag_matrix_rows(mag_matrix),
            mag_from=None if mag_from is None else str(mag_from),
            jobs=jobs,
            quiet=quiet,
            debug=debug,
            local=local,
            overwrite=not resume,
            watch=watch,
            scheduler=scheduler,
            use_non_dw=use_non_dw,
            cluster=parse_slurm_options(slurm),
        )
        report = run_batch(request, console=_out_console(), err_console=_err_console())
    except UsageError as exc:
        usage_exit(str(exc))
    except KeyboardInterrupt:
        _err_console().print(
            f"interrupted: the finished micrographs are in {out / STAR_NAME}; run the same "
            "command again to finish the rest",
            markup=False,
        )
        raise typer.Exit(130) from None
    raise typer.Exit(report.exit_code)


def _local_settings(
    patches: str | None, tilt: bool, thickness: bool, box: int
) -> LocalSettings | None:
    """``--patches NxM`` / ``--tilt`` / ``--thickness`` as local settings (None: global only)."""
    if patches is None and not tilt and not thickness:
        return None
    grid = (5, 5)
    if patches is not None:
        parts = patches.lower().replace("×", "x").split("x")
        try:
            if len(parts) != 2:
                raise ValueError
            grid = (int(parts[0]), int(parts[1]))
        except ValueError:
            usage_exit(f"--patches must look like 5x5 (columns x rows), got {patches!r}")
    try:
        return LocalSettings(patches=grid, box=box, thickness=thickness)
    except ValueError as exc:
        usage_exit(f"--patches: {exc}")


# --------------------------------------------------------------------------------------------
# simulate


SimulateMagMatrix = mag_matrix_option(
    "Magnification matrix (k_true = M k_obs) [default: identity]."
)


@app.command()
def simulate(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory (created if needed).")
    ] = Path("."),
    prefix: Annotated[str, typer.Option(help="File names are <prefix>_NNN.mrc/.json.")] = (
        "micrograph"
    ),
    n: Annotated[int, typer.Option("--n", help="Number of micrographs.")] = _SIM.n,
    size: Annotated[int, typer.Option(help="Edge length (pixels).")] = _SIM.size,
    apix: Annotated[float, typer.Option(help="Pixel size (Å).")] = _SIM.apix,
    kv: Annotated[float, typer.Option(help="Voltage (kV).")] = _SIM.kv,
    cs: Annotated[float, typer.Option(help="Spherical aberration (mm).")] = _SIM.cs,
    ac: Annotated[float, typer.Option(help="Amplitude contrast.")] = _SIM.ac,
    defocus: Annotated[float, typer.Option(help="Mean defocus (Å).")] = _SIM.defocus,
    df_range: Annotated[
        tuple[float, float] | None,
        typer.Option(
            metavar="MIN MAX",
            help="Draw the mean defocus uniformly from MIN..MAX (Å).",
            show_default=False,
        ),
    ] = None,
    astig: Annotated[float, typer.Option(help="Astigmatism |U−V| (Å).")] = _SIM.astig,
    random_astig: Annotated[
        bool, typer.Option("--random-astig", help="Draw |U−V| uniformly from 0..--astig.")
    ] = _SIM.random_astig,
    angle: Annotated[
        float | None,
        typer.Option(help="Angle of the U axis (deg) [default: random].", show_default=False),
    ] = None,
    phase_shift: Annotated[float, typer.Option(help="Phase shift (deg).")] = _SIM.phase_shift,
    bfactor: Annotated[float, typer.Option(help="Envelope B-factor (Å²).")] = _SIM.bfactor,
    dose: Annotated[float, typer.Option(help="Dose (e/Å²).")] = _SIM.dose,
    snr: Annotated[float, typer.Option(help="Thon-ring signal to shot-noise ratio.")] = _SIM.snr,
    background: Annotated[
        float, typer.Option(help="CTF-free background power (multiple of shot noise).")
    ] = _SIM.background,
    mag_matrix: SimulateMagMatrix = None,
    tilt_angle: Annotated[float, typer.Option(help="Specimen tilt (deg).")] = _SIM.tilt_angle,
    tilt_axis: Annotated[float, typer.Option(help="Tilt-axis angle (deg).")] = _SIM.tilt_axis,
    thickness: Annotated[
        float, typer.Option("--thickness", help="Specimen thickness (Å).")
    ] = _SIM.thickness,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _SIM.seed,
) -> None:
    """Simulate micrographs with a known CTF: <prefix>_NNN.mrc and the truth <prefix>_NNN.json."""
    opts = SimulationOptions(
        n=n,
        size=size,
        apix=apix,
        kv=kv,
        cs=cs,
        ac=ac,
        defocus=defocus,
        df_range=df_range,
        astig=astig,
        random_astig=random_astig,
        angle=angle,
        phase_shift=phase_shift,
        bfactor=bfactor,
        dose=dose,
        snr=snr,
        background=background,
        mag_matrix=mag_matrix,
        tilt_angle=tilt_angle,
        tilt_axis=tilt_axis,
        thickness=thickness,
        seed=seed,
    )
    console = _out_console()

    def written(item) -> None:
        c = item.spec.ctf
        console.print(
            f"{item.mrc}  U {c.defocus_u:.0f} Å  V {c.defocus_v:.0f} Å  angle {c.angle_deg:.1f}°",
            markup=False,
        )

    try:
        run_simulate(opts, out, prefix, on_written=written)
    except UsageError as exc:
        usage_exit(str(exc))
    except (AnisoctfError, OSError) as exc:
        error_exit(exc, 1)


# --------------------------------------------------------------------------------------------
# demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo directory.")] = Path(
        "anisoctf_demo"
    ),
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            help="Micrographs processed at once [default: one per core, at most 3].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Simulate 3 micrographs, estimate their CTF and compare with the truth (PASS/FAIL)."""
    console = _out_console()
    request = DemoRequest(out, jobs)
    console.print(
        f"simulating {len(DEMO_CASES)} micrographs ({DEMO_SIZE}², {DEMO_APIX:g} Å/px, "
        f"{DEMO_KV:g} kV) into {request.micrograph_dir}",
        markup=False,
    )
    try:
        report = run_demo(request, console=console, err_console=_err_console())
    except UsageError as exc:
        usage_exit(str(exc))
    except (AnisoctfError, OSError) as exc:
        error_exit(exc, 1)
    _print_demo(console, request, report)
    raise typer.Exit(0 if report.passed else 1)


def _print_demo(console: Console, request: DemoRequest, report: DemoReport) -> None:
    """The demo's table (estimate vs truth), where its files are, and the verdict."""
    table = Table(title="estimate vs truth (Å, degrees)")
    for col in ("micrograph", "U true", "U est", "ΔU", "V true", "V est", "ΔV", "angle", "Δangle"):
        table.add_column(col, justify="left" if col == "micrograph" else "right")
    for c in report.comparisons:
        if c.failed:
            table.add_row(c.name, f"{c.true_u:.0f}", "failed", "", f"{c.true_v:.0f}")
            continue
        du, dv, da = c.errors
        table.add_row(
            c.name,
            f"{c.true_u:.0f}",
            f"{c.est_u:.0f}",
            f"{du:+.0f}",
            f"{c.true_v:.0f}",
            f"{c.est_v:.0f}",
            f"{dv:+.0f}",
            f"{c.est_angle:.1f}",
            f"{da:+.1f}",
            style="" if c.good else "bold red",
        )
    console.print(table)
    ctf_dir = request.ctf_dir
    console.print(f"micrographs and truth (.json): {request.micrograph_dir}", markup=False)
    console.print(
        f"CTF results: {ctf_dir / STAR_NAME}, <stem>.txt, <stem>_ctf.png, <stem>.ctf in {ctf_dir}",
        markup=False,
    )
    ok = report.passed
    console.print(
        f"{'PASS' if ok else 'FAIL'}: every defocus error {'<' if ok else 'not <'} "
        f"{DEMO_TOLERANCE:.0f} Å",
        markup=False,
    )


app.add_typer(aniso_app, name="aniso")
app.add_typer(convert_app, name="convert")
app.command("assign")(assign_command)
app.command("relion-external", context_settings=RELION_CONTEXT)(relion_external_command)
app.command("relion-external-refine", context_settings=RELION_CONTEXT)(
    relion_external_refine_command
)
app.command("report")(report_command)
app.command("refine")(refine_command)
app.command("simulate-particles")(simulate_particles_command)


def main() -> NoReturn:  # pragma: no cover - the ``anisoctf`` command, ``python -m ...``
    """Run the command line, then end the process without the interpreter's teardown.

    By the time a command returns, every output is written (atomically) and closed; the
    process then ends through :func:`anisoctf.jobs.process_exit.fast_exit` with the command's
    exit status.
    """
    try:
        app()
        status = 0
    except SystemExit as exc:  # typer ends every command with one
        code = exc.code
        if code is None or isinstance(code, int):
            status = int(code or 0)
        else:  # sys.exit("message"): printed, status 1
            print(code, file=sys.stderr)
            status = 1
    fast_exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
