"""Anisomag detection end to end on simulated micrographs, and the fit with the matrix given.

One dataset = ``--n`` micrographs (default 24) simulated with a magnification matrix of
``--aniso`` per cent along ``--axis`` degrees (symmetric, det 1), mean defocus uniform in
5000–30000 Å, and a real astigmatism of 150 Å at 20° plus a per-micrograph part of
``|U − V|`` uniform in 0–100 Å at a random angle. For each dataset it

1. estimates every micrograph *without* the matrix and runs
   :func:`~anisoctf.magnification.detect.detect_anisomag` on the results: prints the
   anisotropy and axis errors against the truth (acceptance: within 0.1 % and 3°);
2. estimates every micrograph again *with* the true matrix, and with the detected one, and
   prints the true-frame errors: U, V, the angle, and the largest defocus error over all
   directions ``||D_est - D_true||₂`` (target: 15 Å; angle 1° where ``|U − V| >= 300 Å``, the
   angle of a 150 Å astigmatism being set by the noise);
3. (``--check``) fits with the true matrix of strongly astigmatic micrographs (500–1500 Å) at
   ``--aniso`` and at 5 %: U, V and angle errors (targets 15 Å and 1°).

Then (``--mc``) a Monte Carlo of the detection alone on exact synthetic tables with the same
distribution (no images): the spread of the errors and how often a dataset of ``--n``
micrographs meets the 0.1 % / 3° acceptance.

Usage::

    python benchmarks/bench_anisomag.py                       # 24 × 2048², 2 processes
    python benchmarks/bench_anisomag.py --datasets 5 --size 1024 --mc 2000
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
from anisoctf.magnification import MagMat, defocus_table_to_observed
from anisoctf.magnification.detect import detect_anisomag
from anisoctf.optics.ctf import params_from_astig
from anisoctf.simulate import simulate_micrograph

REAL_ASTIG = 150.0  # Å, constant part of U - V
REAL_ANGLE = 20.0  # degrees
SCATTER = 100.0  # Å, largest per-micrograph |U - V| added to it
DF_RANGE = (5000.0, 30000.0)


def true_frame_params(n: int, rng: np.random.Generator) -> list[CTFParams]:
    """True-frame CTF of ``n`` micrographs (see the module notes)."""
    z = rng.uniform(*DF_RANGE, n)
    h0, t0 = 0.5 * REAL_ASTIG, np.deg2rad(2.0 * REAL_ANGLE)
    hs, ts = rng.uniform(0.0, 0.5 * SCATTER, n), rng.uniform(0.0, 2.0 * np.pi, n)
    a1 = h0 * np.cos(t0) + hs * np.cos(ts)
    a2 = h0 * np.sin(t0) + hs * np.sin(ts)
    return [params_from_astig(z[i], a1[i], a2[i], 0.0, 60.0) for i in range(n)]


def angle_error(a: float, b: float) -> float:
    return float((a - b + 90.0) % 180.0 - 90.0)


def defocus_error(p: CTFParams, t: CTFParams) -> float:
    """Largest defocus error over all directions: the spectral norm of ``D_est - D_true``."""
    return float(np.linalg.norm(p.matrix() - t.matrix(), 2))


def run_one(args: tuple) -> dict:
    """Simulate one micrograph; fit it without, with the true and with a given matrix."""
    i, truth, mag, size, snr, seed, box, given = args
    spec = MicrographSpec(
        shape=(size, size),
        optics=Optics(1.0, 300.0, 2.7, 0.07, mag_matrix=mag),
        ctf=truth,
        snr=snr,
        seed=seed,
    )
    image = simulate_micrograph(spec).image
    settings = FitSettings(box=box)
    out: dict = {"i": i}
    for key, m in (("plain", None), ("true", mag), ("given", given)):
        if key == "given" and m is None:
            continue
        optics = Optics(1.0, 300.0, 2.7, 0.07, mag_matrix=m or ((1.0, 0.0), (0.0, 1.0)))
        try:
            out[key] = estimate_ctf(image, optics, settings).params
        except FitError as exc:
            out[key] = str(exc)
    return out


def dataset(k: int, a: argparse.Namespace, pool: ProcessPoolExecutor) -> dict:
    rng = np.random.default_rng([a.seed, k])
    mag = MagMat.from_anisotropy(a.aniso, a.axis)
    truth = true_frame_params(a.n, rng)
    seeds = rng.integers(0, 2**31, a.n)
    box = a.box or (256 if a.size <= 1024 else 512)
    t0 = time.perf_counter()
    jobs = [(i, truth[i], mag.matrix, a.size, a.snr, int(seeds[i]), box, None) for i in range(a.n)]
    rows = list(pool.map(run_one, jobs))
    t_fit = time.perf_counter() - t0
    ok = [r for r in rows if isinstance(r["plain"], CTFParams)]
    u = [r["plain"].defocus_u for r in ok]
    v = [r["plain"].defocus_v for r in ok]
    ang = [r["plain"].angle_deg for r in ok]
    t1 = time.perf_counter()
    det = detect_anisomag(u, v, ang, [f"mic{r['i']:03d}" for r in ok], seed=a.seed)
    t_det = time.perf_counter() - t1
    # again with the detected matrix (true-frame errors in the real use)
    jobs = [
        (i, truth[i], mag.matrix, a.size, a.snr, int(seeds[i]), box, det.mag_matrix.matrix)
        for i in range(a.n)
    ]
    given = {r["i"]: r.get("given") for r in pool.map(run_one, jobs)}
    res = {
        "det": det,
        "d_aniso": det.anisotropy_percent - a.aniso,
        "d_axis": angle_error(det.axis_deg, a.axis),
        "t_fit": t_fit,
        "t_det": t_det,
        "n_fail": a.n - len(ok),
    }
    for key, source in (("true", {r["i"]: r.get("true") for r in rows}), ("given", given)):
        e_def, e_u, e_v, e_ang = [], [], [], []
        for i, p in source.items():
            if not isinstance(p, CTFParams):
                continue
            t = truth[i]
            e_def.append(defocus_error(p, t))
            e_u.append(p.defocus_u - t.defocus_u)
            e_v.append(p.defocus_v - t.defocus_v)
            if t.astigmatism >= 300.0:
                e_ang.append(angle_error(p.angle_deg, t.angle_deg))
        res[key] = (np.array(e_def), np.array(e_u), np.array(e_v), np.array(e_ang))
    # the observed-frame (plain) fit against the observed-frame truth, for scale
    e_obs = []
    for r in ok:
        t = truth[r["i"]]
        uo, vo, ao = defocus_table_to_observed(t.defocus_u, t.defocus_v, t.angle_deg, mag)
        e_obs.append(defocus_error(r["plain"], CTFParams(float(uo), float(vo), float(ao))))
    res["plain_vs_observed_truth"] = np.array(e_obs)
    res["plain_vs_true"] = np.array([defocus_error(r["plain"], truth[r["i"]]) for r in ok])
    return res


def matrix_check(a: argparse.Namespace, pool: ProcessPoolExecutor) -> None:
    """Fits with the true matrix of strongly astigmatic micrographs (angle accuracy), at the
    dataset's anisotropy and at 5 % (a large anisomag must not push the fit out of its range)."""
    rng = np.random.default_rng([a.seed, 99])
    box = a.box or (256 if a.size <= 1024 else 512)
    print(f"\nfit with the true matrix, |U−V| 500–1500 Å ({a.check} micrographs per anisotropy):")
    for aniso in (a.aniso, 5.0):
        mag = MagMat.from_anisotropy(aniso, a.axis)
        truth = [
            params_from_astig(z, 0.5 * h * np.cos(2 * t), 0.5 * h * np.sin(2 * t), 0.0, 60.0)
            for z, h, t in zip(
                rng.uniform(*DF_RANGE, a.check),
                rng.uniform(500.0, 1500.0, a.check),
                rng.uniform(0.0, np.pi, a.check),
                strict=True,
            )
        ]
        jobs = [
            (i, truth[i], mag.matrix, a.size, a.snr, int(rng.integers(2**31)), box, None)
            for i in range(a.check)
        ]
        e_u, e_v, e_a, fails = [], [], [], 0
        for r in pool.map(run_one, jobs):
            p, t = r["true"], truth[r["i"]]
            if not isinstance(p, CTFParams):
                fails += 1
                continue
            e_u.append(p.defocus_u - t.defocus_u)
            e_v.append(p.defocus_v - t.defocus_v)
            e_a.append(angle_error(p.angle_deg, t.angle_deg))
        print(
            f"  {aniso:.1f} % along {a.axis:.0f}°: max |ΔU| {np.max(np.abs(e_u)):.1f} Å, "
            f"max |ΔV| {np.max(np.abs(e_v)):.1f} Å, max |Δangle| {np.max(np.abs(e_a)):.2f}° "
            f"(RMS {np.sqrt(np.mean(np.square(e_a))):.2f}°); {fails} failed"
        )


