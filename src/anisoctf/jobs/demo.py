"""``anisoctf demo``: simulate three micrographs, estimate their CTF and compare with the truth.

The job writes the micrographs (with their truth, ``.json``) into ``<out>/micrographs``, runs
the estimate batch into ``<out>/ctf`` and returns, per micrograph, the true and estimated
defoci and the verdict: the demo passes when every defocus error is below
:data:`DEMO_TOLERANCE`. The command line prints the comparison.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from anisoctf.fit.result import FitSettings
from anisoctf.jobs.estimate_batch import EstimateReport, run_batch
from anisoctf.jobs.requests import EstimateRequest
from anisoctf.jobs.simulate_micrographs import write_specs
from anisoctf.optics.ctf import CTFParams, Optics
from anisoctf.simulate.micrograph import MicrographSpec

__all__ = [
    "DEMO_APIX",
    "DEMO_CASES",
    "DEMO_KV",
    "DEMO_SIZE",
    "DEMO_TOLERANCE",
    "DemoComparison",
    "DemoReport",
    "DemoRequest",
    "angle_error",
    "demo_specs",
    "run_demo",
]

#: demo micrographs: (mean defocus Å, astigmatism |U − V| Å, angle of U in degrees)
DEMO_CASES = ((12000.0, 800.0, 25.0), (18000.0, 1500.0, 110.0), (26000.0, 400.0, 155.0))
DEMO_SIZE = 2048
DEMO_APIX = 1.0
DEMO_KV = 300.0
#: the demo passes when every defocus error is below this (Å)
DEMO_TOLERANCE = 100.0


@dataclass(frozen=True)
class DemoRequest:
    """Where the demo writes, and how many micrographs it processes at once (None: one per
    core, at most the number of micrographs)."""

    out_dir: Path
    jobs: int | None = None

    @property
    def micrograph_dir(self) -> Path:
        return Path(self.out_dir) / "micrographs"

    @property
    def ctf_dir(self) -> Path:
        return Path(self.out_dir) / "ctf"


@dataclass(frozen=True)
class DemoComparison:
    """One demo micrograph: the truth and, when its estimate succeeded, the estimate."""

    name: str
    true_u: float
    true_v: float
    true_angle: float
    est_u: float | None = None
    est_v: float | None = None
    est_angle: float | None = None

    @property
    def failed(self) -> bool:
        return self.est_u is None

    @property
    def errors(self) -> tuple[float, float, float]:
        """(ΔU, ΔV, Δangle) of estimate − truth (Å, Å, degrees modulo 180)."""
        assert self.est_u is not None and self.est_v is not None and self.est_angle is not None
        return (
            self.est_u - self.true_u,
            self.est_v - self.true_v,
            angle_error(self.est_angle, self.true_angle),
        )

    @property
    def good(self) -> bool:
        """Both defocus errors below :data:`DEMO_TOLERANCE` (a failed estimate is not good)."""
        if self.failed:
            return False
        du, dv, _ = self.errors
        return max(abs(du), abs(dv)) < DEMO_TOLERANCE


@dataclass(frozen=True)
class DemoReport:
    """The demo's outcome: the comparisons in input order, the estimate's report, the verdict."""

    comparisons: tuple[DemoComparison, ...]
    estimate: EstimateReport

    @property
    def passed(self) -> bool:
        ok = self.estimate.n_failed == 0
        for c in self.comparisons:
            if c.failed:
                return False
            du, dv, _ = c.errors
            ok = ok and c.good and math.isfinite(du) and math.isfinite(dv)
        return ok


def angle_error(a: float, b: float) -> float:
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


def run_demo(
    request: DemoRequest, *, console: Console | None = None, err_console: Console | None = None
) -> DemoReport:
    """Simulate the demo micrographs, estimate them and compare with the truth.

    Raises
    ------
    UsageError
        The output directory cannot be used.
    AnisoctfError, OSError
        A file could not be written.
    """
    files = write_specs(demo_specs(), request.micrograph_dir, prefix="demo")
    jobs = request.jobs
    if jobs is None:
        jobs = max(1, min(len(files), os.cpu_count() or 1))
    estimate = run_batch(
        EstimateRequest(
            tuple(str(f.mrc) for f in files),
            request.ctf_dir,
            FitSettings(),
            apix=DEMO_APIX,
            kv=DEMO_KV,
            cs=files[0].spec.optics.cs_mm,  # the simulated optics, stated (MRC files carry none)
            ac=files[0].spec.optics.amplitude_contrast,
            jobs=jobs,
        ),
        console=console,
        err_console=err_console,
    )
    by_name = {r.name: r for r in estimate.results}
    comparisons = []
    for f in files:
        c = f.spec.ctf
        r = by_name.get(str(f.mrc))
        est = {}
        if r is not None:
            est = {
                "est_u": r.row.defocus_u,
                "est_v": r.row.defocus_v,
                "est_angle": r.row.defocus_angle,
            }
        comparisons.append(
            DemoComparison(f.mrc.name, c.defocus_u, c.defocus_v, c.angle_deg, **est)
        )
    return DemoReport(tuple(comparisons), estimate)
