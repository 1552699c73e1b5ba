"""The covariance types of the mixture family: what each one means for the arithmetic.

One object per type (:data:`TYPES`; :func:`of` by covariance type, :func:`of_moments`
by the second moments a pass accumulates) owns the per-type behaviour: the shapes of
its arrays, the covariance estimate from sufficient statistics, ``reg_covar``, the
degenerate components, the precision-Cholesky conversions, the log-determinant, the
number of free parameters, and the moment shift. The E-step, the M-step, BIC, io and
recluster ask it rather than comparing names. NumPy/SciPy only, like the kernels.

``identity`` (k-means) is a member: unit covariances, equal fixed weights, no second
moments. Where scikit-learn's attributes are wanted of it (``precisions_``,
``covariances_``), they are those of spherical ones.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from scipy import linalg

from dkm._typing import (
    COVARIANCE_TYPES,
    CovarianceType,
    Moments,
    parse_covariance_type,
    parse_moments,
)
from dkm.errors import UserError

F64 = NDArray[np.float64]


class DegenerateComponentError(UserError, ValueError):
    """A mixture component has no mass or a covariance that is not positive definite."""

    def __init__(self, components: list[int], what: str) -> None:
        self.components, self.what = components, what
        names = ", ".join(str(c) for c in components)
        where = f"mixture component(s) {names}" if components else "the mixture"
        super().__init__(
            f"{where}: {what}. This happens with collapsed or "
            "singleton components, duplicated points or features of very different "
            "scales. Increase reg_covar, scale the data (e.g. standardise the features), "
            "or lower the number of components."
        )

    def __reduce__(self) -> tuple[type, tuple[list[int], str]]:
        # an error raised in a task reaches the client pickled: rebuilt from its fields
        return type(self), (self.components, self.what)


class Covariance:
    """One covariance type. Subclasses override what differs from diag's behaviour."""

    name: CovarianceType
    #: The second moments its M-step needs ("none": means only).
    moments: Moments
    #: Unit covariances and equal fixed weights (k-means): no precisions to store.
    unit: bool = False
    #: One covariance shared by all components (its statistics are summed over them).
    shared: bool = False
    #: A dense (d, d) matrix per component: the E-step's stacked GEMM and features.
    dense: bool = False

    def __repr__(self) -> str:
        return f"<covariance {self.name}>"

    # ------------------------------------------------------------------ shapes

    def sxx_shape(self, k: int, d: int) -> tuple[int, ...] | None:
        """Shape of the second moments (None: none are kept)."""
        raise NotImplementedError

    def precision_shape(self, k: int, d: int) -> tuple[int, ...]:
        """Shape of the precisions, their Cholesky factors and the covariances."""
        shape = self.sxx_shape(k, d)
        assert shape is not None
        return shape

    def raw_shape(self, k: int, d: int) -> tuple[int, ...]:
        """Shape of the E-step's raw (uncentred) moments, :meth:`raw_moments`."""
        return self.precision_shape(k, d)

    def n_parameters(self, k: int, d: int) -> int:
        """Free parameters of a mixture of ``k`` components (scikit-learn's count)."""
        return self.n_covariance_parameters(k, d) + k * d + k - 1

    def n_covariance_parameters(self, k: int, d: int) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ M-step

    def estimate(self, sxx: F64 | None, nk: F64, delta: F64) -> F64:
        """Covariances from the second moments ``sxx`` around the shift, the masses ``nk``
        and ``delta`` (k, d) = means − shift; before ``reg_covar``."""
        raise NotImplementedError

    def add_reg(self, cov: F64, reg_covar: float) -> F64:
        """A copy of ``cov`` with ``reg_covar`` on the diagonals."""
        cov = cov.copy()
        cov += reg_covar
        return cov

    def degenerate(self, cov: F64) -> tuple[list[int], str]:
        """Components whose covariance cannot be used, and why."""
        mask = ~np.isfinite(cov) | (cov <= 0.0)
        rows = mask.any(axis=1) if mask.ndim == 2 else mask
        return [int(j) for j in np.flatnonzero(rows)], "variance is not positive"

    def bad_components(self, mask: NDArray[np.bool_]) -> list[int]:
        """The components with any ``True`` in ``mask`` (shaped like the covariances)."""
        axes = tuple(range(1, mask.ndim))
        return [int(j) for j in np.flatnonzero(mask.any(axis=axes) if axes else mask)]

    # ------------------------------------------------------------------ precisions

    def precision_cholesky(self, covariances: F64) -> F64:
        """Precision-Cholesky factors from covariances; raises DegenerateComponentError."""
        if not np.all(np.isfinite(covariances)):
            bad = self.bad_components(~np.isfinite(covariances))
            raise DegenerateComponentError(bad, "covariance is not finite")
        if np.any(covariances <= 0.0):
            bad = self.bad_components(covariances <= 0.0)
            raise DegenerateComponentError(bad, "variance is not positive")
        return 1.0 / np.sqrt(covariances)

    def cholesky_of_precisions(self, precisions: F64) -> F64:
        """Cholesky factors of given precisions (``precisions_init``)."""
        return np.sqrt(precisions)

    def precisions(self, prec_chol: F64) -> F64:
        return prec_chol**2

    def as_full(self, covariances: F64, k: int, d: int) -> F64:
        """(k, d, d) matrices from covariances of this type's shape."""
        return np.asarray(covariances[:, :, None] * np.eye(d))  # row j on matrix j's diagonal

    def covariances(self, prec_chol: F64) -> F64:
        return 1.0 / prec_chol**2

    def log_det(self, prec_chol: F64 | None, n_features: int) -> F64:
        """``log det P`` per component, i.e. ``−½ log det Σ_k``; shape (k,) or scalar
        (0 without factors: unit covariances)."""
        return np.zeros(()) if prec_chol is None else self._log_det(prec_chol, n_features)

    def _log_det(self, prec_chol: F64, n_features: int) -> F64:
        raise NotImplementedError

    def variances(self, covariances: F64, k: int, d: int) -> F64:
        """Each component's mean variance per feature (k,)."""
        raise NotImplementedError

    def draw(
        self, rng: np.random.RandomState, mean: F64, covariances: F64, j: int, count: int
    ) -> F64:
        """``count`` points of component ``j``."""
        scale = np.sqrt(covariances[j])
        return np.asarray(mean + rng.standard_normal(size=(count, mean.shape[0])) * scale)

    # ------------------------------------------------------------------ E-step

    def diagonal_form(self, means: F64, prec_chol: F64) -> tuple[F64 | None, F64, F64]:
        """The Mahalanobis terms as a weighted sum of squares ``Σ_f prec_fk (y_f −
        m_fk)²`` of ``y = x T``: ``(T or None, mᵀ (d, k), precᵀ (d, k))``."""
        prec = prec_chol**2
        return None, np.ascontiguousarray(means.T), np.ascontiguousarray(prec.T)

    def raw_moments(
        self, X64: F64, labels: NDArray[np.int64] | None, R: Any, w: F64, c: F64
    ) -> F64:
        """The additive part of the second moments over some rows: here ``Σ w r x²`` per
        component and feature, ``R`` being the (k, n) weighted responsibilities."""
        return np.asarray(R @ (X64 * X64))

    def from_raw(self, raw: F64, S1: F64, nk: F64, c: F64) -> F64:
        """Second moments around ``c_k`` from the summed :meth:`raw_moments` and the
        totals ``S1 = Σ w r x``, ``nk``."""
        return self.around(raw, S1, nk, c)

    def around(self, sxx: F64, sx: F64, nk: F64, c: F64) -> F64:
        """The moment shift: second moments around ``c_k`` from those around the
        origin ``sxx`` and the first moments ``sx`` around it (exact algebra:
        ``Σ w r (x − c)(x − c)ᵀ = sxx − c sxᵀ − sx cᵀ + nk c cᵀ``, by type)."""
        return np.asarray(sxx - 2.0 * c * sx + nk[:, None] * c**2)


