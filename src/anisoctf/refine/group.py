"""Refine one optics group: magnification matrix (Gauss–Newton) and per-particle defocus.

Arrays in, arrays out: images come from a callable ``images(rows) -> (len(rows), N, N)`` so
that the file layer can read them lazily in batches. Order of work, per round (``rounds``):

1. ``mag_iterations`` Gauss–Newton steps for ``M`` (:mod:`anisoctf.refine.anisomag`); after each
   step every particle's defocus matrix is rewritten with the step (``D ← (I+G)⁻ᵀ D (I+G)⁻¹``)
   so the CTF's quadratic term is unchanged, as in RELION;
2. one per-particle mean-defocus pass (:mod:`anisoctf.refine.defocus`): by default each
   particle's posterior under a learned height prior (:mod:`anisoctf.refine.height_prior`,
   ``defocus_mode="prior"``), or its own best correlation (``"ml"``, the old behaviour), or one
   offset per micrograph (``"micrograph"``).

Defocus values are true-frame throughout (the CTF is evaluated at ``M k``), so the matrix the
group starts with must be the one its defocus values refer to (identity for CTFFIND results).
Noise weights ``1/σ²(|k|)`` come from the radial mean of ``|X|²`` of the first batch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import lazy
from anisoctf.errors import FitError
from anisoctf.optics.ctf import Optics, frequency_features
from anisoctf.optics.frames import defocus_table_to_true
from anisoctf.optics.kernel import ctf_constants
from anisoctf.optics.magmat import MagMat
from anisoctf.records.fsc import FscCurve
from anisoctf.records.particles import ParticleBatch
from anisoctf.refine.anisomag import (
    MagEquations,
    accumulate_band,
    displacement_field,
    shell_evidence,
    solve_matrix,
    update_matrix,
)
from anisoctf.refine.astigmatism_pass import astigmatism_pass
from anisoctf.refine.defocus import defocus_offsets
from anisoctf.refine.fsc import fsc_weight
from anisoctf.refine.height_prior import HeightPrior
from anisoctf.refine.model import (
    GridFeatures,
    batch_chi,
    batch_ctf,
    grid_features,
    uva_to_zaa,
    zaa_to_uva,
)
from anisoctf.refine.posterior_pass import defocus_pass_posterior
from anisoctf.refine.projection import (
    FourierProjector,
    centre_shift_phase,
    euler_to_matrix,
    image_frequencies,
)
from anisoctf.refine.reference_gain import amplitude_gain, gain_at, reference_summary

#: scipy.fft costs 0.1–0.3 s to import; only the commands that need it pay for it
sfft = lazy("scipy.fft")

__all__ = [
    "DEFOCUS_MODES",
    "MAX_STEP",
    "GroupResult",
    "ParticleBatch",
    "RefineSettings",
    "refine_group",
]

T = TypeVar("T")


def _available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: Per-particle defocus: posterior under the learned prior, own best correlation, per micrograph.
DEFOCUS_MODES = ("prior", "ml", "micrograph")

#: Largest accepted change of any matrix element in one Gauss–Newton step (5 %: RELION's
#: refined matrices differ from the identity by ~2 % at most).
MAX_STEP = 0.05


@dataclass(frozen=True)
class RefineSettings:
    """What to fit and how (resolutions in Å, defocus in Å)."""

    fit_anisomag: bool = True
    fit_defocus: bool = True
    fit_astigmatism: bool = False  # per micrograph, after each defocus pass
    min_res: float = 30.0
    max_res: float | None = None  # default: 2.2 pixels (just inside Nyquist)
    rounds: int = 2
    mag_iterations: int = 2
    defocus_search: float = 1500.0
    defocus_step: float = 25.0
    chunk: int = 128
    cache_mb: float = 1024.0  # keep the particles' band spectra in memory up to this size
    astig_search: float = 300.0  # ± Å on each Cartesian component (a1, a2)
    astig_step: float = 50.0
    n_shells: int = 8
    whiten: bool = True  # weights 1/σ²(|k|) from the radial power; False: flat (noiseless data)
    threads: int | None = None  # chunks worked on at once; None: the CPUs this process may use
    defocus_mode: str = "prior"  # "prior" (posterior), "ml" (best correlation), "micrograph"
    height_spread: float | None = None  # fix the prior's height SD (Å); None: learn it
    micrograph_offsets: bool = True  # learn a prior centre offset per micrograph
    match_amplitudes: bool = True  # scale the reference's shells to the data's (defocus passes)

    def __post_init__(self) -> None:
        if self.defocus_mode not in DEFOCUS_MODES:
            raise ValueError(
                f"defocus mode must be one of {', '.join(DEFOCUS_MODES)}, got {self.defocus_mode!r}"
            )
        if self.height_spread is not None and not self.height_spread > 0:
            raise ValueError("the height spread must be positive (Å)")
        if self.max_res is not None and self.max_res >= self.min_res:
            raise ValueError(f"max-res {self.max_res} Å must be below min-res {self.min_res} Å")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.rounds < 1 or self.mag_iterations < 1 or self.chunk < 1:
            raise ValueError("rounds, mag iterations and chunk must be at least 1")
        if not (self.defocus_search > 0 and self.defocus_step > 0):
            raise ValueError("defocus search range and step must be positive")


@dataclass
class GroupResult:
    """The outcome for one optics group."""

    group: int
    n_particles: int
    mag_initial: MagMat
    mag: MagMat
    defocus_u: NDArray[np.float64]
    defocus_v: NDArray[np.float64]
    defocus_angle: NDArray[np.float64]
    defocus_change: NDArray[np.float64]  # fitted mean-defocus offsets, summed over rounds (Å)
    score: NDArray[np.float64]  # final correlation per particle
    band: tuple[float, float]  # 1/Å
    evidence: list[dict[str, float]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    cov: NDArray[np.float64] | None = None  # of the last step's (g00, g01, g10, g11)
    timing: dict[str, float] = field(default_factory=dict)
    flipped_contrast: bool = False
    displacement: dict | None = None  # binned displacement of the first step, and the model
    defocus_sd: NDArray[np.float64] | None = None  # posterior SD of each mean defocus (Å)
    prior: dict | None = None  # the learned height prior (defocus_mode "prior")
    defocus_mode: str = "ml"
    reference: dict | None = None  # FSC weighting and the reference's radial gain

    def summary(self) -> dict:
        """JSON-ready summary (matrix, anisotropy, axis, evidence, history, timings)."""
        m = self.mag
        return {
            "optics_group": self.group,
            "n_particles": self.n_particles,
            "mag_matrix": [list(r) for r in m.matrix],
            "anisotropy_percent": m.anisotropy_percent,
            "axis_deg": m.axis_deg,
            "scale": m.scale,
            "rotation_deg": m.rotation_deg,
            "mag_matrix_initial": [list(r) for r in self.mag_initial.matrix],
            "band_resolution_A": [1.0 / self.band[0], 1.0 / self.band[1]],
            "matrix_element_sd": None
            if self.cov is None
            else np.sqrt(np.diag(self.cov)).reshape(2, 2).tolist(),
            "per_frequency": self.evidence,
            "iterations": self.history,
            "defocus_change_A": {
                "median": float(np.median(self.defocus_change)),
                "rms": float(np.sqrt(np.mean(self.defocus_change**2))),
            },
            "defocus_mode": self.defocus_mode,
            "defocus_sd_A": None
            if self.defocus_sd is None
            else {
                "median": float(np.median(self.defocus_sd)),
                "p90": float(np.quantile(self.defocus_sd, 0.9)),
            },
            "height_prior": self.prior,
            "reference_weighting": self.reference,
            "timing_s": self.timing,
            "contrast_inverted": self.flipped_contrast,
            "displacement_field": self.displacement,
        }


def _radial_noise(x: NDArray[np.complexfloating], box: int) -> NDArray[np.float64]:
    """Per-pixel σ² from the radial mean of ``|X|²`` (1-pixel shells)."""
    kx, ky = image_frequencies(box)
    r = np.rint(np.hypot(kx, ky) * box).astype(int)
    p = np.mean(x.real.astype(np.float64) ** 2 + x.imag.astype(np.float64) ** 2, axis=0)
    s = np.bincount(r.ravel(), weights=p.ravel())
    c = np.bincount(r.ravel())
    prof = s / np.maximum(c, 1)
    prof = np.where(prof > 0, prof, np.max(prof))
    return prof[r]


@dataclass(frozen=True)
class _Setup:
    """What stays fixed while one group is refined: band, weights, chunks, readers."""

    images: Callable[[NDArray[np.int64]], NDArray[np.floating]]
    particles: ParticleBatch
    optics: Optics
    box: int
    projectors: Mapping[int, FourierProjector]
    st: RefineSettings
    group: int
    say: Callable[[str], None]
    rots: NDArray[np.float64]
    shift: NDArray[np.float64]
    k_lo: float
    k_hi: float
    kx: NDArray[np.float64]
    ky: NDArray[np.float64]
    band: NDArray[np.bool_]
    bidx: NDArray[np.int64]
    weight: NDArray[np.float64]
    chunks: list[NDArray[np.int64]]
    first_rows: NDArray[np.int64]
    mic: NDArray[np.int64]
    keep_spectra: bool
    n_threads: int
    fsc: FscCurve | None = None
    spectra_cache: dict[int, NDArray[np.complex64]] = field(default_factory=dict)
    read_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def n(self) -> int:
        return self.particles.n

    @property
    def apix(self) -> float:
        return self.optics.pixel_size

    @property
    def w_band(self) -> NDArray[np.float64]:
        return self.weight[self.band]

    def batch(self, rows: NDArray[np.int64], mcur: NDArray[np.float64]):
        """Observed spectra (origin at pixel 0) and reference slices of ``rows``, whole grid."""
        imgs = np.asarray(self.images(rows), dtype=np.float32)
        x = sfft.rfft2(imgs, workers=-1)
        x0 = x * np.conj(centre_shift_phase(self.box, self.shift[rows])).astype(np.complex64)
        proj = self.projectors[int(self.particles.which[rows[0]])]
        q = proj.slices(self.rots[rows], self.box, self.apix, mcur, band=None)
        return x0, q

    def over_chunks(self, work: Callable[[int, NDArray[np.int64]], T]) -> list[T]:
        """``work(ci, rows)`` for every chunk, in order; on ``n_threads`` threads (numpy, the
        FFTs and the gathers release the GIL), each chunk's result kept apart so that the sums
        taken afterwards do not depend on the scheduling."""
        if self.n_threads == 1:
            return [work(ci, rows) for ci, rows in enumerate(self.chunks)]
        with ThreadPoolExecutor(self.n_threads) as ex:
            return list(ex.map(work, range(len(self.chunks)), self.chunks))

    def spectra(self, ci: int, rows: NDArray[np.int64]) -> NDArray[np.complex64]:
        """Observed spectra of chunk ``ci`` on the band's pixels, origin moved to pixel 0."""
        hit = self.spectra_cache.get(ci)
        if hit is not None:
            return hit
        with self.read_lock:  # the reader need not be thread-safe
            imgs = np.asarray(self.images(rows), dtype=np.float32)
        fft_workers = 1 if self.n_threads > 1 else -1
        x = sfft.rfft2(imgs, workers=fft_workers).reshape(len(rows), -1)[:, self.bidx]
        ph = centre_shift_phase(self.box, self.shift[rows]).reshape(len(rows), -1)[:, self.bidx]
        x *= np.conj(ph)
        if self.keep_spectra:
            self.spectra_cache[ci] = x
        return x

    def project(
        self, rows: NDArray[np.int64], mcur: NDArray[np.float64], pixels: NDArray[np.bool_] | None
    ) -> NDArray[np.complex64]:
        proj = self.projectors[int(self.particles.which[rows[0]])]
        return proj.slices(self.rots[rows], self.box, self.apix, mcur, band=pixels)

    def band_terms(
        self, ci: int, rows: NDArray[np.int64], s: _State, gb: GridFeatures
    ) -> tuple[NDArray[np.complex64], NDArray[np.complex64], NDArray, NDArray]:
        """Chunk ``ci`` on the band's pixels at the state's defocus and matrix: observed
        spectra, reference slices, CTF phase (amplitude contrast included) and the signed
        B-factor envelope, each ``(len(rows), n_band)``; ``gb`` is
        :meth:`band_features` of ``s.m``."""
        p = self.particles
        xb = self.spectra(ci, rows)
        qb = self.project(rows, s.m, self.band).reshape(len(rows), -1)[:, self.bidx]
        if s.gain is not None:
            qb = qb * gain_at(s.gain, gb.feats.k2[0]).astype(np.float32)
        phi0 = batch_chi(gb, s.z[rows], s.a1[rows], s.a2[rows], self.optics, p.phase_shift[rows])
        phi0 += ctf_constants(self.optics).amplitude_phase_rad
        env = s.sign * np.exp(-0.25 * p.bfactor[rows, None, None] * gb.feats.k2[None])
        return xb, qb, phi0[:, 0], env[:, 0]

    def band_features(self, mcur: NDArray[np.float64]) -> GridFeatures:
        """The band's pixels as a (1, n_band) grid: batch_chi gives (P, 1, n_band)."""
        kxb, kyb = self.kx[self.band][None], self.ky[self.band][None]
        return GridFeatures(
            box=self.box,
            pixel_size=self.apix,
            kx=kxb,
            ky=kyb,
            feats=frequency_features(kxb / self.apix, kyb / self.apix, mcur),
        )


