"""Local defocus on simulated 4096² micrographs: tilt, axis, local defocus, untilted, time.

For each simulated micrograph (realistic SNR, 200/300 kV, defocus 1–3 µm, astigmatism up to
1000 Å, B-factor 60 Å², detector MTF) this runs the plain estimate and the local estimate
(``--patches 5x5``, i.e. :func:`anisoctf.local.estimate_local` after
:func:`anisoctf.estimate_ctf`) and prints:

* tilted micrographs (20–40° about a random axis): tilt angle error, tilt axis error, and the
  RMS error of the local defocus (surface) at 200 random particle positions, against the truth
  ``d(x, y) = mean defocus + tan(tilt) · distance from the axis``;
* untilted micrographs: the reported tilt (target < 2°), and how far the surface's centre
  defocus lies from the plain estimate's mean defocus (the global estimate itself is left
  unchanged by the local fit);
* tilted micrographs: the global CTF refitted on the tilt-corrected spectrum
  (:func:`anisoctf.local.corrected.refit_tilt_corrected`, what ``anisoctf estimate --tilt``
  reports): the error of the centre's mean defocus and astigmatism, and the fit resolution,
  plain → corrected;
* time of ``estimate + local (+ refit)`` over plain ``estimate`` (in-process, single-threaded BLAS,
  median of ``--repeats`` alternating runs per micrograph, then the median over micrographs;
  target ≤ 2),
  each also in multiples of one single-threaded 4096² ``rfft2`` timed in the same run;
* with ``--hard``, harder micrographs: half the SNR, B = 100 Å², and carbon in one corner (a
  third of each side) with strong rings 1.3 µm further from focus; local defocus is then
  scored on the specimen only;
* with ``--ctftilt``, the same tilt set through our implementation of the classic CTFTILT /
  CTFFIND-5 approach (:mod:`benchmarks.ctftilt_baseline`), for comparison.

With ``--cli N`` it also times the whole command, ``anisoctf estimate`` on N written 4096²
micrographs with and without ``--patches 5x5`` (fresh processes, every output file written,
``--repeats`` alternating runs, medians): the ratio of the two.

Usage::

    python benchmarks/bench_local.py --n-tilted 6 --n-flat 2 [--size 4096] [--seed 7]
    python benchmarks/bench_local.py --n-tilted 0 --n-flat 0 --cli 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft as sfft

from anisoctf import CTFParams, MicrographSpec, Optics, estimate_ctf, simulate_micrograph
from anisoctf.fit.result import FitSettings
from anisoctf.local.corrected import refit_tilt_corrected
from anisoctf.local.estimate import LocalSettings, estimate_local

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fft_reference(size: int, repeats: int = 7) -> float:
    x = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    sfft.rfft2(x, workers=1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sfft.rfft2(x, workers=1)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def make_spec(
    rng: np.random.Generator, size: int, tilt: float, axis: float, hard: bool = False
) -> MicrographSpec:
    z = rng.uniform(10000, 30000)
    ast = rng.uniform(0, 1000)
    kv = float(rng.choice([200.0, 300.0]))
    return MicrographSpec(
        shape=(size, size),
        optics=Optics(1.0, kv, 2.7, float(rng.uniform(0.07, 0.1))),
        ctf=CTFParams(
            z + ast / 2, z - ast / 2, float(rng.uniform(0, 180)), 0.0, 100.0 if hard else 60.0
        ),
        snr=0.4 if hard else 0.8,
        tilt_angle_deg=tilt,
        tilt_axis_deg=axis,
        tilt_max_res=3.0,
        seed=int(rng.integers(2**31)),
    )


def axis_error(est_tilt: float, est_axis: float, tilt: float, axis: float) -> float:
    """Smallest axis difference (degrees) allowing for the (tilt, axis) ≡ (−tilt, axis+180)."""
    a = est_axis if np.sign(est_tilt) == np.sign(tilt) else est_axis + 180.0
    d = (a - axis + 180.0) % 360.0 - 180.0
    return abs(d)


def truth_defocus(spec: MicrographSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ny, nx = spec.shape
    t = np.deg2rad(spec.tilt_axis_deg)
    dist = (-(x - nx / 2) * np.sin(t) + (y - ny / 2) * np.cos(t)) * spec.optics.pixel_size
    return spec.ctf.mean_defocus + np.tan(np.deg2rad(spec.tilt_angle_deg)) * dist


def _centre_errors(est, spec: MicrographSpec) -> tuple[float, float, float]:
    """(mean defocus error, |astigmatism error| as a vector in (a1, a2), fit resolution) of a
    global estimate against the micrograph centre's truth."""
    p, t = est.params, spec.ctf
    da = np.subtract(p.astig_components, t.astig_components)
    return p.mean_defocus - t.mean_defocus, float(np.hypot(*da)), float(est.fit_resolution)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-tilted", type=int, default=6)
    ap.add_argument("--n-flat", type=int, default=2)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per micrograph")
    ap.add_argument("--cli", type=int, default=0, help="also time the command on N micrographs")
    ap.add_argument(
        "--hard",
        action="store_true",
        help="half the SNR, B = 100 Å², and a carbon corner (a third of each side) with strong "
        "rings 1.3 µm further from focus",
    )
    ap.add_argument("--ctftilt", action="store_true", help="also run the CTFTILT-style baseline")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    rng = np.random.default_rng(args.seed)
    ref = fft_reference(args.size)
    print(f"reference: one single-threaded rfft2 of {args.size}² = {ref * 1e3:.1f} ms")
    rows = []
    base_rows = []
    cases = [
        (float(rng.uniform(20, 40)) * rng.choice([-1, 1]), float(rng.uniform(0, 180)))
        for _ in range(args.n_tilted)
    ] + [(0.0, 0.0)] * args.n_flat
    for i, (tilt, axis) in enumerate(cases):
        spec = make_spec(rng, args.size, tilt, axis, args.hard)
        img = simulate_micrograph(spec).image
        clean = np.ones(spec.shape, dtype=bool)
        if args.hard:  # a corner of carbon: strong rings 1.3 µm further from focus
            c = args.size // 3
            cspec = MicrographSpec(
                shape=spec.shape,
                optics=spec.optics,
                ctf=CTFParams(
                    spec.ctf.defocus_u + 1300, spec.ctf.defocus_v + 1300, spec.ctf.angle_deg
                ),
                snr=3.0,
                seed=spec.seed + 1,
            )
            carbon = simulate_micrograph(cspec).image
            img[:c, :c] = carbon[:c, :c] * (img.mean() / carbon.mean())
            clean[: c + 256, : c + 256] = False
        op = spec.optics
        plain_t, local_t = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            t0 = time.perf_counter()
            g = estimate_ctf(img, op)
            t1 = time.perf_counter()
            loc = estimate_local(img, op, g, local=LocalSettings(patches=(5, 5)))
            refit = refit_tilt_corrected(img, op, g, loc, FitSettings())
            t2 = time.perf_counter()
            plain_t.append(t1 - t0)
            local_t.append(t2 - t1)
        x = rng.uniform(0, args.size, 1000)
        y = rng.uniform(0, args.size, 1000)
        ok = clean[y.astype(int), x.astype(int)]
        x, y = x[ok][:200], y[ok][:200]  # 200 positions on the specimen (not on carbon)
        err = loc.surface(x, y) - truth_defocus(spec, x, y)
        row = {
            "tilt": tilt,
            "axis": axis,
            "est_tilt": loc.tilt_angle,
            "est_axis": loc.tilt_axis,
            "tilt_err": abs(abs(loc.tilt_angle) - abs(tilt)) if tilt else abs(loc.tilt_angle),
            "axis_err": axis_error(loc.tilt_angle, loc.tilt_axis, tilt, axis) if tilt else 0.0,
            "local_rms": float(np.sqrt(np.mean(err**2))),
            "centre_vs_plain": loc.surface.d0 - g.params.mean_defocus,
            "plain_s": statistics.median(plain_t),
            "local_s": statistics.median(plain_t) + statistics.median(local_t),
            "outliers": sum(p.outlier for p in loc.patches),
            "centre_err": _centre_errors(g, spec),
            "refit_err": _centre_errors(refit, spec) if refit is not None else None,
        }
        rows.append(row)
        print(
            f"[{i + 1}/{len(cases)}] tilt {tilt:6.1f} axis {axis:6.1f} -> {loc.tilt_angle:6.2f} "
            f"{loc.tilt_axis:6.1f} (±{loc.tilt_sigma:.2f}); local RMS {row['local_rms']:5.1f} Å; "
            f"centre−plain {row['centre_vs_plain']:+6.1f} Å; "
            f"time ×{row['local_s'] / row['plain_s']:.2f}",
            flush=True,
        )
        ce, re_ = row["centre_err"], row["refit_err"]
        print(
            f"      global: defocus err {ce[0]:+6.1f} Å, astig err {ce[1]:5.1f} Å, "
            f"fit {ce[2]:.2f} Å"
            + (
                f" -> tilt-corrected {re_[0]:+6.1f} Å, {re_[1]:5.1f} Å, fit {re_[2]:.2f} Å"
                if re_ is not None
                else " (no tilt correction)"
            ),
            flush=True,
        )
        if args.ctftilt and tilt:
            from ctftilt_baseline import ctftilt

            b = ctftilt(img, op, g)
            base_rows.append(
                {
                    "tilt_err": abs(abs(b[0]) - abs(tilt)),
                    "axis_err": axis_error(b[0], b[1], tilt, axis),
                }
            )
            print(f"      baseline CTFTILT-style: tilt {b[0]:6.2f} axis {b[1]:6.1f}", flush=True)

    tilted = [r for r in rows if r["tilt"]]
    flat = [r for r in rows if not r["tilt"]]
    print()
    if tilted:
        te = [r["tilt_err"] for r in tilted]
        ae = [r["axis_err"] for r in tilted]
        lr = [r["local_rms"] for r in tilted]
        print(
            f"tilted ({len(tilted)}): tilt error max {max(te):.2f}° (target ≤ 1°), "
            f"RMS {np.sqrt(np.mean(np.square(te))):.2f}°"
        )
        print(
            f"tilted ({len(tilted)}): axis error max {max(ae):.2f}° (target ≤ 3°), "
            f"RMS {np.sqrt(np.mean(np.square(ae))):.2f}°"
        )
        print(
            f"tilted ({len(tilted)}): local defocus RMS at 200 positions: worst {max(lr):.1f} Å, "
            f"median {statistics.median(lr):.1f} Å (target ≤ 30 Å)"
        )
        fixed = [r for r in tilted if r["refit_err"] is not None]
        if fixed:
            for key, label in ((0, "|mean defocus error|"), (2, "fit resolution")):
                a = [abs(r["centre_err"][key]) for r in fixed]
                b = [abs(r["refit_err"][key]) for r in fixed]
                print(
                    f"tilted ({len(fixed)} refitted): {label} median {statistics.median(a):.2f}"
                    f" → {statistics.median(b):.2f} (plain → tilt-corrected; worst "
                    f"{max(a):.2f} → {max(b):.2f})"
                )
        if base_rows:
            bt = [r["tilt_err"] for r in base_rows]
            ba = [r["axis_err"] for r in base_rows]
            print(
                f"baseline CTFTILT-style: tilt error max {max(bt):.2f}° RMS "
                f"{np.sqrt(np.mean(np.square(bt))):.2f}°; axis error max {max(ba):.2f}° RMS "
                f"{np.sqrt(np.mean(np.square(ba))):.2f}°"
            )
    if flat:
        print(
            f"untilted ({len(flat)}): reported tilt max {max(r['tilt_err'] for r in flat):.2f}° "
            f"(target < 2°); |surface centre − plain estimate| max "
            f"{max(abs(r['centre_vs_plain']) for r in flat):.1f} Å (global defocus unchanged)"
        )
    if args.cli:
        cli_ratio(args, rng, ref)
    if not rows:
        return
    ratio = [r["local_s"] / r["plain_s"] for r in rows]
    print(
        f"time: estimate + local = {statistics.median(ratio):.2f}× plain estimate (median; "
        f"target ≤ 2); plain {statistics.median(r['plain_s'] for r in rows) / ref:.1f} FFTs, "
        f"with local {statistics.median(r['local_s'] for r in rows) / ref:.1f} FFTs"
    )


