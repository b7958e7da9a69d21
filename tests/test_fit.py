"""Micrograph CTF estimation against simulated truth (defocus, astigmatism, angle, phase)."""

from __future__ import annotations

import numpy as np
import pytest

from anisoctf import (
    CTFParams,
    FitError,
    FitSettings,
    InputError,
    MicrographSpec,
    Optics,
    estimate_ctf,
    fit_spectrum,
    simulate_micrograph,
)
from anisoctf.spectrum import stack_periodogram


def _angle_error(a: float, b: float) -> float:
    return ((a - b + 90.0) % 180.0) - 90.0


def _simulate(
    ctf: CTFParams, size: int = 1024, seed: int = 0, **kw
) -> tuple[np.ndarray, MicrographSpec]:
    optics = kw.pop("optics", Optics(1.0, 300.0, 2.7, 0.07))
    spec = MicrographSpec(shape=(size, size), optics=optics, ctf=ctf, seed=seed, snr=1.5, **kw)
    return simulate_micrograph(spec).image, spec


@pytest.mark.parametrize(
    ("u", "v", "angle", "kv"),
    [
        (15600.0, 14400.0, 30.0, 300.0),
        (8300.0, 7700.0, 120.0, 200.0),
        (32000.0, 30500.0, 75.0, 300.0),
    ],
)
def test_defocus_astigmatism_and_angle_recovered(u, v, angle, kv):
    truth = CTFParams(u, v, angle, 0.0, 60.0)
    image, spec = _simulate(truth, optics=Optics(1.0, kv, 2.7, 0.08), seed=int(u))
    est = estimate_ctf(image, spec.optics)
    p = est.params
    assert abs(p.defocus_u - u) < 40.0
    assert abs(p.defocus_v - v) < 40.0
    assert abs(_angle_error(p.angle_deg, angle)) < 1.5
    assert p.defocus_u >= p.defocus_v
    assert 0.0 <= p.angle_deg < 180.0
    assert 0.05 < est.figure_of_merit <= 1.0
    assert 2.0 < est.fit_resolution < 8.0  # rings visible well beyond 8 Å at this SNR


def test_rotating_the_micrograph_by_90_degrees_turns_the_angle_by_90():
    truth = CTFParams(20600.0, 19400.0, 20.0, 0.0, 60.0)
    image, spec = _simulate(truth, seed=3)
    a = estimate_ctf(image, spec.optics).params.angle_deg
    # np.rot90 with k=-1 maps +x (columns) onto +y (rows): a feature along angle θ goes to θ+90
    b = estimate_ctf(np.rot90(image, k=-1), spec.optics).params.angle_deg
    assert abs(_angle_error(b, a + 90.0)) < 1.0
    assert abs(_angle_error(a, 20.0)) < 1.0


def test_phase_plate_shift_is_fitted():
    truth = CTFParams(6200.0, 5800.0, 60.0, 70.0, 60.0)
    image, spec = _simulate(truth, seed=5)
    est = estimate_ctf(image, spec.optics, FitSettings(phase_plate=True, df_min=2000.0))
    assert abs(est.params.phase_shift_deg - 70.0) < 6.0
    assert abs(est.params.mean_defocus - 6000.0) < 60.0
    assert abs(est.params.astigmatism - 400.0) < 80.0


def test_with_the_magnification_matrix_the_fit_is_in_the_true_frame():
    # 1.5 % anisotropy along 30°: without the matrix it looks like astigmatism
    a, th = 0.015, np.deg2rad(30.0)
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    m = r @ np.diag([1 + a / 2, 1 - a / 2]) @ r.T
    truth = CTFParams(20300.0, 19700.0, 110.0, 0.0, 60.0)
    optics = Optics(1.0, 300.0, 2.7, 0.07, mag_matrix=tuple(map(tuple, m)))
    image, spec = _simulate(truth, size=2048, seed=11, optics=optics)
    est = estimate_ctf(image, optics)
    assert abs(est.params.defocus_u - truth.defocus_u) < 15.0
    assert abs(est.params.defocus_v - truth.defocus_v) < 15.0
    assert abs(_angle_error(est.params.angle_deg, truth.angle_deg)) < 1.0
    # ignoring the matrix gives a different, wrong astigmatism (the false part ≈ 2·Δf·a)
    naive = estimate_ctf(image, Optics(1.0, 300.0, 2.7, 0.07)).params
    assert abs(naive.astigmatism - truth.astigmatism) > 200.0


