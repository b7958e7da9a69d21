"""Implausible local results are flagged, not written as values (issue 13 item 10).

A thickness at the end of the thickness search is no estimate (the rings do not bound it): the
record carries NaN, the tables CTFFIND 5's "not estimated" 0.0, the surface JSON null, and a
flag. A tilt that fewer than half of the patches support is flagged in the record, the summary
and the pictures.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from anisoctf.fit.result import FitSettings
from anisoctf.io import read_ctffind_txt
from anisoctf.io.batch_records import read_record
from anisoctf.io.star import read_micrographs_ctf_star
from anisoctf.jobs.estimate_micrographs import run_estimate
from anisoctf.local.estimate import LocalSettings
from anisoctf.records.flags import (
    FLAG_PREFIX,
    MIN_FIGURE_OF_MERIT,
    figure_of_merit_flag,
    flags_of,
    is_flag,
    thickness_at_limit_flag,
    tilt_support_flag,
)


def test_tilt_support_flag_counts_patches() -> None:
    assert tilt_support_flag([False] * 13 + [True] * 12) is None  # 13 of 25: a majority
    assert tilt_support_flag([False] * 2 + [True] * 2) is None  # exactly half
    flag = tilt_support_flag([False] * 5 + [True] * 20)
    assert flag is not None and is_flag(flag) and "5 of 25" in flag
    assert tilt_support_flag([]) is None


def test_figure_of_merit_flag_threshold() -> None:
    assert figure_of_merit_flag(MIN_FIGURE_OF_MERIT) is None
    assert figure_of_merit_flag(0.3) is None
    assert is_flag(figure_of_merit_flag(0.5 * MIN_FIGURE_OF_MERIT))
    assert is_flag(figure_of_merit_flag(float("nan")))
    assert flags_of(["a", thickness_at_limit_flag(4000.0), "b"])[0].startswith(FLAG_PREFIX)


@pytest.fixture(scope="module")
def fei_run(tmp_path_factory) -> tuple[Path, str]:
    real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
    mic = real / "micrographs" / "fei-extended.mrc"
    if not mic.is_file():
        pytest.skip(f"real test data not found at {real}")
    out = tmp_path_factory.mktemp("fei_flags")
    buf = io.StringIO()
    report = run_estimate(
        [str(mic)],
        out,
        FitSettings(df_min=2000.0),
        apix=0.854,
        kv=300.0,
        cs=2.7,
        ac=0.07,
        quiet=False,
        local=LocalSettings(thickness=True),
        console=Console(file=buf, width=300),
        err_console=Console(file=buf, width=300),
    )
    assert report.exit_code == 0
    return out, buf.getvalue()


def test_real_thickness_at_search_limit_is_not_written(fei_run) -> None:
    # fei-extended.mrc: the thickness search ends at its 4,000 Å limit (it reported 4,015 Å)
    out, _ = fei_run
    rows, _ = read_micrographs_ctf_star(out / "micrographs_ctf.star")
    assert rows[0].thickness == 0.0  # CTFFIND 5's "not estimated", never 4,015 Å or NaN
    assert read_ctffind_txt(out / "fei-extended.txt")[0].thickness == 0.0
    assert "nan" not in (out / "micrographs_ctf.star").read_text().lower()
    doc = json.loads((out / "fei-extended_surface.json").read_text())
    assert doc["thickness"] is None
    rec = read_record(out / "fei-extended.record.json")
    assert rec is not None and rec.ok
    assert any(is_flag(w) and "thickness at the search limit" in w for w in rec.warnings)


def test_real_tilt_support_is_flagged_exactly_when_a_minority_carries_it(fei_run) -> None:
    """fei-extended's weak rings leave many patches off the plane. Whether fewer than half
    carry it depends on the plane fit (the robust plane keeps 13 of 25 where the plain one kept
    5): the flag must appear exactly when they are a minority, first among the warnings, and
    the summary and the report must count the micrograph (its thickness flag at least)."""
    from anisoctf.records.flags import tilt_support_flag

    out, printed = fei_run
    doc = json.loads((out / "fei-extended_surface.json").read_text())
    outliers = [bool(p["outlier"]) for p in doc["patches"]]
    used, n = outliers.count(False), len(outliers)
    rec = read_record(out / "fei-extended.record.json")
    flags = flags_of(rec.warnings)
    tilt_flagged = any(f"tilt from only {used} of {n} patches" in f for f in flags)
    assert tilt_flagged == (2 * used < n)
    assert (tilt_support_flag(outliers) is not None) == (2 * used < n)
    assert rec.warnings[: len(flags)] == flags  # flags come first
    assert "1 micrograph flagged as implausible" in printed
    from anisoctf.jobs.report_job import run_report

    page = run_report(out).read_text()
    assert "1 flagged as implausible" in page
    assert ("tilt from only" in page) == tilt_flagged
    assert "sample thickness at the search limit" in page


def test_tilt_from_a_minority_of_patches_is_flagged() -> None:
    from anisoctf.records.flags import tilt_support_flag

    assert "tilt from only 5 of 25 patches" in tilt_support_flag([False] * 5 + [True] * 20)
    assert tilt_support_flag([False] * 13 + [True] * 12) is None


def test_fit_thickness_at_the_limit_returns_no_value() -> None:
    from anisoctf import CTFParams, MicrographSpec, Optics, estimate_ctf, simulate_micrograph
    from anisoctf.local.estimate import estimate_local

    optics = Optics(pixel_size=1.0, voltage_kv=300.0)
    spec = MicrographSpec(
        shape=(2048, 2048),
        optics=optics,
        ctf=CTFParams(16000.0, 15000.0, 30.0, 0.0, 60.0),
        seed=4,
        tilt_max_res=3.0,
        thickness=1500.0,
    )
    img = simulate_micrograph(spec).image
    g = estimate_ctf(img, optics)
    loc = estimate_local(
        img, optics, g, local=LocalSettings(patches=(2, 2), thickness=True, max_thickness=1100.0)
    )
    # the 1,500 Å sample is thicker than the 1,100 Å the search may reach: no value, a flag
    assert loc.thickness is not None and math.isnan(loc.thickness)
    assert loc.reported_thickness == 0.0
    assert math.isinf(loc.thickness_sigma)
    assert any(is_flag(w) and "1100 Å" in w for w in loc.warnings)
    assert np.isfinite(loc.tilt_angle)
