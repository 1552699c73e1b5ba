"""Kernels on wide rows (d = 200 and 784): statistics against direct sums, block shapes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from dkm import covariance
from dkm.kernels import MixtureParams, estep, predict_labels
from dkm.kernels import expectation as E
from dkm.stats import SuffStats

TYPES = ("full", "tied", "diag", "spherical")


def wide_params(ct: str, k: int, d: int, seed: int, scale: float = 1.0) -> MixtureParams:
    """Random well-conditioned covariances of about ``scale`` times the identity."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3, size=(k, d))
    weights = rng.dirichlet(np.ones(k))
    A = rng.normal(size=(k, d, d)) / np.sqrt(d)
    full = scale * (A @ A.transpose(0, 2, 1) + np.eye(d))
    cov = {
        "full": full,
        "tied": full[0],
        "diag": np.diagonal(full, axis1=1, axis2=2).copy(),
        "spherical": np.diagonal(full, axis1=1, axis2=2).mean(axis=1),
    }[ct]
    pc = covariance.of(ct).precision_cholesky(cov)
    return MixtureParams(ct, weights, means, pc)


def direct_log_prob(params: MixtureParams, X: np.ndarray) -> np.ndarray:
    """``log π_k + log N(x | k)`` from each component's dense precision, one at a time."""
    k, d = params.n_components, params.n_features
    kind = covariance.of(params.covariance_type)
    cov = kind.as_full(kind.covariances(params.precisions_cholesky), k, d)
    out = np.empty((X.shape[0], k))
    for j in range(k):
        _sign, logdet = np.linalg.slogdet(cov[j])
        diff = X - params.means[j]
        maha = np.einsum("ij,ij->i", diff @ np.linalg.inv(cov[j]), diff)
        out[:, j] = np.log(params.weights[j]) - 0.5 * (d * np.log(2 * np.pi) + logdet + maha)
    return out


def direct_stats(X, w, resp, shift, moments):
    """``nk``, ``Σ w r (x − c)`` and the second moments of ``moments`` around ``c``."""
    R = resp * w[:, None]
    nk = R.sum(axis=0)
    diffs = [X - c for c in shift]
    sx = np.array([R[:, j] @ D for j, D in enumerate(diffs)])
    outer = np.array([(D * R[:, j, None]).T @ D for j, D in enumerate(diffs)])
    sxx = {
        "full": outer,
        "tied": outer.sum(axis=0),
        "diag": np.diagonal(outer, axis1=1, axis2=2),
        "spherical": np.trace(outer, axis1=1, axis2=2),
    }[moments]
    return nk, sx, sxx