@dataclass
class _State:
    """What one group's refinement changes: matrix, defocus, scores, history, timings."""

    m: NDArray[np.float64]
    z: NDArray[np.float64]
    z_input: NDArray[np.float64]  # the input mean defocus, carried through the matrix steps
    a1: NDArray[np.float64]
    a2: NDArray[np.float64]
    change: NDArray[np.float64]
    score: NDArray[np.float64]
    sign: float = 1.0
    sd: NDArray[np.float64] | None = None
    prior: HeightPrior | None = None
    # the reference's radial gain: (shell frequencies 1/Å, gain), see _amplitude_gain
    gain: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    evidence: list[dict[str, float]] = field(default_factory=list)
    cov: NDArray[np.float64] | None = None
    first_eqs: MagEquations | None = None
    first_m: NDArray[np.float64] | None = None
    t_mag: float = 0.0
    t_def: float = 0.0
    t_ast: float = 0.0
    c_mag: float = 0.0
    c_def: float = 0.0
    n_mag: int = 0
    n_def: int = 0


def _scales(x0, q, c, w) -> NDArray[np.float64]:
    """Least-squares scale of each particle; the pixels are the trailing axes."""
    cq = c * q
    axes = tuple(range(1, cq.ndim))
    num = np.sum(w * (x0.real * cq.real + x0.imag * cq.imag), axis=axes)
    den = np.sum(w * (cq.real**2 + cq.imag**2), axis=axes)
    return num / np.maximum(den, 1e-300)


