"""Cramér–Rao lower bounds for CTF parameters of a simulated micrograph.

Each periodogram ordinate ``I(k)`` of the whole micrograph (one per independent frequency of
the half plane) is treated as an exponential variable with the simulator's expected power
``P(k)`` (:func:`anisoctf.simulate.micrograph.expected_power`); only the CTF parameters are
unknown. The Fisher information is ``F = sum_k grad P grad P^T / P^2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from anisoctf.optics.ctf import frequency_grid, params_from_astig
from anisoctf.simulate.micrograph import MicrographSpec, expected_power

__all__ = ["crlb"]


def _spec_with(spec: Any, z: float, a1: float, a2: float) -> MicrographSpec:
    p = params_from_astig(z, a1, a2, spec.ctf.phase_shift_deg, spec.ctf.bfactor)
    return replace(spec, ctf=replace(p, bfactor=spec.ctf.bfactor))


def crlb(
    spec: MicrographSpec,
    k_min: float = 1.0 / 30.0,
    k_max: float | None = None,
    power: Callable[..., Any] = expected_power,
) -> dict[str, float]:
    """Lower bounds (standard deviations) of U, V (Å), angle (°) and mean defocus (Å).

    Parameters
    ----------
    spec
        The simulated micrograph (untilted).
    k_min, k_max
        Frequency band (Å⁻¹) of the ordinates counted; ``k_max`` defaults to Nyquist.
    power
        Expected periodogram ``power(spec, kx, ky)`` of the simulator that made ``spec``
        (e.g. :func:`anisoctf.simulate.mismatch.mismatch_power` for a ``MismatchSpec``).
    """
    apix = spec.optics.pixel_size
    k_max = 0.5 / apix if k_max is None else k_max
    kx, ky = frequency_grid(spec.shape, apix, rfft=True)
    kx, ky = np.broadcast_arrays(kx, ky)
    k = np.hypot(kx, ky)
    sel = (k >= k_min) & (k <= k_max)
    sel[:, 0] &= ky[:, 0] > 0  # the kx = 0 column holds each ordinate twice
    nyq_col = kx.shape[1] - 1
    if spec.shape[1] % 2 == 0:
        sel[:, nyq_col] &= ky[:, nyq_col] > 0
    kx, ky = kx[sel], ky[sel]
    c = spec.ctf
    z = c.mean_defocus
    a1, a2 = c.astig_components
    base = power(spec, kx, ky)
    grads = []
    for i, h in enumerate((0.5, 0.5, 0.5)):
        d = np.zeros(3)
        d[i] = h
        plus = power(_spec_with(spec, z + d[0], a1 + d[1], a2 + d[2]), kx, ky)
        minus = power(_spec_with(spec, z - d[0], a1 - d[1], a2 - d[2]), kx, ky)
        grads.append((plus - minus) / (2 * h))
    g = np.stack(grads, axis=1) / base[:, None]
    fisher = g.T @ g
    cov = np.linalg.inv(fisher)
    # (z, a1, a2) -> (U, V, angle): U = z + h, V = z - h, angle = atan2(a2, a1) / 2
    hh = float(np.hypot(a1, a2))
    if hh > 0:
        jac = np.array(
            [
                [1.0, a1 / hh, a2 / hh],
                [1.0, -a1 / hh, -a2 / hh],
                [0.0, np.rad2deg(-0.5 * a2 / hh**2), np.rad2deg(0.5 * a1 / hh**2)],
            ]
        )
        cu = jac @ cov @ jac.T
        su, sv, sa = np.sqrt(np.diag(cu))
    else:
        su = sv = float(np.sqrt(cov[0, 0] + cov[1, 1]))
        sa = float("inf")
    return {
        "defocus_u": float(su),
        "defocus_v": float(sv),
        "angle_deg": float(sa),
        "mean_defocus": float(np.sqrt(cov[0, 0])),
    }
