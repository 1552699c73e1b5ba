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


def _count_exact_terms(monkeypatch) -> list[tuple[int, int]]:
    """(component, rows) of every exact log-density computation from now on."""
    computed: list[tuple[int, int]] = []
    exact = E._mahalanobis_terms

    def counting(Xb, rows, j, *args):
        computed.append((j, Xb.shape[0] if rows is None else rows.size))
        return exact(Xb, rows, j, *args)

    monkeypatch.setattr(E, "_mahalanobis_terms", counting)
    return computed


def _screened_and_whole(X, params, monkeypatch, **kwargs):
    """The wide E-step with its screen and without it, and the (component, rows) pairs
    the screened one computed exactly."""
    computed = _count_exact_terms(monkeypatch)
    screened = estep(X, params, **kwargs)
    monkeypatch.undo()  # the exact terms uncounted
    monkeypatch.setattr(E, "SCREEN_MIN_D", 10**9)
    whole = estep(X, params, **kwargs)
    monkeypatch.undo()
    return screened, whole, sum(rows for _j, rows in computed)


def _assert_same_stats(a, b):
    np.testing.assert_allclose(a.nk, b.nk, rtol=1e-13, atol=0)
    np.testing.assert_allclose(a.sx, b.sx, rtol=1e-13, atol=1e-13 * np.abs(b.sx).max())
    np.testing.assert_allclose(a.sxx, b.sxx, rtol=1e-13, atol=1e-13 * np.abs(b.sxx).max())
    assert a.objective == pytest.approx(b.objective, rel=1e-14)


@pytest.mark.parametrize("assignment", ["soft", "hard"])
@pytest.mark.parametrize("d", [200, 784])
def test_wide_screen_computes_few_log_densities_on_separated_components(d, assignment, monkeypatch):
    """Well-separated components: the screen's bounds leave out most (row, component)
    pairs (each row's own component and a few more are computed), and the statistics,
    the objective and the farthest points are those of computing every pair."""
    k, n = 8, 2000
    params = anisotropic_params(k, d, seed=11)
    X = sample_rows(params, n, seed=12)
    w = np.random.default_rng(13).uniform(0.5, 1.5, size=n)
    kwargs = dict(
        assignment=assignment, moments="full", shift=params.means, sample_weight=w, n_farthest=3
    )
    screened, whole, computed = _screened_and_whole(X, params, monkeypatch, **kwargs)
    assert computed <= 1.5 * n  # of n·k = 8n
    _assert_same_stats(screened, whole)
    np.testing.assert_array_equal(screened.farthest.rows, whole.farthest.rows)
    logp = direct_log_prob(params, X)
    if assignment == "soft":
        norm = logsumexp(logp, axis=1)
        assert screened.objective == pytest.approx(float(w @ norm), rel=1e-12)
    else:
        labels = logp.argmax(axis=1)
        np.testing.assert_allclose(screened.nk, np.bincount(labels, w, minlength=k), rtol=1e-12)


def anisotropic_params(k: int, d: int, seed: int) -> MixtureParams:
    """Means 3 apart per feature and covariances ``A Aᵀ``, ``A = I + 0.4 G`` (G standard
    normal): the spread spectra of the benchmarks' blobs, whose precision factors have a
    few columns far larger than the rest (the screen's bounds take those)."""
    rng = np.random.default_rng(seed)
    A = np.eye(d) + rng.normal(scale=0.4, size=(k, d, d))
    cov = A @ A.transpose(0, 2, 1)
    pc = covariance.of("full").precision_cholesky(cov)
    weights, means = rng.dirichlet(np.full(k, 5.0)), rng.normal(scale=3, size=(k, d))
    return MixtureParams("full", weights, means, pc)