def _setup(
    images: Callable[[NDArray[np.int64]], NDArray[np.floating]],
    particles: ParticleBatch,
    optics: Optics,
    box: int,
    projectors: Mapping[int, FourierProjector],
    st: RefineSettings,
    group: int,
    say: Callable[[str], None],
    fsc: FscCurve | None = None,
) -> _Setup:
    """Band, chunks and noise weights of one group (reads the first chunk's images); with
    ``fsc`` the weights are multiplied by :func:`~anisoctf.refine.fsc.fsc_weight` and the band
    ends where it falls to zero."""
    n = particles.n
    apix = optics.pixel_size
    which = particles.which
    if which.shape != (n,) or not set(np.unique(which).tolist()) <= set(projectors):
        raise ValueError("every particle needs a projector")
    angles = particles.angles
    rots = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    shift = particles.origins_angst / apix
    k_lo = 1.0 / st.min_res
    k_hi = 1.0 / (st.max_res if st.max_res is not None else 2.2 * apix)
    k_hi = min(k_hi, 0.5 / apix)
    kx, ky = image_frequencies(box)
    k_obs = np.hypot(kx, ky) / apix
    band = (k_obs >= k_lo) & (k_obs <= k_hi)
    shell_w = None
    if fsc is not None:
        shell_w = fsc_weight(fsc, k_obs)
        band &= shell_w > 0
        if band.any():
            k_hi = min(k_hi, float(np.max(k_obs[band])))
        src = fsc.source or "the reference"
        say(
            f"optics group {group}: comparison weighted by the FSC of {src} (0.143 at "
            f"{fsc.resolution_A():.1f} Å; band ends at {1 / k_hi:.1f} Å)"
        )
    if band.sum() < 20:
        raise ValueError(
            f"the band {st.min_res}–{1 / k_hi:.1f} Å holds too few pixels"
            + ("" if fsc is None else " (the FSC falls to zero before the band's end)")
        )
    order = np.argsort(which, kind="stable")
    chunks = [order[i : i + st.chunk] for i in range(0, n, st.chunk)]
    # split chunks so that each uses one projector
    chunks = [c[which[c] == key] for c in chunks for key in np.unique(which[c])]
    first_rows = np.arange(min(n, st.chunk))
    first = np.asarray(images(first_rows), dtype=np.float32)
    x_first = sfft.rfft2(first, workers=-1)
    if st.whiten:
        weight = np.where(band, 1.0 / _radial_noise(x_first, box), 0.0)
    else:
        weight = band.astype(np.float64)
    if shell_w is not None:
        weight = weight * shell_w
    bidx = np.flatnonzero(band.ravel())
    mic = (
        np.zeros(n, dtype=np.int64)
        if particles.micrograph is None
        else np.unique(np.asarray(particles.micrograph), return_inverse=True)[1].reshape(-1)
    )
    return _Setup(
        images=images,
        particles=particles,
        optics=optics,
        box=box,
        projectors=projectors,
        st=st,
        group=group,
        say=say,
        rots=rots,
        shift=shift,
        k_lo=k_lo,
        k_hi=k_hi,
        kx=kx,
        ky=ky,
        band=band,
        bidx=bidx,
        weight=weight,
        chunks=chunks,
        first_rows=first_rows,
        mic=mic,
        # the observed band spectra do not change between passes: keep them when they fit
        keep_spectra=n * bidx.size * 8 <= st.cache_mb * 2**20,
        n_threads=max(1, min(st.threads or _available_cpus(), len(chunks))),
        fsc=fsc,
    )


