"""The fitted CTF² as the diagnostic picture shows it: at the display's own resolution, alias-free.

The fit's model lives on the spectrum's grid (e.g. 512² for a 512 box), and the picture shows
it in a 384² square. Far from focus, or near Nyquist, the Thon rings are finer than a display
pixel (or even than a grid pixel): sampling ``CTF²`` there, or reducing a sampled grid, draws
*aliasing rings* (Moiré circles) that are not in the model and that a person reads as rings
that the fit claims.

Here the model is evaluated analytically at the centre of each display pixel, with its
oscillating part ``cos 2(χ + asin w)`` damped by a low-pass factor of the local ring frequency
(:func:`ring_taper`): ``CTF² = ½ − ½ m cos 2(χ + asin w)`` with ``m = t(u_x) t(u_y)``, where
``u`` is the phase of ``2χ`` per display pixel in cycles along each axis, measured from ``χ``
itself (finite differences of the unwrapped phase, so astigmatism, the magnification matrix and
Cs are all included). ``t`` is 1 for well-resolved rings and falls to 0 at the display's Nyquist
frequency (half a cycle per pixel), beyond which rings cannot be drawn: there the model shows
its mean, ½, as a fine ring pattern would look from a distance. The phase is
:func:`anisoctf.optics.ctf.chi` and ``CTF²`` :func:`anisoctf.optics.kernel.ctf2_from_chi`: no
CTF phase is computed here.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.optics.ctf import CTFParams, Optics, chi
from anisoctf.optics.kernel import ctf2_from_chi, ctf_constants, frequency_features

__all__ = ["display_ctf2", "display_frequencies", "ring_taper"]


def ring_taper(u: NDArray[np.floating]) -> NDArray[np.float64]:
    """Contrast kept of rings with ``u`` cycles per display pixel: ``1 − (2u)⁴``, 0 from
    Nyquist (``u ≥ ½``) on (rings with 4 pixels per period keep 94 %)."""
    x = np.minimum(2.0 * np.abs(np.asarray(u, dtype=np.float64)), 1.0)
    return 1.0 - x**4


def display_frequencies(
    n_grid: int, size: int, pixel_size: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(kx, ky)`` (Å⁻¹, broadcastable row and column) at the centres of the pixels of a
    ``size × size`` display of a centred ``n_grid × n_grid`` spectrum.

    The grid's pixel ``j`` holds frequency ``(j − n_grid // 2) / (n_grid · pixel_size)``; a
    resize to ``size`` (Pillow's pixel-area convention, pixel ``j`` spanning ``[j, j + 1)``)
    puts display pixel ``i``'s centre at grid coordinate ``(i + ½) · n_grid / size − ½``.
    """
    i = np.arange(size, dtype=np.float64)
    coord = (i + 0.5) * (n_grid / size) - 0.5 - n_grid // 2
    k = coord / (n_grid * pixel_size)
    return k[None, :], k[:, None]


def display_ctf2(
    params: CTFParams,
    optics: Optics,
    n_grid: int,
    size: int,
    pixel_size: float,
    first_column: int = 0,
) -> NDArray[np.float32]:
    """The fitted ``CTF²`` (envelope free) on a ``size × size`` centred display of a
    ``n_grid``-pixel spectrum at ``pixel_size`` Å/px, rings beyond the display's Nyquist
    replaced by their mean (module doc).

    Parameters
    ----------
    params
        The fitted CTF (true frame).
    optics
        Optics of the fit; its magnification matrix maps observed to true frequencies.
    n_grid
        Size of the spectrum grid that the display shows (the observed half's).
    size
        Display pixels per side.
    pixel_size
        Pixel size (Å) of the spectrum: the display's edge is its Nyquist frequency.
    first_column
        Compute only the display columns from this one on (``size × (size − first_column)``;
        the picture shows the model in its right half only).
    """
    kx, ky = display_frequencies(n_grid, size, pixel_size)
    kx = kx[:, first_column:]
    feats = frequency_features(kx, ky, optics.M if optics.has_anisomag else None)
    phase = chi(feats, params, optics)
    # cycles of cos(2χ) per display pixel along each axis: 2 |∂χ/∂i| / 2π
    ux = np.abs(np.gradient(phase, axis=1)) / np.pi
    uy = np.abs(np.gradient(phase, axis=0)) / np.pi
    modulation = ring_taper(ux) * ring_taper(uy)
    return ctf2_from_chi(phase, ctf_constants(optics), modulation, overwrite=True).astype(
        np.float32
    )