class _Identity(Covariance):
    name = "identity"
    moments = "none"
    unit = True

    def sxx_shape(self, k: int, d: int) -> tuple[int, ...] | None:
        return None

    def precision_shape(self, k: int, d: int) -> tuple[int, ...]:
        return (k,)

    def n_parameters(self, k: int, d: int) -> int:
        return k * d  # means only: weights and covariances are fixed

    def n_covariance_parameters(self, k: int, d: int) -> int:
        return 0

    def estimate(self, sxx: F64 | None, nk: F64, delta: F64) -> F64:
        # Unit covariances, equal fixed weights: soft k-means. Reported as spherical 1.0.
        return np.ones(nk.shape[0])

    def add_reg(self, cov: F64, reg_covar: float) -> F64:
        return cov

    def _log_det(self, prec_chol: F64, n_features: int) -> F64:
        return np.zeros(())

    def raw_shape(self, k: int, d: int) -> tuple[int, ...]:
        return ()

    def degenerate(self, cov: F64) -> tuple[list[int], str]:
        return [], ""  # unit covariances: only an empty cluster can fail

    def variances(self, covariances: F64, k: int, d: int) -> F64:
        return np.ones(k)

    def as_full(self, covariances: F64, k: int, d: int) -> F64:
        return SPHERICAL.as_full(covariances, k, d)  # given as scikit-learn's (k,) ones

    def precision_cholesky(self, covariances: F64) -> F64:
        raise ValueError("covariance_type 'identity' has no precision")


