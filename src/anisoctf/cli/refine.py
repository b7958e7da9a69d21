"""``anisoctf refine``, ``anisoctf simulate-particles`` and ``anisoctf aniso compare``.

Thin typer layer over :mod:`anisoctf.jobs.refine_particles`,
:mod:`anisoctf.jobs.simulate_particles` and :mod:`anisoctf.jobs.compare`. Bad input ends
with one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from anisoctf.cli.errors import usage_exit
from anisoctf.errors import AnisoctfError
from anisoctf.jobs.requests import ParticleSimSpec, RefineSettings

__all__ = ["compare_command", "refine_command", "simulate_particles_command"]

_SET = RefineSettings()
_SIM = ParticleSimSpec()
_FITS = {"defocus", "anisomag", "astigmatism"}


#: --fsc: RELION CtfRefine's --f, or computed from the half maps
_FscOption = Annotated[
    str | None,
    typer.Option(
        help="Weight frequencies by the reference's FSC, as RELION CtfRefine's --f does: "
        "a RELION postprocess.star, or half-maps to compute it from --half-maps (and "
        "--mask). [no FSC weighting]",
        show_default=False,
    ),
]
#: --match-amplitudes: the reference's radial gain (refine.reference_gain)
_MatchOption = Annotated[
    bool,
    typer.Option(
        "--match-amplitudes/--no-match-amplitudes",
        help="Scale each resolution shell of the prediction to the particles' own "
        "(measured on the data) before the defocus passes, so that a filtered, noisy or "
        "low-resolution reference does not move defocus.",
    ),
]


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def refine_command(
    star: Annotated[Path, typer.Argument(help="Particles STAR file with 3D poses.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    reference: Annotated[
        Path | None, typer.Option(help="Reference map (.mrc).", show_default=False)
    ] = None,
    half_maps: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            metavar="H1 H2",
            help="Two half maps; each particle is compared with the one of its _rlnRandomSubset.",
            show_default=False,
        ),
    ] = None,
    mask: Annotated[
        Path | None, typer.Option(help="Real-space mask for the reference.", show_default=False)
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            help="Comma-separated: defocus (per particle), astigmatism (per micrograph), "
            "anisomag (per optics group)."
        ),
    ] = "defocus,anisomag",
    min_res: Annotated[float, typer.Option(help="Lowest resolution used (Å).")] = _SET.min_res,
    max_res: Annotated[
        float | None,
        typer.Option(help="Highest resolution used (Å) [2.2 pixels].", show_default=False),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of (anisomag, defocus).")] = _SET.rounds,
    mag_iterations: Annotated[
        int, typer.Option(help="Gauss–Newton steps per round.")
    ] = _SET.mag_iterations,
    defocus_range: Annotated[
        float, typer.Option(help="Defocus search ± (Å).")
    ] = _SET.defocus_search,
    defocus_mode: Annotated[
        str,
        typer.Option(
            help="Per-particle defocus: prior (posterior with a learned height prior, and a "
            "standard error per particle in _anisoctfDefocusError), ml (each particle's best "
            "correlation alone), micrograph (one offset per micrograph)."
        ),
    ] = _SET.defocus_mode,
    height_spread: Annotated[
        float | None,
        typer.Option(
            help="Fix the prior's SD of particle heights about their micrograph (Å) "
            "[learned from the data].",
            show_default=False,
        ),
    ] = None,
    micrograph_offsets: Annotated[
        bool,
        typer.Option(
            "--micrograph-offsets/--no-micrograph-offsets",
            help="Let the prior's centre move per micrograph (learned), or keep it at the "
            "input values.",
        ),
    ] = _SET.micrograph_offsets,
    fsc: _FscOption = None,
    match_amplitudes: _MatchOption = _SET.match_amplitudes,
    ref_apix: Annotated[
        float | None,
        typer.Option(help="Reference pixel size (Å) if the header has none.", show_default=False),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--continue/--overwrite",
            help="Take optics groups an earlier (interrupted) run into --out already refined "
            "with the same inputs and settings (--continue), or refine them all (--overwrite).",
        ),
    ] = True,
) -> None:
    """Refine per-particle defocus and the magnification matrix against a reference.

    Writes DIR/particles_ctf_refine.star (true-frame defocus, _rlnMagMat in data_optics, every
    other column unchanged) and DIR/anisomag_group<N>.json/.png per optics group.
    """
    from anisoctf.jobs.refine_particles import run_refine

    items = {f.strip() for f in fit.split(",") if f.strip()}
    unknown = items - _FITS
    if unknown or not items:
        usage_exit(f"--fit takes defocus, astigmatism and/or anisomag, got {fit!r}")
    try:
        settings = RefineSettings(
            fit_anisomag="anisomag" in items,
            fit_defocus="defocus" in items,
            fit_astigmatism="astigmatism" in items,
            min_res=min_res,
            max_res=max_res,
            rounds=rounds,
            mag_iterations=mag_iterations,
            defocus_search=defocus_range,
            defocus_mode=defocus_mode,
            height_spread=height_spread,
            micrograph_offsets=micrograph_offsets,
            match_amplitudes=match_amplitudes,
        )
    except ValueError as exc:
        usage_exit(str(exc))
    con = _out()
    err = Console(stderr=True, highlight=False)
    started = time.perf_counter()
    # a live status line (on a terminal) with the latest step; the steps are printed as well
    status = err.status("refining", spinner="dots") if err.is_terminal and not quiet else None

    def log(message: str) -> None:
        con.print(message, markup=False)
        if status is not None:
            status.update(f"refining: {message}")

    try:
        with status if status is not None else contextlib.nullcontext():
            report = run_refine(
                star,
                out,
                reference=reference,
                half_maps=(str(half_maps[0]), str(half_maps[1])) if half_maps else None,
                mask=mask,
                settings=settings,
                ref_apix=ref_apix,
                log=None if quiet else log,
                resume=resume,
                fsc=fsc,
            )
    except (AnisoctfError, ValueError) as exc:
        usage_exit(str(exc))
    except KeyboardInterrupt:
        err.print(
            f"interrupted: the optics groups already refined are kept in {out}; run the same "
            "command again to finish the rest",
            markup=False,
        )
        raise typer.Exit(130) from None
    for r in report.groups:
        con.print(f"optics group {r.group}: {r.mag.describe()}", markup=False)
    resumed = f" ({len(report.resumed)} from an earlier run)" if report.resumed else ""
    con.print(
        f"wrote {report.out_star}: {sum(r.n_particles for r in report.groups)} particles in "
        f"{len(report.groups)} optics group(s){resumed}, {time.perf_counter() - started:.1f} s",
        markup=False,
    )


def simulate_particles_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    n: Annotated[int, typer.Option("--n", help="Number of particles.")] = _SIM.n,
    box: Annotated[int, typer.Option(help="Box (pixels, even).")] = _SIM.box,
    apix: Annotated[float, typer.Option(help="Pixel size (Å).")] = _SIM.apix,
    kv: Annotated[float, typer.Option(help="Voltage (kV).")] = _SIM.kv,
    cs: Annotated[float, typer.Option(help="Cs (mm).")] = _SIM.cs,
    ac: Annotated[float, typer.Option(help="Amplitude contrast.")] = _SIM.ac,
    anisotropy: Annotated[float, typer.Option(help="Anisotropy (%).")] = _SIM.anisotropy_percent,
    axis: Annotated[float, typer.Option(help="Axis (deg from +x).")] = _SIM.axis_deg,
    micrographs: Annotated[int, typer.Option(help="Number of micrographs.")] = _SIM.n_micrographs,
    df_range: Annotated[
        tuple[float, float], typer.Option(metavar="MIN MAX", help="Mean defocus range (Å).")
    ] = (_SIM.df_min, _SIM.df_max),
    astig: Annotated[float, typer.Option(help="Largest |U−V| per micrograph (Å).")] = (
        _SIM.astig_max
    ),
    height: Annotated[float, typer.Option(help="Per-particle defocus SD (Å).")] = _SIM.height_sigma,
    bfactor: Annotated[float, typer.Option(help="B-factor (Å²).")] = _SIM.bfactor,
    snr: Annotated[float, typer.Option(help="Per-pixel signal/noise variance.")] = _SIM.snr,
    shift: Annotated[float, typer.Option(help="Origin SD (pixels).")] = _SIM.shift_sigma,
    map_path: Annotated[
        Path | None,
        typer.Option("--map", help="Map to project [default: a blob map].", show_default=False),
    ] = None,
    map_apix: Annotated[
        float | None, typer.Option(help="Pixel size of --map (Å).", show_default=False)
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _SIM.seed,
) -> None:
    """Simulate particles with known poses, defocus and magnification matrix (RELION 3.1 STAR)."""
    from anisoctf.jobs.simulate_particles import run_simulate_particles

    try:
        spec = ParticleSimSpec(
            n=n,
            box=box,
            apix=apix,
            kv=kv,
            cs=cs,
            ac=ac,
            anisotropy_percent=anisotropy,
            axis_deg=axis,
            n_micrographs=micrographs,
            df_min=df_range[0],
            df_max=df_range[1],
            astig_max=astig,
            height_sigma=height,
            bfactor=bfactor,
            snr=snr,
            shift_sigma=shift,
            seed=seed,
        )
        files = run_simulate_particles(spec, out, map_path, map_apix)
    except (AnisoctfError, ValueError) as exc:
        usage_exit(str(exc))
    con = _out()
    con.print(
        f"{n} particles in {len(files.stacks)} stacks; {files.sim.spec.mag.describe()}",
        markup=False,
    )
    con.print(
        f"input: {files.star}  truth: {files.truth_star}, {files.truth_json}  "
        f"reference: {files.reference}",
        markup=False,
    )


def compare_command(
    detect_json: Annotated[Path, typer.Argument(help="JSON of 'anisoctf aniso detect --json'.")],
    refine_json: Annotated[Path, typer.Argument(help="anisomag_group<N>.json of 'refine'.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the comparison here.", show_default=False)
    ] = None,
) -> None:
    """Micrograph-based (detect) and particle-based (refine) matrices side by side."""
    from anisoctf.jobs.compare import run_compare

    try:
        cmp = run_compare(detect_json, refine_json, json_out)
    except AnisoctfError as exc:
        usage_exit(str(exc))
    con = _out()
    mi, pa, d = cmp["micrograph"], cmp["particle"], cmp["difference"]
    con.print(f"{'':14s}{'micrographs':>24s}{'particles':>24s}{'difference':>14s}", markup=False)
    con.print(
        f"{'anisotropy %':14s}{mi['anisotropy_percent']:24.4f}"
        f"{pa['anisotropy_percent']:24.4f}{d['anisotropy_percent']:+14.4f}",
        markup=False,
    )
    con.print(
        f"{'axis deg':14s}{mi['axis_deg']:24.2f}{pa['axis_deg']:24.2f}{d['axis_deg']:+14.2f}",
        markup=False,
    )
    for i in range(2):
        a = mi["symmetric_unit"][i]
        b = pa["symmetric_unit"][i]
        con.print(
            f"{'S/sqrt(det) ' + str(i):14s}{a[0]:12.6f}{a[1]:12.6f}{b[0]:12.6f}{b[1]:12.6f}",
            markup=False,
        )
    con.print(
        f"max |element difference| {d['max_abs_element']:.2e}; particle value within the "
        f"micrograph 95 % interval: {cmp['within_micrograph_ci']}",
        markup=False,
    )
