"""The magnification matrix ``M`` and its conversion to and from other programs' formats.

Convention (RELION's, used everywhere in anisoctf): ``M`` maps an *observed*-image spatial
frequency to the *true* one,

    k_true = M k_obs,

so a CTF with true-frame defocus matrix ``D_true`` reads ``D_obs = M^T D_true M`` in the frame of
the recorded image. Frequencies are column vectors ``(kx, ky)`` with x along array columns and
y along array rows, the frame of :func:`anisoctf.optics.ctf.frequency_grid`; angles run from +x
towards +y.

How each external convention was established is written in the docstring of its converter and
collected, with sources, in ``docs/anisomag.md``. In short:

========== ============================================ =====================================
program    stored                                       ``M`` from it
========== ============================================ =====================================
RELION     ``_rlnMagMat00.._rlnMagMat11`` = M[i, j]     identity mapping
cryoSPARC  ``ctf/anisomag`` = (A - I) row-major (C)     ``M = A^-1`` (A maps k_true → k_obs)
cisTEM     mag_distortion_correct angle, major, minor   ``M = R^T diag(1/major, 1/minor) R``
MotionCor2 ``-Mag major minor angle``                   as cisTEM (angle sign: unverified)
========== ============================================ =====================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "RELION_MAGMAT_LABELS",
    "MagMat",
    "as_matrix",
    "from_cistem",
    "from_cryosparc_anisomag",
    "from_motioncor2",
    "from_relion",
    "matrices_from_cryosparc_anisomag",
    "to_cistem",
    "to_cryosparc_anisomag",
    "to_motioncor2",
    "to_relion",
]

#: RELION optics-table labels of the four matrix elements, in (00, 01, 10, 11) order.
RELION_MAGMAT_LABELS: tuple[str, str, str, str] = (
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
)

_Matrix2 = tuple[tuple[float, float], tuple[float, float]]


def _rotation(angle_deg: float) -> NDArray[np.float64]:
    """Counter-clockwise (from +x towards +y) rotation matrix by ``angle_deg``."""
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s], [s, c]])


def _axis_angle(v: NDArray[np.float64]) -> float:
    """Direction of a 2-vector as an angle in [0, 180) degrees from +x towards +y."""
    a = float(np.mod(np.rad2deg(np.arctan2(v[1], v[0])), 180.0))
    return 0.0 if a >= 180.0 else a  # guard the floating point edge of mod


@dataclass(frozen=True)
class MagMat:
    """A 2×2 magnification matrix with ``k_true = M k_obs`` (RELION's ``_rlnMagMat``).

    Parameters
    ----------
    matrix
        Anything ``numpy.asarray`` turns into a finite 2×2 float array with a positive
        determinant (a negative determinant would be a mirror, which no microscope does). It is
        stored as nested tuples of floats so that the object stays hashable and comparable; the
        layout is the same as :attr:`anisoctf.optics.ctf.Optics.mag_matrix`, so
        ``Optics(..., mag_matrix=m.matrix)`` works.

    Notes
    -----
    With the singular value decomposition ``M = U diag(s1, s2) V^T`` (``s1 >= s2 > 0``) and the
    polar decomposition ``M = R S`` (``R`` a rotation, ``S = V diag(s1, s2) V^T`` symmetric
    positive definite, both in the observed frame):

    * :attr:`anisotropy_percent` is ``100 (s1 - s2) / ((s1 + s2) / 2)``;
    * :attr:`axis_deg` is the direction of ``v1``, the first *right* singular vector: the
      observed-frame frequency direction that ``M`` stretches most. Equivalently it is the
      principal axis of ``S`` with eigenvalue ``s1``, and the axis along which an isotropic true
      defocus shows up as the larger apparent defocus ``U`` (``D_obs = Δf M^T M``). In real space
      that is the direction along which the recorded image is *most magnified* (features look
      longest), i.e. the axis perpendicular to the "lower magnification" axis that cisTEM and
      MotionCor2 call *major*;
    * :attr:`scale` is ``sqrt(det M) = sqrt(s1 s2)``, the isotropic part;
    * :attr:`rotation_deg` is the angle of ``R``.
    """

    matrix: _Matrix2

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=float)
        if m.shape != (2, 2):
            raise ValueError(f"a magnification matrix must be 2x2, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"a magnification matrix must be finite, got {m.tolist()}")
        det = float(np.linalg.det(m))
        if not det > 0.0:
            raise ValueError(
                f"a magnification matrix must have a positive determinant, got {det:g} for "
                f"{m.tolist()}"
            )
        object.__setattr__(self, "matrix", tuple(tuple(float(x) for x in row) for row in m))

    # ---------------------------------------------------------------- constructors
    @classmethod
    def identity(cls) -> MagMat:
        """No magnification error: ``M = I``."""
        return cls(np.eye(2))

    @classmethod
    def from_anisotropy(cls, percent: float, axis_deg: float, scale: float = 1.0) -> MagMat:
        """Symmetric ``M`` with a given anisotropy, axis and isotropic scale.

        ``M = scale · R(axis) diag(r, 1/r) R(axis)^T`` with ``r = sqrt((1 + a/2) / (1 - a/2))``
        and ``a = percent / 100``. The singular values are ``scale·r`` along ``axis_deg`` and
        ``scale/r`` across it, so the matrix stretches frequencies along the axis in the ratio
        ``(1 + a/2) : (1 - a/2)``, and — exactly, not to first order —

        * ``anisotropy_percent == percent`` (since ``2 (r - 1/r) / (r + 1/r) = a``),
        * ``axis_deg == axis_deg mod 180`` (for ``percent > 0``),
        * ``scale == scale`` (``det M = scale²``) and ``rotation_deg == 0``.

        To first order in ``a`` this is ``scale · R diag(1 + a/2, 1 - a/2) R^T``.

        Parameters
        ----------
        percent
            Anisotropy in per cent, ``0 <= percent < 200``.
        axis_deg
            Observed-frame direction (degrees from +x towards +y) that ``M`` stretches most.
        scale
            Isotropic scale ``sqrt(det M)``, > 0.
        """
        if not (np.isfinite(percent) and 0.0 <= percent < 200.0):
            raise ValueError(f"anisotropy must be in [0, 200) per cent, got {percent}")
        if not (np.isfinite(scale) and scale > 0.0):
            raise ValueError(f"scale must be a positive number, got {scale}")
        a = 0.01 * float(percent)
        r = np.sqrt((1.0 + 0.5 * a) / (1.0 - 0.5 * a))
        rot = _rotation(axis_deg)
        return cls(scale * rot @ np.diag([r, 1.0 / r]) @ rot.T)

    # ---------------------------------------------------------------- array access
    @property
    def array(self) -> NDArray[np.float64]:
        """The matrix as a new 2×2 float array."""
        return np.array(self.matrix, dtype=float)

    def __array__(self, dtype: Any = None, copy: Any = None) -> NDArray[Any]:
        return np.array(self.matrix, dtype=float if dtype is None else dtype)

    def _svd(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        u, s, vt = np.linalg.svd(self.array)
        return u, s, vt

    # ---------------------------------------------------------------- derived quantities
    @property
    def singular_values(self) -> tuple[float, float]:
        """``(s1, s2)`` with ``s1 >= s2 > 0``."""
        s = self._svd()[1]
        return float(s[0]), float(s[1])

    @property
    def anisotropy_percent(self) -> float:
        """``100 (s1 - s2) / mean(s1, s2)`` from the singular values; 0 for no anisomag."""
        s1, s2 = self.singular_values
        return float(200.0 * (s1 - s2) / (s1 + s2))

    @property
    def axis_deg(self) -> float:
        """Observed-frame direction (degrees in [0, 180), from +x towards +y) stretched most.

        The first right singular vector of ``M`` (see the class notes). Undefined when the
        anisotropy is zero; 0.0 is returned then (relative anisotropy below 1e-12).
        """
        _, s, vt = self._svd()
        if s[0] - s[1] <= 1e-12 * s[0]:
            return 0.0
        return _axis_angle(vt[0])

    @property
    def scale(self) -> float:
        """Isotropic scale ``sqrt(det M)`` (the geometric mean of the singular values)."""
        return float(np.sqrt(np.linalg.det(self.array)))

    @property
    def rotation_deg(self) -> float:
        """Angle in (-180, 180] degrees of the rotation ``R`` in the polar form ``M = R S``."""
        u, _, vt = self._svd()
        r = u @ vt
        return float(np.rad2deg(np.arctan2(r[1, 0], r[0, 0])))

    @property
    def symmetric_part(self) -> NDArray[np.float64]:
        """``S`` of the polar form ``M = R S`` (symmetric positive definite, observed frame)."""
        _, s, vt = self._svd()
        return vt.T @ np.diag(s) @ vt

    @property
    def rotation_part(self) -> NDArray[np.float64]:
        """``R`` of the polar decomposition ``M = R S`` (a proper rotation)."""
        u, _, vt = self._svd()
        return u @ vt

    @property
    def is_identity(self) -> bool:
        """True when ``M`` equals the identity to 1e-12."""
        return bool(np.allclose(self.array, np.eye(2), rtol=0.0, atol=1e-12))

    # ---------------------------------------------------------------- algebra
    def normalised(self) -> MagMat:
        """The same distortion with the isotropic scale removed: ``M / sqrt(det M)`` (det 1)."""
        return MagMat(self.array / self.scale)

    def inverse(self) -> MagMat:
        """``M^-1`` (maps true frequency to observed frequency)."""
        return MagMat(np.linalg.inv(self.array))

    def __matmul__(self, other: MagMat) -> MagMat:
        """Composition ``self @ other`` (apply ``other`` first)."""
        if not isinstance(other, MagMat):
            return NotImplemented
        return MagMat(self.array @ other.array)

    def describe(self) -> str:
        """One line: anisotropy, axis, scale and rotation."""
        return (
            f"anisotropy {self.anisotropy_percent:.3f} % along {self.axis_deg:.1f} deg, "
            f"scale {self.scale:.5f}, rotation {self.rotation_deg:.3f} deg"
        )


def as_matrix(m: MagMat | ArrayLike) -> NDArray[np.float64]:
    """A 2×2 float array from a :class:`MagMat` or anything array-like (validated as MagMat)."""
    if isinstance(m, MagMat):
        return m.array
    return MagMat(m).array


# ===================================================================== RELION
def from_relion(m00: float, m01: float, m10: float, m11: float) -> MagMat:
    """``M`` from RELION's ``_rlnMagMat00, 01, 10, 11`` (identity mapping: ``M[i, j] = MagMatij``).

    RELION (3.1 and later) evaluates the CTF and the reference projection at ``M k`` for image
    frequency ``k = (x, y)``: ``CTF::getLowOrderGamma`` computes ``XX = M(0,0) X + M(0,1) Y``,
    ``YY = M(1,0) X + M(1,1) Y`` before the defocus form (``src/ctf.cpp``), and
    ``ObservationModel::applyAnisoMag`` multiplies the projection matrix by ``M^-1``
    (``src/jaz/single_particle/obs_model.cpp``). That is ``k_true = M k_obs``, anisoctf's own
    convention, so the elements are copied as they are.
    """
    return MagMat(((m00, m01), (m10, m11)))


def to_relion(m: MagMat | ArrayLike) -> dict[str, float]:
    """``{"rlnMagMat00": M[0,0], "rlnMagMat01": M[0,1], "rlnMagMat10": M[1,0], ...}``."""
    a = as_matrix(m)
    return {
        label: float(a[i, j])
        for label, (i, j) in zip(
            RELION_MAGMAT_LABELS, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True
        )
    }


# ===================================================================== cryoSPARC
def to_cryosparc_anisomag(m: MagMat | ArrayLike) -> NDArray[np.float64]:
    """cryoSPARC's ``ctf/anisomag`` (4 floats) for ``M``: ``(M^-1 - I)`` flattened row-major.

    See :func:`from_cryosparc_anisomag` for the convention and how it was established. The
    result is float64; cryoSPARC stores float32 (about 1e-7 relative precision).
    """
    a = np.linalg.inv(as_matrix(m))
    return (a - np.eye(2)).reshape(4)


def from_cryosparc_anisomag(anisomag: ArrayLike) -> MagMat:
    """``M`` from one particle's cryoSPARC ``ctf/anisomag`` field (4 floats).

    Convention, as established from public material (``docs/anisomag.md`` has the details):

    * The 4 floats are a 2×2 matrix in row-major (C) order with the identity subtracted:
      all zeros means no magnification error. Sources: the cryosparc-tools example
      ``docs/examples/magnification.ipynb`` ("stored sequentially in row-major order … [0, 0,
      0, 0] means no magnification is applied"; it adds ``np.eye(2)`` before use), and a
      cryoSPARC developer on discuss.cryosparc.com ("Help interpreting the anisotropic
      magnification matrix": reshape C-order, add the identity, "CryoSPARC stores the matrix
      with the identity subtracted off"). The real exported particle files in
      ``shared/data/real/cryodrgn/*.cs`` indeed hold ``[0, 0, 0, 0]``.
    * Direction: ``A = I + anisomag`` maps the *true* frequency to the *observed* one,
      ``k_obs = A k_true``, so ``M = A^-1``. The same cryosparc-tools example relabels
      particles of pixel size ``p2`` as pixel size ``p1 < p2`` and updates
      ``A_new = A_old · p2 / p1``. Relabelling makes the observed frequencies larger by
      ``p2 / p1`` for the same content, i.e. RELION's ``M`` becomes ``M · p1 / p2`` — the
      inverse scaling, hence ``A ∝ M^-1``. A cryoSPARC developer described ``I + anisomag`` as
      "a passive transformation on coordinates in Fourier space" (thread "Convert aniso Mag to
      motion_corr2"), which is why the inverse is taken without a transpose.

    Uncertain: the isotropic example cannot tell ``M^-1`` from ``M^-T``; the two differ only
    in the sign of the (tiny) rotation part. pyem (``pyem/metadata/cryosparc2.py``,
    ``cryosparc_2_cs_ctf_parameters``) copies the four numbers straight into ``_rlnMagMat``
    without adding the identity or inverting — its author calls it untested, and it would turn
    the common ``[0, 0, 0, 0]`` into a singular matrix — so it is not followed here, apart from
    the row-major element order, on which all sources agree.

    Raises
    ------
    ValueError
        If the input does not hold 4 finite numbers or ``I + anisomag`` is not invertible with
        a positive determinant.
    """
    v = np.asarray(anisomag, dtype=float).reshape(-1)
    if v.shape != (4,):
        raise ValueError(f"ctf/anisomag must hold 4 numbers, got {v.size}")
    a = np.eye(2) + v.reshape(2, 2)
    if not np.all(np.isfinite(a)) or not np.linalg.det(a) > 0.0:
        raise ValueError(f"ctf/anisomag {v.tolist()} does not describe a valid magnification")
    return MagMat(np.linalg.inv(a))


def matrices_from_cryosparc_anisomag(anisomag: ArrayLike) -> NDArray[np.float64]:
    """Vectorised :func:`from_cryosparc_anisomag`: ``(N, 4)`` → ``(N, 2, 2)`` arrays of ``M``.

    No validation beyond the shape (use this on whole particle tables; ``numpy.linalg.inv``
    raises on a singular row).
    """
    v = np.asarray(anisomag, dtype=float)
    if v.ndim != 2 or v.shape[1] != 4:
        raise ValueError(f"expected an (N, 4) array of ctf/anisomag rows, got shape {v.shape}")
    a = np.eye(2)[None, :, :] + v.reshape(-1, 2, 2)
    return np.linalg.inv(a)


# ===================================================================== cisTEM / MotionCor2
def from_cistem(
    angle_deg: float, major_scale: float, minor_scale: float, pixel_ratio: float = 1.0
) -> MagMat:
    """``M`` from cisTEM ``mag_distortion_correct`` parameters (angle, major, minor scale).

    What cisTEM does (``Image::CorrectMagnificationDistortion`` in ``src/core/image.cpp``): for
    each output pixel ``p`` (relative to the box centre, x = column, y = row) it reads the input
    image at ``C p`` with

        C = R(θ)^T diag(1/major, 1/minor) R(θ),   R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]].

    So the corrected image is the input *stretched* by ``major`` along the unit vector
    ``R(θ)^T e_x = (cos θ, -sin θ)`` and by ``minor`` across it. In anisoctf's frame the major
    axis therefore lies at ``-θ`` (angle measured from +x towards +y); cisTEM's angle counts the
    other way round (from +x towards -y). A cisTEM developer confirmed on the Grigorieff-lab
    forum (magdistortion/angle_definition) that the sign may be opposite to CTFFIND's.

    Derivation of ``M``: take the corrected image as the truth, labelled with the same pixel
    size as the input. A feature at input position ``x_obs`` appears in the output at
    ``x_true = C^-1 x_obs``, i.e. the recorded image is the true one distorted by
    ``x_obs = A x_true`` with ``A = C``. A plane wave ``cos(2π k_true·x_true)`` is recorded as
    ``cos(2π (A^-T k_true)·x_obs)``, so ``k_obs = A^-T k_true`` and ``M = A^T = C`` (symmetric).
    Along the major axis ``M`` has eigenvalue ``1/major``: where the image must be stretched
    (recorded at lower magnification), observed frequencies are too high.

    Parameters
    ----------
    angle_deg
        cisTEM's distortion angle θ in degrees.
    major_scale, minor_scale
        Stretch factors that *correct* the image along the major axis and across it (the values
        ``mag_distortion_estimate`` reports as the correction), > 0.
    pixel_ratio
        ``input pixel size / corrected pixel size``. Leave at 1 when the distorted images keep
        the pixel size of the corrected ones (the round-trip convention of :func:`to_cistem`);
        when the program reports a "corrected pixel size" ``p_c`` for images recorded at
        ``p_in``, ``M`` picks up the isotropic factor ``p_in / p_c``.
    """
    if not (major_scale > 0.0 and minor_scale > 0.0 and pixel_ratio > 0.0):
        raise ValueError(
            f"scales and pixel ratio must be positive, got major={major_scale}, "
            f"minor={minor_scale}, pixel_ratio={pixel_ratio}"
        )
    rot = _rotation(angle_deg)
    c = rot.T @ np.diag([1.0 / major_scale, 1.0 / minor_scale]) @ rot
    return MagMat(pixel_ratio * c)


def to_cistem(m: MagMat | ArrayLike, max_rotation_deg: float = 0.5) -> tuple[float, float, float]:
    """cisTEM ``mag_distortion_correct`` parameters ``(angle_deg, major, minor)`` for ``M``.

    The inverse of :func:`from_cistem` with ``pixel_ratio = 1``: ``major >= minor`` and the
    angle is in [0, 180). cisTEM can only express a symmetric ``M``; the symmetric part ``S`` of
    the polar decomposition ``M = R S`` is converted and the rotation ``R`` dropped (RELION's
    refined matrices carry rotations of a few hundredths of a degree at most).

    Raises
    ------
    ValueError
        If the rotation part exceeds ``max_rotation_deg`` (likely a convention mix-up).
    """
    mm = m if isinstance(m, MagMat) else MagMat(m)
    if abs(mm.rotation_deg) > max_rotation_deg:
        raise ValueError(
            f"the matrix contains a {mm.rotation_deg:.3f} deg rotation, which cisTEM/MotionCor2 "
            "cannot represent"
        )
    s = mm.symmetric_part
    w, v = np.linalg.eigh(s)  # ascending: w[0] is 1/major, along the major axis
    major, minor = 1.0 / w[0], 1.0 / w[1]
    vec = v[:, 0]
    # the major axis is (cos θ, -sin θ) in the anisoctf frame, so θ = -(its angle)
    angle = float(np.mod(-np.rad2deg(np.arctan2(vec[1], vec[0])), 180.0))
    if angle >= 180.0:
        angle = 0.0
    return angle, float(major), float(minor)


def from_motioncor2(major_scale: float, minor_scale: float, angle_deg: float) -> MagMat:
    """``M`` from MotionCor2 ``-Mag major minor angle``.

    MotionCor2's manual (quoted in the scipion-em-motioncorr wrapper, ``protocol_base.py``):
    "Correct anisotropic magnification by stretching image along the major axis, the axis where
    the lower magnification is detected"; the three inputs are the magnifications along the
    major and minor axes and the angle of the major axis relative to the image x-axis, in
    degrees. These are the numbers cisTEM's ``mag_distortion_estimate`` reports, and the same
    real-space stretch as ``mag_distortion_correct``, so this is :func:`from_cistem` with the
    arguments reordered.

    Uncertain: MotionCor2 is closed source, so the sign of its angle could not be checked; it is
    assumed to follow ``mag_distortion_estimate``/``mag_distortion_correct`` (major axis along
    ``(cos θ, -sin θ)`` in column/row pixel coordinates). If MotionCor2 counts the angle the
    other way, pass ``-angle``.
    """
    return from_cistem(angle_deg, major_scale, minor_scale)


def to_motioncor2(
    m: MagMat | ArrayLike, max_rotation_deg: float = 0.5
) -> tuple[float, float, float]:
    """MotionCor2 ``-Mag`` values ``(major, minor, angle_deg)`` for ``M``; see :func:`to_cistem`."""
    angle, major, minor = to_cistem(m, max_rotation_deg=max_rotation_deg)
    return major, minor, angle