class _Spherical(Covariance):
    name = "spherical"
    moments = "spherical"

    def sxx_shape(self, k: int, d: int) -> tuple[int, ...] | None:
        return (k,)

    def raw_shape(self, k: int, d: int) -> tuple[int, ...]:
        return (k, d)  # per feature, summed by from_raw

    def n_covariance_parameters(self, k: int, d: int) -> int:
        return k

    def estimate(self, sxx: F64 | None, nk: F64, delta: F64) -> F64:
        assert sxx is not None, f"{self.name} covariances need second moments"
        d = delta.shape[1]
        return np.asarray((sxx / nk - (delta**2).sum(axis=1)) / d)

    def _log_det(self, prec_chol: F64, n_features: int) -> F64:
        return np.asarray(n_features * np.log(prec_chol))

    def variances(self, covariances: F64, k: int, d: int) -> F64:
        return covariances

    def as_full(self, covariances: F64, k: int, d: int) -> F64:
        return np.asarray(covariances[:, None, None] * np.eye(d))

    def diagonal_form(self, means: F64, prec_chol: F64) -> tuple[F64 | None, F64, F64]:
        d = means.shape[1]
        prec = np.repeat((prec_chol**2)[:, None], d, axis=1)
        return None, np.ascontiguousarray(means.T), np.ascontiguousarray(prec.T)

    def from_raw(self, raw: F64, S1: F64, nk: F64, c: F64) -> F64:
        return np.asarray(DIAG.around(raw, S1, nk, c).sum(axis=1))

    def around(self, sxx: F64, sx: F64, nk: F64, c: F64) -> F64:
        # summed over features: the diagonal's shift, summed
        return np.asarray(sxx + (nk[:, None] * c**2 - 2.0 * c * sx).sum(axis=1))


class _Diag(Covariance):
    name = "diag"
    moments = "diag"

    def sxx_shape(self, k: int, d: int) -> tuple[int, ...] | None:
        return (k, d)

    def n_covariance_parameters(self, k: int, d: int) -> int:
        return k * d

    def estimate(self, sxx: F64 | None, nk: F64, delta: F64) -> F64:
        assert sxx is not None, f"{self.name} covariances need second moments"
        return np.asarray(sxx / nk[:, None] - delta**2)

    def _log_det(self, prec_chol: F64, n_features: int) -> F64:
        return np.asarray(np.log(prec_chol).sum(axis=1))

    def variances(self, covariances: F64, k: int, d: int) -> F64:
        return np.asarray(covariances.mean(axis=1))


