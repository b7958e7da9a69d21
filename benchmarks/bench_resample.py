"""Accuracy, speed and memory of the anisomag correction methods, against an analytic truth.

Truth: sums of Gaussians (random centres, widths 2-6 px, so band-limited to about 1e-8 at
Nyquist) rendered analytically twice: in the true (corrected) frame, and in the recorded frame
through the inverse of the correction's sampling matrix. Each method corrects the recorded image;
the error is the relative RMS difference from the true-frame rendering over the interior (a
border of ``--border`` px plus the width the map moves pixels in from the edge is excluded).

Reported per method, for 1 % and 3 % anisotropy (``MagMat.from_anisotropy``, axis 37°, plus a
0.05° rotation, default pixel-size mode):

* ``rel. RMS``: as above;
* ``time / FFT``: median wall time of ``correct_image`` over ``--repeats`` runs, divided by the
  median time of one single-threaded ``scipy.fft.rfft2`` of the same float32 image, timed in the
  same run (interleaved); the sinc method's plan (tap indices and weights) is cached per shape
  and matrix, as for every micrograph of an optics group, so these calls reuse it;
* ``first call / FFT``: one call with the plan cache emptied first (the plan built too);
* ``peak mem / image``: peak memory allocated during one call (``tracemalloc``; numpy and scipy
  report their buffers to it), as a multiple of the image's float32 size; the input and the
  returned image are not counted beyond the call's own allocations (the output is 1.0 of it).

Usage::

    python benchmarks/bench_resample.py --sizes 512 1024 2048 4096 --methods sinc --repeats 15

The sinc method runs through the compiled passes (``anisoctf.magnification._sinc``) where they
are built; ``--numpy`` times its numpy passes instead.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

import numpy as np
import scipy.fft as sfft

from anisoctf.magnification import resample
from anisoctf.magnification.resample import METHODS, correct_image, image_centre, sampling_matrix
from anisoctf.optics.magmat import MagMat


def render(n: int, centres: np.ndarray, widths: np.ndarray, amps: np.ndarray, b: np.ndarray):
    """``sum_i a_i exp(-|c + B (w - c) - mu_i|^2 / 2 s_i^2)`` at every pixel ``w`` (x = column).

    Each Gaussian is evaluated in a window reaching 8 widths (relative truncation < 1e-13).
    """
    cx, cy = image_centre((n, n))
    out = np.zeros((n, n))
    binv = np.linalg.inv(b)
    c = np.array([cx, cy])
    for mu, s, amp in zip(centres, widths, amps, strict=True):
        w0 = c + binv @ (mu - c)  # the centre in w coordinates
        r = int(np.ceil(8.0 * s * np.abs(binv).sum(axis=1).max())) + 2
        x0, x1 = max(0, int(w0[0]) - r), min(n, int(w0[0]) + r + 1)
        y0, y1 = max(0, int(w0[1]) - r), min(n, int(w0[1]) + r + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        x, y = np.meshgrid(np.arange(x0, x1) - cx, np.arange(y0, y1) - cy)
        vx = b[0, 0] * x + b[0, 1] * y + cx - mu[0]
        vy = b[1, 0] * x + b[1, 1] * y + cy - mu[1]
        out[y0:y1, x0:x1] += amp * np.exp(-(vx * vx + vy * vy) / (2.0 * s * s))
    return out


def fft_time(x: np.ndarray) -> float:
    t0 = time.perf_counter()
    sfft.rfft2(x, workers=1)
    return time.perf_counter() - t0


def peak_memory(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def first_call(recorded: np.ndarray, m: MagMat, method: str) -> float:
    resample._cached_plan.cache_clear()
    t0 = time.perf_counter()
    correct_image(recorded, m, method=method)
    return time.perf_counter() - t0


def run(
    size: int, percent: float, repeats: int, border: int, seed: int, methods: list[str]
) -> list[dict]:
    rot = np.deg2rad(0.05)
    r = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    m = MagMat(MagMat.from_anisotropy(percent, 37.0).array @ r)
    a = sampling_matrix(m)
    rng = np.random.default_rng(seed)
    count = max(50, size * size // 2000)
    centres = rng.uniform(0.0, size, (count, 2))
    widths = rng.uniform(2.0, 6.0, count)
    amps = rng.uniform(0.5, 1.5, count)
    recorded = render(size, centres, widths, amps, np.linalg.inv(a)).astype(np.float32)
    truth = render(size, centres, widths, amps, np.eye(2))
    edge = int(np.ceil(np.abs(a - np.eye(2)).sum(axis=1).max() * size / 2)) + border
    inner = (slice(edge, -edge), slice(edge, -edge))
    norm = float(np.sqrt(np.sum(truth[inner] ** 2)))
    image_bytes = recorded.nbytes
    rows = []
    for method in methods:
        correct_image(recorded[:256, :256], m, method=method)  # warm up imports and caches
        t_first = first_call(recorded, m, method)
        t_fft, t_run = [], []
        out = None
        for _ in range(repeats):
            t_fft.append(fft_time(recorded))
            t0 = time.perf_counter()
            out = correct_image(recorded, m, method=method)
            t_run.append(time.perf_counter() - t0)
            t_fft.append(fft_time(recorded))
        assert out is not None
        err = float(np.sqrt(np.sum((out[inner] - truth[inner]) ** 2))) / norm
        del out
        peak = peak_memory(lambda: correct_image(recorded, m, method=method))  # noqa: B023
        rows.append(
            {
                "size": size,
                "percent": percent,
                "method": method,
                "rel_rms": err,
                "time_s": float(np.median(t_run)),
                "fft_s": float(np.median(t_fft)),
                "ratio": float(np.median(t_run) / np.median(t_fft)),
                "first": float(t_first / np.median(t_fft)),
                "peak_mem": peak / image_bytes,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--numpy", action="store_true", help="the sinc method's numpy passes")
    ap.add_argument("--percent", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--border", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.numpy:
        resample._USE_COMPILED = False
    print(
        "| size | anisotropy | method | rel. RMS error | time (s) | time / rfft2 | "
        "first call / rfft2 | peak mem / image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for percent in args.percent:
            for row in run(size, percent, args.repeats, args.border, args.seed, args.methods):
                print(
                    f"| {row['size']}² | {row['percent']:g} % | {row['method']} | "
                    f"{row['rel_rms']:.1e} | {row['time_s']:.4f} | {row['ratio']:.2f} | "
                    f"{row['first']:.2f} | {row['peak_mem']:.1f} |",
                    flush=True,
                )
        fft = row["fft_s"]
        print(f"|   | (one rfft2 of {size}² float32, 1 thread: {fft * 1e3:.2f} ms) | | | | | | |")


if __name__ == "__main__":
    main()
