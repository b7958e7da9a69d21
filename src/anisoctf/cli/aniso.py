"""``anisoctf aniso ...``: anisotropic magnification commands (a typer sub-application).

Each command lives in its own module (:mod:`anisoctf.cli.aniso_detect`,
:mod:`anisoctf.cli.aniso_apply`, :mod:`anisoctf.cli.aniso_correct`; ``compare`` in
:mod:`anisoctf.cli.refine`) and is registered here.
"""

from __future__ import annotations

import typer

from anisoctf.cli.aniso_apply import apply_command
from anisoctf.cli.aniso_correct import correct_command
from anisoctf.cli.aniso_detect import detect_command
from anisoctf.cli.refine import compare_command

aniso_app = typer.Typer(
    name="aniso",
    help="Anisotropic magnification: detect it from micrograph CTFs, rewrite tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
aniso_app.command("detect")(detect_command)
aniso_app.command("apply")(apply_command)
aniso_app.command("correct")(correct_command)
aniso_app.command("compare")(compare_command)
