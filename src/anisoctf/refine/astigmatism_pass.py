"""The per-micrograph astigmatism pass of one optics group (``--fit astigmatism``).

A change ``(Δa1, Δa2)`` of the Cartesian astigmatism is shared by all particles of a
micrograph: the same matrix products score a grid of candidates for every particle
(:func:`anisoctf.refine.defocus.astigmatism_scores`), the scores of a micrograph's particles
are summed and each micrograph takes its best candidate, coarse then fine.

Works on :mod:`anisoctf.refine.group`'s set-up and state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from anisoctf.optics.kernel import ctf_constants
from anisoctf.refine.defocus import astigmatism_scores
from anisoctf.refine.model import batch_chi, grid_features
from anisoctf.refine.reference_gain import gain_at

if TYPE_CHECKING:
    from anisoctf.refine.group import _Setup, _State

__all__ = ["astigmatism_pass"]


def astigmatism_pass(su: _Setup, s: _State, rnd: int) -> None:
    """Per-micrograph Cartesian astigmatism: a coarse then a fine grid search."""
    p, optics, st, mic = su.particles, su.optics, su.st, su.mic
    t0 = time.perf_counter()
    g = grid_features(su.box, su.apix, s.m)
    asin_w = ctf_constants(optics).amplitude_phase_rad
    nm = int(mic.max()) + 1
    total = np.zeros((nm, 2))
    for half, stp in ((st.astig_search, st.astig_step), (st.astig_step, st.astig_step / 5)):
        d = np.arange(-half, half + 0.5 * stp, stp)
        cand = np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)
        sums = np.zeros((nm, len(cand)))
        for rows in su.chunks:
            x0, q = su.batch(rows, s.m)
            if s.gain is not None:
                q = q * gain_at(s.gain, g.feats.k2).astype(np.float32)
            phi0 = batch_chi(g, s.z[rows], s.a1[rows], s.a2[rows], optics, p.phase_shift[rows])
            phi0 += asin_w
            env = s.sign * np.exp(-0.25 * p.bfactor[rows, None, None] * g.feats.k2[None])
            sc = astigmatism_scores(
                x0, q, phi0, env, su.weight, g.feats.c2, g.feats.s2, optics.wavelength, cand
            )
            np.add.at(sums, mic[rows], sc)
        best = cand[np.argmax(sums, axis=1)]
        s.a1 += best[mic, 0]
        s.a2 += best[mic, 1]
        total += best
    s.t_ast += time.perf_counter() - t0
    su.say(
        f"optics group {su.group}: round {rnd + 1} astigmatism: median |change| "
        f"{np.median(np.hypot(total[:, 0], total[:, 1])) * 2:.0f} Å in U − V"
    )