class _Tied(Covariance):
    name = "tied"
    moments = "tied"
    shared = True

    def sxx_shape(self, k: int, d: int) -> tuple[int, ...] | None:
        return (d, d)

    def n_covariance_parameters(self, k: int, d: int) -> int:
        return d * (d + 1) // 2

    def estimate(self, sxx: F64 | None, nk: F64, delta: F64) -> F64:
        assert sxx is not None, f"{self.name} covariances need second moments"
        return np.asarray((sxx - (delta.T * nk) @ delta) / nk.sum())

    def add_reg(self, cov: F64, reg_covar: float) -> F64:
        cov = cov.copy()
        cov.flat[:: cov.shape[0] + 1] += reg_covar
        return cov

    def degenerate(self, cov: F64) -> tuple[list[int], str]:
        return [], ""  # checked as a whole when its factor is computed

    def bad_components(self, mask: NDArray[np.bool_]) -> list[int]:
        return []

    def precision_cholesky(self, covariances: F64) -> F64:
        return _matrix_precision_cholesky(self, covariances[None])[0]

    def cholesky_of_precisions(self, precisions: F64) -> F64:
        return np.asarray(linalg.cholesky(precisions, lower=True))

    def precisions(self, prec_chol: F64) -> F64:
        return np.asarray(prec_chol @ prec_chol.T)

    def covariances(self, prec_chol: F64) -> F64:
        return np.asarray(np.linalg.inv(prec_chol @ prec_chol.T))

    def _log_det(self, prec_chol: F64, n_features: int) -> F64:
        return np.asarray(np.log(np.diag(prec_chol)).sum())

    def variances(self, covariances: F64, k: int, d: int) -> F64:
        return np.full(k, np.trace(covariances) / d)

    def as_full(self, covariances: F64, k: int, d: int) -> F64:
        return np.broadcast_to(covariances, (k, d, d)).copy()

    def draw(
        self, rng: np.random.RandomState, mean: F64, covariances: F64, j: int, count: int
    ) -> F64:
        return np.asarray(rng.multivariate_normal(mean, covariances, count))

    def diagonal_form(self, means: F64, prec_chol: F64) -> tuple[F64 | None, F64, F64]:
        d, k = means.shape[1], means.shape[0]
        return prec_chol, np.ascontiguousarray((means @ prec_chol).T), np.ones((d, k))

    def raw_moments(
        self, X64: F64, labels: NDArray[np.int64] | None, R: Any, w: F64, c: F64
    ) -> F64:
        return np.asarray(X64.T @ (X64 * w[:, None]))  # Σ w x xᵀ

    def around(self, sxx: F64, sx: F64, nk: F64, c: F64) -> F64:
        # Σ_k Σ_i w r (x − c_k)(x − c_k)ᵀ, using Σ_k r_ik = 1 for every row.
        return np.asarray(sxx - c.T @ sx - sx.T @ c + (c.T * nk) @ c)