def test_fourier_cropping_to_a_fitting_pixel_size_keeps_the_answer():
    truth = CTFParams(12300.0, 11700.0, 45.0, 0.0, 40.0)
    image, spec = _simulate(truth, size=2048, seed=2, optics=Optics(0.6, 300.0, 2.7, 0.07))
    est = estimate_ctf(image, spec.optics, FitSettings(fit_pixel_size=1.0, max_res=3.0))
    assert abs(est.params.mean_defocus - 12000.0) < 30.0
    assert est.diagnostics is not None
    assert est.diagnostics.pixel_size > 0.6  # the spectrum was computed at the coarser size


def test_an_outlier_region_does_not_spoil_the_estimate():
    truth = CTFParams(18500.0, 17500.0, 140.0, 0.0, 60.0)
    image, spec = _simulate(truth, size=2048, seed=4)
    clean = estimate_ctf(image, spec.optics).params
    bad = image.copy()
    rng = np.random.default_rng(0)
    bad[:600, :700] = bad[:600, :700] * 0.4 + 40.0 * rng.standard_normal((600, 700))  # "carbon"
    dirty = estimate_ctf(bad, spec.optics).params
    assert abs(dirty.mean_defocus - clean.mean_defocus) < 25.0
    assert abs(dirty.mean_defocus - 18000.0) < 40.0


def test_pooled_particle_stack_spectrum():
    truth = CTFParams(21000.0, 21000.0, 0.0, 0.0, 40.0)
    image, spec = _simulate(truth, size=2048, seed=8)
    # cut 64 "particles" of 256² out of the micrograph and pool their periodograms
    stack = np.stack(
        [image[r : r + 256, c : c + 256] for r in range(0, 2048, 256) for c in range(0, 2048, 256)]
    )
    est = fit_spectrum(stack_periodogram(stack, 1.0), spec.optics, FitSettings(box=256))
    assert abs(est.params.mean_defocus - 21000.0) / 21000.0 < 0.01


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (np.full((512, 512), np.nan, dtype=np.float32), "NaN"),
        (np.ones((512, 512), dtype=np.float32), "same value"),
        (np.zeros((0, 0), dtype=np.float32), "empty"),
    ],
)
def test_unusable_images_raise_one_line_input_errors(image, fragment):
    with pytest.raises(InputError) as e:
        estimate_ctf(image, Optics(1.0), name="mic_007.mrc")
    msg = str(e.value)
    assert "\n" not in msg
    assert "mic_007.mrc" in msg
    assert fragment in msg


def test_no_rings_in_range_is_a_clear_fit_error():
    # white noise has no Thon rings at all: the fit must say so, not invent a defocus
    image = np.random.default_rng(1).poisson(40.0, (1024, 1024)).astype(np.float32)
    with pytest.raises(FitError) as e:
        estimate_ctf(image, Optics(1.0), name="noise.mrc")
    assert "noise.mrc" in str(e.value)
    assert "\n" not in str(e.value)


def test_settings_validation():
    with pytest.raises(ValueError):
        FitSettings(min_res=3.0, max_res=5.0)
    with pytest.raises(ValueError):
        FitSettings(df_min=5000.0, df_max=4000.0)
    with pytest.raises(ValueError):
        FitSettings(box=63)


def test_astigmatism_restraint_pulls_towards_zero():
    truth = CTFParams(15300.0, 14700.0, 50.0, 0.0, 60.0)
    image, spec = _simulate(truth, seed=9)
    free = estimate_ctf(image, spec.optics).params
    tight = estimate_ctf(image, spec.optics, FitSettings(astig_restraint=5.0)).params
    assert abs(free.astigmatism - 600.0) < 60.0
    assert tight.astigmatism < 0.5 * free.astigmatism
    assert abs(tight.mean_defocus - 15000.0) < 60.0
