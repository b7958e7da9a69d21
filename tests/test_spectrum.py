"""Spectra and bands against analytic truth (docs/conventions.md §5–§6).

* normalisation: a white image of variance s^2 has spectrum s^2 (per-pixel PSD);
* layout: rfft2 half plane, FFT order, zero at [0, 0], kx along columns (= image x);
* Fourier cropping keeps ``power * pixel_size**2`` (the PSD per Å⁻²) at every kept frequency;
* band selection, binning and polar compression against brute force.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from anisoctf.fit.band import (
    binned_power,
    concat_bands,
    make_band,
    polar_compress,
    radial_basis,
)
from anisoctf.optics.ctf import Optics, frequency_features, frequency_grid
from anisoctf.spectrum.periodogram import (
    Spectrum,
    full_periodogram,
    micrograph_spectrum,
    outlier_tile_weights,
    stack_periodogram,
    tile_periodogram,
)

SIGMA = 3.0
MAG = np.array([[1.045, 0.03], [-0.02, 0.96]])


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """1024² white Gaussian noise of standard deviation SIGMA on an offset of 100 (float32)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1024, 1024)) * SIGMA + 100.0).astype(np.float32)


def _interior_mean(sp: Spectrum, lo: float = 0.05, hi: float = 0.45) -> float:
    """Mean spectrum over lo <= |k| <= hi (cycles per pixel of the spectrum)."""
    kx, ky = frequency_grid(sp.shape, sp.pixel_size)
    k = np.hypot(*np.broadcast_arrays(kx, ky)) * sp.pixel_size
    return float(sp.power[(k >= lo) & (k <= hi)].mean())


def _spectrum(power: np.ndarray, apix: float, shape: tuple[int, int] | None = None) -> Spectrum:
    return Spectrum(
        power=power,
        pixel_size=apix,
        n_eff=1.0,
        tile_weights=np.ones(1),
        tile_origins=np.zeros((1, 2), dtype=np.int64),
        shape=shape or (0, 0),
    )


# ---------------------------------------------------------------------------------------------
# normalisation


def test_white_noise_full_periodogram(noise: np.ndarray) -> None:
    sp = full_periodogram(noise, 1.0)
    assert sp.shape == (1024, 1024) and sp.power.shape == (1024, 513)
    assert sp.n_eff == 1.0 and sp.pixel_size == 1.0
    assert _interior_mean(sp) == pytest.approx(SIGMA**2, rel=0.02)


def test_white_noise_full_periodogram_with_weight_map(noise: np.ndarray) -> None:
    y = np.linspace(0.0, 1.0, noise.shape[0])[:, None]
    wmap = np.broadcast_to(0.2 + 0.8 * y, noise.shape)  # any smooth map keeps the PSD level
    sp = full_periodogram(noise, 1.0, weight_map=wmap)
    assert _interior_mean(sp) == pytest.approx(SIGMA**2, rel=0.02)


def test_white_noise_tile_periodogram(noise: np.ndarray) -> None:
    sp = tile_periodogram(noise, 1.0, box=256)
    assert sp.power.shape == (256, 129) and sp.shape == (256, 256)
    assert np.all(sp.tile_weights == 1.0)
    assert sp.n_eff > 10
    assert _interior_mean(sp) == pytest.approx(SIGMA**2, rel=0.02)


def test_white_noise_stack_periodogram() -> None:
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((40, 128, 128)) * SIGMA + 7.0
    sp = stack_periodogram(stack, 1.4)
    assert sp.power.shape == (128, 65) and sp.n_eff == 40.0 and sp.pixel_size == 1.4
    assert _interior_mean(sp) == pytest.approx(SIGMA**2, rel=0.02)
    padded = stack_periodogram(stack, 1.4, box=256)  # zero padding keeps the PSD level
    assert padded.power.shape == (256, 129)
    assert _interior_mean(padded) == pytest.approx(SIGMA**2, rel=0.02)