def mixture_rows(params: MixtureParams, n: int, seed: int, spread: float) -> np.ndarray:
    """Rows near the components' means (``spread`` standard deviation)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, params.n_components, size=n)
    return params.means[labels] + spread * rng.normal(size=(n, params.n_features))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("assignment", ["soft", "hard"])
@pytest.mark.parametrize("ct", TYPES)
@pytest.mark.parametrize("d", [200, 784])
def test_wide_mixture_estep_matches_direct_sums(d, ct, assignment, dtype, monkeypatch):
    """Soft and hard E-steps at d = 200 and 784, weighted, rows read as float32 or
    float64 and centred on an origin as they are read, over several row blocks."""
    monkeypatch.setattr(E, "WIDE_BLOCK_BYTES", 1)  # blocks of MIN_BLOCK_ROWS rows
    k, n = 3, 300
    params = wide_params(ct, k, d, seed=d)
    rng = np.random.default_rng(1)
    origin = rng.normal(scale=20, size=d)
    X = (origin + mixture_rows(params, n, seed=2, spread=1.5)).astype(dtype)
    Xc = X.astype(np.float64) - origin
    w = rng.uniform(0, 2, size=n)
    shift = params.means + rng.normal(scale=0.1, size=params.means.shape)
    logp = direct_log_prob(params, Xc)
    if assignment == "hard":
        resp = np.eye(k)[logp.argmax(axis=1)]
        objective = float(w @ logp.max(axis=1))
    else:
        norm = logsumexp(logp, axis=1)
        resp = np.exp(logp - norm[:, None])
        objective = float(w @ norm)
    got = estep(
        X, params, assignment=assignment, moments=ct, shift=shift, sample_weight=w, origin=origin
    )
    nk, sx, sxx = direct_stats(Xc, w, resp, shift, ct)
    # float32 rows: the origin is subtracted from each row in float32 (the engine's
    # ``centred``) or, for full covariances, from the exact float64 value of the row
    rtol = 1e-9 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got.nk, nk, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(got.sx, sx, rtol=rtol, atol=rtol * np.abs(sx).max())
    np.testing.assert_allclose(got.sxx, sxx, rtol=rtol, atol=rtol * np.abs(sxx).max())
    assert got.objective == pytest.approx(objective, rel=rtol)
    assert got.n == pytest.approx(w.sum()) and got.count == n


@pytest.mark.parametrize("d", [200, 784])
def test_wide_full_estep_with_exact_zero_responsibilities(d, monkeypatch):
    """Well-separated components: most responsibilities are exactly zero and those
    rows are left out of a component's rank update; the sums are still the direct ones,
    and the farthest points are those of the lowest likelihood."""
    monkeypatch.setattr(E, "WIDE_BLOCK_BYTES", 1)
    k, n = 4, 600
    params = wide_params("full", k, d, seed=5, scale=0.01)
    X = mixture_rows(params, n, seed=6, spread=0.1)
    w = np.random.default_rng(7).uniform(0.5, 1.5, size=n)
    logp = direct_log_prob(params, X)
    norm = logsumexp(logp, axis=1)
    resp = np.exp(logp - norm[:, None])
    assert (resp == 0).mean() > 0.5  # the case this test is about
    got = estep(
        X,
        params,
        assignment="soft",
        moments="full",
        shift=params.means,
        sample_weight=w,
        n_farthest=3,
        row_offset=100,
    )
    nk, sx, sxx = direct_stats(X, w, resp, params.means, "full")
    np.testing.assert_allclose(got.nk, nk, rtol=1e-12)
    np.testing.assert_allclose(got.sx, sx, rtol=1e-9, atol=1e-9 * np.abs(sx).max())
    np.testing.assert_allclose(got.sxx, sxx, rtol=1e-9, atol=1e-9 * np.abs(sxx).max())
    assert got.objective == pytest.approx(float(w @ norm), rel=1e-12)
    worst = np.argsort(norm, kind="stable")[:3]
    assert got.farthest is not None
    np.testing.assert_array_equal(got.farthest.rows, worst + 100)
    np.testing.assert_allclose(got.farthest.points, X[worst])


def test_wide_full_moments_far_from_the_origin_are_exact():
    """Rows 1e6 away from the origin with unit spread: the E-step on the rows as they are
    (origin given) equals the one on the centred copy, to about float64's epsilon."""
    d, k, n = 200, 2, 400
    params = wide_params("full", k, d, seed=8)
    X = 1e6 + mixture_rows(params, n, seed=9, spread=1.0)
    origin = X.mean(axis=0)
    w = np.ones(n)
    kwargs = dict(assignment="soft", moments="full", shift=params.means, sample_weight=w)
    a = estep(X, params, **kwargs, origin=origin)
    b = estep(X - origin, params, **kwargs)
    np.testing.assert_allclose(a.nk, b.nk, rtol=1e-9)
    np.testing.assert_allclose(a.sxx, b.sxx, rtol=1e-9, atol=1e-9 * np.abs(b.sxx).max())
    assert a.objective == pytest.approx(b.objective, rel=1e-12)


@pytest.mark.parametrize("d", [200, 784])
def test_wide_full_estep_merges_no_block_statistics(d, monkeypatch):
    """The (k, d, d) moments are summed into one array per chunk: no per-block
    statistics merged (each a (k, d, d) addition), and blocks of at least
    MIN_BLOCK_ROWS rows."""
    merges = []
    original = SuffStats.merge
    monkeypatch.setattr(SuffStats, "merge", lambda a, b: merges.append(1) or original(a, b))
    params = wide_params("full", 3, d, seed=3)
    X = mixture_rows(params, 300, seed=4, spread=1.0)
    estep(X, params, assignment="soft", moments="full", shift=params.means)
    assert merges == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [200, 784])
