"""The diagnostic picture <stem>_ctf.png (anisoctf.report.diagnostic)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anisoctf.fit.result import CTFEstimate, FitDiagnostics
from anisoctf.optics.ctf import CTFParams, Optics, ctf_1d, ctf_2d
from anisoctf.report import diagnostic as dmod
from anisoctf.report import render_diagnostic


def synthetic_estimate(
    box: int = 512,
    params: CTFParams | None = None,
    spectrum_params: CTFParams | None = None,
    noise: float = 0.15,
    pixel_size: float = 1.2,
    warnings: tuple[str, ...] = (),
    seed: int = 0,
) -> CTFEstimate:
    """A hand-made estimate whose observed spectrum is CTF² (of ``spectrum_params``) + noise."""
    params = params or CTFParams(21000.0, 18500.0, 35.0)
    spectrum_params = spectrum_params or params
    optics = Optics(pixel_size=pixel_size)
    rng = np.random.default_rng(seed)
    shape = (box, box)
    model = (ctf_2d(shape, params, optics) ** 2).astype(np.float32)
    observed = ctf_2d(shape, dataclasses.replace(spectrum_params, bfactor=60.0), optics) ** 2
    spectrum = (observed + noise * rng.standard_normal(observed.shape)).astype(np.float32)

    k = np.fft.rfftfreq(box, d=pixel_size)
    profile_fit = ctf_1d(k, params.mean_defocus, optics) ** 2
    profile = ctf_1d(k, spectrum_params.mean_defocus, optics, bfactor=60.0) ** 2
    profile = profile + 0.3 * noise * rng.standard_normal(k.size)
    quality = np.clip(1.2 - 3.0 * k, 0.0, 1.0)
    quality[0] = np.nan  # undefined at k = 0: the plot must cope
    diag = FitDiagnostics(
        pixel_size=pixel_size,
        spectrum=spectrum,
        model=model,
        k=k,
        profile=profile,
        profile_fit=profile_fit,
        quality=quality,
        fit_band=(1 / 30.0, 1 / 4.0),
    )
    return CTFEstimate(
        params=params,
        optics=optics,
        figure_of_merit=0.41,
        fit_resolution=3.9,
        n_tiles=48.0,
        diagnostics=diag,
        warnings=warnings,
    )


def spectrum_panel(path) -> np.ndarray:
    """The rendered spectrum square as a float gray image."""
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    x0, y0, s = dmod._SPEC_X0, dmod._SPEC_Y0, dmod._SPEC_SIZE
    return img[y0 : y0 + s, x0 : x0 + s]


def band_mask(size: int, est: CTFEstimate, margin: float = 0.1) -> np.ndarray:
    """Display pixels well inside the fit band (and away from the dotted band circles)."""
    diag = est.diagnostics
    k_nyq = 0.5 / diag.pixel_size
    c = size / 2
    yy, xx = np.mgrid[0:size, 0:size]
    kr = np.hypot(yy + 0.5 - c, xx + 0.5 - c) / (size / 2) * k_nyq
    lo, hi = diag.fit_band
    return (kr > lo * (1 + margin)) & (kr < hi * (1 - margin))


def mirror_correlation(panel: np.ndarray, est: CTFEstimate) -> float:
    """Correlation of the left (observed) half with the point reflection of the right (fit) half.

    S(-k) = S(k), so the observed pixel at -k should look like the fitted pixel at +k.
    """
    s = panel.shape[0]
    h = s // 2
    mask = band_mask(s, est)
    # point reflection about the centre; rows/cols 1..s-1 map to s-1..1
    refl = panel[::-1, ::-1]
    refl = np.roll(refl, (1, 1), axis=(0, 1))
    left = panel[1:, 1 : h - 2]
    right_refl = refl[1:, 1 : h - 2]
    m = mask[1:, 1 : h - 2]
    return float(np.corrcoef(left[m], right_refl[m])[0, 1])


def test_full_plane_is_hermitian_reconstruction():
    rng = np.random.default_rng(1)
    for n in (64, 65):
        img = rng.standard_normal((n, n))
        power = np.abs(np.fft.fft2(img)) ** 2
        half = power[:, : n // 2 + 1]
        full = dmod.full_plane(half)
        np.testing.assert_allclose(full, np.fft.fftshift(power), rtol=1e-5)


def test_render_writes_valid_png(tmp_path):
    est = synthetic_estimate()
    out = tmp_path / "mic_0001_ctf.png"
    render_diagnostic(est, out, title="mic_0001.mrc")
    assert out.is_file()
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (dmod.WIDTH, dmod.HEIGHT)
        arr = np.asarray(im.convert("RGB"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mic_0001_ctf.png"]
    assert arr.std() > 10  # not uniform
    # the fit curve (red) and the quality curve (green) are drawn in the plot
    x0, y0, x1, y1 = dmod._PLOT
    plot = arr[y0:y1, x0:x1].astype(int)
    red = (plot[..., 0] > 150) & (plot[..., 1] < 110) & (plot[..., 2] < 110)
    green = (plot[..., 1] > 120) & (plot[..., 0] < 110) & (plot[..., 2] < 110)
    assert red.sum() > 300 and green.sum() > 100


def test_spectrum_halves_are_mirror_consistent(tmp_path):
    good = synthetic_estimate()
    render_diagnostic(good, tmp_path / "good.png")
    panel = spectrum_panel(tmp_path / "good.png")
    assert panel.std() > 20
    r_good = mirror_correlation(panel, good)

    # the observed rings belong to another defocus: the halves no longer continue each other
    bad = synthetic_estimate(spectrum_params=CTFParams(15000.0, 14000.0, 120.0))
    render_diagnostic(bad, tmp_path / "bad.png")
    r_bad = mirror_correlation(spectrum_panel(tmp_path / "bad.png"), bad)
    assert r_good > 0.6
    assert r_bad < 0.2


def test_spectrum_panel_shows_model_rings_in_place(tmp_path):
    # the right half must be the fitted CTF² in the right orientation (not transposed/flipped)
    est = synthetic_estimate(params=CTFParams(24000.0, 16000.0, 30.0), noise=0.3)
    render_diagnostic(est, tmp_path / "x.png")
    panel = spectrum_panel(tmp_path / "x.png")
    s = panel.shape[0]
    model = dmod.full_plane(est.diagnostics.model)
    n = model.shape[0]
    disp = np.asarray(
        Image.fromarray(model.astype(np.float32)).resize((s, s), Image.Resampling.BOX)
    )
    mask = band_mask(s, est)
    mask[:, : s // 2 + 2] = False  # right half only
    r = np.corrcoef(panel[mask], disp[mask])[0, 1]
    r_transposed = np.corrcoef(panel[mask], disp.T[mask])[0, 1]
    assert n == 512
    assert r > 0.8
    assert r_transposed < 0.5


def test_small_box_and_phase_shift_and_warnings(tmp_path):
    est = synthetic_estimate(
        box=128,
        params=CTFParams(9000.0, 8000.0, 100.0, phase_shift_deg=60.0),
        warnings=("estimate at the edge of the defocus range", "few tiles", "third"),
    )
    out = tmp_path / "small_ctf.png"
    render_diagnostic(est, str(out))
    with Image.open(out) as im:
        assert im.size == (dmod.WIDTH, dmod.HEIGHT)
        arr = np.asarray(im.convert("RGB")).astype(int)
    # warnings are written in orange at the bottom
    bottom = arr[-50:]
    orange = (bottom[..., 0] > 150) & (bottom[..., 1] < 130) & (bottom[..., 2] < 60)
    assert orange.sum() > 50


def test_overwrites_existing_file_atomically(tmp_path):
    out = tmp_path / "a_ctf.png"
    out.write_bytes(b"old")
    render_diagnostic(synthetic_estimate(box=128), out)
    with Image.open(out) as im:
        assert im.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["a_ctf.png"]


def test_missing_directory_leaves_nothing(tmp_path):
    out = tmp_path / "no_such_dir" / "m_ctf.png"
    with pytest.raises(OSError):
        render_diagnostic(synthetic_estimate(box=128), out)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_removes_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "m_ctf.png"
    out.write_bytes(b"previous")

    import anisoctf.io.atomic as atomic_mod
    from anisoctf.jobs.batch_state import _TMP_NAME

    def broken_replace(src, dst):
        # a temporary name that a later run recognises (and removes if a kill left it)
        assert _TMP_NAME.match(Path(src).name) and Path(src).name.startswith(".m_ctf.png.")
        assert Path(src).stat().st_size > 1000
        raise OSError("disk full")

    monkeypatch.setattr(atomic_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        render_diagnostic(synthetic_estimate(box=128), out)
    assert [p.name for p in tmp_path.iterdir()] == ["m_ctf.png"]
    assert out.read_bytes() == b"previous"  # the old picture is untouched


def test_failure_while_encoding_leaves_nothing(tmp_path, monkeypatch):
    def broken_encode(rgb):
        raise MemoryError

    monkeypatch.setattr(dmod, "encode_png", broken_encode)
    with pytest.raises(MemoryError):
        render_diagnostic(synthetic_estimate(box=128), tmp_path / "m_ctf.png")
    assert list(tmp_path.iterdir()) == []


def test_encode_png_round_trips_through_pillow():
    rgb = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[:10] = 255
    with Image.open(io.BytesIO(dmod.encode_png(rgb))) as im:
        im.load()
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    with pytest.raises(ValueError):
        dmod.encode_png(rgb.astype(np.float32))


def test_no_diagnostics_is_an_error(tmp_path):
    est = dataclasses.replace(synthetic_estimate(box=128), diagnostics=None)
    with pytest.raises(ValueError, match="diagnostics"):
        render_diagnostic(est, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_degenerate_inputs_still_render(tmp_path):
    # flat spectrum, NaNs in the profiles, band from k = 0, no fit resolution, anisomag optics,
    # and a fit at a coarser pixel size than the image
    est = synthetic_estimate(box=128)
    diag = est.diagnostics
    profile = diag.profile.copy()
    profile[10:20] = np.nan
    diag = dataclasses.replace(
        diag,
        spectrum=np.zeros_like(diag.spectrum),
        profile=profile,
        fit_band=(0.0, 1.0),
        pixel_size=2.0,
    )
    optics = Optics(pixel_size=1.0, mag_matrix=((1.01, 0.002), (0.002, 0.99)))
    est = dataclasses.replace(
        est, diagnostics=diag, optics=optics, fit_resolution=float("nan"), n_tiles=0.0
    )
    out = tmp_path / "d_ctf.png"
    render_diagnostic(est, out, title="")
    with Image.open(out) as im:
        assert im.size == (dmod.WIDTH, dmod.HEIGHT)


def test_mismatched_arrays_are_an_error(tmp_path):
    est = synthetic_estimate(box=128)
    diag = dataclasses.replace(est.diagnostics, model=est.diagnostics.model[:, :10])
    with pytest.raises(ValueError, match="same shape"):
        render_diagnostic(dataclasses.replace(est, diagnostics=diag), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_renders_from_several_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    est = synthetic_estimate(box=256)
    paths = [tmp_path / f"m{i}_ctf.png" for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: render_diagnostic(est, p, title=p.stem), paths))
    first = np.asarray(Image.open(paths[0]).convert("L"), dtype=float)
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (dmod.WIDTH, dmod.HEIGHT)
            # same estimate, different titles: identical below the header
            assert np.array_equal(np.asarray(im.convert("L"), dtype=float)[36:], first[36:])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