class _Full(Covariance):
    name = "full"
    moments = "full"
    dense = True

    def sxx_shape(self, k: int, d: int) -> tuple[int, ...] | None:
        return (k, d, d)

    def n_covariance_parameters(self, k: int, d: int) -> int:
        return k * d * (d + 1) // 2

    def estimate(self, sxx: F64 | None, nk: F64, delta: F64) -> F64:
        assert sxx is not None, f"{self.name} covariances need second moments"
        return np.asarray(sxx / nk[:, None, None] - np.einsum("ki,kj->kij", delta, delta))

    def add_reg(self, cov: F64, reg_covar: float) -> F64:
        cov = cov.copy()
        d = cov.shape[-1]
        cov.reshape(cov.shape[0], -1)[:, :: d + 1] += reg_covar
        return cov

    def degenerate(self, cov: F64) -> tuple[list[int], str]:
        bad = []
        for j, c in enumerate(cov):  # k small Cholesky factorisations
            try:
                if not np.all(np.isfinite(c)):
                    raise linalg.LinAlgError
                linalg.cholesky(c, lower=True)
            except linalg.LinAlgError:
                bad.append(j)
        return bad, "covariance is not positive definite"

    def precision_cholesky(self, covariances: F64) -> F64:
        return _matrix_precision_cholesky(self, covariances)

    def cholesky_of_precisions(self, precisions: F64) -> F64:
        return np.array([linalg.cholesky(p, lower=True) for p in precisions])

    def precisions(self, prec_chol: F64) -> F64:
        # a product per component, as scikit-learn's ``P @ P.T`` (BLAS's syrk);
        # einsum's loops took a second for k = 10 at d = 784
        return np.array([p @ p.T for p in prec_chol]).reshape(prec_chol.shape)

    def covariances(self, prec_chol: F64) -> F64:
        return np.array([np.linalg.inv(p @ p.T) for p in prec_chol])

    def _log_det(self, prec_chol: F64, n_features: int) -> F64:
        return np.asarray(np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1))

    def variances(self, covariances: F64, k: int, d: int) -> F64:
        return np.asarray(np.trace(covariances, axis1=1, axis2=2) / d)

    def as_full(self, covariances: F64, k: int, d: int) -> F64:
        return covariances.copy()

    def draw(
        self, rng: np.random.RandomState, mean: F64, covariances: F64, j: int, count: int
    ) -> F64:
        return np.asarray(rng.multivariate_normal(mean, covariances[j], count))

    def diagonal_form(self, means: F64, prec_chol: F64) -> tuple[F64 | None, F64, F64]:
        raise ValueError("full covariances have no diagonal form: the E-step stacks them")

    def raw_moments(
        self, X64: F64, labels: NDArray[np.int64] | None, R: Any, w: F64, c: F64
    ) -> F64:
        """``Σ w (x − c_k)(x − c_k)ᵀ`` per component, already around ``c_k``, from hard
        ``labels`` (soft responsibilities take the E-step's features instead)."""
        assert labels is not None
        k, d = c.shape
        sxx = np.empty((k, d, d))
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(k + 1))
        for j in range(k):  # one (d × n_j) @ (n_j × d) GEMM per component
            idx = order[bounds[j] : bounds[j + 1]]
            diff = X64[idx] - c[j]
            sxx[j] = (diff * w[idx, None]).T @ diff
        return sxx

    def from_raw(self, raw: F64, S1: F64, nk: F64, c: F64) -> F64:
        return raw  # raw_moments takes them around c_k already

    def around(self, sxx: F64, sx: F64, nk: F64, c: F64) -> F64:
        cs = c[:, :, None] * sx[:, None, :]
        return np.asarray(
            sxx - cs - cs.transpose(0, 2, 1) + nk[:, None, None] * c[:, :, None] * c[:, None, :]
        )


def _matrix_precision_cholesky(kind: Covariance, covariances: F64) -> F64:
    """``P = L⁻ᵀ`` per (d, d) matrix, ``Σ = L Lᵀ``: ``‖(x − μ) P‖²`` is the Mahalanobis
    distance and ``Σ log diag(P) = −½ log det Σ``."""
    if not np.all(np.isfinite(covariances)):
        bad = kind.bad_components(~np.isfinite(covariances))
        raise DegenerateComponentError(bad, "covariance is not finite")
    d = covariances.shape[-1]
    out = np.empty_like(covariances)
    for j, cov in enumerate(covariances):  # one Cholesky per component: k small ones
        try:
            chol = linalg.cholesky(cov, lower=True)
        except linalg.LinAlgError:
            if kind.shared:
                what = "the shared (tied) covariance is not positive definite"
                raise DegenerateComponentError([], what) from None
            raise DegenerateComponentError([j], "covariance is not positive definite") from None
        out[j] = linalg.solve_triangular(chol, np.eye(d), lower=True).T
    return out


IDENTITY: Final = _Identity()
SPHERICAL: Final = _Spherical()
DIAG: Final = _Diag()
TIED: Final = _Tied()
FULL: Final = _Full()

#: covariance type → its behaviour, in the order of :data:`dkm._typing.COVARIANCE_TYPES`.
TYPES: Final[dict[CovarianceType, Covariance]] = {
    kind.name: kind for kind in (IDENTITY, FULL, TIED, DIAG, SPHERICAL)
}
assert tuple(TYPES) == COVARIANCE_TYPES
_BY_MOMENTS: Final[dict[Moments, Covariance]] = {kind.moments: kind for kind in TYPES.values()}


def of(covariance_type: object, name: str = "covariance_type") -> Covariance:
    """The behaviour of a covariance type; a ValueError naming the choices otherwise."""
    return TYPES[parse_covariance_type(covariance_type, name)]


def of_moments(moments: object) -> Covariance:
    """The covariance type whose M-step needs these second moments ("none": identity)."""
    return _BY_MOMENTS[parse_moments(moments)]
