"""Tier 1: chunk kernels against naive references (loops, SciPy densities)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from dkm import covariance
from dkm.kernels import (
    DegenerateComponentError,
    MixtureParams,
    estep,
    gaussian_mstep,
    kmeans_centres,
    log_gaussian,
    predict_labels,
)
from dkm.stats import SuffStats

TYPES = ["full", "tied", "diag", "spherical"]


def random_params(
    ct: str, k: int = 3, d: int = 4, seed: int = 0
) -> tuple[MixtureParams, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3, size=(k, d))
    weights = rng.dirichlet(np.ones(k))
    if ct == "identity":
        return MixtureParams.identity(means), np.broadcast_to(np.eye(d), (k, d, d))
    A = rng.normal(size=(k, d, d))
    full = A @ A.transpose(0, 2, 1) + d * np.eye(d)
    cov = {
        "full": full,
        "tied": full[0],
        "diag": np.diagonal(full, axis1=1, axis2=2).copy(),
        "spherical": np.diagonal(full, axis1=1, axis2=2).mean(axis=1),
    }[ct]
    dense = {
        "full": full,
        "tied": np.broadcast_to(full[0], (k, d, d)),
        "diag": np.array([np.diag(c) for c in cov]) if ct == "diag" else None,
        "spherical": np.array([c * np.eye(d) for c in cov]) if ct == "spherical" else None,
    }[ct]
    pc = covariance.of(ct).precision_cholesky(cov)
    return MixtureParams(ct, weights, means, pc), dense


@pytest.mark.parametrize("ct", [*TYPES, "identity"])
def test_log_gaussian_matches_scipy(ct):
    params, dense = random_params(ct)
    X = np.random.default_rng(1).normal(scale=3, size=(50, 4))
    got = log_gaussian(X, params)
    ref = np.column_stack(
        [multivariate_normal(params.means[j], dense[j]).logpdf(X) for j in range(3)]
    )
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def naive_log_prob(params, dense, X):
    """``log π_k + log N(x | k)`` by SciPy, component by component."""
    return np.column_stack(
        [
            np.log(params.weights[j]) + multivariate_normal(params.means[j], dense[j]).logpdf(X)
            for j in range(params.n_components)
        ]
    )


def naive_stats(X, w, resp, shift, moments):
    k, _d = shift.shape
    nk = np.array([sum(w[i] * resp[i, j] for i in range(len(X))) for j in range(k)])
    sx = np.array(
        [sum(w[i] * resp[i, j] * (X[i] - shift[j]) for i in range(len(X))) for j in range(k)]
    )
    outer = np.array(
        [
            [w[i] * resp[i, j] * np.outer(X[i] - shift[j], X[i] - shift[j]) for i in range(len(X))]
            for j in range(k)
        ]
    ).sum(axis=1)
    sxx = {
        "full": outer,
        "tied": outer.sum(axis=0),
        "diag": np.diagonal(outer, axis1=1, axis2=2),
        "spherical": np.trace(outer, axis1=1, axis2=2),
        "none": None,
    }[moments]
    return nk, sx, sxx


@pytest.mark.parametrize("assignment", ["hard", "soft"])
@pytest.mark.parametrize("ct", TYPES)
def test_estep_statistics_match_naive_sums(ct, assignment):
    params, dense = random_params(ct)
    rng = np.random.default_rng(2)
    X = rng.normal(scale=3, size=(40, 4))
    w = rng.uniform(0, 2, size=40)
    shift = params.means + rng.normal(scale=0.1, size=params.means.shape)
    logp = naive_log_prob(params, dense, X)
    if assignment == "hard":
        resp = np.eye(3)[logp.argmax(axis=1)]
        objective = float(w @ logp.max(axis=1))
    else:
        norm = np.log(np.exp(logp).sum(axis=1))
        resp = np.exp(logp - norm[:, None])
        objective = float(w @ norm)
    got = estep(X, params, assignment=assignment, moments=ct, shift=shift, sample_weight=w)
    nk, sx, sxx = naive_stats(X, w, resp, shift, ct)
    np.testing.assert_allclose(got.nk, nk, rtol=1e-12)
    np.testing.assert_allclose(got.sx, sx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.sxx, sxx, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got.objective, objective, rtol=1e-12)
    assert got.n == pytest.approx(w.sum()) and got.count == 40


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kmeans_estep_matches_naive(dtype):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 3)).astype(dtype)
    C = rng.normal(size=(5, 3))
    w = rng.uniform(0.5, 1.5, size=200)
    got = estep(
        X,
        MixtureParams.identity(C),
        assignment="hard",
        moments="none",
        sample_weight=w,
        n_farthest=4,
        row_offset=10,
    )
    d2 = ((X[:, None, :].astype(float) - C[None]) ** 2).sum(axis=2)
    labels = d2.argmin(axis=1)
    np.testing.assert_array_equal(predict_labels(X, MixtureParams.identity(C)), labels)
    np.testing.assert_allclose(got.nk, np.bincount(labels, w, minlength=5), rtol=1e-12)
    sums = np.array([(w[labels == j, None] * X[labels == j]).sum(axis=0) for j in range(5)])
    np.testing.assert_allclose(got.sx, sums, rtol=1e-6 if dtype == np.float32 else 1e-12)
    dmin = d2.min(axis=1)
    np.testing.assert_allclose(got.objective, w @ dmin, rtol=1e-6)
    far = np.argsort(-dmin, kind="stable")[:4]
    assert got.farthest is not None
    np.testing.assert_array_equal(got.farthest.rows, far + 10)
    np.testing.assert_array_equal(got.farthest.labels, labels[far])


def test_estep_on_empty_chunk_is_zero():
    params, _ = random_params("full")
    got = estep(np.empty((0, 4)), params, assignment="soft", moments="full")
    assert got.count == 0 and got.n == 0 and not got.nk.any()


@pytest.mark.parametrize("ct", TYPES)
def test_mstep_matches_direct_estimates(ct):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 3)) * [1, 2, 3] + [5, -1, 2]
    resp = rng.dirichlet(np.ones(2), size=300)
    shift = rng.normal(size=(2, 3))
    params = MixtureParams.identity(shift)
    # build statistics exactly as a soft pass would, from known responsibilities
    nk, sx, sxx = naive_stats(X, np.ones(300), resp, shift, ct)
    stats = SuffStats(ct, nk, sx, sxx, 0.0, 300.0, 300)
    new, cov, _ = gaussian_mstep(stats, params.means, ct, reg_covar=1e-6)
    means = resp.T @ X / resp.sum(axis=0)[:, None]
    np.testing.assert_allclose(new.means, means, rtol=1e-12)
    np.testing.assert_allclose(new.weights, resp.sum(axis=0) / 300, rtol=1e-12)
    covs = np.array([np.cov(X.T, aweights=resp[:, j], bias=True) for j in range(2)])
    expected = {
        "full": covs + 1e-6 * np.eye(3),
        "tied": (covs * resp.sum(axis=0)[:, None, None]).sum(axis=0) / 300 + 1e-6 * np.eye(3),
        "diag": np.diagonal(covs, axis1=1, axis2=2) + 1e-6,
        "spherical": np.diagonal(covs, axis1=1, axis2=2).mean(axis=1) + 1e-6,
    }[ct]
    np.testing.assert_allclose(cov, expected, rtol=1e-10)


def test_far_from_origin_covariance_is_exact():
    """1e6 + N(0, 1): moments around the previous means keep the variance."""
    rng = np.random.default_rng(5)
    Z = rng.normal(size=(5000, 2))
    X = Z + 1e6
    shift = np.full((1, 2), 1e6 + 0.3)  # previous mean, not exactly the mean
    stats = estep(X, MixtureParams.identity(shift), assignment="hard", moments="full", shift=shift)
    _, cov, _ = gaussian_mstep(stats, shift, "full", reg_covar=0.0)
    # X itself carries ~1e-10 rounding (the ulp of 1e6): compare at that scale
    np.testing.assert_allclose(cov[0], np.cov(X.T, bias=True), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cov[0], np.cov(Z.T, bias=True), rtol=1e-6, atol=1e-8)


def test_degenerate_component_names_component_and_remedy():
    stats = SuffStats(
        "full", np.array([5.0, 0.0]), np.zeros((2, 2)), np.zeros((2, 2, 2)), 0.0, 5.0, 5
    )
    with pytest.raises(DegenerateComponentError, match=r"component\(s\) 1: no points") as e:
        gaussian_mstep(stats, np.zeros((2, 2)), "full", 1e-6)
    assert "reg_covar" in str(e.value) and e.value.components == [1]
    # a rank-deficient covariance without regularisation
    sxx = np.array([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]) * 5
    stats = SuffStats("full", np.array([5.0, 5.0]), np.zeros((2, 2)), sxx, 0.0, 10.0, 10)
    with pytest.raises(DegenerateComponentError, match=r"component.*0: covariance is not positive"):
        gaussian_mstep(stats, np.zeros((2, 2)), "full", 0.0)


def test_empty_kmeans_cluster_is_reseeded_from_farthest_point():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [5.0, 5.0]])
    C = np.array([[0.0, 0.0], [100.0, 100.0]])  # cluster 1 gets nothing
    stats = estep(X, MixtureParams.identity(C), assignment="hard", moments="none", n_farthest=2)
    centres, reseeded = kmeans_centres(stats)
    assert reseeded == [1]
    np.testing.assert_allclose(centres[1], [10.0, 10.0])  # the farthest point
    np.testing.assert_allclose(centres[0], X[[0, 1, 2, 4]].mean(axis=0))
    assert np.all(np.isfinite(centres))


def test_kmeans_without_candidates_raises():
    X = np.zeros((1, 2))  # one point cannot fill two clusters
    C = np.array([[0.0, 0.0], [1.0, 1.0]])
    stats = estep(X, MixtureParams.identity(C), assignment="hard", moments="none", n_farthest=2)
    with pytest.raises(ValueError, match="cluster 1 is empty"):
        kmeans_centres(stats)


@pytest.mark.parametrize("limit", [0.0, None, np.inf], ids=["exact", "default", "raw"])
@pytest.mark.parametrize("block", [None, 1 << 8], ids=["default-blocks", "tiny-blocks"])
def test_soft_full_moments_match_naive_on_every_path(limit, block, monkeypatch):
    """Second moments from ``R Z`` (raw path), from the exact differences, or chosen
    per component, over one block or many: all equal the naive sums."""
    from dkm.kernels import expectation as E

    if limit is not None:
        monkeypatch.setattr(E, "CANCELLATION_LIMIT", limit)
    if block is not None:
        monkeypatch.setattr(E, "SOFT_BLOCK_ELEMENTS", block)
    params, dense = random_params("full", k=4, d=5, seed=7)
    rng = np.random.default_rng(8)
    X = rng.normal(scale=3, size=(301, 5))
    w = rng.uniform(0, 2, size=301)
    shift = params.means + rng.normal(scale=0.1, size=params.means.shape)
    logp = naive_log_prob(params, dense, X)
    norm = np.log(np.exp(logp).sum(axis=1))
    resp = np.exp(logp - norm[:, None])
    got = estep(X, params, assignment="soft", moments="full", shift=shift, sample_weight=w)
    nk, sx, sxx = naive_stats(X, w, resp, shift, "full")
    np.testing.assert_allclose(got.nk, nk, rtol=1e-12)
    np.testing.assert_allclose(got.sx, sx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.sxx, sxx, rtol=1e-10, atol=1e-9)
    assert got.objective == pytest.approx(float(w @ norm), rel=1e-12)


@pytest.mark.parametrize("limit", [None, np.inf], ids=["default", "raw-only"])
def test_soft_full_moments_of_a_tight_far_component_are_exact(limit, monkeypatch):
    """A component of spread 1e-3 at distance 1e3 from the origin: raw sums would cancel
    12 digits; the default limit sums that component from exact differences instead."""
    from dkm.kernels import expectation as E

    if limit is not None:
        monkeypatch.setattr(E, "CANCELLATION_LIMIT", limit)
    rng = np.random.default_rng(9)
    near = rng.normal(size=(400, 3))
    far = 1e3 + 1e-3 * rng.normal(size=(400, 3))
    X = np.vstack([near, far])
    means = np.array([np.zeros(3), np.full(3, 1e3)])
    cov = np.array([np.eye(3), 1e-6 * np.eye(3)])
    params = MixtureParams(
        "full", np.array([0.5, 0.5]), means, covariance.FULL.precision_cholesky(cov)
    )
    got = estep(X, params, assignment="soft", moments="full", shift=means)
    ref = np.cov((far - 1e3).T, bias=True) * 400 + 400 * np.outer(
        far.mean(axis=0) - 1e3, far.mean(axis=0) - 1e3
    )
    error = np.abs(got.sxx[1] - ref).max() / np.abs(ref).max()
    logp = np.column_stack(
        [np.log(0.5) + multivariate_normal(means[j], cov[j]).logpdf(X) for j in range(2)]
    )
    objective = float(np.log(np.exp(logp).sum(axis=1)).sum())
    objective_error = abs(got.objective - objective) / abs(objective)
    if limit is None:
        assert error < 1e-7, error  # the exact differences err by ~7e-9 here
        assert objective_error < 1e-12
    else:  # the raw path alone is visibly wrong here: the fallback is what fixes it
        assert error > 1e-6


@pytest.mark.parametrize("limit", [None, 120.0, -1.0], ids=["all-gemm", "mixed", "all-exact"])
def test_full_log_density_from_features_matches_scipy(limit, monkeypatch):
    """``F(x) @ W + const`` (the expanded quadratic form) equals SciPy's log-pdf; the
    components over the limit take the exact differences instead, the others the GEMM."""
    from dkm.kernels import expectation as E

    if limit is not None:
        monkeypatch.setattr(E, "QUADRATIC_LIMIT", limit)
    params, dense = random_params("full", k=5, d=4, seed=3)
    X = np.random.default_rng(4).normal(scale=3, size=(200, 4))
    offset = np.log(params.weights)
    form = E.QuadraticForm(params, offset)
    P = params.precisions_cholesky
    sigma = np.sqrt(np.diagonal(dense, axis1=1, axis2=2))
    reach = np.abs(params.means) + E.QUADRATIC_SPREAD * sigma
    scale = np.einsum("ka,kab,kb->k", reach, np.abs(P @ P.transpose(0, 2, 1)), reach)
    expected_exact = np.flatnonzero(scale > (E.QUADRATIC_LIMIT if limit is None else limit))
    np.testing.assert_array_equal(form.exact, expected_exact)
    if limit == 120.0:
        assert 0 < form.exact.size < 5  # the seed gives both kinds
    assert form.useful == (form.exact.size < 5)
    got = form.log_density(X, E._full_features(X, E.Workspace()), E.Workspace())
    np.testing.assert_allclose(got, naive_log_prob(params, dense, X), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("limit", [None, np.inf], ids=["default", "features-only"])
def test_elongated_component_keeps_exact_log_densities(limit, monkeypatch):
    """Variances 1e-8 and 1 along (1, 1) and (1, −1), mean 30·(1, −1): μᵀΛμ is only
    1800, but Λ's entries (~5e7) cancel, and the expansion errs by ~7e-6 near μ (the
    exact differences by ~7e-9); the limit is on |μ|ᵀ|Λ||μ| (~1.8e11), so the component
    keeps the exact differences."""
    from dkm.kernels import expectation as E

    if limit is not None:
        monkeypatch.setattr(E, "QUADRATIC_LIMIT", limit)
    R = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0)
    cov = np.array([R @ np.diag([1e-8, 1.0]) @ R.T, np.eye(2)])
    means = np.array([[30.0, -30.0], [0.0, 0.0]])
    params = MixtureParams(
        "full", np.array([0.5, 0.5]), means, covariance.FULL.precision_cholesky(cov)
    )
    rng = np.random.default_rng(5)
    X = rng.multivariate_normal(means[0], cov[0], size=500)
    form = E.QuadraticForm(params, np.zeros(2))
    got = form.log_density(X, E._full_features(X, E.Workspace()), E.Workspace())[:, 0]
    ref = multivariate_normal(means[0], cov[0]).logpdf(X)
    error = np.abs(got - ref).max()
    if limit is None:
        np.testing.assert_array_equal(form.exact, [0])
        assert error < 1e-7, error  # the exact differences err by ~7e-9 here
    else:  # the expansion alone is visibly off here: the limit is what fixes it
        assert form.exact.size == 0 and error > 1e-6, error


@pytest.mark.parametrize("limit", [None, np.inf], ids=["default", "features-only"])
def test_elongated_component_at_the_origin_keeps_exact_log_densities(limit, monkeypatch):
    """μ = 0, variances 1e4, 1, 1, 1e-6 along rotated axes: μᵀΛμ = 0, but rows reach
    ~300 along the long axis while Λ's entries are ~1e6, and the expansion errs by far
    more than the exact differences there; the limit counts the rows' reach, so the
    component stays exact."""
    from dkm.kernels import expectation as E

    if limit is not None:
        monkeypatch.setattr(E, "QUADRATIC_LIMIT", limit)
    rng = np.random.default_rng(6)
    Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    cov = np.array([Q @ np.diag([1e4, 1.0, 1.0, 1e-6]) @ Q.T, np.eye(4)])
    means = np.zeros((2, 4))
    params = MixtureParams(
        "full", np.array([0.5, 0.5]), means, covariance.FULL.precision_cholesky(cov)
    )
    X = Q @ (np.sqrt([1e4, 1.0, 1.0, 1e-6])[:, None] * rng.normal(size=(4, 2000)))
    X = np.ascontiguousarray(X.T)
    form = E.QuadraticForm(params, np.zeros(2))
    got = form.log_density(X, E._full_features(X, E.Workspace()), E.Workspace())[:, 0]
    # reference from the same P, in extended precision: −½(d log 2π + ‖xᵀP‖²) + log det P
    P = params.precisions_cholesky[0].astype(np.longdouble)
    y = X.astype(np.longdouble) @ P
    ref = -0.5 * (4 * np.log(2 * np.pi) + (y * y).sum(axis=1)) + np.log(np.diag(P)).sum()
    error = float(np.abs(got - ref).max())
    if limit is None:
        np.testing.assert_array_equal(form.exact, [0])
        assert error < 1e-10, error  # ~7e-12 here; the expansion: ~6e-7
    else:  # the expansion alone is visibly off here: the limit is what fixes it
        assert form.exact.size == 0 and error > 1e-8, error


def test_soft_full_estep_same_from_features_or_exact_differences(monkeypatch):
    """The E-step's statistics do not depend on which way the log-densities were taken."""
    from dkm.kernels import expectation as E

    params, _ = random_params("full", k=4, d=6, seed=11)
    rng = np.random.default_rng(12)
    X = rng.normal(scale=3, size=(5000, 6))
    w = rng.uniform(0, 2, size=5000)
    kw = {"assignment": "soft", "moments": "full", "shift": params.means, "sample_weight": w}
    assert E.QuadraticForm(params, np.log(params.weights)).exact.size == 0
    quadratic = estep(X, params, **kw, n_farthest=5)
    monkeypatch.setattr(E, "QUADRATIC_LIMIT", -1.0)
    exact = estep(X, params, **kw, n_farthest=5)
    np.testing.assert_allclose(quadratic.nk, exact.nk, rtol=1e-11)
    np.testing.assert_allclose(quadratic.sx, exact.sx, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(quadratic.sxx, exact.sxx, rtol=1e-11)
    assert quadratic.objective == pytest.approx(exact.objective, rel=1e-13)
    assert quadratic.farthest is not None and exact.farthest is not None
    np.testing.assert_array_equal(quadratic.farthest.rows, exact.farthest.rows)


@pytest.mark.parametrize("ct", [*TYPES, "identity"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_estep_centring_rows_as_read_equals_centred_copy(ct, dtype):
    """``estep(X, origin=o)`` is bit for bit ``estep(centred(X, o))``, farthest included."""
    from dkm.kernels.expectation import centred

    params, _ = random_params(ct, k=3, d=4, seed=10)
    rng = np.random.default_rng(11)
    origin = rng.normal(scale=50, size=4)
    X = (origin + rng.normal(scale=3, size=(257, 4))).astype(dtype)
    w = rng.uniform(0, 2, size=257)
    assignment = "hard" if ct == "identity" else "soft"
    moments = "none" if ct == "identity" else ct
    kwargs = dict(assignment=assignment, moments=moments, sample_weight=w, n_farthest=3)
    a = estep(centred(X, origin, ct), params, **kwargs, row_offset=5)
    b = estep(X, params, **kwargs, row_offset=5, origin=origin)
    for field in ("nk", "sx", "sxx"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.objective == b.objective
    assert a.farthest is not None and b.farthest is not None
    np.testing.assert_array_equal(a.farthest.points, b.farthest.points)
    np.testing.assert_array_equal(a.farthest.rows, b.farthest.rows)


@pytest.mark.parametrize("ct", TYPES)
@pytest.mark.parametrize("d", [4, 30], ids=["narrow", "wide"])
@pytest.mark.parametrize("block", [None, 7], ids=["one-block", "blocks"])
def test_score_samples_and_predict_proba_match_scipy(ct, d, block, monkeypatch):
    """The per-row log-density, responsibilities and labels (the E-step's log-densities,
    in blocks, with its compiled softmax) against SciPy's densities and log-sum-exp."""
    from scipy.special import logsumexp

    from dkm.kernels import expectation as E

    if block is not None:  # several blocks, the last one short
        monkeypatch.setattr(E, "SOFT_BLOCK_ELEMENTS", block)
        monkeypatch.setattr(E, "MIN_BLOCK_ROWS", block)
    params, dense = random_params(ct, k=3, d=d, seed=5)
    X = np.random.default_rng(6).normal(scale=3, size=(61, d))
    log_prob = naive_log_prob(params, dense, X)
    expected = logsumexp(log_prob, axis=1)
    np.testing.assert_allclose(E.score_samples(X, params), expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(
        E.predict_proba(X, params), np.exp(log_prob - expected[:, None]), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_array_equal(predict_labels(X, params), log_prob.argmax(axis=1))
