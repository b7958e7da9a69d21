"""Fit resolution: ours against where the rings truly vanish, an independent check and CTFFIND.

For simulated micrographs (:func:`anisoctf.simulate.simulate_micrograph`, 300 kV, known
envelope and SNR) this prints, per SNR and B-factor:

* ``truth``: where an ideal detector with all of the image's Fourier samples would no longer see
  a three-ring window of the Thon rings at t ≥ 3 (from the simulator's exact expected spectrum,
  :func:`anisoctf.fit.ring_check.expected_ring_extent`);
* ``ours`` for every ``--box`` (the fit resolution of :func:`anisoctf.estimate_ctf`);
* ``indep``: the CTFFIND-like independent ring check on the image with the fitted CTF
  (:func:`anisoctf.fit.ring_check.independent_ring_check`).

Then the same (less the truth) for the real micrographs in ``../shared`` where present, with
CTFFIND's own fit resolution for them: fei-extended.mrc (CTFFIND 4: 4.29 Å) and the tilted
CTFFIND 5 test image (CTFFIND 5 with its tilt search: 2.91 Å; our global fit here does not
correct the tilt).

Usage::

    python benchmarks/bench_resolution.py [--size 2048] [--snr 0.2 0.5 1 2] [--bfactor 60 150]
        [--boxes 256 512 1024] [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np

from anisoctf import Optics, estimate_ctf
from anisoctf.errors import AnisoctfError
from anisoctf.fit.result import FitSettings
from anisoctf.fit.ring_check import expected_ring_extent, independent_ring_check
from anisoctf.optics.ctf import CTFParams, chi, frequency_grid
from anisoctf.optics.kernel import ctf_constants, ctf_from_chi, frequency_features
from anisoctf.simulate.micrograph import MicrographSpec, expected_power, simulate_micrograph

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
K_MIN = 1.0 / 30.0


def truth_extent(spec: MicrographSpec, grid: int = 512) -> float:
    """Where the rings of ``spec`` truly vanish (Å)."""
    opt = spec.optics
    kx, ky = frequency_grid((grid, grid), opt.pixel_size)
    p = expected_power(spec, kx, ky)
    p0 = expected_power(replace(spec, snr=0.0), kx, ky)
    feats = frequency_features(kx, ky, opt.M if opt.has_anisomag else None)
    c2 = ctf_from_chi(chi(feats, spec.ctf, opt), ctf_constants(opt)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        mod = np.where(c2 > 1e-6, (p - p0) / c2, np.nan)
    return expected_ring_extent(spec.shape, spec.ctf, opt, p, mod, K_MIN, grid)


def _fit(image: np.ndarray, optics: Optics, settings: FitSettings) -> tuple[float, CTFParams]:
    est = estimate_ctf(image, optics, settings, diagnostics=False)
    return est.fit_resolution, est.params


def simulations(args: argparse.Namespace) -> None:
    print(f"simulated {args.size}² micrographs, 1.06 Å/px, 300 kV (Å; ours − truth in brackets)")
    diffs: list[float] = []
    spreads: list[float] = []
    for bf in args.bfactor:
        for snr in args.snr:
            for seed in range(args.seeds):
                opt = Optics(1.06, 300.0, 2.7, 0.07)
                spec = MicrographSpec(
                    shape=(args.size, args.size),
                    optics=opt,
                    ctf=CTFParams(12000.0, 11000.0, 30.0, 0.0, bf),
                    snr=snr,
                    seed=seed,
                )
                image = simulate_micrograph(spec).image
                truth = truth_extent(spec)
                row = [f"B {bf:4.0f} snr {snr:4.2f} seed {seed}: truth {truth:5.2f}"]
                got = []
                params = None
                for box in args.boxes:
                    try:
                        res, params = _fit(image, opt, FitSettings(box=box))
                    except AnisoctfError as e:
                        row.append(f"box {box}: failed ({str(e)[:40]})")
                        continue
                    got.append(res)
                    row.append(f"box {box} {res:5.2f} [{res - truth:+.2f}]")
                if params is not None:
                    ind = independent_ring_check(image, params, opt, K_MIN).fit_resolution
                    row.append(f"indep {ind:5.2f}")
                if got:
                    diffs.append(statistics.median(got) - truth)
                    spreads.append(max(got) - min(got))
                print("  ".join(row), flush=True)
    if diffs:
        print(
            f"ours − truth: median {statistics.median(diffs):+.2f} Å, "
            f"|·| median {statistics.median(np.abs(diffs)):.2f} Å, max {max(diffs, key=abs):+.2f}; "
            f"spread over boxes: max {max(spreads):.2f} Å"
        )


def real(args: argparse.Namespace) -> None:
    from anisoctf.io import read_micrograph  # the benchmark is an edge: it may read files

    cases = [
        ("fei-extended.mrc", SHARED / "real/micrographs/fei-extended.mrc", 0.854, 2000.0, 4.29),
        ("tilted_2048.mrc", SHARED / "ctffind5/tilted_2048.mrc", 1.2, 5000.0, 2.91),
    ]
    for name, path, apix, df_min, ctffind in cases:
        if not path.is_file():
            print(f"{name}: not found at {path}, skipped")
            continue
        image = read_micrograph(path).data
        opt = Optics(apix, 300.0, 2.7, 0.07)
        row = [f"{name}: CTFFIND {ctffind:.2f}"]
        params = None
        for box in args.boxes + [2048]:
            try:
                res, params = _fit(image, opt, FitSettings(box=box, df_min=df_min))
                row.append(f"box {box} {res:5.2f}")
            except AnisoctfError as e:
                row.append(f"box {box}: failed ({e})")
        for apix_t in (np.float32(apix),):
            res32, _ = _fit(image, Optics(apix_t, 300.0, 2.7, 0.07), FitSettings(df_min=df_min))
            row.append(f"float32 apix {res32:5.2f}")
        if params is not None:
            ind = independent_ring_check(image, params, opt, K_MIN).fit_resolution
            row.append(f"indep {ind:5.2f}")
        print("  ".join(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--snr", type=float, nargs="+", default=[0.2, 0.5, 1.0, 2.0])
    ap.add_argument("--bfactor", type=float, nargs="+", default=[60.0, 150.0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--no-real", action="store_true")
    args = ap.parse_args()
    simulations(args)
    if not args.no_real:
        real(args)


if __name__ == "__main__":
    main()
