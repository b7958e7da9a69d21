"""The independent mismatch simulator against known truth (issue 13 item 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anisoctf import CTFParams, FitSettings, Optics, estimate_ctf
from anisoctf.optics.ctf import frequency_grid
from anisoctf.simulate import crlb
from anisoctf.simulate.mismatch import (
    MismatchSpec,
    k2_mtf,
    mismatch_power,
    noise_transfer,
    protein_spectrum,
    simulate_mismatch,
)

K2_STAR = (
    Path(__file__).resolve().parents[2]
    / "shared/data/real/relion_tutorial_metadata/mtf_k2_200kV.star"
)


def test_k2_mtf_model_follows_relion_curve() -> None:
    if not K2_STAR.exists():
        pytest.skip("../shared absent")
    rows = [ln.split() for ln in K2_STAR.read_text().splitlines()]
    d = np.array(
        [[float(a), float(b)] for a, b, *_ in (r for r in rows if len(r) >= 2) if a[0].isdigit()]
    )
    assert d.shape[0] > 100
    assert np.max(np.abs(k2_mtf(d[:, 0]) - d[:, 1])) < 0.02
    assert k2_mtf(np.array(0.0)) == pytest.approx(1.0)


def _radial(spec: MismatchSpec, image: np.ndarray, lo: float, hi: float):
    kx, ky = frequency_grid(spec.shape, spec.optics.pixel_size, rfft=True)
    kx, ky = np.broadcast_arrays(kx, ky)
    per = np.abs(np.fft.rfft2(image.astype(np.float64))) ** 2 / image.size
    k = np.hypot(kx, ky)
    sel = (k > lo) & (k < hi)
    return per[sel].mean(), mismatch_power(spec, kx[sel], ky[sel]).mean()


def test_poisson_mean_and_noise_power() -> None:
    # no specimen, no background: mean = dose_px, noise power = NTF^2 dose_px
    spec = MismatchSpec(shape=(512, 512), dose=30.0, snr=1e-9, background=0.0, seed=3)
    img = simulate_mismatch(spec)
    assert img.mean() == pytest.approx(30.0, rel=0.002)
    assert img.var() == pytest.approx(
        30.0 * np.mean(noise_transfer(np.linspace(0, 0.7, 50))), rel=0.15
    )
    for lo, hi in ((0.05, 0.1), (0.2, 0.25), (0.4, 0.45)):
        got, want = _radial(spec, img, lo, hi)
        assert got == pytest.approx(want, rel=0.03)
    got, _ = _radial(spec, img, 0.45, 0.5)
    assert got == pytest.approx(30.0 * noise_transfer(np.array(0.475)) ** 2, rel=0.03)


def test_mtf_and_bump_in_simulated_spectrum() -> None:
    spec = MismatchSpec(shape=(1024, 1024), dose=40.0, snr=5.0, bump=1.5, seed=4)
    img = simulate_mismatch(spec)
    for lo, hi in ((0.03, 0.05), (0.09, 0.11), (0.2, 0.22), (0.3, 0.35)):
        got, want = _radial(spec, img, lo, hi)
        assert got == pytest.approx(want, rel=0.05)
    k = np.linspace(0.05, 0.3, 501)
    s = protein_spectrum(spec, k)
    assert k[np.argmax(s)] == pytest.approx(0.1, abs=0.002)


def test_estimator_on_mismatch_micrographs_near_bound() -> None:
    errs, bounds = [], []
    for i, (kv, z) in enumerate(((300.0, 12000.0), (200.0, 20000.0), (300.0, 28000.0))):
        truth = CTFParams(z + 500, z - 500, 30.0 + 40 * i, 0.0, 60.0).normalised()
        spec = MismatchSpec(
            shape=(1024, 1024), optics=Optics(1.0, kv, 2.7, 0.08), ctf=truth, dose=40.0, seed=10 + i
        )
        est = estimate_ctf(simulate_mismatch(spec), spec.optics, FitSettings(), diagnostics=False)
        errs += [est.params.defocus_u - truth.defocus_u, est.params.defocus_v - truth.defocus_v]
        b = crlb(spec, k_min=1.0 / FitSettings().min_res, power=mismatch_power)
        bounds += [b["defocus_u"], b["defocus_v"]]
    rms = float(np.sqrt(np.mean(np.square(errs))))
    assert rms < 3.0 * float(np.sqrt(np.mean(np.square(bounds))))
