"""Particle images with known poses, per-particle defocus and magnification matrix.

Each image is the forward model of :mod:`anisoctf.refine.model`:

    X(k) = CTF(M k; D_p) · E(M k) · P(M k) · exp(-2πi k·(N/2 - origin)) + white noise

* ``CTF``: the kernel's, with RELION's sign (``sin(chi + asin w)``, ``+w`` at ``k = 0``, as
  RELION ``CTF::getCTF``), so the stacks have RELION's contrast (the particle white);
* ``P``: central slice of the map (:class:`~anisoctf.refine.projection.FourierProjector`) for a
  pose drawn uniformly on the sphere (rot, psi uniform; cos tilt uniform);
* ``D_p``: true-frame defocus of particle ``p`` = its micrograph's defocus (mean drawn from a
  range, astigmatism |U − V| uniform up to a maximum, random axis) plus a per-particle height
  offset (Gaussian, ``height_sigma``) on the mean;
* ``M``: the group's magnification matrix (``k_true = M k_obs``) of the requested anisotropy and
  axis (:meth:`MagMat.from_anisotropy`);
* origins: Gaussian, ``shift_sigma`` pixels, RELION's sign (the particle centre sits at
  ``N/2 - origin``);
* noise: white Gaussian of unit variance; the signal is scaled so that the mean per-pixel signal
  variance over the box is ``snr``.

The micrograph-level values a CTFFIND-type fit would report (one observed-frame defocus per
micrograph: ``D_obs = Mᵀ D_mic M``, no height offset) are returned too: they are the starting
point the refinement gets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import lazy
from anisoctf.optics.ctf import Optics
from anisoctf.optics.frames import defocus_table_to_observed
from anisoctf.optics.magmat import MagMat
from anisoctf.refine.model import batch_ctf, grid_features, uva_to_zaa, zaa_to_uva
from anisoctf.refine.projection import FourierProjector, centre_shift_phase, euler_to_matrix

#: scipy.fft costs 0.1–0.3 s to import; only the commands that need it pay for it
sfft = lazy("scipy.fft")

__all__ = ["ParticleSimSpec", "SimulatedParticles", "blob_map", "simulate_particles"]


@dataclass(frozen=True)
class ParticleSimSpec:
    """What to simulate (all lengths in Å unless stated)."""

    n: int = 1000
    box: int = 128
    apix: float = 1.3
    kv: float = 300.0
    cs: float = 2.7
    ac: float = 0.1
    anisotropy_percent: float = 1.5
    axis_deg: float = 30.0
    n_micrographs: int = 50
    df_min: float = 8000.0
    df_max: float = 25000.0
    astig_max: float = 600.0
    height_sigma: float = 150.0
    bfactor: float = 40.0
    snr: float = 0.05
    shift_sigma: float = 2.0  # pixels
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.n_micrographs < 1:
            raise ValueError("n and n_micrographs must be at least 1")
        if self.box < 16 or self.box % 2:
            raise ValueError(f"box must be even and at least 16, got {self.box}")
        if not (self.apix > 0 and self.snr > 0 and self.df_max >= self.df_min > 0):
            raise ValueError("apix and snr must be positive and 0 < df_min <= df_max")
        if not 0 <= self.anisotropy_percent < 20:
            raise ValueError("anisotropy must be in [0, 20) per cent")

    @property
    def optics(self) -> Optics:
        """Optics of the (single) optics group, magnification matrix included."""
        return Optics(self.apix, self.kv, self.cs, self.ac, mag_matrix=self.mag.matrix)

    @property
    def mag(self) -> MagMat:
        """The magnification matrix (symmetric, unit determinant)."""
        return MagMat.from_anisotropy(self.anisotropy_percent, self.axis_deg)


@dataclass
class SimulatedParticles:
    """Images and every true parameter (arrays have one entry per particle)."""

    spec: ParticleSimSpec
    images: NDArray[np.float32]  # (n, box, box)
    angles: NDArray[np.float64]  # (n, 3) rot, tilt, psi
    origins: NDArray[np.float64]  # (n, 2) Å
    micrograph: NDArray[np.int64]  # (n,) 0-based micrograph number
    true_u: NDArray[np.float64]  # true-frame per-particle defocus
    true_v: NDArray[np.float64]
    true_angle: NDArray[np.float64]
    obs_u: NDArray[np.float64]  # per-micrograph observed-frame defocus (the starting point)
    obs_v: NDArray[np.float64]
    obs_angle: NDArray[np.float64]
    mic_true_mean: NDArray[np.float64]  # (n_micrographs,) true-frame mean defocus

    def truth_json(self) -> dict:
        """The truth as a JSON-ready dict (spec, matrix, per-micrograph mean defocus)."""
        m = self.spec.mag
        return {
            "spec": asdict(self.spec),
            "mag_matrix": [list(r) for r in m.matrix],
            "anisotropy_percent": m.anisotropy_percent,
            "axis_deg": m.axis_deg,
            "micrograph_true_mean_defocus": self.mic_true_mean.tolist(),
        }


def blob_map(box: int, n_blobs: int = 300, sigma: float = 1.2, seed: int = 0) -> NDArray:
    """An asymmetric test map: Gaussian blobs (σ in voxels) inside a radius of 0.3 box.

    Built by splatting unit points onto the grid and convolving in Fourier space.
    """
    rng = np.random.default_rng(seed)
    r = 0.3 * box * rng.random(n_blobs) ** (1 / 3)
    v = rng.normal(size=(n_blobs, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    # an elongated, lopsided particle: stretch x, shift the mass off-centre
    pos = v * r[:, None] * np.array([1.0, 0.75, 0.6]) + np.array([0.05, -0.03, 0.02]) * box
    pos += box / 2
    vol = np.zeros((box, box, box))
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (
                    (f[:, 0] if dx else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dz else 1 - f[:, 2])
                )
                np.add.at(vol, (i0[:, 2] + dz, i0[:, 1] + dy, i0[:, 0] + dx), w)
    k = np.fft.fftfreq(box)
    kz, ky, kx = np.meshgrid(k, k, np.fft.rfftfreq(box), indexing="ij")
    g = np.exp(-2 * np.pi**2 * sigma**2 * (kx**2 + ky**2 + kz**2))
    return sfft.irfftn(sfft.rfftn(vol) * g, s=vol.shape)


def simulate_particles(
    spec: ParticleSimSpec,
    projector: FourierProjector,
    *,
    chunk: int = 256,
    noise: bool = True,
) -> SimulatedParticles:
    """Simulate ``spec.n`` particle images from ``projector`` (see the module notes).

    Parameters
    ----------
    spec
        What to simulate.
    projector
        The reference; its pixel size may differ from ``spec.apix`` (frequencies are in 1/Å).
    chunk
        Particles per batch (memory).
    noise
        False gives noiseless images (for exactness tests); the scale is the same.
    """
    rng = np.random.default_rng(spec.seed)
    n, box = spec.n, spec.box
    optics = spec.optics
    m = spec.mag.array
    angles = np.stack(
        [
            rng.uniform(-180, 180, n),
            np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
            rng.uniform(-180, 180, n),
        ],
        axis=1,
    )
    origins = rng.normal(0.0, spec.shift_sigma, (n, 2)) * spec.apix
    mic = np.arange(n) % spec.n_micrographs
    nm = spec.n_micrographs
    mic_mean = rng.uniform(spec.df_min, spec.df_max, nm)
    mic_astig = rng.uniform(0.0, spec.astig_max, nm)
    mic_angle = rng.uniform(0.0, 180.0, nm)
    height = rng.normal(0.0, spec.height_sigma, n)
    tu = mic_mean[mic] + height + 0.5 * mic_astig[mic]
    tv = mic_mean[mic] + height - 0.5 * mic_astig[mic]
    ta = mic_angle[mic]
    ou, ov, oa = defocus_table_to_observed(
        mic_mean + 0.5 * mic_astig, mic_mean - 0.5 * mic_astig, mic_angle, m
    )
    g = grid_features(box, spec.apix, m)
    z, a1, a2 = uva_to_zaa(tu, tv, ta)
    rots = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    clean = np.empty((n, box, box), dtype=np.float32)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        spec2d = projector.slices(rots[sl], box, spec.apix, m)
        spec2d *= batch_ctf(g, z[sl], a1[sl], a2[sl], optics, 0.0, spec.bfactor)
        spec2d *= centre_shift_phase(box, origins[sl] / spec.apix).astype(np.complex64)
        clean[sl] = sfft.irfft2(spec2d, s=(box, box), workers=-1)
    power = float(np.mean(clean.astype(np.float64) ** 2))
    if power <= 0:
        raise ValueError("the map projects to zero; check the map and its pixel size")
    images = clean * np.float32(np.sqrt(spec.snr / power))
    if noise:
        images += rng.standard_normal(images.shape, dtype=np.float32)
    tu2, tv2, ta2 = zaa_to_uva(z, a1, a2)
    return SimulatedParticles(
        spec=spec,
        images=images,
        angles=angles,
        origins=origins,
        micrograph=mic,
        true_u=tu2,
        true_v=tv2,
        true_angle=ta2,
        obs_u=np.asarray(ou)[mic],
        obs_v=np.asarray(ov)[mic],
        obs_angle=np.asarray(oa)[mic],
        mic_true_mean=mic_mean,
    )
