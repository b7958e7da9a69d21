"""The HTML report shows flags of implausible numbers and the pictures of failures
(issue 13 item 10)."""

from __future__ import annotations

import numpy as np

from anisoctf.fit.result import FitSettings
from anisoctf.io.batch_records import MicrographRecord, record_path, write_record
from anisoctf.io.mrc import write_mrc
from anisoctf.io.star import MicrographCTFRow, write_micrographs_ctf_star
from anisoctf.jobs.estimate_micrographs import run_estimate
from anisoctf.jobs.report_job import run_report
from anisoctf.optics.ctf import Optics
from anisoctf.records.flags import figure_of_merit_flag, tilt_support_flag
from anisoctf.report.html import collect_report_data


def test_failure_picture_reaches_the_report(tmp_path):
    rng = np.random.default_rng(2)
    write_mrc(tmp_path / "noise.mrc", rng.poisson(20.0, (512, 512)).astype(np.float32), 1.0)
    out = tmp_path / "out"
    report = run_estimate(
        [str(tmp_path / "noise.mrc")], out, FitSettings(box=256), apix=1.0, kv=300.0, cs=2.7,
        ac=0.07, quiet=True,
    )
    assert report.n_failed == 1
    assert (out / "noise_ctf.png").is_file()
    data = collect_report_data(out)
    assert [n for n, _ in data.failures] == ["noise"]
    assert data.failure_pictures == {"noise": out / "noise_ctf.png"}
    page = run_report(out).read_text()
    assert 'alt="failure picture"' in page


def test_flags_in_the_report(tmp_path):
    rows = [
        MicrographCTFRow(f"m{i}.mrc", 1, f"{tmp_path}/m{i}.ctf:mrc", 15000.0 + i, 14000.0,
                         10.0, 0.3, 4.0)
        for i in range(3)
    ]
    write_micrographs_ctf_star(tmp_path / "micrographs_ctf.star", rows, {1: Optics(1.0)})
    flag_t = tilt_support_flag([False] * 3 + [True] * 9)
    flag_f = figure_of_merit_flag(0.001)
    for i, r in enumerate(rows):
        warnings = (flag_t, flag_f, "a remark") if i == 1 else ("a remark",)
        write_record(
            record_path(tmp_path, f"m{i}"),
            MicrographRecord(fingerprint="x", ok=True, row=r, warnings=warnings),
        )
    data = collect_report_data(tmp_path)
    assert data.flags == {"m1.mrc": (flag_t, flag_f)}
    page = run_report(tmp_path).read_text()
    assert "3 micrographs fitted, 0 failed, 1 flagged as implausible." in page
    assert "tilt from only 3 of 12 patches" in page
    assert "a remark" not in page  # remarks stay in the records; flags are shown


def test_low_figure_of_merit_is_flagged_first_in_a_micrographs_warnings():
    import dataclasses

    from test_report_diagnostic import synthetic_estimate

    from anisoctf.jobs.batch_state import flag_summary
    from anisoctf.jobs.micrograph import RowResult, _all_warnings

    est = synthetic_estimate(box=128, warnings=("estimate at the edge of the defocus range",))
    assert _all_warnings(est, None) == est.warnings  # FOM 0.41: nothing to flag
    low = dataclasses.replace(est, figure_of_merit=0.004)
    warnings = _all_warnings(low, None)
    assert warnings[0].startswith("implausible: figure of merit 0.004")
    assert warnings[1:] == est.warnings
    row = MicrographCTFRow("m.mrc", 1, "", 2.0, 1.0, 0.0, 0.004, 9.0)
    line = flag_summary([RowResult("m.mrc", row, 0.004, 9.0, warnings)])
    assert line is not None and line.startswith("1 micrograph flagged")
    assert "figure of merit: 1" in line
