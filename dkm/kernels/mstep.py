"""M-step: new mixture parameters from merged sufficient statistics, per covariance type."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dkm import covariance
from dkm._typing import CovarianceType, OnDegenerate
from dkm.covariance import Covariance
from dkm.errors import InvalidDataError
from dkm.kernels.params import DegenerateComponentError, MixtureParams
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
                raise InvalidDataError(
                    f"k-means cluster {j} is empty and no point is left to re-seed it: "
                    "the data has fewer distinct points with positive weight than "
                    "n_clusters. Lower n_clusters or check the sample weights."
                )
    return sums / nk[:, None], empty


def _degenerate(nk: F64, cov: F64, kind: Covariance) -> tuple[list[int], str]:
    """Components that cannot be used, and why: empty, or covariance not positive definite."""
    empty = [int(j) for j in np.flatnonzero(nk <= NK_EPS)]
    if empty:
        return empty, "no points are assigned to it (empty component)"
    return kind.degenerate(cov)


def gaussian_mstep(
    stats: SuffStats,
    shift: F64,
    covariance_type: CovarianceType,
    reg_covar: float,
    on_degenerate: OnDegenerate = "error",
) -> tuple[MixtureParams, F64, list[int]]:
    """Weights, means and precision-Cholesky factors from the totals.

    ``means = shift + sx / nk``; covariances are ``sxx / nk − δ δᵀ`` (δ = means − shift)
    by type, plus ``reg_covar`` on the diagonal. A component that is empty or whose
    covariance is not positive definite is handled by ``on_degenerate``: ``error``
    raises :class:`DegenerateComponentError` naming it; ``drop`` removes it (the
    mixture gets fewer components); ``reseed`` puts its mean on the point the model
    explains worst (``stats.farthest``, collected in the E-step), with the average
    covariance and weight of the healthy components. Returns the parameters, the
    covariances and the indices of the dropped or re-seeded components.
    """
    kind = covariance.of(covariance_type)
    nk = stats.nk + NK_EPS
    delta = stats.sx / nk[:, None]
    means = shift + delta
    cov = kind.add_reg(kind.estimate(stats.sxx, nk, delta), reg_covar)
    bad, why = _degenerate(stats.nk, cov, kind)
    if bad:
        means, cov, nk = _repair(bad, why, on_degenerate, means, cov, nk, stats)
    if kind.unit:
        return MixtureParams.identity(means), cov, bad
    prec_chol = kind.precision_cholesky(cov)
    weights = nk / nk.sum()
    return MixtureParams(covariance_type, weights, means, prec_chol), cov, bad


def _repair(
    bad: list[int],
    why: str,
    policy: str,
    means: F64,
    cov: F64,
    nk: F64,
    stats: SuffStats,
) -> tuple[F64, F64, F64]:
    good = np.setdiff1d(np.arange(nk.shape[0]), bad)
    if policy == "error" or good.size == 0:
        raise DegenerateComponentError(bad, why)
    shared = covariance.of_moments(stats.moments).shared  # nothing per component to fix
    if policy == "drop":
        return means[good], cov if shared else cov[good], nk[good]
    far = stats.farthest
    if far is None or far.distances.size < len(bad):
        raise DegenerateComponentError(bad, why + " and no point is left to re-seed it")
    means, cov, nk = means.copy(), cov.copy(), nk.copy()
    for i, j in enumerate(bad):  # a handful of components, not a loop over points
        means[j] = far.points[i]
        if not shared:
            cov[j] = cov[good].mean(axis=0)
        nk[j] = nk[good].mean()
    return means, cov, nk