def monte_carlo(a: argparse.Namespace) -> None:
    mag = MagMat.from_anisotropy(a.aniso, a.axis)
    da, dx, sig = [], [], 0
    t0 = time.perf_counter()
    for k in range(a.mc):
        rng = np.random.default_rng([a.seed, 10_000 + k])
        truth = true_frame_params(a.n, rng)
        u, v, ang = defocus_table_to_observed(
            [t.defocus_u for t in truth], [t.defocus_v for t in truth],
            [t.angle_deg for t in truth], mag,
        )  # fmt: skip
        d = detect_anisomag(u, v, ang, n_bootstrap=0)
        da.append(d.anisotropy_percent - a.aniso)
        dx.append(angle_error(d.axis_deg, a.axis))
        sig += d.significant
    da_a, dx_a = np.abs(da), np.abs(dx)
    print(
        f"\nMonte Carlo, exact tables ({a.mc} datasets of {a.n}, no images, "
        f"{time.perf_counter() - t0:.1f} s):"
    )
    print(
        f"  anisotropy error: mean {np.mean(da):+.4f} %, sd {np.std(da):.4f} %; "
        f"axis error sd {np.std(dx):.2f}°"
    )
    print(
        f"  |Δaniso| ≤ 0.1 %: {np.mean(da_a <= 0.1):.1%}   |Δaxis| ≤ 3°: {np.mean(dx_a <= 3):.1%}"
        f"   both: {np.mean((da_a <= 0.1) & (dx_a <= 3)):.1%}   significant: {sig / a.mc:.1%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="micrographs per dataset")
    ap.add_argument("--datasets", type=int, default=1)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--box", type=int, default=None)
    ap.add_argument("--snr", type=float, default=1.2)
    ap.add_argument("--aniso", type=float, default=1.2, help="anisotropy (per cent)")
    ap.add_argument("--axis", type=float, default=35.0, help="axis (degrees)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--mc", type=int, default=500, help="Monte Carlo datasets (0: none)")
    ap.add_argument(
        "--check", type=int, default=8, help="strongly astigmatic micrographs for the matrix check"
    )
    a = ap.parse_args()
    print(
        f"{a.datasets} dataset(s) of {a.n} micrographs, {a.size}², SNR {a.snr}; anisomag "
        f"{a.aniso} % along {a.axis}°; real astigmatism {REAL_ASTIG:.0f} Å at {REAL_ANGLE:.0f}° "
        f"+ 0–{SCATTER:.0f} Å per micrograph; defocus {DF_RANGE[0]:.0f}–{DF_RANGE[1]:.0f} Å"
    )
    passes = 0
    with ProcessPoolExecutor(a.jobs) as pool:
        for k in range(a.datasets):
            r = dataset(k, a, pool)
            d = r["det"]
            ok = abs(r["d_aniso"]) <= 0.1 and abs(r["d_axis"]) <= 3.0
            passes += ok
            lo, hi = d.anisotropy_ci
            print(
                f"\ndataset {k}: fits {r['t_fit']:.1f} s ({r['n_fail']} failed), "
                f"detection {r['t_det']:.2f} s"
            )
            print(
                f"  detected {d.anisotropy_percent:.3f} % [{lo:.3f}, {hi:.3f}] along "
                f"{d.axis_deg:.2f}° [{d.axis_ci[0]:.1f}, {d.axis_ci[1]:.1f}]; p = {d.p_value:.2g},"
                f" significant {d.significant}; rejected {d.n_rejected}"
            )
            print(
                f"  error: anisotropy {r['d_aniso']:+.3f} %, axis {r['d_axis']:+.2f}° -> "
                f"{'PASS' if ok else 'FAIL'} (0.1 %, 3°); real astigmatism "
                f"{d.real_astigmatism:.0f} Å at {d.real_astigmatism_angle:.1f}° "
                f"(truth {REAL_ASTIG:.0f} Å at {REAL_ANGLE:.0f}°)"
            )
            for key, label in (("true", "true matrix"), ("given", "detected matrix")):
                e_def, e_u, e_v, e_ang = r[key]
                ang = (
                    f"max |Δangle| {np.max(np.abs(e_ang)):.2f}° ({e_ang.size} with |U−V| ≥ 300)"
                    if e_ang.size
                    else "no micrograph with |U−V| ≥ 300 Å"
                )
                print(
                    f"  fit with the {label}: max ||ΔD|| {np.max(e_def):.1f} Å "
                    f"(median {np.median(e_def):.1f}), max |ΔU| {np.max(np.abs(e_u)):.1f}, "
                    f"max |ΔV| {np.max(np.abs(e_v)):.1f} Å; {ang}"
                )
            print(
                f"  fit without a matrix: max ||ΔD|| vs the observed-frame truth "
                f"{np.max(r['plain_vs_observed_truth']):.1f} Å, vs the true frame "
                f"{np.max(r['plain_vs_true']):.1f} Å"
            )
        if a.check:
            matrix_check(a, pool)
    print(f"\nacceptance (0.1 %, 3°): {passes} of {a.datasets} dataset(s)")
    if a.mc:
        monte_carlo(a)


if __name__ == "__main__":
    main()
