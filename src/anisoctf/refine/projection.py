"""Fourier-slice projection of a 3D map for RELION poses, magnification matrix included.

Conventions (RELION's; each one pinned by a test in ``tests/test_refine_projection.py`` and
listed in ``docs/conventions.md`` §12):

* A map is a cubic array ``vol[z, y, x]`` (x fastest, as ``mrcfile`` returns it); its centre is
  voxel ``(N/2, N/2, N/2)`` (0-based, N even), and the position of voxel ``[z, y, x]`` is
  ``r = (x, y, z) - N/2`` in voxels.
* Euler angles ``(rot, tilt, psi)`` in degrees, ZYZ, give RELION's matrix
  ``A = Rz(-psi) Ry(-tilt) Rz(-rot)`` in the active-rotation notation
  (:func:`euler_to_matrix`). A map feature at ``r`` appears in the projection at the first two
  components of ``A r``: the projection is ``p(x, y) = ∫ V(Aᵀ (x, y, z)) dz``. In Fourier space
  the 2D frequency ``k`` samples the 3D transform at ``Aᵀ (k, 0)`` (RELION's ``Projector``,
  which applies ``A⁻¹ = Aᵀ`` to ``(x, y, 0)``).
* Magnification: the observed image frequency ``k_obs`` samples the reference at the true
  frequency ``k_true = M k_obs`` (RELION's ``ObservationModel::applyAnisoMag`` multiplies ``A``
  by ``M⁻¹`` before the projector inverts it).
* Origin: the particle centre in the image is pixel ``(N/2, N/2) - (rlnOriginXAngst,
  rlnOriginYAngst) / pixel_size``; RELION's ``predictObservation`` shifts the projection by
  ``N/2 - origin`` (``shiftImageInFourierTransform`` multiplies by ``exp(-2πi k·s)``, i.e. moves
  the content by ``+s``). So ``image = shift(projection centred on the box, -origin)``.
* Spectra are ``rfft2`` half planes in FFT order (anisoctf's layout, ``docs/conventions.md``
  §2); frequencies in cycles per pixel of the image unless stated.

The 3D transform is taken of the map zero-padded ``pad`` times and divided beforehand by the
transform of the trilinear kernel (``sinc²`` per axis, gridding correction), as RELION does.
What remains is aliasing of order ``(π²/3)(r / (pad N))²`` for a feature at radius ``r``: a few
per cent at the edge of a small box for pad = 2, a smooth amplitude error that cancels wherever
simulation and refinement use the same projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf._lazy import lazy

#: scipy.fft costs 0.1–0.3 s to import; only the commands that need it pay for it
sfft = lazy("scipy.fft")

__all__ = [
    "FourierProjector",
    "centre_shift_phase",
    "euler_to_matrix",
    "image_frequencies",
    "real_positions",
]


def euler_to_matrix(rot: ArrayLike, tilt: ArrayLike, psi: ArrayLike) -> NDArray[np.float64]:
    """RELION's rotation matrix for ZYZ Euler angles in degrees (vectorised).

    Parameters
    ----------
    rot, tilt, psi
        ``_rlnAngleRot``, ``_rlnAngleTilt``, ``_rlnAnglePsi`` in degrees (broadcastable).

    Returns
    -------
    numpy.ndarray
        ``(..., 3, 3)`` matrices ``A`` with ``A = Rz(-psi) Ry(-tilt) Rz(-rot)`` (active
        rotations ``Rz(t) = [[c, -s, 0], [s, c, 0], [0, 0, 1]]``,
        ``Ry(t) = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``); a map feature at ``r`` projects to
        ``(A r)[:2]``.
    """
    a, b, g = (np.deg2rad(np.asarray(x, dtype=float)) for x in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    out = np.empty(a.shape + (3, 3))
    out[..., 0, 0] = cg * cb * ca - sg * sa
    out[..., 0, 1] = cg * cb * sa + sg * ca
    out[..., 0, 2] = -cg * sb
    out[..., 1, 0] = -sg * cb * ca - cg * sa
    out[..., 1, 1] = -sg * cb * sa + cg * ca
    out[..., 1, 2] = sg * sb
    out[..., 2, 0] = sb * ca
    out[..., 2, 1] = sb * sa
    out[..., 2, 2] = cb
    return out


def image_frequencies(n: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Half-plane frequencies of an ``n × n`` image in cycles per pixel, each ``(n, n//2+1)``."""
    kx = np.broadcast_to(np.fft.rfftfreq(n)[None, :], (n, n // 2 + 1))
    ky = np.broadcast_to(np.fft.fftfreq(n)[:, None], (n, n // 2 + 1))
    return np.ascontiguousarray(kx), np.ascontiguousarray(ky)


def real_positions(n: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Signed pixel positions ``(x, y)`` of an ``n × n`` image whose origin is pixel 0 (wrapped)."""
    f = np.fft.fftfreq(n) * n
    return np.broadcast_to(f[None, :], (n, n)), np.broadcast_to(f[:, None], (n, n))


def centre_shift_phase(n: int, origins_px: ArrayLike) -> NDArray[np.complex64]:
    """Phase factors that move an image's origin from pixel 0 to the particle centre.

    Parameters
    ----------
    n
        Box size (pixels).
    origins_px
        ``(P, 2)`` RELION origins ``(x, y)`` in pixels (``rlnOriginXAngst / pixel_size``).

    Returns
    -------
    numpy.ndarray
        ``(P, n, n//2+1)`` complex64 factors ``exp(-2πi k·(n/2 - origin))``; multiplying the
        spectrum of an image centred on pixel 0 by them centres it on pixel ``n/2 - origin``.
    """
    o = np.atleast_2d(np.asarray(origins_px, dtype=float))
    s = n / 2.0 - o
    fx = np.fft.rfftfreq(n)
    fy = np.fft.fftfreq(n)
    # separable: exp(-2πi kx sx) exp(-2πi ky sy)
    ex = np.exp(-2j * np.pi * fx[None, :] * s[:, 0, None]).astype(np.complex64)
    ey = np.exp(-2j * np.pi * fy[None, :] * s[:, 1, None]).astype(np.complex64)
    return ey[:, :, None] * ex[:, None, :]


#: Pixels interpolated per block in :meth:`FourierProjector.slices` (fits the L2 cache).
_BLOCK = 16384


@dataclass(frozen=True)
class _Geometry:
    n: int  # map box
    npad: int  # padded box
    scale: float  # padded-grid index per (cycle / Å) of frequency


class FourierProjector:
    """Central slices of a cubic map's 3D Fourier transform (trilinear, gridding-corrected).

    Parameters
    ----------
    volume
        Cubic ``(N, N, N)`` map, ``vol[z, y, x]``; N even.
    pixel_size
        Voxel size of the map in Å.
    pad
        Zero-padding factor (2, RELION's default; larger is more accurate and slower).
    mask
        Optional real-space mask multiplied into the map first (same shape).
    """

    def __init__(
        self,
        volume: ArrayLike,
        pixel_size: float,
        pad: int = 2,
        mask: ArrayLike | None = None,
    ) -> None:
        vol = np.asarray(volume, dtype=np.float64)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"the reference must be a cubic 3D map, got shape {vol.shape}")
        n = vol.shape[0]
        if n % 2:
            raise ValueError(f"the reference box must be even, got {n}")
        if mask is not None:
            m = np.asarray(mask, dtype=np.float64)
            if m.shape != vol.shape:
                raise ValueError(f"mask shape {m.shape} differs from the map's {vol.shape}")
            vol = vol * m
        if not (pixel_size > 0):
            raise ValueError(f"pixel size must be positive, got {pixel_size}")
        npad = int(pad) * n
        # gridding correction: trilinear interpolation multiplies real space by sinc^2 per axis
        r = np.arange(n) - n // 2
        corr = np.sinc(r / npad) ** 2
        vol = vol / (corr[:, None, None] * corr[None, :, None] * corr[None, None, :])
        padded = np.zeros((npad, npad, npad))
        lo = npad // 2 - n // 2
        padded[lo : lo + n, lo : lo + n, lo : lo + n] = vol
        # centre voxel npad/2 -> index 0, transform, then zero frequency -> index npad/2
        f = sfft.fftshift(sfft.fftn(sfft.ifftshift(padded), workers=-1))
        # the map is real, so F(-k) = conj F(k): keep the planes z >= npad/2 only
        flat = np.ascontiguousarray(f[npad // 2 :].astype(np.complex64)).reshape(-1)
        del f
        # voxel i with its +x, +y and +x+y neighbours side by side: the four corners of one
        # z-plane of a trilinear cell in one aligned 32-byte read; zero rows at the end keep
        # the +z plane of the last cells in bounds
        quads = np.zeros((flat.size + npad * npad + npad + 1, 4), dtype=np.complex64)
        quads[: flat.size, 0] = flat
        quads[: flat.size - 1, 1] = flat[1:]
        quads[: flat.size - npad, 2] = flat[npad:]
        quads[: flat.size - npad - 1, 3] = flat[npad + 1 :]
        self._quads = quads.view(np.dtype((np.void, 32))).reshape(-1)
        self._pixel_cache: dict = {}
        self.geometry = _Geometry(n=n, npad=npad, scale=npad * float(pixel_size))
        self.pixel_size = float(pixel_size)
        self.box = n

    def sample(self, k3: NDArray[np.floating]) -> NDArray[np.complex64]:
        """Trilinear samples of the 3D transform at frequencies ``k3[..., (x, y, z)]`` (1/Å).

        Frequencies beyond the map's Nyquist give 0. The transform is that of the map with its
        centre at the origin (real-valued for a centro-symmetric map). Computed in single
        precision.
        """
        g = self.geometry
        k3 = np.asarray(k3, dtype=np.float32)
        shape = k3.shape[:-1]
        k3 = k3.reshape(-1, 3)
        q = k3 * np.float32(g.scale) + np.float32(g.npad / 2)  # fractional padded index
        r2 = np.sum(k3.astype(np.float64) ** 2, axis=-1) * g.scale**2
        inside = r2 <= (g.npad / 2 * (g.n - 1) / g.n) ** 2
        inside &= np.all((q >= 1) & (q < g.npad - 1), axis=-1)
        out = np.zeros(q.shape[0], dtype=np.complex64)
        qi = q[inside]
        out[inside] = self._trilinear(qi[:, 0], qi[:, 1], qi[:, 2])
        return out.reshape(shape)

    def _trilinear(
        self, x: NDArray[np.float32], y: NDArray[np.float32], z: NDArray[np.float32]
    ) -> NDArray[np.complex64]:
        """Trilinear interpolation at fractional padded-grid indices (all in ``[1, npad - 1]``).

        The arrays are overwritten (they become the fractional parts). Points below the
        central z-plane are reflected through the centre and their value conjugated (the
        table holds the upper half of the transform).
        """
        npad = self.geometry.npad
        flip = z < np.float32(npad // 2)
        for c in (x, y, z):
            np.subtract(np.float32(npad), c, out=c, where=flip)
        base = None
        for c, stride in ((z, npad * npad), (y, npad), (x, 1)):
            f = np.floor(c)
            i = f.astype(np.intp)
            c -= f
            if stride != 1:
                i *= stride
            base = i if base is None else np.add(base, i, out=base)
        base -= (npad // 2) * npad * npad  # the table starts at the central z-plane
        fx, fy, fz = x, y, z
        planes = []
        for dz in (0, npad * npad):
            v = np.take(self._quads, base + dz if dz else base).view(np.float32)
            v = v.reshape(base.shape + (8,))  # corners (x0y0, x1y0, x0y1, x1y1) × (re, im)
            plane = []
            for part in (0, 1):  # real, imaginary
                c00, c10, c01, c11 = (v[..., 2 * j + part] for j in range(4))
                lo = c10 - c00
                lo *= fx
                lo += c00
                hi = c11 - c01
                hi *= fx
                hi += c01
                hi -= lo
                hi *= fy
                hi += lo
                plane.append(hi)
            planes.append(plane)
        out = np.empty(base.shape + (2,), dtype=np.float32)
        for part in (0, 1):
            lo, hi = planes[0][part], planes[1][part]
            hi -= lo
            hi *= fz
            np.add(hi, lo, out=out[..., part])
        np.negative(out[..., 1], out=out[..., 1], where=flip)
        return out.view(np.complex64)[..., 0]

    def _pixels(
        self,
        box: int,
        pixel_size: float,
        mag_matrix: ArrayLike | None,
        band: NDArray[np.bool_] | None = None,
    ) -> tuple[NDArray[np.intp], NDArray[np.float32], NDArray[np.float32]]:
        """Flat indices of the half-plane pixels inside the map's Nyquist sphere (and ``band``)
        and their true frequencies in padded-grid voxels (cached per geometry)."""
        m = None if mag_matrix is None else np.asarray(mag_matrix, dtype=float)
        bkey = None if band is None else np.packbits(np.asarray(band, dtype=bool)).tobytes()
        key = (box, float(pixel_size), None if m is None else m.tobytes(), bkey)
        hit = self._pixel_cache.get(key)
        if hit is not None:
            return hit
        kx, ky = image_frequencies(box)
        kx = kx / pixel_size
        ky = ky / pixel_size
        if m is not None:
            kx, ky = m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky
        g = self.geometry
        # inside the map's Nyquist sphere (and one voxel inside the padded grid's edge, which
        # matters only for pad = 1): every trilinear cell then lies inside the table
        kmax = min(g.npad / 2 * (g.n - 1) / g.n, g.npad / 2 - 1) / g.scale
        keep = (kx * kx + ky * ky).ravel() <= kmax * kmax
        if band is not None:
            keep &= np.broadcast_to(np.asarray(band, dtype=bool), kx.shape).ravel()
        idx = np.flatnonzero(keep)
        # padded-grid offsets from the centre, so that a pose needs one multiply-add per axis
        hit = (
            idx,
            (kx.ravel()[idx] * g.scale).astype(np.float32),
            (ky.ravel()[idx] * g.scale).astype(np.float32),
        )
        if len(self._pixel_cache) > 16:
            self._pixel_cache.clear()
        self._pixel_cache[key] = hit
        return hit

    def slices(
        self,
        rotations: ArrayLike,
        box: int,
        pixel_size: float,
        mag_matrix: ArrayLike | None = None,
        band: NDArray[np.bool_] | None = None,
    ) -> NDArray[np.complex64]:
        """Half-plane central slices for a batch of poses, origin at pixel 0.

        Parameters
        ----------
        rotations
            ``(P, 3, 3)`` matrices from :func:`euler_to_matrix`.
        box, pixel_size
            Box (pixels, even) and pixel size (Å) of the particle images.
        mag_matrix
            ``M`` (``k_true = M k_obs``); identity when None.
        band
            Optional ``(box, box//2+1)`` boolean mask: only these pixels are projected, the
            others are 0 (e.g. the resolution band of a fit that uses no other pixel).

        Returns
        -------
        numpy.ndarray
            ``(P, box, box//2+1)`` spectra (``rfft2`` layout) of the projections with the map
            centre at pixel 0; multiply by :func:`centre_shift_phase` to place them in the box.
            For equal pixel sizes the amplitude is that of ``rfft2`` of the real-space
            projection (sum of voxels along z); for other pixel sizes it differs by a constant.
        """
        a = np.asarray(rotations, dtype=np.float32).reshape(-1, 3, 3)
        idx, kx, ky = self._pixels(box, pixel_size, mag_matrix, band)
        out = np.zeros((a.shape[0], box * (box // 2 + 1)), dtype=np.complex64)
        if idx.size == 0:
            return out.reshape(a.shape[0], box, box // 2 + 1)
        c = np.float32(self.geometry.npad / 2)
        # blocks of a few particles keep the temporaries in the CPU cache
        step = max(1, _BLOCK // idx.size)
        for p0 in range(0, a.shape[0], step):
            ab = a[p0 : p0 + step]
            # padded index of A^T (kx, ky, 0): q_j = A[0, j] kx + A[1, j] ky + npad/2
            q = []
            for j in range(3):
                qj = ab[:, 0, j, None] * kx[None, :]
                qj += ab[:, 1, j, None] * ky[None, :]
                qj += c
                q.append(qj)
            out[p0 : p0 + step, idx] = self._trilinear(*q)
        return out.reshape(a.shape[0], box, box // 2 + 1)

    def project(
        self,
        rot: ArrayLike,
        tilt: ArrayLike,
        psi: ArrayLike,
        origins_angst: ArrayLike | None = None,
        box: int | None = None,
        pixel_size: float | None = None,
        mag_matrix: ArrayLike | None = None,
    ) -> NDArray[np.float64]:
        """Real-space projections ``(P, box, box)`` placed as RELION would predict them.

        The particle centre lands on pixel ``box/2 - origin / pixel_size``.
        """
        box = self.box if box is None else int(box)
        pixel_size = self.pixel_size if pixel_size is None else float(pixel_size)
        rots = euler_to_matrix(rot, tilt, psi).reshape(-1, 3, 3)
        spec = self.slices(rots, box, pixel_size, mag_matrix).astype(np.complex128)
        if origins_angst is None:
            o = np.zeros((len(rots), 2))
        else:
            o = np.asarray(origins_angst, dtype=float).reshape(-1, 2) / pixel_size
        spec *= centre_shift_phase(box, o)
        return sfft.irfft2(spec, s=(box, box), workers=-1)
