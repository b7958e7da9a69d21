"""Time the diagnostic picture (``render_diagnostic``) for a 512-pixel spectrum.

Prints the median over 20 renders in ms and as a ratio to one single-threaded
``scipy.fft.rfft2`` of a 512×512 float32 image timed in the same run (a machine-independent
yardstick). Run with ``python3 benchmarks/bench_diagnostic.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.fft

from anisoctf.fit.result import CTFEstimate, FitDiagnostics
from anisoctf.optics.ctf import CTFParams, Optics, ctf_1d, ctf_2d
from anisoctf.report import render_diagnostic


def synthetic_estimate(box: int = 512, pixel_size: float = 1.2) -> CTFEstimate:
    params = CTFParams(21000.0, 18500.0, 35.0)
    optics = Optics(pixel_size=pixel_size)
    rng = np.random.default_rng(0)
    model = (ctf_2d((box, box), params, optics) ** 2).astype(np.float32)
    spectrum = (model + 0.15 * rng.standard_normal(model.shape)).astype(np.float32)
    k = np.fft.rfftfreq(box, d=pixel_size)
    fit = ctf_1d(k, params.mean_defocus, optics) ** 2
    diag = FitDiagnostics(
        pixel_size=pixel_size,
        spectrum=spectrum,
        model=model,
        k=k,
        profile=fit + 0.05 * rng.standard_normal(k.size),
        profile_fit=fit,
        quality=np.clip(1.2 - 3.0 * k, 0.0, 1.0),
        fit_band=(1 / 30.0, 1 / 4.0),
    )
    return CTFEstimate(
        params=params,
        optics=optics,
        figure_of_merit=0.41,
        fit_resolution=3.9,
        n_tiles=48.0,
        diagnostics=diag,
        warnings=("estimate at the edge of the defocus range",),
    )


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    est = synthetic_estimate(args.box)
    image = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench_ctf.png"
        render_diagnostic(est, out, title="bench")  # warm-up: fonts, imports
        scipy.fft.rfft2(image, workers=1)
        t_render = median_time(lambda: render_diagnostic(est, out, title="bench"), args.repeats)
        t_fft = median_time(lambda: scipy.fft.rfft2(image, workers=1), 200)
        size_kb = out.stat().st_size / 1024

    print(f"render_diagnostic box {args.box}: median {t_render * 1e3:.1f} ms over {args.repeats}")
    print(f"rfft2 512x512 float32, 1 thread: median {t_fft * 1e3:.3f} ms")
    print(f"ratio render / rfft2: {t_render / t_fft:.0f}x   (PNG {size_kb:.0f} KiB)")


if __name__ == "__main__":
    main()
