"""Initial centres from points in memory (a sample of the data): k-means++ and random."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]


def _sq_dist_to(X: F64, x_norms: F64, Y: F64) -> F64:
    """‖y_j − x_i‖² for rows y of Y against all X; (m, n), clipped at 0."""
    D = Y @ X.T
    D *= -2.0
    D += x_norms
    D += np.einsum("ij,ij->i", Y, Y)[:, None]
    np.maximum(D, 0.0, out=D)
    return D


def kmeans_plusplus(
    X: F64,
    n_clusters: int,
    sample_weight: F64,
    random_state: np.random.RandomState,
    n_local_trials: int | None = None,
) -> F64:
    """Greedy k-means++ (Arthur & Vassilvitskii, with scikit-learn's greedy trials).

    The first centre is drawn with probability proportional to the weight; each next
    one is the best of ``n_local_trials`` candidates drawn with probability
    proportional to ``w · D(x)²``, "best" meaning the lowest resulting potential. The
    random draws follow the same sequence as scikit-learn's ``kmeans_plusplus``, so on
    the same points and ``RandomState`` the same centres come out.

    Returns (n_clusters, d) float64 centres.
    """
    n = X.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    centres = np.empty((n_clusters, X.shape[1]))
    x_norms = np.einsum("ij,ij->i", X, X)
    first = random_state.choice(n, p=sample_weight / sample_weight.sum())
    centres[0] = X[first]
    closest = _sq_dist_to(X, x_norms, X[first : first + 1])[0]
    potential = closest @ sample_weight
    for c in range(1, n_clusters):
        draws = random_state.uniform(size=n_local_trials) * potential
        cumulative = np.cumsum(sample_weight * closest, dtype=np.float64)
        candidates = np.minimum(np.searchsorted(cumulative, draws), n - 1)
        trial = np.minimum(closest, _sq_dist_to(X, x_norms, X[candidates]))
        trial_pot = trial @ sample_weight
        best = int(np.argmin(trial_pot))
        potential = trial_pot[best]
        closest = trial[best]
        centres[c] = X[candidates[best]]
    return centres


def random_points(
    X: F64,
    n_clusters: int,
    sample_weight: F64,
    random_state: np.random.RandomState,
) -> F64:
    """``n_clusters`` distinct rows drawn with probability proportional to the weight."""
    idx = random_state.choice(
        X.shape[0], size=n_clusters, replace=False, p=sample_weight / sample_weight.sum()
    )
    return np.asarray(X[idx], np.float64)


#: init name -> function(points, k, weights, RandomState) -> (k, d) centres.
INIT_METHODS: dict[str, Callable[[F64, int, F64, np.random.RandomState], F64]] = {
    "k-means++": kmeans_plusplus,
    "random": random_points,
}