def test_stack_periodogram_smaller_box_keeps_the_level() -> None:
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((40, 128, 128)) * SIGMA
    sp = stack_periodogram(stack, 1.0, box=64)
    assert sp.power.shape == (64, 33)
    assert _interior_mean(sp) == pytest.approx(SIGMA**2, rel=0.05)


# ---------------------------------------------------------------------------------------------
# layout: which index holds which frequency


@pytest.mark.parametrize(("fx", "fy"), [(20, 0), (0, 12), (20, -12), (35, 30)])
def test_cosine_peak_index(fx: int, fy: int) -> None:
    """cos(2 pi (fx x / nx + fy y / ny)) with x = column, y = row: peak at [fy mod ny, fx]."""
    ny, nx, apix = 192, 256, 1.3  # not square: an x/y swap cannot pass
    y, x = np.mgrid[0:ny, 0:nx]
    img = 50.0 + np.cos(2 * np.pi * (fx * x / nx + fy * y / ny))
    sp = full_periodogram(img.astype(np.float32), apix, taper=16)
    assert sp.shape == (ny, nx) and sp.power.shape == (ny, nx // 2 + 1)
    r, c = np.unravel_index(np.argmax(sp.power), sp.power.shape)
    if fx == 0:  # the kx = 0 column holds both +ky and -ky
        assert c == 0 and r in (fy % ny, -fy % ny)
    else:
        assert (r, c) == (fy % ny, fx)
        kx, ky = frequency_grid(sp.shape, sp.pixel_size)
        assert kx[0, c] == pytest.approx(fx / (nx * apix))
        assert ky[r, 0] == pytest.approx(fy / (ny * apix))
    # the whole cosine's power (variance 1/2) sits in that peak and its taper side lobes
    assert sp.power[r, c] > 100 * np.median(sp.power)


# ---------------------------------------------------------------------------------------------
# Fourier cropping to a fit pixel size


def test_full_periodogram_crop(noise: np.ndarray) -> None:
    full = full_periodogram(noise, 1.0)
    for target in (2.0, 1.7):
        crop = full_periodogram(noise, 1.0, fit_pixel_size=target)
        cy = crop.shape[0]
        # the size is rounded down to an FFT-friendly multiple of 16: pixel >= target
        assert crop.pixel_size == pytest.approx(1024 / cy)
        assert cy % 16 == 0 and cy <= 1024 / target
        assert target <= crop.pixel_size < 1.06 * target
        assert crop.power.shape == (cy, cy // 2 + 1)
        # same Fourier coefficients: power * apix^2 is unchanged at every kept frequency
        rows = np.r_[0 : cy // 2, 1024 - cy // 2 : 1024]
        kept = full.power[rows, : cy // 2 + 1]
        np.testing.assert_allclose(crop.power * crop.pixel_size**2, kept * 1.0**2, rtol=1e-4)
        # so white noise of variance s^2 at 1 Å reads s^2 (1 / apix)^2 at the cropped size
        level = _interior_mean(crop) * crop.pixel_size**2
        assert level == pytest.approx(SIGMA**2, rel=0.02)
    assert full_periodogram(noise, 1.0, fit_pixel_size=0.8).pixel_size == 1.0  # no upsampling


def test_full_periodogram_crop_non_square_keeps_frequencies() -> None:
    ny, nx = 768, 1024
    y, x = np.mgrid[0:ny, 0:nx]
    img = (np.cos(2 * np.pi * x / 20.0) + np.cos(2 * np.pi * y / 25.0)).astype(np.float32)
    sp = full_periodogram(img, 1.0, fit_pixel_size=1.7)
    kx, ky = frequency_grid(sp.shape, sp.pixel_size)
    c = int(np.argmax(sp.power[0, 1:])) + 1  # the x cosine, on the ky = 0 row
    r = int(np.argmax(sp.power[1 : sp.shape[0] // 2, 0])) + 1  # the y cosine, on kx = 0
    assert ky[r, 0] == pytest.approx(1 / 25.0, abs=0.5 / (ny * 1.0))
    assert kx[0, c] == pytest.approx(1 / 20.0, abs=0.5 / (nx * 1.0))


def test_tile_periodogram_crop(noise: np.ndarray) -> None:
    box, target = 128, 1.7
    sp = tile_periodogram(noise, 1.0, box=box, fit_pixel_size=target)
    tile = int(round(box * target / 2)) * 2  # even tile of the nearest size
    assert sp.pixel_size == pytest.approx(tile / box)
    assert abs(sp.pixel_size - target) <= 1.0 / box
    assert sp.power.shape == (box, box // 2 + 1)
    assert _interior_mean(sp) * sp.pixel_size**2 == pytest.approx(SIGMA**2, rel=0.02)


def test_crop_preserves_low_frequency_content() -> None:
    """A cosine at 1/20 Å⁻¹ keeps its frequency and its power per Å⁻² after cropping 1 -> 2 Å."""
    n = 512
    y, x = np.mgrid[0:n, 0:n]
    img = np.cos(2 * np.pi * (x / 20.0 + y / 40.0)).astype(np.float32)  # 1 Å pixels
    full = full_periodogram(img, 1.0)
    crop = full_periodogram(img, 1.0, fit_pixel_size=2.0)
    assert crop.pixel_size == 2.0
    for sp in (full, crop):
        r, c = np.unravel_index(np.argmax(sp.power), sp.power.shape)
        kx, ky = frequency_grid(sp.shape, sp.pixel_size)
        assert kx[0, c] == pytest.approx(1 / 20.0, abs=0.5 / (n * 1.0))
        assert ky[r, 0] == pytest.approx(1 / 40.0, abs=0.5 / (n * 1.0))
    assert crop.power.max() * 4.0 == pytest.approx(full.power.max(), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# outliers


def _with_block(img: np.ndarray, r: int, c: int, size: int, mean_shift: float) -> np.ndarray:
    """Paste a carbon-like block: 5x the variance (and optionally a brighter mean)."""
    out = img.copy()
    blk = out[r : r + size, c : c + size]
    out[r : r + size, c : c + size] = (blk - 100.0) * np.sqrt(5.0) + 100.0 + mean_shift
    return out


@pytest.mark.parametrize("shift", [0.0, 30.0])
def test_outlier_tile_weights(noise: np.ndarray, shift: float) -> None:
    w, origins = outlier_tile_weights(noise, 256)
    assert w.shape == (16,) and np.all(w == 1.0)
    assert origins.tolist()[:5] == [[0, 0], [0, 256], [0, 512], [0, 768], [256, 0]]
    bad = _with_block(noise, 256, 512, 256, shift)
    w, origins = outlier_tile_weights(bad, 256)
    i = origins.tolist().index([256, 512])
    assert w[i] < 0.01
    assert np.all(np.delete(w, i) == 1.0)


def test_micrograph_spectrum_clean_is_the_full_periodogram(noise: np.ndarray) -> None:
    sp = micrograph_spectrum(noise, 1.0, box=256)
    assert sp.n_eff == 1.0
    np.testing.assert_array_equal(sp.power, full_periodogram(noise, 1.0).power)


def test_micrograph_spectrum_removes_an_outlier_region(noise: np.ndarray) -> None:
    bad = _with_block(noise, 256, 512, 256, 0.0)
    naive = _interior_mean(full_periodogram(bad, 1.0))
    assert naive > 1.2 * SIGMA**2  # one tile of 16 at 5x variance: +25 % before any weighting
    sp = micrograph_spectrum(bad, 1.0, box=256)
    assert _interior_mean(sp) == pytest.approx(SIGMA**2, rel=0.06)
    tiled = tile_periodogram(bad, 1.0, box=256)
    assert 0 < np.count_nonzero(tiled.tile_weights < 0.5) < len(tiled.tile_weights) // 2
    assert _interior_mean(tiled) == pytest.approx(SIGMA**2, rel=0.03)


# ---------------------------------------------------------------------------------------------
# binning and bands


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_binned_power_is_block_mean_with_mean_frequencies(factor: int) -> None:
    rng = np.random.default_rng(2)
    ny, nx, apix = 192, 256, 1.3
    sp = _spectrum(rng.exponential(size=(ny, nx // 2 + 1)), apix, (ny, nx))
    p, kx, ky = binned_power(sp, factor)
    nb = (nx // 2) // factor
    assert p.shape == (ny // factor, nb + 1)
    fy, fx = np.fft.fftfreq(ny, apix), np.fft.rfftfreq(nx, apix)
    np.testing.assert_allclose(
        ky, [fy[i * factor : (i + 1) * factor].mean() for i in range(ny // factor)]
    )
    np.testing.assert_allclose(
        kx[:-1], [fx[j * factor : (j + 1) * factor].mean() for j in range(nb)]
    )
    assert kx[-1] == pytest.approx(0.5 / apix)  # the Nyquist column stays on its own
    for i in (0, 5, ny // factor - 1):
        rows = slice(i * factor, (i + 1) * factor)
        for j in (0, 3, nb - 1):
            assert p[i, j] == pytest.approx(sp.power[rows, j * factor : (j + 1) * factor].mean())
        assert p[i, -1] == pytest.approx(sp.power[rows, -1].mean())
    assert binned_power(sp, factor)[0] is p  # cached


def test_binned_power_refuses_uneven_factor() -> None:
    sp = _spectrum(np.ones((100, 51)), 1.0)
    with pytest.raises(ValueError):
        binned_power(sp, 8)


def _brute_force_band_index(sp, mag, k_min, k_max, factor, stride):
    p, kx, ky = binned_power(sp, factor)
    ncol = p.shape[1]
    rows, cols = np.meshgrid(np.arange(p.shape[0]), np.arange(ncol - 1), indexing="ij")
    gx, gy = kx[cols], ky[rows]
    tx, ty = mag[0, 0] * gx + mag[0, 1] * gy, mag[1, 0] * gx + mag[1, 1] * gy
    kt = np.hypot(tx, ty)
    sel = (kt >= k_min) & (kt <= k_max) & (rows % stride == 0)
    if factor == 1:
        sel &= (cols > 0) | (gy >= 0)
    return np.sort((rows * ncol + cols)[sel])


@pytest.mark.parametrize("mag", [np.eye(2), MAG], ids=["identity", "anisomag"])
@pytest.mark.parametrize(("factor", "stride"), [(1, 1), (2, 1), (4, 1), (1, 3)])
@pytest.mark.parametrize("shape", [(256, 256), (192, 256)])
def test_make_band_equals_brute_force(mag, factor, stride, shape) -> None:
    rng = np.random.default_rng(3)
    apix = 1.3
    sp = _spectrum(rng.exponential(size=(shape[0], shape[1] // 2 + 1)), apix, shape)
    optics = Optics(pixel_size=apix, mag_matrix=mag)
    k_min, k_max = 0.031, 0.33
    band = make_band(sp, optics, k_min, k_max, bin_factor=factor, row_stride=stride)
    expect = _brute_force_band_index(sp, mag, k_min, k_max, factor, stride)
    np.testing.assert_array_equal(np.sort(band.index), expect)
    p, kx, ky = binned_power(sp, factor)
    row, col = np.divmod(band.index, p.shape[1])
    np.testing.assert_array_equal(band.values, p[row, col])
    np.testing.assert_array_equal(band.kx, kx[col])
    np.testing.assert_array_equal(band.ky, ky[row])
    assert np.all(band.weights == factor * factor)
    tx, ty = mag @ np.stack([band.kx, band.ky])
    np.testing.assert_allclose(band.rho_true, np.hypot(tx, ty))
    np.testing.assert_allclose(band.rho, np.hypot(band.kx, band.ky))
    assert np.all((band.theta_true >= 0.0) & (band.theta_true < np.pi))
    dtheta = np.angle(np.exp(2j * (band.theta_true - np.arctan2(ty, tx))))  # modulo pi
    np.testing.assert_allclose(dtheta, 0.0, atol=1e-9)
    f = frequency_features(band.kx, band.ky, mag)
    np.testing.assert_allclose(band.feats.k2, f.k2)
    np.testing.assert_allclose(band.feats.s2, f.s2)
    assert band.grid_shape == p.shape


def test_band_theta_true_is_half_open() -> None:
    rng = np.random.default_rng(3)
    sp = _spectrum(rng.exponential(size=(192, 129)), 1.3, (192, 256))
    band = make_band(sp, Optics(pixel_size=1.3, mag_matrix=MAG), 0.031, 0.33)
    assert np.all(band.theta_true < np.pi)


def test_polar_compress_preserves_weights_and_means() -> None:
    rng = np.random.default_rng(4)
    apix = 1.3
    sp = _spectrum(rng.exponential(size=(256, 129)) * 5.0, apix)
    optics = Optics(pixel_size=apix, mag_matrix=MAG)
    # a mixed band: 2x2-binned pixels (weight 4) at low k, full-resolution pixels beyond
    band = concat_bands(
        make_band(sp, optics, 0.03, 0.12, bin_factor=2), make_band(sp, optics, 0.12, 0.36)
    )
    assert set(np.unique(band.weights)) == {1.0, 4.0}
    out = polar_compress(band, optics, defocus=12000.0, half_astig=400.0, min_pixels=0)
    assert out.size < 0.7 * band.size
    assert out.weights.sum() == pytest.approx(band.weights.sum())
    w = band.weights

    def wmean(v: np.ndarray, weights: np.ndarray) -> float:
        return float(np.sum(v * weights) / np.sum(weights))

    assert wmean(out.values, out.weights) == pytest.approx(wmean(band.values, w), rel=1e-10)
    # each cell's features are the weighted means of its pixels' features: compress a band
    # whose values *are* a feature, and the cell values must equal the cell features
    for name in ("k2", "c2", "s2", "k4"):
        v = getattr(band.feats, name)
        probe = polar_compress(replace(band, values=v.copy()), optics, 12000.0, 400.0, min_pixels=0)
        np.testing.assert_allclose(probe.values, getattr(probe.feats, name), rtol=1e-9, atol=1e-20)
        assert wmean(getattr(out.feats, name), out.weights) == pytest.approx(wmean(v, w))
    for name in ("kx", "ky"):
        v = getattr(band, name)
        probe = polar_compress(replace(band, values=v.copy()), optics, 12000.0, 400.0, min_pixels=0)
        np.testing.assert_allclose(probe.values, getattr(probe, name), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(out.rho_true, np.sqrt(out.feats.k2))
    # bands under min_pixels, or without a defocus to set the cells, are returned unchanged
    small = make_band(sp, optics, 0.10, 0.15)
    assert small.size < 20000
    assert polar_compress(small, optics, 12000.0, 400.0) is small
    assert polar_compress(band, optics, 0.0, 400.0, min_pixels=0) is band


def test_radial_basis_partition_of_unity() -> None:
    rng = np.random.default_rng(5)
    rho = np.concatenate([rng.uniform(0.0, 0.6, 500), [0.03, 0.4, 0.0, 1.0]])
    for n in (4, 7, 12):
        b = radial_basis(rho, 0.03, 0.4, n)
        assert b.shape == (rho.size, n)
        np.testing.assert_allclose(b.sum(axis=1), 1.0, rtol=1e-12)
        assert np.all(b >= -1e-15)
        assert np.all(np.count_nonzero(b > 1e-15, axis=1) <= 4)
    # outside the band the basis is clamped to its end values
    b = radial_basis(np.array([0.0, 0.03, 0.4, 2.0]), 0.03, 0.4, 8)
    np.testing.assert_allclose(b[0], b[1])
    np.testing.assert_allclose(b[2], b[3])


# ---------------------------------------------------------------------------------------------
# fast paths pinned against their plain equivalents


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(96, 128), (75, 64)])
def test_rfft2_matches_scipy(dtype: type, shape: tuple[int, int]) -> None:
    import scipy.fft as sfft

    from anisoctf.spectrum import _rfft

    x = np.random.default_rng(9).standard_normal(shape).astype(dtype)
    for workers in (1, 2):
        got = _rfft.rfft2(x, workers=workers)
        want = sfft.rfft2(x, workers=workers)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert _rfft._R2C[0] is not None  # scipy's compiled transform was loaded on its own


@pytest.mark.parametrize("compiled", [True, False])
def test_power_in_place_is_the_squared_modulus(monkeypatch, compiled: bool) -> None:
    """The power over F's own memory, and with the compiled loop its 2×2 binning made in the
    same pass, equal to the numpy binning of the fit (fit.band._bin_half_plane) bit for bit."""
    from anisoctf.fit.band import _bin_half_plane
    from anisoctf.spectrum import periodogram

    if compiled and periodogram._kernels is None:
        pytest.skip("anisoctf.spectrum._kernels was not built (no C compiler at install)")
    if not compiled:
        monkeypatch.setattr(periodogram, "_kernels", None)
    rng = np.random.default_rng(10)
    for rows in (1, 2, 3, 130, 128):
        f = (rng.standard_normal((rows, 33)) + 1j * rng.standard_normal((rows, 33))).astype(
            np.complex64
        )
        want = (np.abs(f.astype(np.complex128)) ** 2 * 0.25).astype(np.float32)
        bin2 = rows % 4 == 0
        got, binned = periodogram._power_in_place(f.copy(), np.float32(0.25), bin2)
        assert got.shape == f.shape and got.flags.c_contiguous
        np.testing.assert_allclose(got, want, rtol=1e-6)
        if compiled and bin2:
            assert binned is not None and binned.shape == (rows // 2, 17)
            np.testing.assert_array_equal(binned, _bin_half_plane(got, 2))
        else:
            assert binned is None


def test_full_periodogram_leaves_the_2x2_binning_the_fit_would_make(noise: np.ndarray) -> None:
    from anisoctf.fit.band import _bin_half_plane, binned_power

    sp = full_periodogram(noise, 1.0)
    p2 = binned_power(sp, 2)[0]
    np.testing.assert_array_equal(p2, _bin_half_plane(sp.power, 2))


@pytest.mark.parametrize("compiled", [True, False])
def test_grid_tile_features_match_each_tile(monkeypatch, noise: np.ndarray, compiled) -> None:
    from anisoctf.spectrum import periodogram
    from anisoctf.spectrum.periodogram import _grid_tile_features

    if compiled and periodogram._kernels is None:
        pytest.skip("anisoctf.spectrum._kernels was not built (no C compiler at install)")
    if not compiled:
        monkeypatch.setattr(periodogram, "_kernels", None)
    img = noise.copy()
    img[100:400, 600:1000] += 7.0  # something to tell tiles apart
    tile, b, step = 256, 8, 4
    got = _grid_tile_features(img, 4, 4, tile, b, step)
    nb = tile // b
    corners = [(r, c) for r in range(0, 1024, tile) for c in range(0, 1024, tile)]
    for i, (r, c) in enumerate(corners):
        t = img[r : r + tile : step, c : c + tile].astype(np.float64)
        small = t.reshape(nb, b // step, nb, b).mean(axis=(1, 3))
        want = (small.mean(), np.mean(t * t) - small.mean() ** 2, small.var())
        np.testing.assert_allclose(got[i], want, rtol=1e-5)
    # a grid of 3 × 2 tiles in the corner of a larger image: only those pixels count
    wide = np.zeros((1024 + 37, 1024 + 50), dtype=img.dtype)
    wide[:1024, :1024] = img
    wide[768:, :] = 1e6  # below the 3 tile rows used
    wide[:, 512:] += 5.0  # right of the 2 tile columns used
    np.testing.assert_allclose(
        _grid_tile_features(wide, 3, 2, tile, b, step),
        got.reshape(4, 4, 3)[:3, :2].reshape(6, 3),
        rtol=1e-5,  # the numpy path centres in float32 on the mean of the tiles used
    )


@pytest.mark.parametrize("mag", [None, MAG])
@pytest.mark.parametrize(("factor", "stride"), [(1, 1), (2, 1), (1, 3)])
def test_compressed_zone_keeps_every_pixel_once(mag, factor: int, stride: int) -> None:
    """Cells average the band's pixels: the weighted sums of values and phase features over
    all cells equal those over the band's pixels, and no cell spans more than its phase width."""
    from anisoctf.fit.band import compressed_zone

    rng = np.random.default_rng(11)
    apix = 1.1
    sp = _spectrum(rng.exponential(size=(512, 257)) * 3.0, apix)
    optics = Optics(pixel_size=apix) if mag is None else Optics(pixel_size=apix, mag_matrix=mag)
    k_min, k_max = 0.12, 0.4
    band = make_band(sp, optics, k_min, k_max, bin_factor=factor, row_stride=stride)
    cz = compressed_zone(sp, optics, k_min, k_max, factor, 15000.0, 500.0, row_stride=stride)
    assert cz.size < band.size
    assert cz.weights.sum() == pytest.approx(band.weights.sum(), rel=1e-12)
    for a, b in ((cz.values, band.values), (cz.feats.k2, band.feats.k2)):
        assert np.dot(a, cz.weights) == pytest.approx(np.dot(b, band.weights), rel=1e-9)
    for name in ("c2", "s2", "k4"):
        got = np.dot(getattr(cz.feats, name), cz.weights)
        want = np.dot(getattr(band.feats, name), band.weights)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12 * band.weights.sum())
    assert np.all((cz.rho_true >= k_min) & (cz.rho_true <= k_max))
    assert np.all((cz.theta_true >= 0) & (cz.theta_true < np.pi))


# ---------------------------------------------------------------------------------------------
# phase cells: the compiled loop, elliptical cells


@pytest.mark.parametrize("mag", [None, MAG])
@pytest.mark.parametrize(("factor", "stride"), [(1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("astig", [None, (900.0, -600.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_cell_loop_matches_numpy(
    monkeypatch, mag, factor: int, stride: int, astig, dtype
):
    """The C loop (anisoctf.fit._cells) and the numpy loop put every pixel in the same cell
    and give the same sums (to rounding: they only add in another order), for micrograph
    (float32) and tile or stack (float64) spectra alike."""
    from anisoctf.fit import band as band_mod

    if band_mod._cells is None:
        pytest.skip("anisoctf.fit._cells was not built (no C compiler at install)")
    rng = np.random.default_rng(5)
    apix = 1.1
    sp = _spectrum(rng.exponential(size=(512, 257)).astype(dtype) * 3.0, apix)
    optics = Optics(pixel_size=apix) if mag is None else Optics(pixel_size=apix, mag_matrix=mag)
    args = (sp, optics, 0.1, 0.42, factor, 15000.0, 120.0)
    compiled = band_mod.compressed_zone(*args, row_stride=stride, astig=astig)
    monkeypatch.setattr(band_mod, "_cells", None)
    sp.cache.clear()
    plain = band_mod.compressed_zone(*args, row_stride=stride, astig=astig)
    assert compiled.size == plain.size > 100
    np.testing.assert_array_equal(compiled.weights, plain.weights)
    for name in ("values", "rho", "rho_true", "kx", "ky"):
        np.testing.assert_allclose(getattr(compiled, name), getattr(plain, name), rtol=1e-12)
    # the mean direction is taken in float32: a last-bit difference of the sums may round it
    # to the neighbouring float32
    np.testing.assert_allclose(compiled.theta_true, plain.theta_true, rtol=0, atol=1e-6)
    for name in ("k2", "c2", "s2", "k4"):
        a, b = getattr(compiled.feats, name), getattr(plain.feats, name)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_nearly_astigmatic_to_focus_falls_back_to_circular_cells() -> None:
    """Astigmatism of half the defocus or more: circular cells, sized for that astigmatism
    plus the margin (not for the margin alone)."""
    from anisoctf.fit.band import compressed_zone

    rng = np.random.default_rng(6)
    apix = 1.1
    sp = _spectrum(rng.exponential(size=(512, 257)) * 3.0, apix)
    optics = Optics(pixel_size=apix)
    got = compressed_zone(sp, optics, 0.1, 0.42, 1, 15000.0, 100.0, astig=(7000.0, 3000.0))
    want = compressed_zone(sp, optics, 0.1, 0.42, 1, 15000.0, 100.0 + np.hypot(7000.0, 3000.0))
    assert got.size == want.size
    np.testing.assert_array_equal(got.weights, want.weights)
    np.testing.assert_array_equal(got.values, want.values)


def test_compiled_cell_loop_rejects_bad_segments() -> None:
    from anisoctf.fit import band as band_mod

    if band_mod._cells is None:
        pytest.skip("anisoctf.fit._cells was not built (no C compiler at install)")
    power = np.ones((8, 5), dtype=np.float32)
    seg = np.array([9], dtype=np.int64)  # row 9 of an 8-row spectrum
    with pytest.raises(ValueError, match="segment outside"):
        band_mod._accumulate_cells(
            power, (seg, seg * 0, seg * 0 + 2), np.arange(5.0), np.arange(8.0), None,
            band_mod.CellLayout((0.0, 100.0, 1.0, 0.0, 0.0), False, 0, 16, 10), True, 1 << 16,
            compiled=True,
        )  # fmt: skip


@pytest.mark.parametrize("compiled", [True, False])
def test_elliptical_cells_follow_the_rings(monkeypatch, compiled: bool) -> None:
    """On a noise-free CTF² with 3000 Å of astigmatism, cells that follow the ellipse hold
    pixels of nearly one phase (value ≈ CTF² at the cell's mean features) even with the
    fewest sectors; circular cells sized for no astigmatism mix phases across a ring."""
    from anisoctf.fit import band as band_mod
    from anisoctf.optics.ctf import CTFParams, chi

    if compiled and band_mod._cells is None:
        pytest.skip("anisoctf.fit._cells was not built (no C compiler at install)")
    if not compiled:
        monkeypatch.setattr(band_mod, "_cells", None)
    apix, n = 1.2, 1024
    optics = Optics(pixel_size=apix, voltage_kv=300.0)
    params = CTFParams(16500.0, 13500.0, 35.0)
    kx, ky = frequency_grid((n, n), apix)  # (1, n/2 + 1) and (n, 1)
    feats = frequency_features(*np.broadcast_arrays(kx, ky))
    w = optics.amplitude_contrast
    x = chi(feats, params, optics)
    power = ((np.sqrt(1 - w * w) * np.sin(x) + w * np.cos(x)) ** 2).astype(np.float32)
    sp = _spectrum(power, apix, (n, n))
    a1, a2 = params.astig_components

    def worst(cells) -> float:
        c = chi(cells.feats, params, optics)
        model = (np.sqrt(1 - w * w) * np.sin(c) + w * np.cos(c)) ** 2
        return float(np.max(np.abs(cells.values - model)))

    ell = band_mod.compressed_zone(sp, optics, 0.05, 0.3, 1, 15000.0, 0.0, astig=(a1, a2))
    circ = band_mod.compressed_zone(sp, optics, 0.05, 0.3, 1, 15000.0, 0.0)
    assert worst(ell) < 0.05  # phase spread ≤ 0.4 rad: a second-order error only
    assert worst(circ) > 0.3  # 1500 Å half-astigmatism across 11° sectors: phases mixed
    assert ell.weights.sum() == circ.weights.sum()