def test_wide_kmeans_estep_matches_direct_sums(d, dtype):
    rng = np.random.default_rng(d)
    k, n = 16, 1000
    C = rng.normal(scale=2, size=(k, d))
    origin = rng.uniform(0, 100, size=d)
    X = (origin + C[rng.integers(0, k, size=n)] + rng.normal(size=(n, d))).astype(dtype)
    Xc = X.astype(np.float64) - origin
    w = rng.uniform(0.5, 1.5, size=n)
    params = MixtureParams.identity(C)
    got = estep(
        X,
        params,
        assignment="hard",
        moments="none",
        shift=C,
        sample_weight=w,
        origin=origin,
        n_farthest=4,
    )
    d2 = ((Xc[:, None, :] - C[None]) ** 2).sum(axis=2)
    labels = d2.argmin(axis=1)
    cdtype = E.compute_dtype(np.dtype(dtype), "identity")
    np.testing.assert_array_equal(predict_labels(E.centred(X, origin, "identity"), params), labels)
    np.testing.assert_allclose(got.nk, np.bincount(labels, w, minlength=k), rtol=1e-12)
    sx = np.array([(w[labels == j, None] * (Xc[labels == j] - C[j])).sum(0) for j in range(k)])
    rtol = 1e-4 if cdtype == np.float32 else 1e-10
    np.testing.assert_allclose(got.sx, sx, rtol=rtol, atol=rtol * np.abs(sx).max())
    dmin = d2.min(axis=1)
    assert got.objective == pytest.approx(float(w @ dmin), rel=1e-5 if rtol > 1e-9 else 1e-12)
    assert got.farthest is not None
    np.testing.assert_array_equal(got.farthest.rows, np.argsort(-dmin, kind="stable")[:4])


def test_wide_kmeans_blocks_are_sized_by_their_rows(monkeypatch):
    """At d = 784 the GEMM search's blocks hold about FUSED_BLOCK_ELEMENTS elements of
    rows and distances together (the block is re-read from cache), not k distances a
    row (26k rows of 784 features at k = 10)."""
    from dkm.kernels import _fused

    widths = []
    original = _fused.nearest_cols
    monkeypatch.setattr(
        _fused, "nearest_cols", lambda GT, *a: widths.append(GT.shape[1]) or original(GT, *a)
    )
    d, k = 784, 10
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, d)).astype(np.float32)
    estep(X, MixtureParams.identity(X[:k].astype(np.float64)), assignment="hard", moments="none")
    assert len(widths) > 1
    assert max(widths) * (d + k) <= E.FUSED_BLOCK_ELEMENTS


@pytest.mark.parametrize("ct", ["diag", "spherical"])
@pytest.mark.parametrize("limit", [None, np.inf], ids=["default", "gemm-only"])
def test_diagonal_log_densities_of_a_tight_far_component_stay_exact(ct, limit, monkeypatch):
    """A component of spread 1e-3 at 1e3 from the origin: its log-densities from the
    features' GEMM (``x²`` terms of 1e6 against differences of 1e-3) would lose most
    digits; the default limit keeps the exact differences for it, and the other
    component takes the GEMM."""
    if limit is not None:
        monkeypatch.setattr(E, "QUADRATIC_LIMIT", limit)
    rng = np.random.default_rng(12)
    d = 6
    means = np.stack([np.zeros(d), np.full(d, 1e3)])
    std = np.array([1.0, 1e-3])
    cov = {"diag": np.outer(std**2, np.ones(d)), "spherical": std**2}[ct]
    pc = covariance.of(ct).precision_cholesky(cov)
    params = MixtureParams(ct, np.array([0.5, 0.5]), means, pc)
    X = np.concatenate([rng.normal(size=(300, d)), 1e3 + 1e-3 * rng.normal(size=(300, d))])
    form = E.DiagonalQuadraticForm(params, np.log(params.weights))
    got = estep(X, params, assignment="soft", moments=ct, shift=means)
    logp = direct_log_prob(params, X)
    norm = logsumexp(logp, axis=1)
    exact = got.objective == pytest.approx(float(norm.sum()), rel=1e-12, abs=1e-9)
    if limit is None:
        np.testing.assert_array_equal(form.exact, [1])
        assert exact
    else:
        assert form.exact.size == 0
        assert not exact  # what the limit is for
