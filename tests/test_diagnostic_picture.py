"""The diagnostic picture shows what was measured (issue 13 item 10).

* the fitted 1D trace must not hide the observed one: where the fit and the observation
  coincide, observed-trace pixels stay visible (and the fit still shows);
* the fitted CTF² half has no aliasing rings: far from focus the rings are finer than the
  display's pixels, and the picture must show their mean there, not Moiré circles; where the
  rings are resolved it agrees with a finely sampled reference reduced to the display;
* a failed micrograph still gets its picture: its spectrum and the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from test_report_diagnostic import synthetic_estimate

from anisoctf.fit.result import FitSettings
from anisoctf.io.mrc import write_mrc
from anisoctf.jobs.micrograph import process_one
from anisoctf.optics.ctf import CTFParams, Optics, chi
from anisoctf.optics.kernel import ctf2_from_chi, ctf_constants, frequency_features
from anisoctf.report import diagnostic as dmod
from anisoctf.report import render_diagnostic
from anisoctf.report.display_model import display_frequencies


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)


def _near(img: np.ndarray, colour, tol: int = 30) -> np.ndarray:
    return np.all(np.abs(img - np.asarray(colour)[None, None, :]) <= tol, axis=2)


def test_observed_trace_stays_visible_where_the_fit_agrees(tmp_path):
    est = synthetic_estimate(box=256)
    d = est.diagnostics
    k = np.asarray(d.k)
    # a perfect fit: the observed profile is the fitted one, point for point
    diag = dataclasses.replace(d, profile=np.array(d.profile_fit, dtype=float))
    render_diagnostic(dataclasses.replace(est, diagnostics=diag), tmp_path / "p.png")
    img = _rgb(tmp_path / "p.png")
    x0, y0, x1, y1 = dmod._PLOT
    plot = img[y0:y1, x0:x1]
    # columns inside the fit band, where the fit is drawn in full colour
    kb = np.linspace(0.0, k.max(), x1 - x0)
    cols = (kb > d.fit_band[0] * 1.2) & (kb < d.fit_band[1] * 0.9)
    observed = _near(plot, dmod._OBSERVED, 35)[:, cols]
    fitted = _near(plot, dmod._FIT, 45)[:, cols]
    # the observed trace shows in most columns of the band (drawn over the fit) ...
    assert observed.any(axis=0).mean() > 0.8
    # ... and the fit is still seen beside it
    assert fitted.any(axis=0).mean() > 0.8


def _model_half(path) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    x0, y0, s = dmod._SPEC_X0, dmod._SPEC_Y0, dmod._SPEC_SIZE
    return img[y0 : y0 + s, x0 : x0 + s]


def _ring_cycles_per_pixel(params: CTFParams, optics: Optics, n: int, size: int, apix: float):
    """Cycles of cos 2χ per display pixel (radial), from a finely sampled χ."""
    kx, ky = display_frequencies(n, size, apix)
    feats = frequency_features(kx, ky)
    phase = chi(feats, params, optics)
    return np.hypot(*np.gradient(phase)) / np.pi


def _reference(params: CTFParams, optics: Optics, n: int, size: int, apix: float, ss: int = 8):
    """CTF² sampled ``ss × ss`` times per display pixel and box-averaged."""
    kx, ky = display_frequencies(n, size * ss, apix)
    feats = frequency_features(kx, ky)
    c2 = ctf2_from_chi(chi(feats, params, optics), ctf_constants(optics))
    return c2.reshape(size, ss, size, ss).mean(axis=(1, 3))


def test_model_half_has_no_aliasing_rings(tmp_path):
    # 25,000 Å from focus at 1 Å/px: beyond ~4 Å the rings are finer than the display's
    # Nyquist (two display pixels per ring), and beyond ~3 Å finer than the 512 grid's
    params = CTFParams(25500.0, 24500.0, 20.0)
    optics = Optics(pixel_size=1.0)
    est = synthetic_estimate(box=512, params=params, pixel_size=1.0)
    d = est.diagnostics
    est = dataclasses.replace(est, diagnostics=dataclasses.replace(d, fit_band=(1 / 40, 1 / 2.2)))
    render_diagnostic(est, tmp_path / "m.png")
    s = dmod._SPEC_SIZE
    half = _model_half(tmp_path / "m.png")[:, s // 2 + 2 :]
    u = _ring_cycles_per_pixel(params, optics, 512, s, 1.0)[:, s // 2 + 2 :]
    yy, xx = np.mgrid[0:s, 0:s]
    kr = np.hypot(xx + 0.5 - s / 2, yy + 0.5 - s / 2)[:, s // 2 + 2 :] / (s / 2) * 0.5
    inside = (kr > (1 / 40) * 1.1) & (kr < (1 / 2.2) * 0.95)  # in the band, off the circles
    resolved = inside & (u < 0.25)  # rings of more than 4 display pixels
    beyond = inside & (u > 0.6)  # rings finer than the display's Nyquist
    assert resolved.sum() > 1000 and beyond.sum() > 5000
    # beyond the display's Nyquist no ring pattern may show: the (tiny) spread left there is
    # a small fraction of the rings' contrast where they are resolved
    assert np.std(half[beyond]) < 0.1 * np.std(half[resolved])
    # where resolved, the picture is the finely sampled reference reduced to the display
    ref = _reference(params, optics, 512, s, 1.0)[:, s // 2 + 2 :]
    r = np.corrcoef(half[resolved], ref[resolved])[0, 1]
    assert r > 0.97


def test_failed_micrograph_gets_its_spectrum_and_reason(tmp_path):
    # a micrograph of pure noise has no rings: the fit fails, the picture stays
    rng = np.random.default_rng(1)
    img = rng.poisson(20.0, (768, 768)).astype(np.float32)
    write_mrc(tmp_path / "noise.mrc", img, 1.0)
    out = tmp_path / "out"
    out.mkdir()
    res = process_one(
        tmp_path / "noise.mrc", "noise.mrc", Optics(1.0), FitSettings(box=256), out, 1
    )
    assert isinstance(res, str) and "noise.mrc" in res
    png = out / "noise_ctf.png"
    assert png.is_file()
    pic = _rgb(png)
    assert pic.shape == (dmod.HEIGHT, dmod.WIDTH, 3)
    x0, y0, s = dmod._SPEC_X0, dmod._SPEC_Y0, dmod._SPEC_SIZE
    panel = pic[y0 : y0 + s, x0 : x0 + s].mean(axis=2)
    assert panel.std() > 10.0  # a spectrum is drawn, not an empty square
    # the reason is written in the warning colour beside it
    right = pic[y0 : y0 + 200, dmod._RIGHT_X0 :]
    assert _near(right, dmod._WARN, 40).sum() > 200


def test_unreadable_micrograph_gets_the_reason_alone(tmp_path):
    (tmp_path / "broken.mrc").write_bytes(b"not an mrc file at all" * 10)
    out = tmp_path / "out"
    out.mkdir()
    res = process_one(tmp_path / "broken.mrc", "broken.mrc", Optics(1.0), FitSettings(), out, 1)
    assert isinstance(res, str)
    pic = _rgb(out / "broken_ctf.png")
    x0, y0, s = dmod._SPEC_X0, dmod._SPEC_Y0, dmod._SPEC_SIZE
    assert pic[y0 + 5 : y0 + s - 5, x0 + 5 : x0 + s - 5].std() < 1.0  # no spectrum to show
    assert _near(pic[y0 : y0 + 200, dmod._RIGHT_X0 :], dmod._WARN, 40).sum() > 200


def test_flags_are_shown_first_in_the_picture(tmp_path):
    est = synthetic_estimate(box=256, warnings=("a remark", "another remark", "a third"))
    flag = "implausible: figure of merit 0.001 is below 0.02"
    render_diagnostic(est, tmp_path / "f.png", warnings=(flag, *est.warnings))
    render_diagnostic(est, tmp_path / "g.png")
    a, b = _rgb(tmp_path / "f.png"), _rgb(tmp_path / "g.png")
    assert not np.array_equal(a[dmod.HEIGHT - 46 :], b[dmod.HEIGHT - 46 :])
    assert np.array_equal(a[: dmod.HEIGHT - 46], b[: dmod.HEIGHT - 46])