def _contrast_sign(su: _Setup, s: _State) -> float:
    """Contrast sign from the first batch (RELION images have the particle white).

    The prediction uses RELION's CTF sign (:data:`anisoctf.optics.kernel.CTF_SIGN`), so a
    normal RELION stack gives a positive median scale; pinned on RELION-made particles by
    ``tests/test_refine_particles.py::test_relion_made_particles_have_normal_contrast``.
    """
    p = su.particles
    g0 = grid_features(su.box, su.apix, s.m)
    signs = []
    for rows in su.chunks:
        sub = rows[np.isin(rows, su.first_rows)]
        if sub.size:
            x0, q = su.batch(sub, s.m)
            c = batch_ctf(
                g0, s.z[sub], s.a1[sub], s.a2[sub], su.optics, p.phase_shift[sub], p.bfactor[sub]
            )
            signs.append(_scales(x0, q, c, su.weight))
    sign = 1.0 if np.median(np.concatenate(signs)) >= 0 else -1.0
    if sign < 0:
        su.say(
            f"optics group {su.group}: image contrast is inverted relative to the reference; "
            "fitting with the sign flipped"
        )
    return sign


def _mag_step(su: _Setup, s: _State, rnd: int, it: int) -> None:
    """One Gauss–Newton step of the matrix; the defocus matrices follow the step."""
    p, optics, box = su.particles, su.optics, su.box
    t0, c0 = time.perf_counter(), time.process_time()
    m = s.m
    gb = su.band_features(m)
    w_band = su.w_band

    def mag_chunk(
        ci: int, rows: NDArray[np.int64], m=m, gb=gb, z=s.z, a1=s.a1, a2=s.a2
    ) -> MagEquations:
        xb = su.spectra(ci, rows)
        q = su.project(rows, m, None)  # the whole slice: its gradient needs it
        qb = q.reshape(len(rows), -1)[:, su.bidx]
        c = batch_ctf(gb, z[rows], a1[rows], a2[rows], optics, p.phase_shift[rows], p.bfactor[rows])
        c = s.sign * c[:, 0]
        sc = _scales(xb, qb, c, w_band)
        part = MagEquations.zeros(box)
        accumulate_band(part, xb, q, qb, c, sc, w_band, su.bidx, m)
        return part

    eqs = MagEquations.zeros(box)
    for part in su.over_chunks(mag_chunk):
        eqs += part
    try:
        gstep, s.cov = solve_matrix(eqs, m, su.band)
    except ValueError as exc:
        raise FitError(f"optics group {su.group}: {exc}") from None
    if not np.all(np.abs(gstep) <= MAX_STEP):
        raise FitError(
            f"optics group {su.group}: the magnification step "
            f"{np.abs(gstep).max():.3f} exceeds {MAX_STEP}: the reference does not "
            "match these particles (wrong map, pixel size or poses), or there are "
            "too few particles"
        )
    s.t_mag += time.perf_counter() - t0
    s.c_mag += time.process_time() - c0
    s.n_mag += 1
    m_new = update_matrix(m, gstep)
    # keep the CTF's quadratic term: D <- (I+G)^-T D (I+G)^-1
    u, v, ang = zaa_to_uva(s.z, s.a1, s.a2)
    u, v, ang = defocus_table_to_true(u, v, ang, np.eye(2) + gstep)
    s.z, s.a1, s.a2 = uva_to_zaa(u, v, ang)
    u, v, ang = zaa_to_uva(s.z_input, s.a1, s.a2)
    s.z_input = uva_to_zaa(*defocus_table_to_true(u, v, ang, np.eye(2) + gstep))[0]
    s.evidence = shell_evidence(eqs, m, su.apix, (su.k_lo, su.k_hi), su.st.n_shells)
    if s.first_eqs is None:
        s.first_eqs, s.first_m = eqs, m.copy()
    s.m = m_new
    mm = MagMat(m_new)
    s.history.append(
        {
            "round": rnd + 1,
            "iteration": it + 1,
            "anisotropy_percent": mm.anisotropy_percent,
            "axis_deg": mm.axis_deg,
            "step_norm": float(np.abs(gstep).max()),
        }
    )
    su.say(f"optics group {su.group}: round {rnd + 1} step {it + 1}: {mm.describe()}")


