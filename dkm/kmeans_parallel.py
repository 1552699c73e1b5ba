"""k-means‖ initialisation (Bahmani et al., 2012) over a Dask array, one pass per round.

The algorithm as published, with ``l = oversampling_factor · k``:

1. ``C = {c₀}``, ``c₀`` a point drawn with probability proportional to its weight.
2. ``n_rounds`` times: with ``ψ = Σ w·d²(x, C)`` the cost of the current candidates,
   add every point independently with probability ``min(1, l·w·d²(x, C) / ψ)``.
3. Weight each candidate by the (sample-weighted) number of points nearest to it.
4. Reduce the weighted candidates to k centres on the client: greedy weighted
   k-means++ and weighted Lloyd steps (the best of a few such runs).

**One pass per round.** The probabilities of round r need ψ under the candidates of
rounds < r, which is only known once the whole pass is done. Instead of sampling with a
stale ψ from the previous pass (as Spark-style implementations do, which under-samples
as the cost falls) or paying a second pass per round, every row gets a *priority*
``t = l·w·d²(x, C) / u`` with ``u`` a uniform number hashed from (seed, round, global
row). The row is chosen iff ``u < l·w·d²/ψ``, i.e. iff ``t > ψ``: so each chunk emits its
cost and its highest priorities (:class:`~dkm.stats.CandidateSample`, mergeable), and
once the tree reduction has summed ψ the client keeps the rows with ``t > ψ``. That is
exactly the published draw, in the same pass that computes ψ. A round keeps at most
``l + 10√l + 50`` rows (the number chosen has mean ≤ l; more than that are chosen with
probability below 1e-20 and a ``RuntimeWarning`` says so if it happens, keeping the
highest priorities).

The randomness depends only on the seed, the round and the global row index: the
result is the same for any chunking, scheduler, worker count or completion order (up
to the floating-point order of sums, which the fixed reduction tree also pins down for
a given chunking).

Passes over the data: ``n_rounds + 1`` when a :class:`~dkm.stats.DataSummary` is given
(its weighted sample provides ``c₀``; the estimators have one already), ``n_rounds + 2``
without (one pass draws ``c₀``). Fewer when a round finds the cost zero (every point of
positive weight is a candidate) or, with fewer than k distinct candidates, a round finds
no new distinct one: later rounds are skipped; more only in the fallback for fewer than
k distinct candidates (see :func:`kmeans_parallel`). Client memory is the
candidates, ``O(n_rounds · l · d)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from functools import partial
from typing import Any

import numpy as np
from dask.base import tokenize
from numpy.typing import NDArray
from sklearn.utils import check_random_state

from dkm.engine.data import ChunkedData, without_nonfinite
from dkm.engine.passes import PassOptions, Shared, run_pass, stats_pass
from dkm.errors import InvalidDataError
from dkm.kernels.expectation import centred
from dkm.kernels.init import (
    candidate_capacity,
    min_sq_distances,
    recluster,
    round_seed,
)
from dkm.kernels.params import MixtureParams
from dkm.stats import CandidateSample, DataSummary, WeightedSample, _top_order

F64 = NDArray[np.float64]

#: Weighted Lloyd steps on the candidates after weighted k-means++ (at most; they stop
#: when no label changes).
LLOYD_STEPS = 100
#: Independent weighted k-means++ + Lloyd runs on the candidates; the cheapest wins.
RECLUSTER_TRIALS = 5
#: Rounds after ``n_rounds`` while there are fewer than k distinct candidates (at most).
MAX_EXTRA_ROUNDS = 100


def _effective(
    X: NDArray[Any], w: NDArray[Any] | None, origin: F64, drop: bool
) -> tuple[NDArray[Any], NDArray[Any]]:
    """The chunk with rows of NaN/inf at zero weight (nan_policy drop), and its weights."""
    if drop:
        X, w, _ = without_nonfinite(X, w, origin)
    return X, np.ones(X.shape[0]) if w is None else np.asarray(w, np.float64)


def _first_chunk(
    X: NDArray[Any],
    w: NDArray[Any] | None,
    *,
    origin: F64,
    row_offset: int,
    seed: int,
    drop_nonfinite: bool,
) -> WeightedSample:
    X, weights = _effective(X, w, origin, drop_nonfinite)
    return WeightedSample.from_chunk(1, X, weights, row_offset, seed)


def _round_chunk(
    X: NDArray[Any],
    w: NDArray[Any] | None,
    *,
    candidates: F64,
    origin: F64,
    oversampling: float,
    row_offset: int,
    seed: int,
    capacity: int,
    drop_nonfinite: bool,
) -> CandidateSample:
    X, weights = _effective(X, w, origin, drop_nonfinite)
    Xc = centred(X, origin, "identity")
    d2 = min_sq_distances(Xc, candidates)
    return CandidateSample.from_chunk(capacity, Xc, weights, d2, oversampling, row_offset, seed)


def _first_centre_pass(data: ChunkedData, seed: int, split_every: int) -> F64:
    weights_name = None if data.weights is None else data.weights.name
    token = tokenize(data.X.name, weights_name, data.origin, seed, data.nan_policy, split_every)
    sample = run_pass(
        data,
        partial(_first_chunk, seed=seed),
        name="dkm-kmpar-first",
        token=token,
        split_every=split_every,
        shared=(Shared("origin", "dkm-kmpar-origin", data.origin),),
        shared_nbytes=data.origin.nbytes,
    )
    if sample.rows.size == 0:
        raise InvalidDataError("k-means||: no point has positive sample_weight")
    return np.asarray(sample.points[0] - data.origin, np.float64)


def _round_pass(
    data: ChunkedData,
    candidates: F64,
    oversampling: float,
    seed: int,
    capacity: int,
    split_every: int,
) -> CandidateSample:
    weights_name = None if data.weights is None else data.weights.name
    token = tokenize(
        data.X.name,
        weights_name,
        candidates,
        data.origin,
        oversampling,
        seed,
        capacity,
        data.nan_policy,
        split_every,
    )
    return run_pass(
        data,
        partial(_round_chunk, oversampling=oversampling, seed=seed, capacity=capacity),
        name="dkm-kmpar-round",
        token=token,
        split_every=split_every,
        shared=(
            Shared("candidates", "dkm-kmpar-candidates", candidates),
            Shared("origin", "dkm-kmpar-origin", data.origin),
        ),
        shared_nbytes=candidates.nbytes + data.origin.nbytes,
    )


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def kmeans_parallel(
    data: ChunkedData,
    n_clusters: int,
    random_state: Any,
    *,
    oversampling_factor: float = 2.0,
    n_rounds: int = 5,
    split_every: int = 8,
    summary: DataSummary | None = None,
) -> F64:
    """k-means‖ initial centres, (n_clusters, d), relative to ``data.origin``.

    Parameters
    ----------
    data : the points (and weights); rows of zero weight, and rows of NaN/inf under
        ``nan_policy="drop"``, are never chosen.
    n_clusters : k.
    random_state : int, ``RandomState`` or None. The same value gives the same centres
        for any chunking, scheduler or cluster.
    oversampling_factor : ℓ/k; each round adds ``oversampling_factor · k`` candidates
        in expectation (Bahmani et al. use 0.5 to 10; 2 is Spark's and dask-ml's).
    n_rounds : sampling rounds (passes) after the first centre (the paper finds 5 ample).
    split_every : fan-in of the client's merges of the passes' results.
    summary : the data's :func:`~dkm.engine.passes.summarize` result, when there is one: its
        weighted sample provides the first centre (the row with the highest
        Efraimidis–Spirakis key, a draw proportional to weight), saving a pass.

    The candidates are weighted by the sample weight of the points nearest to them and
    reduced to k centres by greedy weighted k-means++ and at most ``LLOYD_STEPS``
    weighted Lloyd steps, ``RECLUSTER_TRIALS`` times from independent draws, keeping the
    lowest weighted cost on the candidates (client work only; on grid-blob benchmarks
    one trial misses a cluster in about one seed of four, five trials rarely do).

    **Fewer than k distinct candidates** after ``n_rounds`` (k close to the number of
    distinct points, or a small ``oversampling_factor``): more rounds of the same
    sampling, each one more pass, with ``l = max(oversampling_factor, 2)·k``, until
    there are k distinct candidates or the cost is zero (every point of positive weight
    is a candidate). A round that finds no new distinct candidate while there are fewer
    than k (in the extra rounds, or one that chose points: copies of candidates, whose
    cost is rounding) ends the sampling: every point is a candidate within rounding. If
    fewer than k candidates then carry weight, they all become centres (no reduction, no
    Lloyd step), completed by distinct candidates whose points went to a nearby
    candidate within rounding; if there are still fewer than k, the data has fewer than
    k distinct points of positive weight and the rest are copies of those centres, as
    k-means++ gives (:class:`~dkm.KMeans` then warns that it found fewer distinct
    clusters than n_clusters). Never random points.

    Raises ValueError for fewer rows than n_clusters and for bad parameters.
    """
    k = _check_int("n_clusters", n_clusters, 1)
    rounds = _check_int("n_rounds", n_rounds, 1)
    split_every = _check_int("split_every", split_every, 2)
    if (
        isinstance(oversampling_factor, bool)
        or not isinstance(oversampling_factor, numbers.Real)
        or not math.isfinite(oversampling_factor)
        or oversampling_factor <= 0
    ):
        raise ValueError(
            f"oversampling_factor must be a positive number, got {oversampling_factor!r}"
        )
    n = int(data.X.shape[0])
    if n < k:
        raise InvalidDataError(f"n_samples={n} should be >= n_clusters={k}.")
    if summary is not None and summary.n_positive < k:
        raise InvalidDataError(
            f"n_samples={summary.n_positive} (with positive sample_weight) should be >= "
            f"n_clusters={k}."
        )
    rng = check_random_state(random_state)
    seed = int(rng.randint(np.iinfo(np.int32).max))

    if summary is not None:
        sample = summary.sample
        if sample.rows.size == 0:
            raise ValueError("k-means||: the summary's sample is empty")
        first = int(_top_order(sample.keys, sample.rows)[0])
        c0 = np.asarray(sample.points[first] - data.origin, np.float64)
    else:
        c0 = _first_centre_pass(data, round_seed(seed, 0), split_every)

    ell = float(oversampling_factor) * k
    found: list[F64] = [c0[None, :]]
    exhausted = False  # every point of positive weight is a candidate
    r = 0
    distinct = 1
    while not exhausted:
        r += 1
        if r > rounds:
            if distinct >= k:
                break
            if r > rounds + MAX_EXTRA_ROUNDS:
                raise RuntimeError(
                    f"k-means||: {MAX_EXTRA_ROUNDS} extra rounds found fewer than "
                    f"n_clusters={k} distinct candidates"
                )
        ell_r = ell if r <= rounds else max(ell, 2.0 * k)
        capacity = candidate_capacity(ell_r)
        total = _round_pass(
            data, np.concatenate(found), ell_r, round_seed(seed, r), capacity, split_every
        )
        exhausted = not total.cost > 0.0
        if total.truncated:
            warnings.warn(
                f"k-means|| round {r} chose more than {capacity} points (expected about "
                f"{ell_r:.3g}); kept the {capacity} with the highest priority",
                RuntimeWarning,
                stacklevel=2,
            )
        chosen = total.points[total.chosen()]
        found.append(chosen)
        if distinct >= k:
            continue  # the count only grows: no need to count again
        before, distinct = distinct, _n_distinct(found)
        if distinct == before and (r > rounds or chosen.shape[0] > 0):
            # Points chosen again on candidates (within rounding) and no new one: every
            # point is a candidate already; the data has fewer than k distinct points.
            break
    candidates = np.concatenate(found)

    # one more pass: the weight of the points nearest to each candidate
    stats = stats_pass(
        data,
        MixtureParams.identity(candidates),
        PassOptions("hard", "none"),
        split_every=split_every,
    )
    positive = stats.nk > 0
    if np.count_nonzero(positive) >= k:
        return recluster(
            candidates[positive], stats.nk[positive], k, rng, LLOYD_STEPS, RECLUSTER_TRIALS
        )
    # Fewer than k candidates carry weight: all of them are centres. A distinct
    # candidate without weight (its own point went to a candidate within rounding)
    # still is a distinct data point and fills up the rest.
    centres = np.concatenate(
        [candidates[positive], _distinct_rows(candidates[~positive], candidates[positive])]
    )[:k]
    # Fewer than k distinct points of positive weight: the rest are duplicates, as
    # k-means++ gives; the k-means fit then warns and stops (its clusters stay empty).
    return centres[np.arange(k) % centres.shape[0]]


def _n_distinct(found: list[F64]) -> int:
    return int(np.unique(np.concatenate(found), axis=0).shape[0])


def _distinct_rows(points: F64, exclude: F64) -> F64:
    """The distinct rows of ``points`` (first occurrences, in order) not in ``exclude``."""
    seen = {tuple(p) for p in exclude}
    out = []
    for i, p in enumerate(points):  # the few candidates without weight, not the data
        key = tuple(p)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return points[out]
