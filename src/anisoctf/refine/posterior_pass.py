"""The posterior defocus pass of one optics group (``defocus_mode`` ``"prior"`` and
``"micrograph"``): the scoring passes over the chunks, the two grids, the learned prior.

Works on :mod:`anisoctf.refine.group`'s set-up and state (the loop that calls it lives there);
the statistics are :mod:`anisoctf.refine.height_prior`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from anisoctf.refine.defocus import defocus_scores
from anisoctf.refine.height_prior import (
    candidate_loglik,
    likelihood_temperature,
    posterior_offsets,
    scale_prior,
)
from anisoctf.refine.peak import parabola_peak

if TYPE_CHECKING:
    from anisoctf.refine.group import _Setup, _State

__all__ = ["defocus_pass_posterior"]


def _scores_pass(
    su: _Setup, s: _State, offsets: NDArray[np.float64], centres: NDArray[np.float64] | None
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float64]]:
    """Correlation numerators and denominators ``(n, J)`` of every particle at ``centres +
    offsets`` (Å from its current defocus) and each particle's ``Σ w |X|²``
    (:func:`~anisoctf.refine.defocus.defocus_scores`)."""
    optics = su.optics
    gb = su.band_features(s.m)

    def chunk(ci: int, rows: NDArray[np.int64]) -> tuple[NDArray, NDArray, NDArray]:
        xb, qb, phi0, env = su.band_terms(ci, rows, s, gb)
        return defocus_scores(
            xb,
            qb,
            phi0,
            env,
            su.w_band,
            gb.feats.k2[0],
            optics.wavelength,
            offsets,
            None if centres is None else centres[rows],
        )

    num = np.empty((su.n, len(offsets)), dtype=np.float32)
    den = np.empty((su.n, len(offsets)), dtype=np.float32)
    power = np.empty(su.n)
    for rows, (nu, de, pw) in zip(su.chunks, su.over_chunks(chunk), strict=True):
        num[rows], den[rows], power[rows] = nu, de, pw
    return num, den, power


def defocus_pass_posterior(su: _Setup, s: _State, rnd: int) -> None:
    """Mean defocus as a posterior (``defocus_mode`` ``"prior"``) or per micrograph.

    Two grids: the coarse grid over the whole search range (its EM learns the prior and finds
    where each posterior lies), then a finer window around every posterior (its EM gives the
    final prior, means and SDs). Offsets are measured from the input defocus (``z_input``), so
    the prior stays centred on the input however many rounds run.
    """
    st = su.st
    t0, c0 = time.perf_counter(), time.process_time()
    step, search = st.defocus_step, st.defocus_search
    coarse = np.arange(-search, search + 0.5 * step, step)
    base = s.z - s.z_input  # where each particle's current defocus is, from its input
    n1, d1, power = _scores_pass(su, s, coarse, None)
    n_pix = int(np.count_nonzero(su.w_band > 0))
    beta = likelihood_temperature(n1, d1, power, n_pix)
    j0 = int(np.argmin(np.abs(coarse)))  # the current defocus
    a_mean, a_sd = scale_prior(n1[:, j0], d1[:, j0], beta)

    def loglik(num: NDArray, den: NDArray) -> NDArray[np.float64]:
        return candidate_loglik(num, den, beta, a_mean, a_sd)

    fine = step / 5.0
    if st.defocus_mode == "micrograph":
        rel = _micrograph_offsets(su, s, loglik(n1, d1), loglik, coarse, fine)
    else:
        post1 = posterior_offsets(
            loglik(n1, d1),
            base[:, None] + coarse[None, :],
            su.mic,
            st.height_spread,
            learn_micrograph_offsets=st.micrograph_offsets,
            init=s.prior,
            temperature=beta,
        )
        centre = np.clip(np.round((post1.mean_A - base) / step) * step, -search, search)
        half = float(np.clip(4.0 * np.quantile(post1.sd_A, 0.99), 2.0 * step, search))
        window = np.arange(-half, half + 0.5 * fine, fine)
        n2, d2, _ = _scores_pass(su, s, window, centre)
        # the coarse grid's prior stands, unless it is too narrow for that grid to measure
        # (below one coarse step): then it is learned again on the windows
        relearn = st.height_spread is None and post1.prior.spread_A <= step * (1 + 1e-9)
        post = posterior_offsets(
            loglik(n2, d2),
            (base + centre)[:, None] + window[None, :],
            su.mic,
            st.height_spread if relearn or st.height_spread else post1.prior.spread_A,
            learn_micrograph_offsets=st.micrograph_offsets,
            init=post1.prior,
            step=fine,
            temperature=beta,
            max_spread=max(4.0 * step, 2.0 * post1.prior.best_spread_A),
            windowed=True,
            best_spread=None if relearn or st.height_spread else post1.prior.best_spread_A,
        )
        rel = np.clip(post.mean_A, -search, search) - base
        s.sd, s.prior = post.sd_A, post.prior
        j = np.clip(np.rint((rel - centre + half) / fine).astype(np.int64), 0, len(window) - 1)
        rows = np.arange(su.n)
        s.score = (n2[rows, j] / np.sqrt(d2[rows, j])).astype(np.float64)
    s.z += rel
    s.change += rel
    s.t_def += time.perf_counter() - t0
    s.c_def += time.process_time() - c0
    s.n_def += 1
    extra = ""
    if s.prior is not None and st.defocus_mode == "prior":
        extra = (
            f"; height prior SD {s.prior.spread_A:.0f} Å, micrograph offsets RMS "
            f"{np.sqrt(np.mean(s.prior.micrograph_offset_A**2)):.0f} Å, median posterior SD "
            f"{np.median(s.sd):.0f} Å"
        )
    su.say(
        f"optics group {su.group}: round {rnd + 1} defocus ({st.defocus_mode}): median change "
        f"{np.median(s.change):+.0f} Å, RMS {np.sqrt(np.mean(s.change**2)):.0f} Å{extra}"
    )


def _micrograph_offsets(
    su: _Setup,
    s: _State,
    ll: NDArray[np.float64],
    loglik: Callable[[NDArray, NDArray], NDArray[np.float64]],
    coarse: NDArray[np.float64],
    fine: float,
) -> NDArray[np.float64]:
    """One offset per micrograph: the summed log-likelihood's best coarse candidate, then a
    parabola on a fine window around it; the SD from its curvature."""
    mic, nm = su.mic, int(su.mic.max()) + 1
    total = np.zeros((nm, len(coarse)))
    np.add.at(total, mic, ll)
    centre_m = coarse[np.argmax(total, axis=1)]
    window = np.arange(-2 * su.st.defocus_step, 2 * su.st.defocus_step + 0.5 * fine, fine)
    n2, d2, _ = _scores_pass(su, s, window, centre_m[mic])
    ll2 = loglik(n2, d2)
    t2 = np.zeros((nm, len(window)))
    np.add.at(t2, mic, ll2)
    j, frac, curv, _ = parabola_peak(t2)
    ok = curv < 0
    off_m = centre_m + window[j] + frac * fine
    sd_m = np.where(ok, fine / np.sqrt(-np.where(ok, curv, -1.0)), fine)
    s.sd = sd_m[mic]
    jj = np.rint((off_m[mic] - centre_m[mic] - window[0]) / fine).astype(np.int64)
    jj = np.clip(jj, 0, len(window) - 1)
    pr = np.arange(su.n)
    s.score = (n2[pr, jj] / np.sqrt(d2[pr, jj])).astype(np.float64)
    return off_m[mic]