def cli_ratio(args: argparse.Namespace, rng: np.random.Generator, ref: float) -> None:
    """Whole-command time with and without ``--patches 5x5`` on the same micrographs."""
    import os
    import shutil
    import subprocess
    import tempfile

    from anisoctf.io import write_mrc

    with tempfile.TemporaryDirectory(prefix="bench_local_") as tmp:
        folder = Path(tmp)
        for i in range(args.cli):
            spec = make_spec(rng, args.size, 0.0, 0.0)
            write_mrc(folder / f"m{i:03d}.mrc", simulate_micrograph(spec).image, 1.0)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        exe = shutil.which("anisoctf") or "anisoctf"
        times: dict[str, list[float]] = {"plain": [], "patches": []}
        for _ in range(args.repeats):
            for key, extra in (("plain", []), ("patches", ["--patches", "5x5"])):
                out = folder / f"out_{key}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [exe, "estimate", str(folder / "m*.mrc"), "--apix", "1", "--kv", "300"]
                cmd += ["--out", str(out)]
                t0 = time.perf_counter()
                subprocess.run(cmd + extra + ["--quiet"], check=True, env=env)
                times[key].append((time.perf_counter() - t0) / args.cli)
        p, q = statistics.median(times["plain"]), statistics.median(times["patches"])
        print(
            f"whole command, {args.cli} micrographs: plain {p / ref:.1f} FFTs per micrograph, "
            f"--patches 5x5 {q / ref:.1f} FFTs: ratio {q / p:.2f} (target ≤ 2)"
        )


if __name__ == "__main__":
    main()
