"""Flags: warnings that say a reported number is implausible and should not be trusted.

A *flag* is a warning (a plain string among a result's warnings) that starts with
:data:`FLAG_PREFIX`. Flags travel wherever warnings do: the batch record
(``<stem>.record.json``), the console, the run's summary line, the diagnostic picture and the
HTML report, which count and list them separately from ordinary remarks.

Flagged today (thresholds are module constants, documented in docs/diagnostics.md):

* a sample thickness at the limit of the thickness search (``--max-thickness``): the rings do
  not bound it, so it is not written as a value (:func:`thickness_at_limit_flag`; CTFFIND 5's
  "not estimated" 0.0 in the ``.txt`` and the STAR file, ``null`` in the surface JSON);
* a specimen tilt fitted from fewer than half of the patches (:func:`tilt_support_flag`):
  the plane then rests on a minority of the micrograph;
* a figure of merit below :data:`MIN_FIGURE_OF_MERIT` (:func:`figure_of_merit_flag`): the
  rings hardly correlate with the fitted CTF² at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = [
    "FLAG_PREFIX",
    "MIN_FIGURE_OF_MERIT",
    "figure_of_merit_flag",
    "flag_kind",
    "flags_of",
    "is_flag",
    "thickness_at_limit_flag",
    "tilt_support_flag",
]

#: the start of every flag
FLAG_PREFIX = "implausible: "
#: figures of merit (mean partial correlation of the rings with CTF², 0–1) below this are
#: flagged; real micrographs with weak but genuine rings score 0.04 (``fei-extended.mrc``) or
#: more, a fit to noise scores around 0
MIN_FIGURE_OF_MERIT = 0.02


def is_flag(warning: str) -> bool:
    """Whether a warning is a flag."""
    return str(warning).startswith(FLAG_PREFIX)


def flags_of(warnings: Iterable[str]) -> tuple[str, ...]:
    """The flags among ``warnings``, in order."""
    return tuple(w for w in warnings if is_flag(w))


def flag_kind(flag: str) -> str:
    """A short name of what a flag is about (for counts in summaries)."""
    text = str(flag).removeprefix(FLAG_PREFIX)
    for kind, word in (
        ("thickness", "thickness"),
        ("tilt", "tilt"),
        ("figure of merit", "figure of merit"),
    ):
        if word in text:
            return kind
    return "other"


def thickness_at_limit_flag(max_thickness: float) -> str:
    """The flag of a thickness that ran into the end of the search range."""
    return (
        f"{FLAG_PREFIX}sample thickness at the search limit ({max_thickness:.0f} Å): the rings "
        "do not bound it, not written (0 = not estimated); raise the limit or check the ice"
    )


def tilt_support_flag(outliers: Sequence[bool]) -> str | None:
    """The flag of a tilt that fewer than half of the patches support; None otherwise.

    ``outliers`` holds each patch's :attr:`~anisoctf.records.local.PatchEstimate.outlier`.
    """
    n = len(outliers)
    used = n - sum(bool(o) for o in outliers)
    if n == 0 or 2 * used >= n:
        return None
    return (
        f"{FLAG_PREFIX}tilt from only {used} of {n} patches (fewer than half show rings that "
        "agree with the plane); do not trust the tilt"
    )


def figure_of_merit_flag(figure_of_merit: float) -> str | None:
    """The flag of a very low (or undefined) figure of merit; None otherwise."""
    fom = float(figure_of_merit)
    if math.isfinite(fom) and fom >= MIN_FIGURE_OF_MERIT:
        return None
    return (
        f"{FLAG_PREFIX}figure of merit {fom:.3f} is below {MIN_FIGURE_OF_MERIT:g}: the rings "
        "hardly follow the fitted CTF; check the picture before using this defocus"
    )
