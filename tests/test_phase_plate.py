"""Phase-plate fits over the whole range of shifts (issue 13 item 12), and NaN as a failure.

CTF² has period 180° in the phase shift, so [0°, 180°) is every shift a power spectrum can tell
apart; Volta plates reach 120° and more as they age. Simulated 1024² micrographs (known truth)
at shifts 0–175° and mean defocus 5,000–20,000 Å.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from anisoctf import (
    CTFParams,
    FitError,
    FitSettings,
    MicrographSpec,
    Optics,
    estimate_ctf,
    simulate_micrograph,
)
from anisoctf.fit import refine, search
from anisoctf.fit.band import make_band
from anisoctf.spectrum.periodogram import micrograph_spectrum

OPTICS = Optics(1.0, 300.0, 2.7, 0.07)


def _phase_error(a: float, b: float) -> float:
    return ((a - b + 90.0) % 180.0) - 90.0


def _micrograph(phase: float, defocus: float, seed: int) -> np.ndarray:
    truth = CTFParams(defocus + 250.0, defocus - 250.0, 35.0, phase, 60.0)
    spec = MicrographSpec(shape=(1024, 1024), optics=OPTICS, ctf=truth, seed=seed, snr=1.5)
    return simulate_micrograph(spec).image


# every shift from 0° to 175°, each at 5,000, 10,000 and 20,000 Å, and the case that failed:
# 120° at 8,000 Å
CASES = [
    (phase, defocus)
    for phase in (0.0, 30.0, 60.0, 90.0, 120.0, 150.0, 175.0)
    for defocus in (5000.0, 10000.0, 20000.0)
] + [(120.0, 8000.0)]


@pytest.mark.parametrize(("phase", "defocus"), CASES)
def test_phase_shift_and_defocus_recovered_over_the_whole_range(phase, defocus):
    image = _micrograph(phase, defocus, seed=int(defocus + phase))
    est = estimate_ctf(image, OPTICS, FitSettings(phase_plate=True, df_min=1000.0))
    p = est.params
    assert np.isfinite([p.defocus_u, p.defocus_v, p.angle_deg, p.phase_shift_deg]).all()
    assert 0.0 <= p.phase_shift_deg < 180.0  # CTF²'s period: one answer per shift
    assert abs(_phase_error(p.phase_shift_deg, phase)) < 3.0
    assert abs(p.mean_defocus - defocus) < 25.0
    assert abs(p.astigmatism - 500.0) < 60.0


def test_120_degrees_at_8000_angstrom_with_the_default_defocus_range():
    # issue 13 saw 53,095 Å for a held-out 120°, 8,000 Å micrograph with the default df range
    est = estimate_ctf(_micrograph(120.0, 8000.0, seed=12), OPTICS, FitSettings(phase_plate=True))
    assert abs(_phase_error(est.params.phase_shift_deg, 120.0)) < 3.0
    assert abs(est.params.mean_defocus - 8000.0) < 25.0


@pytest.fixture(scope="module")
def band():
    image = _micrograph(120.0, 8000.0, seed=3)
    spectrum = micrograph_spectrum(image, OPTICS.pixel_size, box=512)
    return make_band(spectrum, OPTICS.with_pixel_size(spectrum.pixel_size), 1 / 30.0, 1 / 6.0, 2)


def test_a_nan_in_the_spectrum_is_a_failure_not_a_candidate(band):
    values = band.values.copy()
    values[len(values) // 3] = np.nan
    bad = dataclasses.replace(band, values=values)
    with pytest.raises(FitError, match="NaN or Inf"):
        search.coarse_search(bad, OPTICS, 1000.0, 50000.0, 3000.0, phase_plate=True)


def test_a_nan_score_is_a_failure_not_the_best_candidate(band, monkeypatch):
    # np.argmax takes a NaN for the maximum: one NaN score used to become the search's answer
    real = search._projected_drop

    def one_nan(*args):
        out = real(*args)
        out.flat[out.size // 2] = np.nan
        return out

    monkeypatch.setattr(search, "_projected_drop", one_nan)
    with pytest.raises(FitError, match="NaN/Inf"):
        search.coarse_search(band, OPTICS, 1000.0, 50000.0, 3000.0, phase_plate=True)


def test_a_nan_likelihood_is_a_failure_not_a_result(band, monkeypatch):
    found = search.coarse_search(band, OPTICS, 1000.0, 50000.0, 3000.0, phase_plate=True)
    start = found.candidates[0]
    ok = refine.refine_ml(band, OPTICS, start, fit_phase=True)
    assert np.isfinite(ok.nll) and 0.0 <= ok.phase_deg < 180.0
    assert abs(_phase_error(ok.phase_deg, 120.0)) < 5.0
    real = refine._ctf_terms

    def nan_ctf(*args):
        c2, dc2 = real(*args)
        c2 = c2.copy()
        c2[::97] = np.nan  # a NaN anywhere in the model
        return c2, dc2

    monkeypatch.setattr(refine, "_ctf_terms", nan_ctf)
    with pytest.raises(FloatingPointError):
        refine.refine_ml(band, OPTICS, start, fit_phase=True)
    # and the micrograph fails with a message instead of a NaN result
    with pytest.raises(FitError):
        estimate_ctf(_micrograph(120.0, 8000.0, seed=3), OPTICS, FitSettings(phase_plate=True))