def _defocus_pass(su: _Setup, s: _State, rnd: int) -> None:
    """One per-particle mean-defocus pass on the band's pixels."""
    optics, st = su.optics, su.st
    t0, c0 = time.perf_counter(), time.process_time()
    # only the band's pixels enter the correlation: project and model just those
    gb = su.band_features(s.m)

    def defocus_chunk(ci: int, rows: NDArray[np.int64]) -> tuple[NDArray, NDArray]:
        xb, qb, phi0, env = su.band_terms(ci, rows, s, gb)
        return defocus_offsets(
            xb,
            qb,
            phi0,
            env,
            su.w_band,
            gb.feats.k2[0],
            optics.wavelength,
            st.defocus_search,
            st.defocus_step,
        )

    for rows, (off, sc) in zip(su.chunks, su.over_chunks(defocus_chunk), strict=True):
        s.z[rows] += off
        s.change[rows] += off
        s.score[rows] = sc
    s.t_def += time.perf_counter() - t0
    s.c_def += time.process_time() - c0
    s.n_def += 1
    su.say(
        f"optics group {su.group}: round {rnd + 1} defocus: median change "
        f"{np.median(s.change):+.0f} Å, RMS {np.sqrt(np.mean(s.change**2)):.0f} Å"
    )


def _result(su: _Setup, s: _State, m_init: MagMat) -> GroupResult:
    """The group's :class:`GroupResult` from the final state."""
    n = su.n
    u, v, ang = zaa_to_uva(s.z, s.a1, s.a2)
    displacement = None
    if s.first_eqs is not None:
        g_total = s.m @ np.linalg.inv(s.first_m) - np.eye(2)
        displacement = displacement_field(s.first_eqs, s.first_m, g_total, su.apix)
    timing = {}
    if s.n_mag:
        timing["anisomag_s_per_pass"] = s.t_mag / s.n_mag
        timing["anisomag_particles_per_s"] = n * s.n_mag / s.t_mag
        timing["anisomag_particles_per_cpu_s"] = n * s.n_mag / max(s.c_mag, 1e-9)
    if su.st.fit_astigmatism:
        timing["astigmatism_s"] = s.t_ast
    if s.n_def:
        timing["defocus_s_per_pass"] = s.t_def / s.n_def
        timing["defocus_particles_per_s"] = n * s.n_def / s.t_def
        timing["defocus_particles_per_cpu_s"] = n * s.n_def / max(s.c_def, 1e-9)
    return GroupResult(
        group=su.group,
        n_particles=n,
        mag_initial=m_init,
        mag=MagMat(s.m),
        defocus_u=u,
        defocus_v=v,
        defocus_angle=ang,
        defocus_change=s.change,
        score=s.score,
        band=(su.k_lo, su.k_hi),
        evidence=s.evidence,
        history=s.history,
        cov=s.cov,
        timing=timing,
        flipped_contrast=s.sign < 0,
        displacement=displacement,
        defocus_sd=s.sd,
        prior=None if s.prior is None else s.prior.to_dict(),
        defocus_mode=su.st.defocus_mode,
        reference=reference_summary(su, s),
    )


