"""Initial centres from points in memory (a sample of the data): k-means++ and random.

Also the NumPy parts of k-means‖ (:mod:`dkm.kmeans_parallel`): distances of a chunk to
the candidates, per-round seeds, and the reduction of weighted candidates to k centres.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dkm.kernels.expectation import nearest, row_blocks

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


def min_sq_distances(X: NDArray[Any], centres: NDArray[Any]) -> NDArray[Any]:
    """``min_c ‖x − c‖²`` per row, in X's dtype, clipped at 0; (n,).

    One GEMM per block of rows against all centres; the (rows × centres) temporary is
    bounded by :data:`~dkm.kernels.expectation.BLOCK_ELEMENTS` however many there are.
    """
    C = np.asarray(centres).astype(X.dtype, copy=False)
    minus_2c = -2.0 * C
    c_norms = np.einsum("ij,ij->i", C, C)
    out = np.empty(X.shape[0], dtype=X.dtype)
    for rows in row_blocks(X.shape[0], max(C.shape[0], 1)):
        Xb = X[rows]
        D = Xb @ minus_2c.T
        D += c_norms
        m = D.min(axis=1)
        m += np.einsum("ij,ij->i", Xb, Xb)
        np.maximum(m, 0.0, out=m)
        out[rows] = m
    return out


def round_seed(seed: int, round_: int) -> int:
    """A 64-bit seed for k-means‖ round ``round_`` (0: the first centre) of run ``seed``.

    A hash, so the per-row uniform streams of different rounds and runs are unrelated.
    """
    digest = hashlib.blake2b(f"dkm-kmeans||:{seed}:{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def candidate_capacity(expected: float) -> int:
    """Rows a k-means‖ round keeps per chunk and in total, for ``expected`` = l draws.

    The number of rows a round chooses is a sum of independent Bernoulli variables
    whose mean is at most ``l``; by the Chernoff bound
    ``P(S ≥ l + t) ≤ exp(−t² / (2(l + t/3)))``, ``t = 10√l + 50`` makes an overflow
    less likely than 1e-20 for every l.
    """
    return math.ceil(expected + 10.0 * math.sqrt(expected) + 50.0)


def weighted_lloyd(points: F64, weights: F64, centres: F64, max_iter: int) -> F64:
    """At most ``max_iter`` weighted Lloyd steps on points in memory.

    Stops early when no label changes. A centre left without points stays where it is.
    """
    centres = np.array(centres, np.float64)
    labels = None
    for _ in range(max_iter):
        new_labels = nearest(points, centres)
        if labels is not None and np.array_equal(labels, new_labels):
            break
        labels = new_labels
        k = centres.shape[0]
        nk = np.bincount(labels, weights=weights, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, points * weights[:, None])
        filled = nk > 0
        centres[filled] = sums[filled] / nk[filled, None]
    return centres


def recluster(
    points: F64,
    weights: F64,
    n_clusters: int,
    random_state: np.random.RandomState,
    lloyd_steps: int = 100,
    n_trials: int = 5,
) -> F64:
    """k centres from weighted points: greedy weighted k-means++, then weighted Lloyd.

    The reduction step of k-means‖: ``points`` are the candidates, ``weights`` the
    (sample-weighted) number of data points nearest to each; all weights positive.
    ``n_trials`` runs from independent k-means++ draws, the one with the lowest
    weighted cost on the candidates wins: they cost O(trials · candidates · k · d) on
    the client and no pass over the data.
    """
    best, best_cost = None, np.inf
    for _ in range(n_trials):
        centres = kmeans_plusplus(points, n_clusters, weights, random_state)
        centres = weighted_lloyd(points, weights, centres, lloyd_steps)
        cost = float(min_sq_distances(points, centres) @ weights)
        if best is None or cost < best_cost:
            best, best_cost = centres, cost
    assert best is not None
    return best


#: init name -> function(points, k, weights, RandomState) -> (k, d) centres.
INIT_METHODS: dict[str, Callable[[F64, int, F64, np.random.RandomState], F64]] = {
    "k-means++": kmeans_plusplus,
    "random": random_points,
}
