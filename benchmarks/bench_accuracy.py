"""Accuracy of micrograph CTF estimation on simulated data, against truth and the Cramér–Rao bound.

For each simulated micrograph (random voltage 200/300 kV, mean defocus 0.5–4 µm, astigmatism
0–2000 Å at a random angle, amplitude contrast 0.07–0.1) it prints the errors of U, V and the
angle, and the Cramér–Rao lower bound of each (periodogram ordinates of the whole micrograph as
independent exponential variables with the simulator's expected power, band min-res..Nyquist,
only the CTF parameters unknown). The summary gives:

* RMS defocus error (U and V pooled) and RMS angle error where astigmatism ≥ 300 Å;
* failures: micrographs with any defocus error > 500 Å;
* efficiency: RMS error ÷ RMS bound for defocus and angle.

``--hard`` simulates hard micrographs: low dose, thick ice with a strong background, B-factor
150 Å² (rings fading by 6–8 Å).

``--set`` picks the simulator: ``own`` (:mod:`anisoctf.simulate.micrograph`, whose spectrum
is exactly the estimator's model), ``mismatch`` (:mod:`anisoctf.simulate.mismatch`: K2
counting-detector MTF with a different noise transfer, a protein-like spectrum with a bump at
10 Å, a heavy-tailed unmodulated background, Poisson noise at 30–50 e/Å²; the bound is that
simulator's own) or ``both`` (default; one summary per set).

Usage::

    python benchmarks/bench_accuracy.py --n 100 --jobs 2
    python benchmarks/bench_accuracy.py --n 10 --hard --jobs 2
    python benchmarks/bench_accuracy.py --n 20 --set mismatch
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from anisoctf import CTFParams, FitError, FitSettings, MicrographSpec, Optics, estimate_ctf
from anisoctf.simulate import crlb, simulate_micrograph
from anisoctf.simulate.mismatch import MismatchSpec, mismatch_power, simulate_mismatch


def make_spec(i: int, seed: int, size: int, hard: bool) -> MicrographSpec:
    rng = np.random.default_rng([seed, i])
    kv = (200.0, 300.0)[i % 2]
    z = rng.uniform(5000, 40000)
    ast = rng.uniform(0, 2000)
    ang = rng.uniform(0, 180)
    ac = rng.uniform(0.07, 0.1)
    truth = CTFParams(z + ast / 2, z - ast / 2, ang, 0.0, 150.0 if hard else 60.0).normalised()
    kw = {}
    if hard:
        kw = {"dose": 20.0, "background": 8.0, "background_width": 0.05, "snr": 0.8}
    return MicrographSpec(
        shape=(size, size),
        optics=Optics(1.0, kv, 2.7, ac),
        ctf=truth,
        seed=int(rng.integers(2**31)),
        **kw,
    )


def make_mismatch_spec(i: int, seed: int, size: int) -> MismatchSpec:
    """Same CTF draw as :func:`make_spec`; dose 30–50 e/Å², bump height 0.5–1.5."""
    base = make_spec(i, seed, size, False)
    rng = np.random.default_rng([seed, i, 13])
    return MismatchSpec(
        shape=base.shape,
        optics=base.optics,
        ctf=base.ctf,
        dose=float(rng.uniform(30, 50)),
        bump=float(rng.uniform(0.5, 1.5)),
        background=float(rng.uniform(1.0, 3.0)),
        seed=base.seed,
    )


def run_one(args: tuple[int, int, int, bool, dict, str]) -> dict:
    i, seed, size, hard, settings_kw, which = args
    if which == "mismatch":
        spec = make_mismatch_spec(i, seed, size)
        image = simulate_mismatch(spec)
        power = mismatch_power
    else:
        spec = make_spec(i, seed, size, hard)
        image = simulate_micrograph(spec).image
        power = None
    settings = FitSettings(**settings_kw)
    t0 = time.perf_counter()
    try:
        est = estimate_ctf(image, spec.optics, settings, diagnostics=False)
    except FitError as e:
        return {"i": i, "error": str(e)}
    dt = time.perf_counter() - t0
    p, t = est.params, spec.ctf
    bound = crlb(spec, k_min=1.0 / settings.min_res, **({"power": power} if power else {}))
    return {
        "i": i,
        "kv": spec.optics.voltage_kv,
        "z": t.mean_defocus,
        "ast": t.astigmatism,
        "dU": p.defocus_u - t.defocus_u,
        "dV": p.defocus_v - t.defocus_v,
        "dA": ((p.angle_deg - t.angle_deg + 90.0) % 180.0) - 90.0,
        "bU": bound["defocus_u"],
        "bV": bound["defocus_v"],
        "bA": bound["angle_deg"],
        "fit_res": est.fit_resolution,
        "time": dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--hard", action="store_true")
    ap.add_argument("--max-res", type=float, default=None)
    ap.add_argument("--box", type=int, default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--set", choices=("own", "mismatch", "both"), default="both")
    a = ap.parse_args()
    kw = {}
    if a.max_res:
        kw["max_res"] = a.max_res
    if a.box:
        kw["box"] = a.box
    sets = ("own", "mismatch") if a.set == "both" else (a.set,)
    for which in sets:
        jobs = [(i, a.seed, a.size, a.hard, kw, which) for i in range(a.n)]
        with ProcessPoolExecutor(a.jobs) as pool:
            rows = list(pool.map(run_one, jobs))
        label = "mismatch" if which == "mismatch" else ("hard" if a.hard else "realistic")
        summarise(rows, f"{which} simulator, {label}, {a.size}²", a.quiet)


def summarise(rows: list[dict], title: str, quiet: bool) -> None:
    """Print one row per micrograph (unless ``quiet``) and the summary of one set."""
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if quiet:
            continue
        if "error" in r:
            print(f"{r['i']:3d} FIT ERROR {r['error']}")
            continue
        print(
            f"{r['i']:3d} {r['kv']:.0f}kV z {r['z']:7.0f} ast {r['ast']:6.0f} | dU {r['dU']:7.1f} "
            f"dV {r['dV']:7.1f} dA {r['dA']:6.2f} | bound U {r['bU']:5.1f} A {r['bA']:5.2f} | "
            f"fit res {r['fit_res']:.2f} Å  {r['time']:.2f} s"
        )
    d = np.array([[r["dU"], r["dV"]] for r in ok])
    b = np.array([[r["bU"], r["bV"]] for r in ok])
    m = np.array([r["ast"] >= 300 for r in ok])
    da = np.array([r["dA"] for r in ok])[m]
    ba = np.array([r["bA"] for r in ok])[m]

    def rms(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(x)))) if x.size else float("nan")

    fails = len(rows) - len(ok) + int(np.sum(np.abs(d).max(axis=1) > 500))
    print(f"\nmicrographs: {len(rows)} ({title})")
    print(
        f"RMS defocus error (U,V): {rms(d):.2f} Å   bound {rms(b):.2f} Å   "
        f"ratio {rms(d) / rms(b):.2f}"
    )
    print(
        f"RMS angle error (astig ≥ 300 Å): {rms(da):.3f}°   bound {rms(ba):.3f}°   "
        f"ratio {rms(da) / rms(ba):.2f}"
    )
    print(f"failures (> 500 Å or no fit): {fails}")
    print(f"median fit time: {np.median([r['time'] for r in ok]):.2f} s\n")

if __name__ == "__main__":
    main()
