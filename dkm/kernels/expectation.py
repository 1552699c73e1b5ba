"""E-step over one chunk: log-densities by GEMM, assignments, sufficient statistics.

NumPy/SciPy only; one chunk in, one :class:`~dkm.stats.SuffStats` out. All functions
assume validated input: ``X`` is 2-D, finite and already centred on the engine's
origin (``X − origin``), ``params`` are expressed in the same centred coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.special import logsumexp

from dkm._typing import Assignment, Moments
from dkm.kernels.params import MixtureParams, log_det_cholesky
from dkm.stats import FarthestPoints, SuffStats

F64 = NDArray[np.float64]
LOG_2PI = float(np.log(2.0 * np.pi))

#: Upper bound on the elements of the largest temporary a kernel makes per row block.
BLOCK_ELEMENTS = 1 << 22


def row_blocks(n: int, per_row: int) -> Iterator[slice]:
    """Slices of at most ``BLOCK_ELEMENTS // per_row`` rows (bounded temporaries)."""
    step = max(1, BLOCK_ELEMENTS // max(per_row, 1))
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
        if params.covariance_type == "identity":
            labels = nearest(X, params.means)
            # exact squared distances to the assigned centre, in X's dtype (as
            # scikit-learn), summed in float64
            diff = X - params.means.astype(X.dtype)[labels]
            dist = np.einsum("ij,ij->i", diff, diff).astype(np.float64)
            objective = float(w @ dist)
            if n_farthest:
                farthest = FarthestPoints.from_chunk(n_farthest, dist, X64, w, labels, row_offset)
        else:
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
    sxx: F64 | None
    if moments == "none":
        sxx = None
    elif moments == "full":
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
    elif moments == "tied":
        # Σ_k Σ_i w r (x − c_k)(x − c_k)ᵀ, using Σ_k r_ik = 1 for every row.
        S2 = X64.T @ (X64 * w[:, None])
        sxx = S2 - c.T @ S1 - S1.T @ c + (c.T * nk) @ c
    else:  # diag, spherical
        S2d = np.asarray(R @ (X64 * X64))
        sxx = S2d - 2.0 * c * S1 + nk[:, None] * c**2
        if moments == "spherical":
            sxx = sxx.sum(axis=1)
    return SuffStats(moments, nk, sx, sxx, objective, float(w.sum()), n, farthest)


def predict_labels(X: NDArray[Any], params: MixtureParams) -> NDArray[np.int64]:
    """Most likely component per row (nearest centre for identity)."""
    n = X.shape[0]
    cdtype = compute_dtype(X.dtype, params.covariance_type)
    out = np.empty(n, np.int64)
    for rows in row_blocks(n, _per_row(params, "none")):
        Xb = np.asarray(X[rows], dtype=cdtype)
        if params.covariance_type == "identity":
            out[rows] = nearest(Xb, params.means)
        else:
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
