"""Mixture parameters and the covariance ↔ precision-Cholesky conversions, per type."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray
from scipy import linalg

from dkm._typing import COVARIANCE_TYPES, CovarianceType, check_choice
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


class DegenerateComponentWarning(UserWarning):
    """A collapsed component was dropped or re-seeded (``on_degenerate``)."""


@dataclass(frozen=True, eq=False)
class MixtureParams:
    """Parameters of a Gaussian mixture (k-means is the ``identity`` member).

    Attributes
    ----------
    covariance_type : one of identity, spherical, diag, tied, full.
    weights : (k,) mixing weights (equal and fixed for identity).
    means : (k, d).
    precisions_cholesky : ``P`` with precision ``P Pᵀ``: full (k, d, d), tied (d, d),
        diag (k, d), spherical (k,); None for identity (unit covariance).
    """

    covariance_type: CovarianceType
    weights: F64
    means: F64
    precisions_cholesky: F64 | None

    def __post_init__(self) -> None:
        check_choice("covariance_type", self.covariance_type, COVARIANCE_TYPES)

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    def translated(self, offset: F64) -> MixtureParams:
        """The same mixture moved by ``offset`` (precisions are translation invariant)."""
        return replace(self, means=self.means + offset)

    @classmethod
    def identity(cls, means: F64) -> MixtureParams:
        k = means.shape[0]
        return cls("identity", np.full(k, 1.0 / k), np.asarray(means, np.float64), None)


def precision_cholesky_from_covariances(covariances: F64, covariance_type: CovarianceType) -> F64:
    """Precision-Cholesky factors from covariances; raises DegenerateComponentError.

    For full and tied, ``P = L⁻ᵀ`` where ``Σ = L Lᵀ``, so ``‖(x − μ) P‖²`` is the
    Mahalanobis distance and ``Σ log diag(P) = −½ log det Σ``.
    """
    if not np.all(np.isfinite(covariances)):
        bad = _bad_components(~np.isfinite(covariances), covariance_type)
        raise DegenerateComponentError(bad, "covariance is not finite")
    if covariance_type in ("full", "tied"):
        covs = covariances if covariance_type == "full" else covariances[None]
        d = covs.shape[-1]
        out = np.empty_like(covs)
        for j, cov in enumerate(covs):  # one Cholesky per component: k small factorisations
            try:
                chol = linalg.cholesky(cov, lower=True)
            except linalg.LinAlgError:
                if covariance_type == "tied":
                    what = "the shared (tied) covariance is not positive definite"
                    raise DegenerateComponentError([], what) from None
                raise DegenerateComponentError([j], "covariance is not positive definite") from None
            out[j] = linalg.solve_triangular(chol, np.eye(d), lower=True).T
        return out if covariance_type == "full" else out[0]
    if covariance_type in ("diag", "spherical"):
        if np.any(covariances <= 0.0):
            bad = _bad_components(covariances <= 0.0, covariance_type)
            raise DegenerateComponentError(bad, "variance is not positive")
        return 1.0 / np.sqrt(covariances)
    raise ValueError(f"covariance_type {covariance_type!r} has no precision")


def _bad_components(mask: NDArray[np.bool_], covariance_type: str) -> list[int]:
    if covariance_type == "tied":
        return []
    axes = tuple(range(1, mask.ndim))
    return [int(j) for j in np.flatnonzero(mask.any(axis=axes) if axes else mask)]


def precision_cholesky_from_precisions(precisions: F64, covariance_type: CovarianceType) -> F64:
    """Cholesky factors of given precisions (``precisions_init`` as scikit-learn takes it)."""
    if covariance_type == "full":
        return np.array([linalg.cholesky(p, lower=True) for p in precisions])
    if covariance_type == "tied":
        return np.asarray(linalg.cholesky(precisions, lower=True))
    return np.sqrt(precisions)


def precisions_from_cholesky(prec_chol: F64, covariance_type: CovarianceType) -> F64:
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if covariance_type == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


def covariances_from_cholesky(prec_chol: F64, covariance_type: CovarianceType) -> F64:
    """Covariances from precision-Cholesky factors (for ``precisions_init`` models)."""
    if covariance_type == "full":
        return np.array([np.linalg.inv(p @ p.T) for p in prec_chol])
    if covariance_type == "tied":
        return np.asarray(np.linalg.inv(prec_chol @ prec_chol.T))
    return 1.0 / prec_chol**2


def log_det_cholesky(prec_chol: F64 | None, covariance_type: str, n_features: int) -> F64:
    """``log det P`` per component, i.e. ``−½ log det Σ_k``; shape (k,) or scalar."""
    if covariance_type == "identity" or prec_chol is None:
        return np.zeros(())
    if covariance_type == "full":
        return np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
    if covariance_type == "tied":
        return np.asarray(np.log(np.diag(prec_chol)).sum())
    if covariance_type == "diag":
        return np.log(prec_chol).sum(axis=1)
    return n_features * np.log(prec_chol)


def n_parameters(covariance_type: str, n_components: int, n_features: int) -> int:
    """Free parameters of the mixture (scikit-learn's count; identity: means only)."""
    k, d = n_components, n_features
    cov = {
        "full": k * d * (d + 1) // 2,
        "tied": d * (d + 1) // 2,
        "diag": k * d,
        "spherical": k,
        "identity": 0,
    }[covariance_type]
    weights = 0 if covariance_type == "identity" else k - 1
    return cov + k * d + weights