def sample_rows(params: MixtureParams, n: int, seed: int) -> np.ndarray:
    """Rows drawn from the mixture's own components (equally often)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, params.n_components, size=n)
    kind = covariance.of("full")
    chol = np.linalg.cholesky(kind.covariances(params.precisions_cholesky))
    X = rng.normal(size=(n, params.n_features))
    for j in range(params.n_components):
        X[labels == j] = X[labels == j] @ chol[j].T
    return params.means[labels] + X


def _two_components(d: int, distance: float) -> MixtureParams:
    """Unit covariances, equal weights, the second mean ``distance`` along the first axis."""
    means = np.zeros((2, d))
    means[1, 0] = distance
    pc = covariance.of("full").precision_cholesky(np.stack([np.eye(d)] * 2))
    return MixtureParams("full", np.full(2, 0.5), means, pc)


def test_wide_screen_keeps_every_responsibility_the_softmax_keeps(monkeypatch):
    """Rows whose second component is within 8 nats of NEGLIGIBLE_LOG less likely than
    the first, and rows far beyond that: the responsibilities down to exp(NEGLIGIBLE_LOG)
    of a row's largest are all kept (the second component's total is made of nothing
    else), the ones below left out, as the softmax zeroes them; the far rows' second
    component is not computed."""
    from dkm.kernels._fused import NEGLIGIBLE_LOG

    d, distance, n = 200, 100.0, 1200
    params = _two_components(d, distance)
    rng = np.random.default_rng(14)
    # the gap is ½(‖x − μ₂‖² − ‖x‖²) = ½ D² − D x₁: the other features cancel
    near = rng.uniform(-NEGLIGIBLE_LOG - 8, -NEGLIGIBLE_LOG + 8, size=n // 2)
    near = near[np.abs(near + NEGLIGIBLE_LOG) > 1e-4]  # no row within rounding of the cut
    gaps = rng.permutation(np.concatenate([near, rng.uniform(3000, 4000, n)]))
    X = rng.normal(scale=0.01, size=(gaps.size, d))
    X[:, 0] = (0.5 * distance**2 - gaps) / distance
    kwargs = dict(assignment="soft", moments="full", shift=params.means)
    screened, whole, computed = _screened_and_whole(X, params, monkeypatch, **kwargs)
    assert computed < 1.5 * gaps.size  # the far rows' second component is left out
    kept = gaps < -NEGLIGIBLE_LOG
    expected = np.exp(-gaps[kept] - np.log1p(np.exp(-gaps[kept])))
    # each 1 nat of gaps just below the cut holds over a third of the total
    np.testing.assert_allclose(screened.nk[1], expected.sum(), rtol=1e-7)
    np.testing.assert_allclose(screened.nk[1], whole.nk[1], rtol=1e-13)
    _assert_same_stats(screened, whole)


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_wide_screen_duplicate_components_keep_equal_bits(assignment, monkeypatch):
    """Two identical components and rows between them and a third: the rows' needs
    differ, so without care the two copies were computed on different gathered rows
    (BLAS's bits for a row depend on the rows with it) and a row went to the second
    copy. A duplicate's log-densities are its original's: ties go to the first, as
    NumPy's argmax and scikit-learn give them, and soft responsibilities are equal."""
    d, distance = 64, 10.0
    rng = np.random.default_rng(0)
    means = np.zeros((3, d))
    means[2, 0] = distance
    G = rng.normal(size=(d, d))
    cov = np.stack([np.eye(d) + 0.3 * (G @ G.T / d)] * 3)
    pc = covariance.FULL.precision_cholesky(cov)
    params = MixtureParams("full", np.full(3, 1 / 3), means, pc)
    r = np.random.default_rng(3)
    between = r.normal(size=(100, d)) * 0.5
    between[:, 0] = distance / 2 + r.normal(size=100) * 0.05
    X = np.concatenate(
        [r.normal(size=(60, d)) * 0.5, between, means[2] + r.normal(size=(96, d)) * 0.5]
    )
    kwargs = dict(assignment=assignment, moments="full", shift=params.means)
    screened, whole, computed = _screened_and_whole(X, params, monkeypatch, **kwargs)
    assert computed <= 2 * X.shape[0] + E.MIN_BLOCK_ROWS  # of 3n: the copy is not computed
    if assignment == "hard":
        labels = predict_labels(X, params)
        assert not (labels == 1).any()
        np.testing.assert_array_equal(screened.nk, np.bincount(labels, minlength=3))
        np.testing.assert_array_equal(screened.nk, whole.nk)
    else:
        assert _same_bits(screened.nk[0], screened.nk[1])
        assert _same_bits(screened.sxx[0], screened.sxx[1])
    _assert_same_stats(screened, whole)


def test_wide_screen_leaves_out_zero_weights(monkeypatch):
    """A component of zero weight (log-density −∞ everywhere) is not computed against a
    finite best, and the statistics are those of computing it."""
    k, d, n = 5, 128, 1200
    base = anisotropic_params(k, d, seed=24)
    weights = base.weights.copy()
    weights[3] = 0.0
    params = MixtureParams("full", weights / weights.sum(), base.means, base.precisions_cholesky)
    X = sample_rows(base, n, seed=25)
    computed = _count_exact_terms(monkeypatch)
    with np.errstate(divide="ignore"):  # log(0) for the zero weight
        screened = estep(X, params, assignment="soft", moments="full", shift=params.means)
        assert sum(rows for j, rows in computed if j == 3) == 0
        monkeypatch.setattr(E, "SCREEN_MIN_D", 10**9)
        whole = estep(X, params, assignment="soft", moments="full", shift=params.means)
    assert screened.nk[3] == whole.nk[3] == 0.0
    _assert_same_stats(screened, whole)


def _same_bits(a, b) -> bool:
    return np.array_equal(np.asarray(a).view(np.uint64), np.asarray(b).view(np.uint64))


def test_wide_screen_stops_on_overlapping_components(monkeypatch):
    """Components that overlap leave nothing out: after the probe block of MIN_BLOCK_ROWS
    rows, the chunk is computed whole, and the statistics are the same."""
    d, k, n = 128, 4, 3000
    params = wide_params("full", k, d, seed=17)
    params = MixtureParams("full", params.weights, params.means * 0.01, params.precisions_cholesky)
    X = mixture_rows(params, n, seed=18, spread=1.0)
    kwargs = dict(assignment="soft", moments="full", shift=params.means)
    screened, whole, computed = _screened_and_whole(X, params, monkeypatch, **kwargs)
    assert n * k <= computed <= n * k + E.MIN_BLOCK_ROWS  # the probe's first components
    _assert_same_stats(screened, whole)


def test_wide_screen_bounds_from_the_columns_that_separate_the_means(monkeypatch):
    """Features constant in the data (pixels always 0) have the largest precisions
    (``reg_covar``'s) and the same value in every mean: the screen's columns are those
    that separate the means, and it still leaves out most pairs."""
    k, d, n, constant = 6, 96, 1500, 32
    base = anisotropic_params(k, d - constant, seed=19)
    X = np.zeros((n, d))
    X[:, constant:] = sample_rows(base, n, seed=20)
    cov = np.zeros((k, d, d))
    cov[:, :constant, :constant] = 1e-6 * np.eye(constant)
    cov[:, constant:, constant:] = covariance.of("full").covariances(base.precisions_cholesky)
    means = np.zeros((k, d))
    means[:, constant:] = base.means
    params = MixtureParams(
        "full", base.weights, means, covariance.of("full").precision_cholesky(cov)
    )
    kwargs = dict(assignment="soft", moments="full", shift=params.means)
    screened, whole, computed = _screened_and_whole(X, params, monkeypatch, **kwargs)
    assert computed <= 1.5 * n  # of n·k = 6n
    _assert_same_stats(screened, whole)


@pytest.mark.parametrize("d", [200, 784])
def test_wide_outputs_take_the_screened_log_densities(d, monkeypatch):
    """``score_samples``, ``predict_proba`` and the labels of full covariances on wide
    rows: the fit's screened log-densities (few components computed a row), in several
    blocks, equal to those computed whole and to SciPy's densities and log-sum-exp (to
    the accuracy of the inverse covariances, ill-conditioned here)."""
    k, n = 6, 900
    params = anisotropic_params(k, d, seed=21)
    X = sample_rows(params, n, seed=22)
    monkeypatch.setattr(E, "WIDE_BLOCK_BYTES", 1)  # blocks of MIN_BLOCK_ROWS rows
    outputs = (E.score_samples, E.predict_proba, predict_labels)
    with monkeypatch.context() as whole:
        whole.setattr(E, "SCREEN_MIN_D", 10**9)
        score, proba, labels = (f(X, params) for f in outputs)
    computed = _count_exact_terms(monkeypatch)
    np.testing.assert_allclose(E.score_samples(X, params), score, rtol=1e-14)
    np.testing.assert_allclose(E.predict_proba(X, params), proba, rtol=1e-13, atol=1e-300)
    assert sum(rows for _j, rows in computed) <= 2 * 1.5 * n  # two passes, of n·k = 6n each
    computed.clear()
    np.testing.assert_array_equal(predict_labels(X, params), labels)
    assert sum(rows for _j, rows in computed) <= 1.5 * n
    logp = direct_log_prob(params, X)
    norm = logsumexp(logp, axis=1)
    np.testing.assert_allclose(score, norm, rtol=1e-8)
    np.testing.assert_allclose(proba, np.exp(logp - norm[:, None]), atol=1e-8)
    np.testing.assert_array_equal(labels, logp.argmax(axis=1))
    fit = estep(X, params, assignment="hard", moments="full", shift=params.means)
    np.testing.assert_array_equal(fit.nk, np.bincount(labels, minlength=k))
