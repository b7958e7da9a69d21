"""Maximum-likelihood refinement of the CTF against the averaged periodogram.

Model of the expected spectrum at each pixel of the band::

    m(k) = B(|k_obs|) + A(|k_true|) * CTF^2(k; z, a1, a2, phase)

with ``B`` (background) and ``A`` (envelope × signal) smooth cubic B-splines whose coefficients
are fitted together with the CTF parameters. An averaged periodogram ordinate is Gamma
distributed with mean ``m``; its negative log-likelihood (per tile) is
``sum(log m + S / m)``. We minimise it by Newton steps with the observed information (its
exact Hessian; where that is not positive definite, Fisher scoring, i.e. iteratively reweighted
least squares with weights ``1 / m^2``) and Levenberg–Marquardt damping. Astigmatism is
parameterised by Cartesian components, so nothing is clamped. The inverse Fisher information
gives the statistical uncertainty of each parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.fit.band import Band, radial_basis
from anisoctf.optics.ctf import Optics
from anisoctf.optics.kernel import (
    chi_rad,
    ctf2_from_chi_fast,
    ctf_constants,
    defocus_phase_rad,
)

__all__ = ["RefineResult", "background_only_nll", "refine_ml"]


@dataclass(frozen=True)
class RefineResult:
    """Result of :func:`refine_ml` (CTF parameters in the true frame)."""

    z: float
    a1: float
    a2: float
    phase_deg: float
    nll: float
    covariance: NDArray[np.float64]  # of (z, a1, a2[, phase_rad]) in Å (and rad)
    background: NDArray[np.float64]  # B at each band pixel
    envelope: NDArray[np.float64]  # A at each band pixel
    ctf2: NDArray[np.float64]  # CTF^2 at each band pixel
    iterations: int


def _ctf_terms(band: Band, optics: Optics, z: float, a1: float, a2: float, ph: float):
    """CTF² and d(CTF²)/d(chi) at the band's pixels (the kernel's fast path: a float64 cosine
    for the likelihood, a float32 sine for the information matrix)."""
    consts = ctf_constants(optics)
    x = chi_rad(band.feats, consts, z, a1, a2, ph)
    return ctf2_from_chi_fast(x, consts, derivative=True)


@dataclass(frozen=True)
class _Jacobian:
    """The constant parts of the transposed Jacobian, as float32 rows (one contiguous row per
    parameter): ``d(chi)/d(theta)``, background and envelope bases, ``sqrt(weights)``."""

    dchi_t: NDArray[np.float32]
    phi_t: NDArray[np.float32]
    psi_t: NDArray[np.float32]
    snu: NDArray[np.float64]

    @classmethod
    def build(cls, dchi: list[NDArray], phi: NDArray, psi: NDArray, snu: NDArray) -> _Jacobian:
        return cls(
            dchi_t=np.array(dchi, dtype=np.float32),
            phi_t=np.ascontiguousarray(phi.T, dtype=np.float32),
            psi_t=np.ascontiguousarray(psi.T, dtype=np.float32),
            snu=snu,
        )

    def transposed(self, m_: NDArray, env_: NDArray, c2_: NDArray, dc2_: NDArray) -> NDArray:
        """Transposed weighted Jacobian ``(n_par, N)``; float32 is ample: rounding stays far
        below the statistical noise of the sums."""
        nt, nb = self.dchi_t.shape[0], self.phi_t.shape[0]
        n_par = nt + nb + self.psi_t.shape[0]
        inv_ = (self.snu / m_).astype(np.float32)
        j_ = np.empty((n_par, m_.size), dtype=np.float32)
        a_ = (env_ * dc2_).astype(np.float32)
        a_ *= inv_
        np.multiply(self.dchi_t, a_, out=j_[:nt])
        np.multiply(self.phi_t, inv_, out=j_[nt : nt + nb])
        b_ = c2_.astype(np.float32)
        b_ *= inv_
        np.multiply(self.psi_t, b_, out=j_[nt + nb :])
        return j_


def _covariance(j: NDArray, n_eff: float, restr: float, nt: int) -> NDArray[np.float64]:
    """Covariance of the CTF parameters from the Fisher information at the optimum."""
    fisher = max(n_eff, 1.0) * (j @ j.T).astype(np.float64)
    if restr:
        fisher[1, 1] += restr * max(n_eff, 1.0)
        fisher[2, 2] += restr * max(n_eff, 1.0)
    try:
        return np.linalg.inv(fisher)[:nt, :nt]
    except np.linalg.LinAlgError:
        return np.full((nt, nt), np.inf)


def _solve_normal(x: NDArray, y: NDArray) -> NDArray:
    """Least squares by the normal equations (the bases here are well conditioned; they only
    give starting values, so the products are formed in float32, the solve in float64)."""
    xt = np.ascontiguousarray(x.T, dtype=np.float32)
    g = (xt @ xt.T).astype(np.float64)
    g += 1e-12 * np.trace(g) * np.eye(g.shape[0])
    return np.linalg.solve(g, (xt @ np.asarray(y, dtype=np.float32)).astype(np.float64))


def refine_ml(
    band: Band,
    optics: Optics,
    start: tuple[float, float, float, float],
    n_eff: float = 1.0,
    fit_phase: bool = False,
    astig_sigma: float | None = None,
    n_bg: int = 10,
    n_env: int = 6,
    max_iter: int = 40,
    tol: float = 0.01,
) -> RefineResult:
    """Refine ``(z, a1, a2[, phase])`` and the smooth background/envelope by maximum likelihood.

    Parameters
    ----------
    band
        Spectrum pixels to fit.
    optics
        Optics (its magnification matrix is already in ``band.feats``).
    start
        Starting ``(z, a1, a2, phase_deg)``.
    n_eff
        Effective number of periodograms averaged (scales the likelihood and the covariance).
    fit_phase
        Also refine the phase shift.
    astig_sigma
        Width (Å) of a Gaussian restraint on ``U − V``; None for none.
    n_bg, n_env
        Number of spline coefficients of background and envelope.
    max_iter
        Most iterations.
    tol
        Stop when every CTF parameter's step is below ``tol`` times its standard error.
    """
    s = band.values
    nu = band.weights
    snu = np.sqrt(nu)
    nu_mean = nu / nu.sum()
    f = band.feats
    # d(chi)/d(z, a1, a2) = pi lambda (k2, c2, s2): the kernel's defocus phase of each form
    dchi = [defocus_phase_rad(q, optics.wavelength) for q in (f.k2, f.c2, f.s2)]
    if fit_phase:
        dchi.append(np.ones_like(f.k2))
    nt = len(dchi)
    phi = radial_basis(band.rho, float(band.rho.min()), float(band.rho.max()), n_bg)
    psi = radial_basis(band.rho_true, band.k_min, band.k_max, n_env)
    theta = np.array([start[0], start[1], start[2], np.deg2rad(start[3])], dtype=float)

    def unpack(t: NDArray) -> tuple[float, float, float, float]:
        return float(t[0]), float(t[1]), float(t[2]), float(t[3])

    restr = 0.0 if astig_sigma is None else 4.0 / (astig_sigma**2 * max(n_eff, 1.0))
    restr_scaled = restr / band.weights.sum()

    # starting linear coefficients: weighted least squares with a smooth weight
    c2, dc2 = _ctf_terms(band, optics, *unpack(theta))
    x0 = _solve_normal(phi, s)
    ws = 1.0 / np.maximum(phi @ x0, 1e-6 * np.abs(s).mean())
    design = np.concatenate([phi, psi * c2[:, None]], axis=1)
    lin = _solve_normal(design * ws[:, None], s * ws)
    nb = phi.shape[1]
    total_w = float(nu.sum())
    fisher_scale = max(n_eff, 1.0) * total_w

    jac = _Jacobian.build(dchi, phi, psi, snu)
    dchi_t, psi_t, jacobian = jac.dchi_t, jac.psi_t, jac.transposed

    def evaluate(t: NDArray, lin_: NDArray):
        c2_, dc2_ = _ctf_terms(band, optics, *unpack(t))
        bg = phi @ lin_[:nb]
        env = psi @ lin_[nb:]
        m = bg + env * c2_
        return m, bg, env, c2_, dc2_

    def nll_of(m: NDArray, t: NDArray) -> float:
        if np.any(m <= 0):
            return np.inf
        return float(
            np.dot(nu_mean, np.log(m) + s / m) + restr * 0.5 * (t[1] ** 2 + t[2] ** 2) / nu.sum()
        )

    m, bg, env, c2, dc2 = evaluate(theta, lin)
    if np.any(m <= 0):  # start from a pure background fit if the envelope misbehaves
        lin = np.concatenate([x0, np.zeros(psi.shape[1])])
        lin[nb:] = 1e-3 * np.abs(x0).mean()
        m, bg, env, c2, dc2 = evaluate(theta, lin)
    nll = nll_of(m, theta)
    mu = 1e-3
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - reported in the result
        j = jacobian(m, env, c2, dc2)
        r = ((s - m) * snu / m).astype(np.float32)
        jtj = (j @ j.T).astype(np.float64) / total_w
        g = (j @ r).astype(np.float64) / total_w
        hess = _observed_information(j, jtj, s, m, nu, env, c2, dc2, dchi_t, psi_t, nb, total_w)
        if restr:
            g[1] -= restr_scaled * theta[1]
            g[2] -= restr_scaled * theta[2]
            jtj[1, 1] += restr_scaled
            jtj[2, 2] += restr_scaled
            hess[1, 1] += restr_scaled
            hess[2, 2] += restr_scaled
        diag = np.diag(jtj).copy()
        improved = False
        for _ in range(12):
            a = hess + mu * np.diag(diag + 1e-12 * diag.max())
            try:
                step = np.linalg.solve(a, g)
            except np.linalg.LinAlgError:
                mu *= 10
                continue
            t_new = theta.copy()
            t_new[:nt] += step[:nt]
            lin_new = lin + step[nt:]
            m_new, bg_n, env_n, c2_n, dc2_n = evaluate(t_new, lin_new)
            nll_new = nll_of(m_new, t_new)
            if nll_new < nll:
                improved = True
                break
            mu *= 4.0
        if not improved:
            break
        theta, lin, nll = t_new, lin_new, nll_new
        m, bg, env, c2, dc2 = m_new, bg_n, env_n, c2_n, dc2_n
        mu = max(mu / 3.0, 1e-9)
        # converged when the CTF step is a small fraction of its statistical uncertainty
        try:
            sd = np.sqrt(np.abs(np.diag(np.linalg.inv(jtj))[:nt]) / fisher_scale)
        except np.linalg.LinAlgError:
            sd = np.full(nt, np.inf)
        if np.all(np.abs(step[:nt]) < tol * sd):
            break

    # a NaN model never improves (NaN < x is False): a failure, never a result
    if not (np.isfinite(nll) and np.all(np.isfinite(theta)) and np.all(np.isfinite(lin))):
        raise FloatingPointError("the refinement found no finite likelihood")
    cov = _covariance(jacobian(m, env, c2, dc2), n_eff, restr, nt)
    return RefineResult(
        z=float(theta[0]),
        a1=float(theta[1]),
        a2=float(theta[2]),
        phase_deg=float(np.rad2deg(theta[3]) % 180.0),  # CTF²'s period: in [0°, 180°)
        nll=nll,
        covariance=cov,
        background=bg,
        envelope=env,
        ctf2=np.asarray(c2, dtype=np.float64),
        iterations=iterations,
    )


def _observed_information(
    j: NDArray,
    fisher: NDArray,
    s: NDArray,
    m: NDArray,
    nu: NDArray,
    env: NDArray,
    c2: NDArray,
    dc2: NDArray,
    dchi_t: NDArray,
    psi_t: NDArray,
    nb: int,
    total_w: float,
) -> NDArray:
    """The Hessian of the normalised negative log-likelihood (observed information), or the
    Fisher information ``fisher`` where that Hessian is not positive definite.

    Fisher scoring converges only linearly where the model and the data differ systematically
    (cells average the CTF over a little phase, smooth splines approximate background and
    envelope): here the defocus crept by a third of its remaining error per step, 10–14 steps
    on 4096² micrographs. With the observed information, Newton's method takes 2–4.
    ``-log L = sum nu (log m + s/m)`` has the Hessian
    ``sum nu [(2 s/m - 1) dm dm^T / m^2 + (1 - s/m) / m * d2m]``; the second derivatives of
    ``m = B + A CTF²`` are non-zero only between CTF parameters (``A d²CTF²/dχ² dχ dχ^T``) and
    between CTF and envelope parameters (``psi dCTF²/dχ dχ``); ``d²CTF²/dχ² = 2 (1 - 2 CTF²)``.
    """
    nt = dchi_t.shape[0]
    q = s / m
    wq = (2.0 * q - 1.0).astype(np.float32)
    h = ((j * wq) @ j.T).astype(np.float64) / total_w
    e = nu * (1.0 - q) / m
    a = (e * env * (2.0 - 4.0 * c2)).astype(np.float32)
    h[:nt, :nt] += ((dchi_t * a) @ dchi_t.T).astype(np.float64) / total_w
    b = (e * dc2).astype(np.float32)
    cross = ((dchi_t * b) @ psi_t.T).astype(np.float64) / total_w
    h[:nt, nt + nb :] += cross
    h[nt + nb :, :nt] += cross.T
    try:
        np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        return fisher.copy()
    return h


def background_only_nll(band: Band, n_bg: int = 10, iterations: int = 8) -> float:
    """Normalised negative log-likelihood of the best smooth background without any CTF signal.

    The deviance ``2 * (nll_null - nll_fit) * n_eff * sum(weights)`` measures how much the
    Thon rings explain: a few tens for pure noise after a search, thousands for real rings.
    """
    s = band.values
    nu = band.weights
    phi = radial_basis(band.rho, float(band.rho.min()), float(band.rho.max()), n_bg)
    # the IRLS normal equations in float32 (one contiguous row per basis function): the
    # iteration corrects its own rounding, and the likelihood itself is float64
    phi_t = np.ascontiguousarray(phi.T, dtype=np.float32)
    s32 = s.astype(np.float32)
    snu = np.sqrt(nu).astype(np.float32)
    coef = _solve_normal(phi, s)
    floor = 1e-12 * np.abs(s).mean()
    x = np.empty_like(phi_t)
    for _ in range(iterations):  # IRLS with Gamma weights 1/m^2
        w = (snu / np.maximum(phi @ coef, floor)).astype(np.float32)
        np.multiply(phi_t, w, out=x)
        g = (x @ x.T).astype(np.float64)
        g += 1e-12 * np.trace(g) * np.eye(g.shape[0])
        new = np.linalg.solve(g, (x @ (s32 * w)).astype(np.float64))
        done = np.max(np.abs(new - coef)) <= 1e-7 * np.max(np.abs(new))
        coef = new
        if done:  # converged (to the float32 products' precision)
            break
    m = phi @ coef
    if np.any(m <= 0):
        return np.inf
    return float(np.dot(nu / nu.sum(), np.log(m) + s / m))
