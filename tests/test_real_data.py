"""Real data from ../shared/data/real: particle sets against their reference defocus, and
real micrographs (a sensible fit, or a clear one-line error)."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from anisoctf import FitError, FitSettings, Optics, estimate_ctf, fit_spectrum
from anisoctf.io import read_micrograph, read_stack
from anisoctf.spectrum import stack_periodogram


def _table(path):
    data = starfile.read(path)
    if isinstance(data, dict):
        return data["particles"] if "particles" in data else next(iter(data.values()))
    return data


def _pooled_defocus(stack_path, optics, box, max_res=3.0):
    stack = np.asarray(read_stack(stack_path), dtype=np.float32)
    spectrum = stack_periodogram(stack, optics.pixel_size)
    est = fit_spectrum(spectrum, optics, FitSettings(box=box, max_res=max_res))
    return est


@pytest.mark.parametrize(
    ("stack", "star", "optics", "box", "max_res"),
    [
        # header pixel size says 1.0; the STAR's optics table says 2.806 Å, Cs 0.01 mm, 300 kV
        (
            "cryodrgn/relion31.mrcs",
            "cryodrgn/relion31.star",
            Optics(2.806, 300.0, 0.01, 0.1),
            256,
            6.0,
        ),
        # 5 µm detector pixel at 38168× magnification = 1.31 Å
        (
            "cryodrgn/empiar_10076_7.mrc",
            "cryodrgn/empiar_10076_7.star",
            Optics(1.31, 300.0, 2.7, 0.07),
            320,
            3.0,
        ),
        (
            "aspire/sample.mrcs",
            "aspire/sample_particles_relion30.star",
            Optics(1.338, 300.0, 2.7, 0.1),
            200,
            3.0,
        ),
    ],
)
def test_pooled_particle_spectrum_matches_reference_defocus(
    shared_real, stack, star, optics, box, max_res
):
    ref = _table(shared_real / star)
    reference = float(np.mean((ref["rlnDefocusU"] + ref["rlnDefocusV"]) / 2.0))
    est = _pooled_defocus(shared_real / stack, optics, box, max_res)
    assert abs(est.params.mean_defocus / reference - 1.0) < 0.02
    assert est.fit_resolution < 10.0


def test_real_uint16_micrograph_with_extended_header_gives_a_sensible_fit(shared_real):
    mic = read_micrograph(shared_real / "micrographs" / "fei-extended.mrc")
    assert mic.data.shape == (3838, 3710)
    est = estimate_ctf(mic.data, Optics(0.854, 300.0, 2.7, 0.07), FitSettings(df_min=2000.0))
    # nominal defocus 0.8 µm; the rings fit to better than 10 Å
    assert 5000.0 < est.params.mean_defocus < 15000.0
    assert est.params.astigmatism < 1000.0
    assert est.fit_resolution < 10.0


def test_micrograph_of_unknown_pixel_size_fails_with_one_clear_line(shared_real):
    mic = read_micrograph(shared_real / "micrographs" / "Ucsf_stack_1142_DW.mrc")
    with pytest.raises(FitError) as e:
        estimate_ctf(mic.data, Optics(1.0), FitSettings(box=256), name="Ucsf_stack_1142_DW.mrc")
    msg = str(e.value)
    assert "\n" not in msg and "Ucsf_stack_1142_DW.mrc" in msg and "--apix" in msg
