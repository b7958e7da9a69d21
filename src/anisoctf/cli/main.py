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

import math
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from anisoctf import __version__
from anisoctf.cli.aniso import aniso_app
from anisoctf.cli.assign import assign_command
from anisoctf.cli.production import RELION_CONTEXT, relion_external_command, report_command
from anisoctf.cli.refine import refine_command, simulate_particles_command
from anisoctf.errors import AnisoctfError
from anisoctf.fit.result import FitSettings
from anisoctf.jobs.estimate_micrographs import (
    DEFAULT_AMPLITUDE_CONTRAST,
    DEFAULT_CS_MM,
    DEFAULT_VOLTAGE_KV,
    STAR_NAME,
    UsageError,
    run_estimate,
)
from anisoctf.jobs.simulate_micrographs import SimulationOptions, run_simulate, write_specs
from anisoctf.local.estimate import LocalSettings
from anisoctf.optics.ctf import CTFParams, Optics
from anisoctf.simulate.micrograph import MicrographSpec

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

#: demo micrographs: (mean defocus Å, astigmatism |U − V| Å, angle of U in degrees)
DEMO_CASES = ((12000.0, 800.0, 25.0), (18000.0, 1500.0, 110.0), (26000.0, 400.0, 155.0))
DEMO_SIZE = 2048
DEMO_APIX = 1.0
DEMO_KV = 300.0
#: the demo passes when every defocus error is below this (Å)
DEMO_TOLERANCE = 100.0


def _err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _out_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _usage_exit(message: str) -> NoReturn:
    _err_console().print(f"error: {' '.join(str(message).split())}", markup=False)
    raise typer.Exit(2)


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
        _usage_exit(str(exc))


@app.command()
def estimate(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="INPUT...",
            help="MRC micrographs and/or glob patterns (quoted), or one RELION micrographs "
            ".star file (e.g. corrected_micrographs.star).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory (created if needed).")
    ] = Path("anisoctf_ctf"),
    apix: Annotated[
        float | None,
        typer.Option(
            help="Pixel size (Å). Required for MRC files without a plausible header pixel size; "
            "overrides the STAR optics table.",
            show_default=False,
        ),
    ] = None,
    kv: Annotated[
        float | None,
        typer.Option(
            help=f"Voltage (kV) [MRC default {DEFAULT_VOLTAGE_KV:g}].", show_default=False
        ),
    ] = None,
    cs: Annotated[
        float | None,
        typer.Option(
            help=f"Spherical aberration (mm) [MRC default {DEFAULT_CS_MM:g}].", show_default=False
        ),
    ] = None,
    ac: Annotated[
        float | None,
        typer.Option(
            help=f"Amplitude contrast [MRC default {DEFAULT_AMPLITUDE_CONTRAST:g}].",
            show_default=False,
        ),
    ] = None,
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
    astig_restraint: Annotated[
        float | None,
        typer.Option(help="Restrain |U−V| with a Gaussian of this width (Å).", show_default=False),
    ] = _FIT.astig_restraint,
    fit_apix: Annotated[
        float | None,
        typer.Option(
            help="Fourier-crop to this pixel size (Å) before fitting.", show_default=False
        ),
    ] = _FIT.fit_pixel_size,
    mag_matrix: Annotated[
        tuple[float, float, float, float] | None,
        typer.Option(
            metavar="M00 M01 M10 M11",
            help="Magnification matrix (k_true = M k_obs, RELION's _rlnMagMat) for every "
            "micrograph; overrides a STAR file's _rlnMagMat. Defoci are then true-frame.",
            show_default=False,
        ),
    ] = None,
    patches: Annotated[
        str | None,
        typer.Option(
            metavar="NxM",
            help="Local defocus: N×M overlapping patches (x by y) sharing the astigmatism, a "
            "fitted plane (specimen tilt) plus smooth residual; writes <stem>_surface.json and "
            "<stem>_defocus.png.",
            show_default=False,
        ),
    ] = None,
    tilt: Annotated[
        bool,
        typer.Option(
            "--tilt",
            help="Report specimen tilt and tilt axis (local fit, 5x5 patches unless "
            "--patches is given).",
        ),
    ] = False,
    thickness: Annotated[
        bool,
        typer.Option(
            "--thickness",
            help="Also estimate the sample thickness from the Thon-ring "
            "modulation (implies the local fit).",
        ),
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Micrographs processed at once.")] = 1,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar, warnings or summary.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of internal errors.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--continue/--overwrite",
            help="Skip micrographs already done with the same parameters (--continue), or "
            "redo them all (--overwrite).",
        ),
    ] = True,
    watch: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Keep watching the inputs for new micrographs; stop after SECONDS without any.",
            show_default=False,
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Run on Dask: a scheduler address (tcp://host:8786) or 'local' for a local "
            "cluster of --jobs workers. Needs pip install 'anisoctf[dask]'.",
            show_default=False,
        ),
    ] = None,
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
        report = run_estimate(
            inputs or [],
            out,
            settings,
            apix=apix,
            kv=kv,
            cs=cs,
            ac=ac,
            mag_matrix=None if mag_matrix is None else [mag_matrix[:2], mag_matrix[2:]],
            jobs=jobs,
            quiet=quiet,
            debug=debug,
            console=_out_console(),
            err_console=_err_console(),
            local=local,
            overwrite=not resume,
            watch=watch,
            scheduler=scheduler,
        )
    except UsageError as exc:
        _usage_exit(str(exc))
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
            _usage_exit(f"--patches must look like 5x5 (columns x rows), got {patches!r}")
    try:
        return LocalSettings(patches=grid, box=box, thickness=thickness)
    except ValueError as exc:
        _usage_exit(f"--patches: {exc}")


