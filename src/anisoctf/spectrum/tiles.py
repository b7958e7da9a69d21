"""Per-tile periodograms of one micrograph, kept separately (for local defocus).

Where :func:`anisoctf.spectrum.periodogram.tile_periodogram` averages its tiles into one
spectrum, local estimation needs each tile's own periodogram and where the tile sits. The
tiles are tapered and mean-subtracted exactly as for the averaged spectrum, so a tile's
periodogram is on the same scale (power spectral density per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.errors import InputError
from anisoctf.spectrum._rfft import rfft2
from anisoctf.spectrum.periodogram import _robust_weights, tile_layout

__all__ = ["TileSpectra", "tile_spectra"]


@dataclass(frozen=True)
class TileSpectra:
    """The periodograms of a grid of tiles of one micrograph.

    Attributes
    ----------
    power
        float32 array ``(n_tiles, box, box // 2 + 1)``: each tile's half-plane periodogram
        (rfft2 layout, FFT order), normalised as a power spectral density per pixel.
    centres
        ``(n_tiles, 2)`` tile centres as ``(x, y)`` in micrograph pixels (x = column, y = row;
        pixel ``(0, 0)`` is the centre of the first pixel).
    pixel_size
        Å per pixel of the spectra (larger than the micrograph's after Fourier cropping).
    tile
        Side of a tile in micrograph pixels.
    image_shape
        ``(ny, nx)`` of the micrograph.
    weights
        1 for normal tiles, < 1 for tiles whose mean, variance or power is an outlier
        (carbon, contamination, the edge of the exposure).
    """

    power: NDArray[np.float32]
    centres: NDArray[np.float64]
    pixel_size: float
    tile: int
    image_shape: tuple[int, int]
    weights: NDArray[np.float64]

    @property
    def box(self) -> int:
        """Side of each periodogram in pixels."""
        return int(self.power.shape[1])

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return int(self.power.shape[0])


def tile_spectra(
    image: NDArray,
    pixel_size: float,
    box: int = 512,
    overlap: float = 0.0,
    fit_pixel_size: float | None = None,
    workers: int = 1,
    chunk: int = 16,
) -> TileSpectra:
    """Periodogram of each tile of a grid covering the micrograph.

    Parameters
    ----------
    image
        2D micrograph, rows = y, columns = x.
    pixel_size
        Å per pixel of ``image``.
    box
        Side of each periodogram (pixels at the fitting pixel size).
    overlap
        Fractional overlap of neighbouring tiles (0: tiles side by side).
    fit_pixel_size
        If larger than ``pixel_size``, tiles of ``box * fit_pixel_size / pixel_size`` pixels
        are Fourier-cropped to ``box``.
    workers
        Threads for ``scipy.fft``.
    chunk
        Tiles transformed at once.

    Returns
    -------
    TileSpectra
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise InputError(f"expected a 2D image, got an array of shape {img.shape}")
    crop, tile, origins, win, norm = tile_layout(
        img.shape, pixel_size, box, overlap, fit_pixel_size
    )
    ny, nx = img.shape
    nt = len(origins)
    h = box // 2
    power = np.empty((nt, box, h + 1), dtype=np.float32)
    feats = np.zeros((nt, 2))
    buf = np.empty((min(chunk, nt), tile, tile), dtype=np.float32)
    # the tile's mean is removed in Fourier space: F(w·(t − m)) = F(w·t) − m F(w), with the
    # weighted mean m = Σ w t / Σ w read off the zero frequency (one pass over the pixels less)
    fwin = rfft2(win.astype(np.float64), workers=workers).astype(np.complex64)
    wsum = float(np.sum(win, dtype=np.float64))
    for start in range(0, nt, chunk):
        sel = range(start, min(start + chunk, nt))
        b = buf[: len(sel)]
        for i, j in enumerate(sel):
            r, c = origins[j]
            np.multiply(img[r : r + tile, c : c + tile], win, out=b[i])
        f = rfft2(b, workers=workers)
        m = f[:, 0, 0].real / wsum
        feats[start : start + len(sel), 0] = m
        f -= m.astype(np.float32)[:, None, None] * fwin
        if crop:
            f = np.concatenate([f[:, :h, : h + 1], f[:, -h:, : h + 1]], axis=1)
        p = power[start : start + len(sel)]
        np.multiply(f.real, f.real, out=p)
        p += f.imag * f.imag
        p *= np.float32(1.0 / norm)
        feats[start : start + len(sel), 1] = p.reshape(len(sel), -1).mean(axis=1)
    feats[:, 1] = np.log(np.maximum(feats[:, 1], 1e-30))
    # tiles differ a little anyway: only departures beyond 2 % of the typical value count
    floors = 0.02 * np.abs(np.median(feats, axis=0))
    weights = _robust_weights(feats, floors=floors) if nt >= 5 else np.ones(nt)
    centres = np.stack(
        [origins[:, 1] + 0.5 * (tile - 1), origins[:, 0] + 0.5 * (tile - 1)], axis=1
    ).astype(np.float64)
    return TileSpectra(
        power=power,
        centres=centres,
        pixel_size=float(pixel_size * tile / box),
        tile=tile,
        image_shape=(int(ny), int(nx)),
        weights=weights,
    )
