"""E-step over one chunk: log-densities by GEMM, assignments, sufficient statistics.

NumPy/SciPy only; one chunk in, one :class:`~dkm.stats.SuffStats` out. All functions
assume validated input: ``X`` is 2-D, finite and already centred on the engine's
origin (``X − origin``), ``params`` are expressed in the same centred coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.special import logsumexp

from dkm._typing import Assignment, Moments
from dkm.kernels.params import MixtureParams, log_det_cholesky
from dkm.stats import FarthestPoints, SuffStats, sxx_shape

F64 = NDArray[np.float64]
LOG_2PI = float(np.log(2.0 * np.pi))

#: Upper bound on the elements of the largest temporary a kernel makes per row block.
BLOCK_ELEMENTS = 1 << 22

#: Elements of the (rows, k) distance block of the fused k-means kernels: small enough
#: (1 MB in float32) that the compiled pass reads it back from cache, not from memory.
FUSED_BLOCK_ELEMENTS = 1 << 18


def row_blocks(n: int, per_row: int, elements: int = BLOCK_ELEMENTS) -> Iterator[slice]:
    """Slices of at most ``elements // per_row`` rows (bounded temporaries)."""
    step = max(1, elements // max(per_row, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def compute_dtype(dtype: np.dtype[Any], covariance_type: str) -> np.dtype[Any]:
    """float32 distances for float32 k-means (as scikit-learn); float64 otherwise."""
    if covariance_type == "identity" and dtype == np.float32:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def sq_distances(X: NDArray[Any], means: NDArray[Any]) -> NDArray[Any]:
    """‖x − μ_k‖² for all pairs via one GEMM, in X's dtype; (n, k), clipped at 0."""
    C = means.astype(X.dtype, copy=False)
    D = X @ C.T
    D *= -2.0
    D += (C * C).sum(axis=1)
    D += np.einsum("ij,ij->i", X, X)[:, None]
    np.maximum(D, 0.0, out=D)
    return D


def nearest(X: NDArray[Any], means: NDArray[Any]) -> NDArray[np.int64]:
    """Index of the closest centre: argmin of ``‖μ‖² − 2 x·μ`` (one GEMM, X's dtype)."""
    C = means.astype(X.dtype, copy=False)
    D = X @ (-2.0 * C).T  # the factor folded into the small operand: one pass fewer
    D += (C * C).sum(axis=1)
    return D.argmin(axis=1).astype(np.int64, copy=False)


def log_gaussian(X: F64, params: MixtureParams) -> F64:
    """``log N(x_i | μ_k, Σ_k)`` for all i, k; (n, k) float64.

    Mahalanobis terms come from GEMMs: the full type stacks all k precision-Cholesky
    factors into one (d, k·d) matrix so a single product serves every component.
    """
    n, d = X.shape
    means, pc, ct = params.means, params.precisions_cholesky, params.covariance_type
    k = means.shape[0]
    if ct == "identity":
        maha = sq_distances(X, means)
    elif ct == "full":
        assert pc is not None
        stacked = pc.transpose(1, 0, 2).reshape(d, k * d)
        shift = np.einsum("kd,kde->ke", means, pc)
        Y = (X @ stacked).reshape(n, k, d)
        Y -= shift
        maha = np.einsum("nkd,nkd->nk", Y, Y)
    elif ct == "tied":
        assert pc is not None
        Y = X @ pc
        M = means @ pc
        maha = np.empty((n, k))
        for j in range(k):  # k passes over an (n, d) block; the product above is the GEMM
            diff = Y - M[j]
            maha[:, j] = np.einsum("nd,nd->n", diff, diff)
    elif ct == "diag":
        assert pc is not None
        prec = pc**2
        maha = (X * X) @ prec.T - 2.0 * (X @ (means * prec).T) + (means**2 * prec).sum(axis=1)
    else:  # spherical
        assert pc is not None
        prec = pc**2
        x2 = np.einsum("ij,ij->i", X, X)[:, None]
        maha = (x2 - 2.0 * (X @ means.T) + (means**2).sum(axis=1)) * prec
    return -0.5 * (d * LOG_2PI + maha) + log_det_cholesky(pc, ct, d)


def weighted_log_prob(X: F64, params: MixtureParams) -> F64:
    """``log π_k + log N(x_i | k)``; (n, k)."""
    return log_gaussian(X, params) + np.log(params.weights)


def _per_row(params: MixtureParams, moments: Moments) -> int:
    k, d = params.n_components, params.n_features
    width = k * d if params.covariance_type in ("full", "tied") else k + d
    return max(width, 2 * d if moments == "full" else d)


def estep(
    X: NDArray[Any],
    params: MixtureParams,
    *,
    assignment: Assignment,
    moments: Moments,
    shift: F64 | None = None,
    sample_weight: NDArray[Any] | None = None,
    n_farthest: int = 0,
    row_offset: int = 0,
) -> SuffStats:
    """Sufficient statistics of one chunk under ``params``.

    Parameters
    ----------
    X : (n, d) centred points (float32 or float64).
    params : current parameters (centred coordinates).
    assignment : ``hard`` (each point to its most likely component) or ``soft``.
    moments : second moments to accumulate (``none`` for k-means).
    shift : (k, d) centres the moments are taken around; None for zero.
    sample_weight : (n,) non-negative weights, or None for ones.
    n_farthest : keep this many points for re-seeding: farthest from their centre
        (k-means) or with the lowest likelihood (mixtures).
    row_offset : global index of the chunk's first row.
    """
    n, d = X.shape
    k = params.n_components
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if params.covariance_type == "identity" and assignment == "hard":
        return _kmeans_estep(X, params, moments, shift, w, n_farthest, row_offset)
    total = SuffStats.zero(k, d, moments, n_farthest)
    cdtype = compute_dtype(X.dtype, params.covariance_type)
    for rows in row_blocks(n, _per_row(params, moments)):
        Xb = np.asarray(X[rows], dtype=cdtype)
        total = total.merge(
            _estep_block(
                Xb, params, assignment, moments, shift, w[rows], n_farthest, row_offset + rows.start
            )
        )
    return total


def _fused() -> ModuleType:
    """The compiled k-means row passes (numba is imported on first use, not with dkm)."""
    from dkm.kernels import _fused

    return _fused


def _kmeans_estep(
    X: NDArray[Any],
    params: MixtureParams,
    moments: Moments,
    shift: F64 | None,
    w: F64,
    n_farthest: int,
    row_offset: int,
) -> SuffStats:
    """The hard E-step of identity covariances (k-means): GEMM, then one fused pass.

    Per block of rows: ``G = X @ (−2C)ᵀ`` by BLAS in the compute dtype (float32 stays
    float32), then :func:`dkm.kernels._fused.kmeans_rows` takes the argmin of
    ``G + ‖c‖²`` (the labels of :func:`nearest`, lowest index on ties), the squared
    distance to the chosen centre from the exact differences (summed in float64), and
    accumulates ``nk``, ``Σ w x`` and the farthest-point candidates in float64. The
    rows are not copied to float64 unless second moments are asked for.
    """
    n, d = X.shape
    k = params.n_components
    cdtype = compute_dtype(X.dtype, "identity")
    w = np.ascontiguousarray(w, np.float64)
    C = np.ascontiguousarray(params.means, dtype=cdtype)
    neg2CT = (-2.0 * C).T  # as in nearest(): the same GEMM, so the same labels
    c2 = (C * C).sum(axis=1)
    labels = np.empty(n, np.int64)
    nk, s1, objective = np.zeros(k), np.zeros((k, d)), np.zeros(1)
    heap_d, heap_n = np.empty(n_farthest), np.zeros(1, np.int64)
    heap_r, heap_l = np.empty(n_farthest, np.int64), np.empty(n_farthest, np.int64)
    kernel = _fused().kmeans_rows
    for rows in row_blocks(n, k, FUSED_BLOCK_ELEMENTS):
        Xb = np.ascontiguousarray(X[rows], dtype=cdtype)
        G = Xb @ neg2CT
        kernel(
            Xb,
            G,
            c2,
            C,
            w[rows],
            row_offset + rows.start,
            labels[rows],
            nk,
            s1,
            objective,
            heap_d,
            heap_r,
            heap_l,
            heap_n,
        )
    c = np.zeros((k, d)) if shift is None else shift
    sx = s1 - nk[:, None] * c
    sxx = None
    if moments != "none":  # second moments around c: float64 rows, bounded blocks
        raw = np.zeros(_raw_shape(moments, k, d))
        for rows in row_blocks(n, _per_row(params, moments)):
            X64 = np.asarray(X[rows], np.float64)
            ids = np.arange(X64.shape[0])
            R = sparse.csr_array((w[rows], (labels[rows], ids)), shape=(k, X64.shape[0]))
            raw += _raw_moments(X64, labels[rows], R, w[rows], c, moments)
        sxx = _moments_around(raw, s1, nk, c, moments)
    farthest = None
    if n_farthest:
        m = int(heap_n[0])
        order = np.lexsort((heap_r[:m], -heap_d[:m]))  # farthest first, ties by row
        rows_kept = heap_r[:m][order]
        local = rows_kept - row_offset
        farthest = FarthestPoints(
            n_farthest,
            heap_d[:m][order],
            rows_kept,
            np.asarray(X[local], np.float64),
            w[local],
            heap_l[:m][order],
        )
    return SuffStats(moments, nk, sx, sxx, float(objective[0]), float(w.sum()), n, farthest)


def _estep_block(
    X: NDArray[Any],
    params: MixtureParams,
    assignment: Assignment,
    moments: Moments,
    shift: F64 | None,
    w: F64,
    n_farthest: int,
    row_offset: int,
) -> SuffStats:
    n, d = X.shape
    k = params.n_components
    X64 = np.asarray(X, np.float64)
    farthest = None
    if assignment == "hard":
        wlp = weighted_log_prob(X64, params)
        labels = wlp.argmax(axis=1)
        best = wlp[np.arange(n), labels]
        objective = float(w @ best)
        if n_farthest:  # the points the model explains worst, for re-seeding
            farthest = FarthestPoints.from_chunk(n_farthest, -best, X64, w, labels, row_offset)
        R: Any = sparse.csr_array((w, (labels, np.arange(n))), shape=(k, n))
        nk = np.bincount(labels, weights=w, minlength=k).astype(np.float64)
    else:
        wlp = weighted_log_prob(X64, params)
        norm = logsumexp(wlp, axis=1)
        objective = float(w @ norm)
        if n_farthest:  # the points the model explains worst, for re-seeding
            worst_labels = wlp.argmax(axis=1)
            farthest = FarthestPoints.from_chunk(
                n_farthest, -norm, X64, w, worst_labels, row_offset
            )
        resp = np.exp(wlp - norm[:, None])
        resp *= w[:, None]
        R = resp.T
        nk = resp.sum(axis=0)
        labels = None
    S1 = np.asarray(R @ X64)  # (k, d): Σ w r x
    c = np.zeros((k, d)) if shift is None else shift
    sx = S1 - nk[:, None] * c
    sxx = None
    if moments != "none":
        sxx = _moments_around(_raw_moments(X64, labels, R, w, c, moments), S1, nk, c, moments)
    return SuffStats(moments, nk, sx, sxx, objective, float(w.sum()), n, farthest)


def _raw_shape(moments: Moments, k: int, d: int) -> tuple[int, ...]:
    """Shape of :func:`_raw_moments` (diag and spherical are both per feature)."""
    return (k, d) if moments in ("diag", "spherical") else sxx_shape(moments, k, d) or ()


def _raw_moments(
    X64: F64, labels: NDArray[np.int64] | None, R: Any, w: F64, c: F64, moments: Moments
) -> F64:
    """The additive part of the second moments over some rows.

    full: ``Σ w r (x − c_k)(x − c_k)ᵀ`` per component; tied: ``Σ w x xᵀ``; diag and
    spherical: ``Σ w r x²`` per component and feature. ``R`` is the (k, n) matrix of
    weighted responsibilities; with hard ``labels`` the full moments use them instead.
    """
    k, d = c.shape
    if moments == "full":
        sxx = np.empty((k, d, d))
        if labels is not None:
            order = np.argsort(labels, kind="stable")
            bounds = np.searchsorted(labels[order], np.arange(k + 1))
        for j in range(k):  # one (d × n_j) @ (n_j × d) GEMM per component
            if labels is not None:
                idx = order[bounds[j] : bounds[j + 1]]
                diff = X64[idx] - c[j]
                sxx[j] = (diff * w[idx, None]).T @ diff
            else:
                diff = X64 - c[j]
                sxx[j] = (diff * R[j][:, None]).T @ diff
        return sxx
    if moments == "tied":
        return np.asarray(X64.T @ (X64 * w[:, None]))
    return np.asarray(R @ (X64 * X64))  # diag, spherical


def _moments_around(raw: F64, S1: F64, nk: F64, c: F64, moments: Moments) -> F64:
    """Second moments around ``c_k`` from :func:`_raw_moments` and the totals ``S1, nk``."""
    if moments == "full":
        return raw
    if moments == "tied":
        # Σ_k Σ_i w r (x − c_k)(x − c_k)ᵀ, using Σ_k r_ik = 1 for every row.
        return np.asarray(raw - c.T @ S1 - S1.T @ c + (c.T * nk) @ c)
    sxx = raw - 2.0 * c * S1 + nk[:, None] * c**2
    return np.asarray(sxx.sum(axis=1) if moments == "spherical" else sxx)


def predict_labels(X: NDArray[Any], params: MixtureParams) -> NDArray[np.int64]:
    """Most likely component per row (nearest centre for identity)."""
    n = X.shape[0]
    cdtype = compute_dtype(X.dtype, params.covariance_type)
    out = np.empty(n, np.int64)
    if params.covariance_type == "identity":  # nearest(), with the argmin compiled
        C = np.ascontiguousarray(params.means, dtype=cdtype)
        neg2CT, c2 = (-2.0 * C).T, (C * C).sum(axis=1)
        kernel = _fused().nearest_rows
        for rows in row_blocks(n, C.shape[0], FUSED_BLOCK_ELEMENTS):
            kernel(np.asarray(X[rows], dtype=cdtype) @ neg2CT, c2, out[rows])
        return out
    for rows in row_blocks(n, _per_row(params, "none")):
        Xb = np.asarray(X[rows], dtype=cdtype)
        out[rows] = weighted_log_prob(Xb, params).argmax(axis=1)
    return out


def score_samples(X: NDArray[Any], params: MixtureParams) -> F64:
    """``log p(x_i)`` per row; (n,)."""
    return np.asarray(logsumexp(weighted_log_prob(np.asarray(X, np.float64), params), axis=1))


def predict_proba(X: NDArray[Any], params: MixtureParams) -> F64:
    """Responsibilities; (n, k), rows sum to 1."""
    wlp = weighted_log_prob(np.asarray(X, np.float64), params)
    return np.asarray(np.exp(wlp - logsumexp(wlp, axis=1)[:, None]))


def distances(X: NDArray[Any], params: MixtureParams) -> NDArray[Any]:
    """Euclidean distance to every centre; (n, k) in the compute dtype."""
    cdtype = compute_dtype(X.dtype, "identity")
    return np.sqrt(sq_distances(np.asarray(X, cdtype), params.means))


def inertia(X: NDArray[Any], params: MixtureParams, sample_weight: NDArray[Any] | None) -> float:
    """``Σ w ‖x − μ_label‖²`` with labels from :func:`predict_labels`."""
    labels = predict_labels(X, params)
    diff = np.asarray(X, np.float64) - params.means[labels]
    dist = np.einsum("ij,ij->i", diff, diff)
    return float(dist.sum() if sample_weight is None else np.asarray(sample_weight) @ dist)
