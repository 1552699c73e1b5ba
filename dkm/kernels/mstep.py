"""M-step: new mixture parameters from merged sufficient statistics, per covariance type."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from dkm._typing import CovarianceType
from dkm.kernels.params import (
    DegenerateComponentError,
    MixtureParams,
    precision_cholesky_from_covariances,
)
from dkm.stats import SuffStats

F64 = NDArray[np.float64]
#: scikit-learn adds this to nk so that an almost empty component divides safely.
NK_EPS = 10 * np.finfo(np.float64).eps


def kmeans_centres(stats: SuffStats, shift: F64 | None = None) -> tuple[F64, list[int]]:
    """New k-means centres; empty clusters re-seeded from the farthest points.

    As scikit-learn does in memory: each empty cluster takes, in order, the point
    farthest from its assigned centre, and that point's weight and coordinates move out
    of its old cluster. A candidate whose removal would empty its own cluster is passed
    over. Returns the centres (k, d) and the list of re-seeded clusters.

    Raises ValueError when there are not enough candidates (fewer points with positive
    weight than clusters).
    """
    nk = stats.nk.copy()
    sums = stats.sx.copy() if shift is None else stats.sx + stats.nk[:, None] * shift
    empty = [int(j) for j in np.flatnonzero(nk <= 0.0)]
    if empty:
        far = stats.farthest
        n_cand = 0 if far is None else far.distances.size
        cand = 0
        for j in empty:  # a handful of empty clusters, not a loop over points
            while cand < n_cand:
                assert far is not None
                x, w, old = far.points[cand], far.weights[cand], int(far.labels[cand])
                cand += 1
                if nk[old] - w > 0.0:
                    sums[old] -= w * x
                    nk[old] -= w
                    sums[j] = w * x
                    nk[j] = w
                    break
            else:
                raise ValueError(
                    f"k-means cluster {j} is empty and no point is left to re-seed it: "
                    "the data has fewer distinct points with positive weight than "
                    "n_clusters. Lower n_clusters or check the sample weights."
                )
    return sums / nk[:, None], empty


def _check_mass(nk: F64) -> None:
    empty = [int(j) for j in np.flatnonzero(nk <= NK_EPS)]
    if empty:
        raise DegenerateComponentError(empty, "no points are assigned to it (empty component)")


def _cov_full(stats: SuffStats, nk: F64, delta: F64) -> F64:
    assert stats.sxx is not None
    return stats.sxx / nk[:, None, None] - np.einsum("ki,kj->kij", delta, delta)


def _cov_tied(stats: SuffStats, nk: F64, delta: F64) -> F64:
    assert stats.sxx is not None
    return (stats.sxx - (delta.T * nk) @ delta) / nk.sum()


def _cov_diag(stats: SuffStats, nk: F64, delta: F64) -> F64:
    assert stats.sxx is not None
    return stats.sxx / nk[:, None] - delta**2


def _cov_spherical(stats: SuffStats, nk: F64, delta: F64) -> F64:
    assert stats.sxx is not None
    d = delta.shape[1]
    return (stats.sxx / nk - (delta**2).sum(axis=1)) / d


#: covariance type -> covariance estimate from (stats, nk, mean − shift), before reg_covar.
COVARIANCE_ESTIMATORS: dict[str, Callable[[SuffStats, F64, F64], F64]] = {
    "full": _cov_full,
    "tied": _cov_tied,
    "diag": _cov_diag,
    "spherical": _cov_spherical,
}


def add_reg(cov: F64, covariance_type: str, reg_covar: float) -> F64:
    cov = cov.copy()
    if covariance_type == "full":
        d = cov.shape[-1]
        cov.reshape(cov.shape[0], -1)[:, :: d + 1] += reg_covar
    elif covariance_type == "tied":
        cov.flat[:: cov.shape[0] + 1] += reg_covar
    else:
        cov += reg_covar
    return cov


def gaussian_mstep(
    stats: SuffStats,
    shift: F64,
    covariance_type: CovarianceType,
    reg_covar: float,
) -> tuple[MixtureParams, F64]:
    """Weights, means and precision-Cholesky factors from the totals.

    ``means = shift + sx / nk``; covariances are ``sxx / nk − δ δᵀ`` (δ = means − shift)
    by type, plus ``reg_covar`` on the diagonal. Returns the parameters and the
    covariances. Raises :class:`DegenerateComponentError` for an empty component or a
    covariance that is not positive definite.
    """
    _check_mass(stats.nk)
    nk = stats.nk + NK_EPS
    delta = stats.sx / nk[:, None]
    means = shift + delta
    if covariance_type == "identity":
        # Unit covariances, equal fixed weights: soft k-means. Reported as spherical 1.0.
        return MixtureParams.identity(means), np.ones(nk.shape[0])
    cov = add_reg(
        COVARIANCE_ESTIMATORS[covariance_type](stats, nk, delta), covariance_type, reg_covar
    )
    prec_chol = precision_cholesky_from_covariances(cov, covariance_type)
    weights = nk / nk.sum()
    return MixtureParams(covariance_type, weights, means, prec_chol), cov
