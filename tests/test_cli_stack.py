"""`anisoctf estimate` on a `.mrcs` particle stack pools the particles' periodograms."""

from __future__ import annotations

import numpy as np
import starfile
from typer.testing import CliRunner

from anisoctf import CTFParams, MicrographSpec, Optics, simulate_micrograph
from anisoctf.cli.main import app
from anisoctf.io import write_mrc

runner = CliRunner()


def test_particle_stack_is_pooled_and_fitted(tmp_path):
    spec = MicrographSpec(
        shape=(2048, 2048),
        optics=Optics(1.0, 300.0, 2.7, 0.07),
        ctf=CTFParams(17400.0, 16600.0, 65.0, 0.0, 40.0),
        snr=1.5,
        seed=3,
    )
    image = simulate_micrograph(spec).image
    boxes = [
        image[r : r + 256, c : c + 256] for r in range(0, 2048, 256) for c in range(0, 2048, 256)
    ]
    write_mrc(tmp_path / "parts.mrcs", np.stack(boxes), 1.0)
    res = runner.invoke(
        app,
        [
            "estimate",
            str(tmp_path / "parts.mrcs"),
            "--apix",
            "1.0",
            "--kv",
            "300",
            "--cs",
            "2.7",
            "--ac",
            "0.07",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    row = starfile.read(tmp_path / "out" / "micrographs_ctf.star")["micrographs"].iloc[0]
    mean = 0.5 * (row["rlnDefocusU"] + row["rlnDefocusV"])
    assert abs(mean - 17000.0) < 100.0  # 64 boxes of 256²: a pooled, coarser spectrum
    assert abs((row["rlnDefocusU"] - row["rlnDefocusV"]) - 800.0) < 200.0


def test_stack_of_nan_images_fails_with_one_line(tmp_path):
    write_mrc(tmp_path / "bad.mrcs", np.full((4, 128, 128), np.nan, dtype=np.float32), 1.0)
    res = runner.invoke(
        app,
        ["estimate", str(tmp_path / "bad.mrcs"), "--apix", "1.0", "--kv", "300", "--out",
         str(tmp_path / "out")],
    )
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if "bad.mrcs" in ln and "NaN" in ln]
    assert len(lines) == 1
