"""The jobs/cli layout: one glob expander, one matrix-option converter, request objects, the
demo verdict as a job, the fast exit through public interfaces, and cli modules that import
jobs and option types only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import InputError, UsageError
from anisoctf.jobs.demo import DEMO_TOLERANCE, DemoComparison, angle_error
from anisoctf.jobs.inputs import expand_patterns
from anisoctf.jobs.requests import EstimateRequest, FitSettings, mag_matrix_rows

SRC = Path(__file__).resolve().parents[1] / "src" / "anisoctf"


def _touch(folder: Path, *names: str) -> None:
    for n in names:
        (folder / n).write_text("")


def test_expand_patterns_sorts_and_deduplicates(tmp_path: Path) -> None:
    _touch(tmp_path, "b.mrc", "a.mrc", "c.txt")
    (tmp_path / "d.mrc").mkdir()  # folders never match
    got = expand_patterns([str(tmp_path / "b.mrc"), str(tmp_path / "*.mrc")])
    assert got == [str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")]


def test_expand_patterns_keeps_the_given_order_when_asked(tmp_path: Path) -> None:
    _touch(tmp_path, "b.txt", "a.txt", "z.txt")
    got = expand_patterns([str(tmp_path / "z.txt"), str(tmp_path / "*.txt")], sort=False)
    assert got == [str(tmp_path / n) for n in ("z.txt", "a.txt", "b.txt")]


def test_expand_patterns_raises_the_error_asked_for(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no file matches"):
        expand_patterns([str(tmp_path / "*.mrc")])
    with pytest.raises(InputError, match="no file matches"):
        expand_patterns([str(tmp_path / "*.mrc")], error=InputError)


def test_mag_matrix_rows_is_relion_order() -> None:
    assert mag_matrix_rows(None) is None
    assert mag_matrix_rows((1.01, 0.002, 0.003, 0.99)) == ((1.01, 0.002), (0.003, 0.99))
    with pytest.raises(UsageError, match="four numbers"):
        mag_matrix_rows((1.0, 0.0, 1.0))


def test_estimate_request_of_normalises_inputs(tmp_path: Path) -> None:
    r = EstimateRequest.of([tmp_path / "a.mrc"], str(tmp_path), FitSettings(box=128), apix=1.0)
    assert r.inputs == (str(tmp_path / "a.mrc"),)
    assert r.out_dir == tmp_path
    assert r.optics_overrides()["apix"] == 1.0
    with pytest.raises(TypeError):
        EstimateRequest.of([], tmp_path, FitSettings(), not_an_option=1)


def test_demo_comparison_verdict() -> None:
    assert angle_error(179.0, 1.0) == pytest.approx(-2.0)
    ok = DemoComparison("a", 10000.0, 9000.0, 10.0, 10050.0, 8990.0, 12.0)
    assert ok.good and ok.errors == pytest.approx((50.0, -10.0, 2.0))
    bad = DemoComparison("b", 10000.0, 9000.0, 10.0, 10000.0 + DEMO_TOLERANCE, 9000.0, 10.0)
    assert not bad.good
    assert DemoComparison("c", 1.0, 1.0, 0.0).failed


def test_fast_exit_runs_cleanups_flushes_and_keeps_the_status() -> None:
    code = (
        "from anisoctf.jobs.process_exit import at_fast_exit, fast_exit\n"
        "at_fast_exit(lambda: print('first registered, last run'))\n"
        "at_fast_exit(lambda: print('cleanup'))\n"
        "print('output', end=' ')\n"
        "fast_exit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
    assert p.stdout == "output cleanup\nfirst registered, last run\n"


def test_main_exits_with_the_command_status() -> None:
    run = [sys.executable, "-m", "anisoctf.cli.main"]
    p = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("anisoctf ")
    p = subprocess.run([*run, "estimate", "--jobs", "0", "x.mrc"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--jobs" in p.stderr


def test_estimate_and_simulate_keep_their_mag_matrix_help() -> None:
    runner = CliRunner()
    wide = {"COLUMNS": "250"}
    text = runner.invoke(app, ["estimate", "--help"], env=wide).output
    assert "--mag-matrix" in text and "overrides a STAR file's _rlnMagMat" in text
    text = runner.invoke(app, ["simulate", "--help"], env=wide).output
    assert "--mag-matrix" in text and "Magnification matrix (k_true = M k_obs)" in text


_FORBIDDEN = ("io", "spectrum", "fit", "magnification", "local", "refine", "simulate", "report")
#: cli modules that import jobs and option types only (the others are being moved by now)
_CLEAN_CLI = ("main", "aniso", "aniso_detect", "refine", "options", "errors")


@pytest.mark.parametrize("module", _CLEAN_CLI)
def test_cli_module_imports_no_science_or_formats(module: str) -> None:
    tree = ast.parse((SRC / "cli" / f"{module}.py").read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            if node.module == "anisoctf":  # from anisoctf import X: X must not be science
                names += [f"anisoctf.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    bad = [n for n in names if n.split(".")[:2] in (["anisoctf", f] for f in _FORBIDDEN)]
    assert not bad, bad
    assert "anisoctf" not in names  # the package root imports fit and simulate
