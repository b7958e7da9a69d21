"""The job behind ``anisoctf simulate``: micrographs with a known CTF, and their truth.

For each of ``n`` micrographs it writes ``<prefix>_NNN.mrc`` (float32, pixel size in the
header) and ``<prefix>_NNN.json`` (the truth, :meth:`MicrographSpec.to_json`), both atomically.
Random choices (defocus from a range, astigmatism, angle) and the noise of micrograph ``i``
depend only on ``seed`` and ``i``, so the first micrographs do not change when ``n`` grows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anisoctf.errors import UsageError
from anisoctf.io.atomic import write_text_atomic
from anisoctf.io.mrc import write_mrc
from anisoctf.jobs.requests import mag_matrix_rows
from anisoctf.optics.ctf import CTFParams, Optics
from anisoctf.simulate.micrograph import MicrographSpec, simulate_micrograph

__all__ = ["SimulatedFile", "SimulationOptions", "make_specs", "run_simulate", "write_specs"]

_SPEC = MicrographSpec()  # the simulator's defaults, read once


@dataclass(frozen=True)
class SimulationOptions:
    """What ``anisoctf simulate`` makes (defaults are those of :class:`MicrographSpec`).

    Parameters
    ----------
    n
        Number of micrographs.
    size
        Edge length in pixels (square images).
    apix, kv, cs, ac
        Pixel size (Å), voltage (kV), Cs (mm), amplitude contrast.
    defocus
        Mean defocus (Å) when ``df_range`` is None.
    df_range
        (min, max) Å: mean defocus drawn uniformly per micrograph.
    astig
        Astigmatism |U − V| (Å); with ``random_astig`` the upper end of a uniform draw.
    random_astig
        Draw the astigmatism uniformly from 0 .. ``astig``.
    angle
        Angle of the U axis (degrees); None draws it uniformly from [0, 180).
    phase_shift
        Phase-plate phase shift (degrees).
    bfactor, dose, snr, background
        Envelope B-factor (Å²), dose (e/Å²), Thon-ring SNR, background power.
    mag_matrix
        (M00, M01, M10, M11) of the magnification matrix; None for identity.
    tilt_angle, tilt_axis
        Specimen tilt and tilt-axis angle (degrees).
    thickness
        Specimen thickness (Å); 0 for a thin specimen.
    seed
        Random seed.
    """

    n: int = 1
    size: int = _SPEC.shape[1]
    apix: float = _SPEC.optics.pixel_size
    kv: float = _SPEC.optics.voltage_kv
    cs: float = _SPEC.optics.cs_mm
    ac: float = _SPEC.optics.amplitude_contrast
    defocus: float = _SPEC.ctf.mean_defocus
    df_range: tuple[float, float] | None = None
    astig: float = _SPEC.ctf.astigmatism
    random_astig: bool = False
    angle: float | None = None
    phase_shift: float = _SPEC.ctf.phase_shift_deg
    bfactor: float = _SPEC.ctf.bfactor
    dose: float = _SPEC.dose
    snr: float = _SPEC.snr
    background: float = _SPEC.background
    mag_matrix: tuple[float, float, float, float] | None = None
    tilt_angle: float = _SPEC.tilt_angle_deg
    tilt_axis: float = _SPEC.tilt_axis_deg
    thickness: float = _SPEC.thickness
    seed: int = _SPEC.seed


@dataclass(frozen=True)
class SimulatedFile:
    """One written micrograph: its MRC and truth files and the spec."""

    mrc: Path
    truth: Path
    spec: MicrographSpec


def _check(opts: SimulationOptions) -> None:
    """Raise UsageError for options no simulation can use."""
    if opts.n < 1:
        raise UsageError(f"--n must be at least 1, got {opts.n}")
    if opts.size < 64 or opts.size % 2:
        raise UsageError(f"--size must be an even number of pixels ≥ 64, got {opts.size}")
    if opts.astig < 0:
        raise UsageError(f"--astig must be ≥ 0 Å, got {opts.astig}")
    low = opts.df_range[0] if opts.df_range is not None else opts.defocus
    if opts.df_range is not None and not 0 < opts.df_range[0] <= opts.df_range[1]:
        raise UsageError(f"--df-range needs 0 < MIN ≤ MAX, got {opts.df_range}")
    if low - 0.5 * opts.astig <= 0:
        raise UsageError(
            f"defocus {low:g} Å minus half the astigmatism ({0.5 * opts.astig:g} Å) must stay "
            "positive (underfocus)"
        )
    for label, value in (("--dose", opts.dose), ("--snr", opts.snr)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{label} must be a positive number, got {value}")
    if not (math.isfinite(opts.background) and opts.background >= 0):
        raise UsageError(f"--background must be ≥ 0, got {opts.background}")
    if not 0 <= opts.thickness <= 10000:
        raise UsageError(f"--thickness must be between 0 and 10000 Å, got {opts.thickness}")
    if not abs(opts.tilt_angle) < 80:
        raise UsageError(f"--tilt-angle must be within ±80°, got {opts.tilt_angle}")


def make_specs(opts: SimulationOptions) -> list[MicrographSpec]:
    """The spec of every micrograph (random draws per micrograph from ``seed`` and its index).

    Raises
    ------
    UsageError
        Options no simulation can use (e.g. negative defocus, bad optics).
    """
    _check(opts)
    mag = mag_matrix_rows(opts.mag_matrix) or ((1.0, 0.0), (0.0, 1.0))
    try:
        optics = Optics(
            pixel_size=opts.apix,
            voltage_kv=opts.kv,
            cs_mm=opts.cs,
            amplitude_contrast=opts.ac,
            mag_matrix=mag,
        )
    except ValueError as exc:
        raise UsageError(f"bad optics: {exc}") from None
    specs = []
    for i in range(opts.n):
        seq = np.random.SeedSequence([int(opts.seed) & 0xFFFFFFFF, i])
        rng = np.random.default_rng(seq)
        mean = opts.defocus if opts.df_range is None else float(rng.uniform(*opts.df_range))
        astig = float(rng.uniform(0.0, opts.astig)) if opts.random_astig else float(opts.astig)
        angle = float(rng.uniform(0.0, 180.0)) if opts.angle is None else float(opts.angle)
        ctf = CTFParams(
            defocus_u=mean + 0.5 * astig,
            defocus_v=mean - 0.5 * astig,
            angle_deg=angle,
            phase_shift_deg=float(opts.phase_shift),
            bfactor=float(opts.bfactor),
        )
        specs.append(
            MicrographSpec(
                shape=(opts.size, opts.size),
                optics=optics,
                ctf=ctf,
                dose=opts.dose,
                snr=opts.snr,
                background=opts.background,
                tilt_angle_deg=opts.tilt_angle,
                tilt_axis_deg=opts.tilt_axis,
                thickness=opts.thickness,
                seed=int(seq.generate_state(1)[0]),
            )
        )
    return specs


def run_simulate(
    opts: SimulationOptions,
    out_dir: str | os.PathLike[str],
    prefix: str = "micrograph",
    on_written: Callable[[SimulatedFile], None] | None = None,
) -> list[SimulatedFile]:
    """Simulate and write the micrographs.

    Parameters
    ----------
    opts
        What to simulate.
    out_dir
        Output directory (created if needed).
    prefix
        File names are ``<prefix>_NNN.mrc`` / ``.json``, numbered from 001.
    on_written
        Called after each micrograph is written (e.g. for progress output).

    Returns
    -------
    list[SimulatedFile]
        The files written, in order.

    Raises
    ------
    UsageError
        Bad options or an output directory that cannot be created.
    """
    specs = make_specs(opts)
    return write_specs(specs, out_dir, prefix, on_written)


def write_specs(
    specs: list[MicrographSpec],
    out_dir: str | os.PathLike[str],
    prefix: str = "micrograph",
    on_written: Callable[[SimulatedFile], None] | None = None,
) -> list[SimulatedFile]:
    """Simulate the given specs and write ``<prefix>_NNN.mrc`` / ``.json`` for each.

    Raises
    ------
    UsageError
        A bad prefix or an output directory that cannot be created.
    """
    if not prefix or any(c.isspace() or c in "/\\" for c in prefix):
        raise UsageError(f"--prefix must be a plain file name without spaces, got {prefix!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    digits = max(3, len(str(len(specs))))
    written = []
    for i, spec in enumerate(specs, start=1):
        stem = f"{prefix}_{i:0{digits}d}"
        image = simulate_micrograph(spec).image
        mrc, truth = out / f"{stem}.mrc", out / f"{stem}.json"
        write_mrc(mrc, image, pixel_size=spec.optics.pixel_size)
        write_text_atomic(truth, spec.to_json() + "\n")
        item = SimulatedFile(mrc=mrc, truth=truth, spec=spec)
        written.append(item)
        if on_written is not None:
            on_written(item)
    return written
