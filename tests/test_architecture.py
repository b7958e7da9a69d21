"""The size rules of docs/architecture.md, checked on the source tree.

The layering itself (which package may import which) is checked by ``lint-imports`` in
``.ci/run`` (contracts in pyproject.toml); this file checks the rest of the rules: no module over
700 lines, no function over 150 lines, no function outside ``cli/`` with more than 12 parameters,
and no CTF phase written outside the physics layer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import anisoctf

PACKAGE = Path(anisoctf.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))

MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 150
MAX_PARAMETERS = 12


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names = [n for n in names if n not in ("self", "cls")]
    names += ["*" + a.vararg.arg] if a.vararg else []
    names += ["**" + a.kwarg.arg] if a.kwarg else []
    return names


def test_the_tree_is_found():
    assert len(SOURCES) > 40
    assert (PACKAGE / "optics" / "ctf.py") in SOURCES


def test_no_module_over_700_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in SOURCES
        if (n := p.read_text(encoding="utf-8").count("\n")) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_over_150_lines():
    long = {
        f"{p.relative_to(PACKAGE)}:{f.lineno} {f.name}": f.end_lineno - f.lineno + 1
        for p in SOURCES
        for f in _functions(p)
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}


def test_no_function_outside_cli_with_more_than_12_parameters():
    many = {
        f"{p.relative_to(PACKAGE)}:{f.lineno} {f.name}": len(_parameters(f))
        for p in SOURCES
        if p.relative_to(PACKAGE).parts[0] != "cli"
        for f in _functions(p)
        if len(_parameters(f)) > MAX_PARAMETERS
    }
    assert many == {}


# The defocus phase pi*lambda*(...) and the chi -> CTF step with the amplitude contrast, as they
# were written inline before the one kernel existed.
_PHASE_PATTERNS = [
    re.compile(r"np\.pi\s*\*\s*lam\w*\s*\*\s*\(?\s*(z|df|defocus|quad|prof)\b"),
    re.compile(r"sqrt\(\s*1(\.0)?\s*-\s*w\s*\*\s*w\s*\)\s*\*\s*np\.sin"),
    re.compile(r"arcsin\(\s*optics\.amplitude_contrast\s*\)"),
]


@pytest.mark.parametrize("pattern", _PHASE_PATTERNS, ids=lambda p: p.pattern[:30])
def test_no_ctf_phase_outside_the_physics_layer(pattern):
    hits = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in SOURCES
        if p.relative_to(PACKAGE).parts[0] != "optics"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert hits == []


def test_the_checks_would_catch_a_violation(tmp_path):
    """The rules fire on a synthetic module that breaks each of them."""
    bad = tmp_path / "bad.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(160))
    params = ", ".join(f"p{i}" for i in range(13))
    bad.write_text(f"def f({params}):\n{body}\n    return 0\nq = np.pi * lam * (z + 1)\n")
    (f,) = list(_functions(bad))
    assert f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    assert len(_parameters(f)) > MAX_PARAMETERS
    assert _PHASE_PATTERNS[0].search(bad.read_text())