def refine_group(
    images: Callable[[NDArray[np.int64]], NDArray[np.floating]],
    particles: ParticleBatch,
    optics: Optics,
    box: int,
    projectors: Mapping[int, FourierProjector],
    settings: RefineSettings | None = None,
    group: int = 1,
    log: Callable[[str], None] | None = None,
    fsc: FscCurve | None = None,
) -> GroupResult:
    """Refine the magnification matrix and per-particle defocus of one optics group.

    Parameters
    ----------
    images
        ``images(rows)`` returns the images of particle rows ``rows`` (0-based, this group).
    particles
        The group's per-particle arrays (:class:`~anisoctf.records.particles.ParticleBatch`):
        poses, origins, starting defocus (in the frame of ``optics.mag_matrix``, the true frame
        when it is set), phase shifts, B-factors, the micrograph of each particle (for the
        per-micrograph astigmatism, ``settings.fit_astigmatism``) and the key of its projector.
    optics
        The group's optics; ``optics.mag_matrix`` is the starting ``M``.
    box
        Image size (pixels).
    projectors
        Reference projectors, keyed as ``particles.which`` (half maps: the random subset).
    settings, group, log
        What to fit; the group's number (for messages and the result); a message sink.
    fsc
        The reference's FSC: every frequency's weight is multiplied by it, and frequencies
        from where it first falls to zero are left out (:mod:`anisoctf.refine.fsc`; RELION
        CtfRefine's ``--f``). ``None``: weights from the data's noise only.
    """
    st = settings or RefineSettings()
    say = log or (lambda _m: None)
    su = _setup(images, particles, optics, box, projectors, st, group, say, fsc)
    m = np.array(optics.M)
    z, a1, a2 = uva_to_zaa(particles.defocus_u, particles.defocus_v, particles.defocus_angle)
    n = particles.n
    s = _State(
        m=m,
        z=z.copy(),
        z_input=z.copy(),
        a1=a1.copy(),
        a2=a2.copy(),
        change=np.zeros(n),
        score=np.full(n, np.nan),
        first_m=m,
    )
    s.sign = _contrast_sign(su, s)
    for rnd in range(st.rounds):
        if st.fit_anisomag:
            for it in range(st.mag_iterations):
                _mag_step(su, s, rnd, it)
        if st.fit_defocus:
            if st.match_amplitudes:
                t0, c0 = time.perf_counter(), time.process_time()
                s.gain = amplitude_gain(su, s)
                s.t_def += time.perf_counter() - t0  # counted in the defocus pass's time
                s.c_def += time.process_time() - c0
            if st.defocus_mode == "ml":
                _defocus_pass(su, s, rnd)
            else:
                defocus_pass_posterior(su, s, rnd)
        if st.fit_astigmatism:
            astigmatism_pass(su, s, rnd)
    return _result(su, s, MagMat(m))
