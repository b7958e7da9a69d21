"""The per-particle arrays of one optics group, as one typed record.

:class:`ParticleBatch` replaces the seven parallel arrays that
:func:`anisoctf.refine.group.refine_group` used to take one by one; its ``__post_init__`` checks
that they all have one length. File readers (:mod:`anisoctf.io`) and the particle simulator
build it; the refinement reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ParticleBatch"]


@dataclass(frozen=True, eq=False)
class ParticleBatch:
    """Per-particle poses, shifts and CTF parameters of one optics group (``P`` particles).

    Parameters
    ----------
    angles
        ``(P, 3)`` RELION rot/tilt/psi (degrees).
    origins_angst
        ``(P, 2)`` RELION origins (Å).
    defocus_u, defocus_v, defocus_angle
        ``(P,)`` defocus (Å, underfocus positive) and U-axis angle (degrees), in the frame of the
        group's starting magnification matrix (the true frame when one is set).
    phase_shift
        ``(P,)`` phase shift (degrees); None: zeros.
    bfactor
        ``(P,)`` envelope B-factor (Å²); None: zeros.
    micrograph
        ``(P,)`` micrograph label of each particle (any hashable labels: names or codes), for
        per-micrograph fits; None: all on one micrograph.
    which
        ``(P,)`` key of the reference projector of each particle (half maps: the random subset);
        None: zeros (the only projector).

    Arrays are stored as given apart from ``numpy.asarray`` (floats as float64, ``which`` as
    int64); the record is frozen and compares by identity (it holds arrays).
    """

    angles: NDArray[np.float64]
    origins_angst: NDArray[np.float64]
    defocus_u: NDArray[np.float64]
    defocus_v: NDArray[np.float64]
    defocus_angle: NDArray[np.float64]
    phase_shift: NDArray[np.float64] | None = None
    bfactor: NDArray[np.float64] | None = None
    micrograph: NDArray | None = None
    which: NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        n = len(np.asarray(self.defocus_u))
        set_ = object.__setattr__

        def floats(name: str, value: ArrayLike | None, shape: tuple[int, ...]) -> None:
            a = np.zeros(shape) if value is None else np.asarray(value, dtype=float)
            if a.shape != shape:
                raise ValueError(f"{name} has shape {a.shape}; {n} particles need {shape}")
            set_(self, name, a)

        floats("angles", self.angles, (n, 3))
        floats("origins_angst", self.origins_angst, (n, 2))
        for name in ("defocus_u", "defocus_v", "defocus_angle", "phase_shift", "bfactor"):
            floats(name, getattr(self, name), (n,))
        which = (
            np.zeros(n, dtype=np.int64)
            if self.which is None
            else np.asarray(self.which, dtype=np.int64)
        )
        if which.shape != (n,):
            raise ValueError(f"which has shape {which.shape}; {n} particles need {(n,)}")
        set_(self, "which", which)
        if self.micrograph is not None:
            mic = np.asarray(self.micrograph)
            if mic.shape != (n,):
                raise ValueError(f"micrograph has shape {mic.shape}; {n} particles need {(n,)}")
            set_(self, "micrograph", mic)

    @property
    def n(self) -> int:
        """Number of particles."""
        return len(self.defocus_u)

    def __len__(self) -> int:
        return self.n
