"""The per-particle defocus posterior (issue 15 item 2): known-truth checks.

Synthetic likelihoods with a closed-form posterior pin the EM/evidence machinery; simulated
particles pin the whole pass: never worse than the input defocus, better than each particle's
own best correlation, and standard errors that match the errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from anisoctf.optics.ctf import Optics
from anisoctf.records.particles import ParticleBatch
from anisoctf.refine.group import RefineSettings, refine_group
from anisoctf.refine.height_prior import candidate_loglik, posterior_offsets, scale_prior
from anisoctf.refine.projection import FourierProjector
from anisoctf.simulate.particles import ParticleSimSpec, blob_map, simulate_particles


def _gaussian_case(seed: int = 0, n: int = 4000, tau: float = 60.0, m: int = 40):
    rng = np.random.default_rng(seed)
    mic = np.arange(n) % m
    mu = rng.normal(0.0, 20.0, m)
    truth = mu[mic] + rng.normal(0.0, tau, n)
    s = rng.uniform(30.0, 200.0, n)  # each particle's likelihood SD
    obs = truth + rng.normal(0.0, 1.0, n) * s
    grid = np.arange(-1500.0, 1500.0 + 1e-9, 5.0)
    ll = -0.5 * ((grid[None, :] - obs[:, None]) / s[:, None]) ** 2
    return ll, grid, mic, mu, truth, obs, s


def test_posterior_matches_the_conjugate_formula_when_the_prior_is_given() -> None:
    ll, grid, mic, _mu, _truth, obs, s = _gaussian_case()
    post = posterior_offsets(ll, grid, mic, spread=60.0, learn_micrograph_offsets=False)
    w = 1.0 / s**2
    exact_mean = obs * w / (w + 1.0 / 60.0**2)
    exact_sd = 1.0 / np.sqrt(w + 1.0 / 60.0**2)
    np.testing.assert_allclose(post.mean_A, exact_mean, atol=0.05)
    np.testing.assert_allclose(post.sd_A, exact_sd, rtol=2e-3)


def test_learned_prior_recovers_spread_offsets_and_the_optimum() -> None:
    ll, grid, mic, mu, truth, obs, s = _gaussian_case()
    post = posterior_offsets(ll, grid, mic)
    assert post.prior.best_spread_A == pytest.approx(60.0, rel=0.1)
    assert post.prior.spread_A <= post.prior.best_spread_A
    # micrograph offsets: 100 particles each, SE about 12 Å
    assert np.sqrt(np.mean((post.prior.micrograph_offset_A - mu) ** 2)) < 15.0
    w = 1.0 / s**2
    m_true = mu[mic]
    optimum = m_true + (obs - m_true) * w / (w + 1.0 / 60.0**2)  # the true prior's posterior
    rms_opt = np.sqrt(np.mean((optimum - truth) ** 2))
    rms = np.sqrt(np.mean((post.mean_A - truth) ** 2))
    assert rms < 1.03 * rms_opt
    assert rms < np.sqrt(np.mean((obs - truth) ** 2)) and rms < np.sqrt(np.mean(truth**2))
    z = (post.mean_A - truth) / post.sd_A
    assert 0.9 < np.sqrt(np.mean(z**2)) < 1.1


def test_flat_evidence_keeps_the_input() -> None:
    """No information about heights: the posterior stays at the input, not at a wide prior."""
    rng = np.random.default_rng(3)
    grid = np.arange(-1500.0, 1500.0 + 1e-9, 25.0)
    ll = rng.normal(0.0, 0.05, (2000, grid.size))  # almost flat likelihoods
    post = posterior_offsets(ll, grid, np.arange(2000) % 20)
    assert np.sqrt(np.mean(post.mean_A**2)) < 5.0
    assert post.prior.spread_A < post.prior.best_spread_A


def test_sharp_posteriors_use_the_parabola() -> None:
    """A 1 Å likelihood on a 5 Å grid: the mean is not quantised to the grid."""
    rng = np.random.default_rng(1)
    obs = rng.uniform(-100.0, 100.0, 500)
    grid = np.arange(-300.0, 300.0 + 1e-9, 5.0)
    ll = -0.5 * ((grid[None, :] - obs[:, None]) / 1.0) ** 2
    post = posterior_offsets(
        ll, grid, np.zeros(500, dtype=int), spread=1e4, learn_micrograph_offsets=False, step=5.0
    )
    np.testing.assert_allclose(post.mean_A, obs, atol=0.05)
    np.testing.assert_allclose(post.sd_A, 1.0, rtol=0.02)


def test_scale_integrated_likelihood_limits() -> None:
    """Known scale: β(2aN − a²D); a wide scale prior: the profile β CC² − ½ log D."""
    rng = np.random.default_rng(2)
    num = rng.normal(5.0, 2.0, (3, 7))
    den = rng.uniform(1.0, 4.0, (3, 7))
    known = candidate_loglik(num, den, 1.3, 2.0, 1e-4)
    ref = 1.3 * (2 * 2.0 * num - 4.0 * den)
    np.testing.assert_allclose(known - known[:, :1], ref - ref[:, :1], atol=1e-3)
    wide = candidate_loglik(num, den, 1.3, 2.0, 1e4)
    prof = 1.3 * num**2 / den - 0.5 * np.log(den)
    np.testing.assert_allclose(wide - wide[:, :1], prof - prof[:, :1], atol=1e-3)
    assert scale_prior(-np.ones(5), np.ones(5), 1.0) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("n", "box", "apix", "snr"),
    [(1200, 64, 2.6, 0.01), (1200, 96, 1.3 * 128 / 96, 0.2), (600, 64, 2.6, 0.2)],
)
def test_refined_defocus_is_never_worse_than_the_input(
    n: int, box: int, apix: float, snr: float
) -> None:
    """Simulated particles, heights SD 80 Å about each micrograph's value (the input).

    The third case (60 particles a micrograph, box 64) pins a bug: its micrograph offsets,
    learned by Newton steps on likelihoods with several peaks, came out with 22 Å RMS of
    noise and the posterior at 83 Å against the input's 80.6 Å.
    """
    spec = ParticleSimSpec(
        n=n, box=box, apix=apix, snr=snr, seed=3, height_sigma=80.0, n_micrographs=10,
        anisotropy_percent=0.0,
    )  # fmt: skip
    proj = FourierProjector(blob_map(box, seed=4), spec.apix)
    sim = simulate_particles(spec, proj)
    pb = ParticleBatch(
        angles=sim.angles, origins_angst=sim.origins, defocus_u=sim.obs_u, defocus_v=sim.obs_v,
        defocus_angle=sim.obs_angle, bfactor=np.full(spec.n, spec.bfactor),
        micrograph=sim.micrograph.astype(str),
    )  # fmt: skip
    optics = Optics(spec.apix, spec.kv, spec.cs, spec.ac)
    truth = 0.5 * (sim.true_u + sim.true_v)
    rms_in = np.sqrt(np.mean((0.5 * (sim.obs_u + sim.obs_v) - truth) ** 2))
    mic = sim.micrograph
    mic_in = np.sqrt(np.mean([np.mean((truth - 0.5 * (sim.obs_u + sim.obs_v))[mic == k]) ** 2
                              for k in range(spec.n_micrographs)]))  # fmt: skip
    rms = {}
    for mode in ("ml", "prior"):
        st = RefineSettings(defocus_mode=mode, fit_anisomag=False, rounds=1)
        r = refine_group(lambda rows: sim.images[rows], pb, optics, box, {0: proj}, settings=st)
        err = 0.5 * (r.defocus_u + r.defocus_v) - truth
        rms[mode] = np.sqrt(np.mean(err**2))
        if mode == "prior":
            assert r.defocus_sd is not None and np.all(r.defocus_sd > 0)
            z = np.sqrt(np.mean((err / r.defocus_sd) ** 2))
            # conservative where the data say nothing (0.6 at SNR 0.01); with 60 particles a
            # micrograph at box 64 the evidence's best spread (45 Å) is below the true 80 Å,
            # so the SDs understate the errors (1.5, a limitation in docs/refine.md)
            assert 0.4 < z < (1.7 if n < 1000 else 1.3)
            mic_out = np.sqrt(np.mean([np.mean(err[mic == k]) ** 2
                                       for k in range(spec.n_micrographs)]))  # fmt: skip
            assert mic_out < 1.5 * mic_in + 1.0, (mic_out, mic_in)  # offsets not made of noise
    assert rms["prior"] <= 1.01 * rms_in
    assert rms["prior"] < rms["ml"]
    if snr >= 0.2 and box >= 96:
        assert rms["prior"] < 0.8 * rms_in  # the particles' evidence is used