# --------------------------------------------------------------------------------------------
# simulate


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
    mag_matrix: Annotated[
        tuple[float, float, float, float] | None,
        typer.Option(
            metavar="M00 M01 M10 M11",
            help="Magnification matrix (k_true = M k_obs) [default: identity].",
            show_default=False,
        ),
    ] = None,
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
        _usage_exit(str(exc))
    except (AnisoctfError, OSError) as exc:
        _err_console().print(f"error: {' '.join(str(exc).split())}", markup=False)
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------------------------
# demo


def _angle_error(a: float, b: float) -> float:
    """Smallest difference of two axis angles (degrees, modulo 180)."""
    d = (a - b) % 180.0
    return d - 180.0 if d > 90.0 else d


def demo_specs() -> list[MicrographSpec]:
    """The demo's micrographs (known defocus, astigmatism and angle)."""
    optics = Optics(pixel_size=DEMO_APIX, voltage_kv=DEMO_KV)
    base = MicrographSpec()
    return [
        MicrographSpec(
            shape=(DEMO_SIZE, DEMO_SIZE),
            optics=optics,
            ctf=CTFParams(df + 0.5 * astig, df - 0.5 * astig, angle, 0.0, base.ctf.bfactor),
            seed=i + 1,
        )
        for i, (df, astig, angle) in enumerate(DEMO_CASES)
    ]


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
    mic_dir, ctf_dir = out / "micrographs", out / "ctf"
    console.print(
        f"simulating {len(DEMO_CASES)} micrographs ({DEMO_SIZE}², {DEMO_APIX:g} Å/px, "
        f"{DEMO_KV:g} kV) into {mic_dir}",
        markup=False,
    )
    try:
        files = write_specs(demo_specs(), mic_dir, prefix="demo")
        report = run_estimate(
            [str(f.mrc) for f in files],
            ctf_dir,
            FitSettings(),
            apix=DEMO_APIX,
            kv=DEMO_KV,
            jobs=jobs if jobs is not None else max(1, min(len(files), os.cpu_count() or 1)),
            console=console,
            err_console=_err_console(),
        )
    except UsageError as exc:
        _usage_exit(str(exc))
    except (AnisoctfError, OSError) as exc:
        _err_console().print(f"error: {' '.join(str(exc).split())}", markup=False)
        raise typer.Exit(1) from None

    by_name = {r.name: r for r in report.results}
    table = Table(title="estimate vs truth (Å, degrees)")
    for col in ("micrograph", "U true", "U est", "ΔU", "V true", "V est", "ΔV", "angle", "Δangle"):
        table.add_column(col, justify="left" if col == "micrograph" else "right")
    ok = report.n_failed == 0
    for f in files:
        c = f.spec.ctf
        r = by_name.get(str(f.mrc))
        if r is None:
            table.add_row(f.mrc.name, f"{c.defocus_u:.0f}", "failed", "", f"{c.defocus_v:.0f}")
            ok = False
            continue
        du = r.row.defocus_u - c.defocus_u
        dv = r.row.defocus_v - c.defocus_v
        da = _angle_error(r.row.defocus_angle, c.angle_deg)
        good = max(abs(du), abs(dv)) < DEMO_TOLERANCE
        ok = ok and good and math.isfinite(du) and math.isfinite(dv)
        style = "" if good else "bold red"
        table.add_row(
            f.mrc.name,
            f"{c.defocus_u:.0f}",
            f"{r.row.defocus_u:.0f}",
            f"{du:+.0f}",
            f"{c.defocus_v:.0f}",
            f"{r.row.defocus_v:.0f}",
            f"{dv:+.0f}",
            f"{r.row.defocus_angle:.1f}",
            f"{da:+.1f}",
            style=style,
        )
    console.print(table)
    console.print(f"micrographs and truth (.json): {mic_dir}", markup=False)
    console.print(
        f"CTF results: {ctf_dir / STAR_NAME}, <stem>.txt, <stem>_ctf.png, <stem>.ctf in {ctf_dir}",
        markup=False,
    )
    verdict = "PASS" if ok else "FAIL"
    console.print(
        f"{verdict}: every defocus error {'<' if ok else 'not <'} {DEMO_TOLERANCE:.0f} Å",
        markup=False,
    )
    raise typer.Exit(0 if ok else 1)


app.add_typer(aniso_app, name="aniso")
app.command("assign")(assign_command)
app.command("relion-external", context_settings=RELION_CONTEXT)(relion_external_command)
app.command("report")(report_command)
app.command("refine")(refine_command)
app.command("simulate-particles")(simulate_particles_command)


def main() -> NoReturn:  # pragma: no cover - the ``anisoctf`` command, ``python -m ...``
    """Run the command line, then end the process without the interpreter's teardown.

    By the time a command returns, every output is written (atomically) and closed. What Python
    would still do is free every module and array one by one, 0.1–0.2 s per process here, as
    long as a fifth of a 4096² micrograph's whole estimate; so the exit handlers run
    (``atexit``: logging, multiprocessing, temporary directories), the streams are flushed and
    the process ends with the command's exit status.
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
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
