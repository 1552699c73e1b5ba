"""Tier 3: end to end against scikit-learn on the same data and initial parameters."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
from conftest import blobs
from sklearn import cluster, datasets, mixture
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

import dkm


def _datasets():
    iris = datasets.load_iris().data
    wine = StandardScaler().fit_transform(datasets.load_wine().data)
    digits = datasets.load_digits().data[:600]
    cancer = StandardScaler().fit_transform(datasets.load_breast_cancer().data)[:, :8]
    return {
        "iris": iris,
        "wine": wine,
        "digits": digits,
        "cancer": cancer,
        "blobs": blobs(5000, 6, 7, seed=3),
    }


DATA = _datasets()
DTYPE_RTOL = {np.float64: 1e-6, np.float32: 1e-4}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(DATA))
@pytest.mark.parametrize("k", [3, 8])
def test_kmeans_equals_sklearn_lloyd(name, dtype, k):
    X = DATA[name].astype(dtype)
    rng = np.random.default_rng(k)
    # Initial centres near (not at) data points: iris is recorded to 0.1 cm, so some of
    # its points lie exactly halfway between two of its own points, and on which side an
    # exact tie falls is decided by rounding, not by the algorithm.
    init = X[rng.choice(len(X), k, replace=False)] + rng.normal(scale=1e-3, size=(k, X.shape[1]))
    init = init.astype(dtype)
    ref = cluster.KMeans(k, init=init, n_init=1, max_iter=30, tol=0, algorithm="lloyd").fit(X)
    got = dkm.KMeans(k, init=init, n_init=1, max_iter=30, tol=0, chunk_size=97).fit(X)
    rtol = DTYPE_RTOL[dtype]
    assert got.cluster_centers_.dtype == dtype
    np.testing.assert_allclose(
        got.cluster_centers_, ref.cluster_centers_, rtol=rtol, atol=rtol * np.abs(X).max()
    )
    assert got.inertia_ == pytest.approx(ref.inertia_, rel=rtol)
    np.testing.assert_array_equal(got.labels_, ref.labels_)
    assert got.n_iter_ == ref.n_iter_
    np.testing.assert_array_equal(got.predict(X), ref.predict(X))
    np.testing.assert_allclose(got.transform(X), ref.transform(X), rtol=rtol, atol=rtol)
    assert got.score(X) == pytest.approx(ref.score(X), rel=rtol)


@pytest.mark.parametrize("name", ["iris", "blobs", "wine"])
def test_kmeans_tol_and_kmeanspp_follow_sklearn(name):
    """Default tol (relative to the variance) and k-means++ with the same seed."""
    X = DATA[name]
    for seed in range(3):
        ref = cluster.KMeans(5, random_state=seed, n_init=1).fit(X)
        got = dkm.KMeans(5, random_state=seed, n_init=1).fit(X)
        np.testing.assert_allclose(got.cluster_centers_, ref.cluster_centers_, rtol=1e-6, atol=1e-9)
        assert got.n_iter_ == ref.n_iter_
        assert got.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)


def _gmm_init(X, k, ct, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = mixture.GaussianMixture(k, covariance_type=ct, max_iter=2, random_state=seed).fit(X)
    rng = np.random.default_rng(seed)
    means = ref.means_ + rng.normal(scale=0.1, size=ref.means_.shape)  # not a fixed point
    return dict(weights_init=ref.weights_, means_init=means, precisions_init=ref.precisions_)


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("name", list(DATA))
def test_gmm_equals_sklearn(name, ct):
    X = DATA[name]
    k = 3
    init = _gmm_init(X, k, ct)
    params = dict(covariance_type=ct, tol=0, max_iter=15, reg_covar=1e-4, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = mixture.GaussianMixture(k, **params).fit(X)
        got = dkm.GaussianMixture(k, chunk_size=211, **params)
        if ref.weights_.min() < 1e-12:
            # scikit-learn let a component die (no responsibility at all) and moved its
            # mean to the origin; dkm refuses to do that silently and names it instead.
            with pytest.raises(dkm.DegenerateComponentError, match="empty component"):
                got.fit(X)
            return
        got.fit(X)
    rtol = 1e-6
    scale = np.abs(X).max()
    np.testing.assert_allclose(got.weights_, ref.weights_, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(got.means_, ref.means_, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(
        got.covariances_, ref.covariances_, rtol=rtol, atol=rtol * np.abs(ref.covariances_).max()
    )
    np.testing.assert_allclose(
        got.precisions_cholesky_,
        ref.precisions_cholesky_,
        rtol=1e-5,
        atol=1e-5 * np.abs(ref.precisions_cholesky_).max(),
    )
    assert got.score(X) == pytest.approx(ref.score(X), rel=rtol)
    assert got.lower_bound_ == pytest.approx(ref.lower_bound_, rel=rtol)
    assert got.n_iter_ == ref.n_iter_ == 15
    np.testing.assert_allclose(got.score_samples(X), ref.score_samples(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    assert got.bic(X) == pytest.approx(ref.bic(X), rel=rtol)
    assert got.aic(X) == pytest.approx(ref.aic(X), rel=rtol)


GMM_ARRAYS = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_gmm_float32_keeps_the_dtype_as_sklearn(ct):
    """float32 X: float32 parameters and per-point results, attribute by attribute as
    scikit-learn's; the values are the float64 fit's on the same points, rounded
    (scikit-learn's own float32 fit is further off, computed in float32 throughout)."""
    X = DATA["blobs"].astype(np.float32)
    X64 = X.astype(np.float64)
    init = _gmm_init(DATA["blobs"], 3, ct)
    params = dict(covariance_type=ct, tol=0, max_iter=15, reg_covar=1e-4)
    init32 = {name: np.asarray(value, np.float32) for name, value in init.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref32 = mixture.GaussianMixture(3, **params, **init32).fit(X)
        ref = mixture.GaussianMixture(3, **params, **init).fit(X64)
        got = dkm.GaussianMixture(3, chunk_size=211, **params, **init).fit(X)
    for name in GMM_ARRAYS:
        value, expected = getattr(got, name), getattr(ref, name)
        assert value.dtype == getattr(ref32, name).dtype == np.float32, name
        np.testing.assert_allclose(
            value, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max(), err_msg=name
        )
    for method in ("score_samples", "predict_proba"):
        value = getattr(got, method)(X)
        assert value.dtype == getattr(ref32, method)(X).dtype == np.float32, method
        np.testing.assert_allclose(value, getattr(ref, method)(X64), rtol=1e-6, atol=1e-6)
        lazy = getattr(got, method)(da.from_array(X, chunks=(700, -1)))
        assert lazy.dtype == np.float32 and lazy.compute().dtype == np.float32
        np.testing.assert_array_equal(lazy.compute(), value)
        # float64 X on a float32 model: float64 results, as scikit-learn's
        assert getattr(got, method)(X64).dtype == getattr(ref32, method)(X64).dtype
    score = got.score(X)
    assert type(score) is type(ref32.score(X)) is float
    assert score == pytest.approx(ref.score(X64), rel=1e-7)
    identity = dkm.GaussianMixture(3, covariance_type="identity", random_state=0).fit(X)
    assert all(getattr(identity, name).dtype == np.float32 for name in GMM_ARRAYS)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_gmm_default_convergence_matches_sklearn(ct):
    X = DATA["iris"]
    init = _gmm_init(X, 3, ct)
    ref = mixture.GaussianMixture(3, covariance_type=ct, **init).fit(X)
    got = dkm.GaussianMixture(3, covariance_type=ct, **init).fit(X)
    assert got.converged_ and ref.converged_
    assert got.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(got.means_, ref.means_, rtol=1e-6)


def test_gmm_far_from_origin():
    """Data offset by 1e6 with unit variance: covariances correct to 1e-6 relative."""
    rng = np.random.default_rng(0)
    Z = np.vstack([rng.normal(size=(3000, 2)) * [1.0, 2.0], rng.normal(size=(3000, 2)) + 8])
    got = dkm.GaussianMixture(2, random_state=0, reg_covar=0).fit(Z + 1e6)
    centred = dkm.GaussianMixture(2, random_state=0, reg_covar=0).fit(Z)
    order = np.argsort(got.means_[:, 0])
    ref_order = np.argsort(centred.means_[:, 0])
    np.testing.assert_allclose(got.covariances_[order], centred.covariances_[ref_order], rtol=1e-6)
    np.testing.assert_allclose(got.means_[order] - 1e6, centred.means_[ref_order], atol=1e-8)
    assert np.isclose(got.covariances_[order][0, 1, 1], 4.0, rtol=0.1)


@pytest.mark.parametrize("est", ["kmeans", "gmm"])
def test_integer_sample_weight_equals_repeating_rows(est):
    X = DATA["blobs"][:1500]
    w = np.random.default_rng(1).integers(0, 4, size=len(X))
    Xr = np.repeat(X, w, axis=0)
    if est == "kmeans":
        init = X[w > 0][:5]
        a = dkm.KMeans(5, init=init, max_iter=20, tol=0).fit(X, sample_weight=w)
        b = dkm.KMeans(5, init=init, max_iter=20, tol=0).fit(Xr)
        np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-10)
        assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-10)
        assert a.n_iter_ == b.n_iter_
    else:
        init = _gmm_init(X, 4, "full")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            a = dkm.GaussianMixture(4, tol=0, max_iter=10, **init).fit(X, sample_weight=w)
            b = dkm.GaussianMixture(4, tol=0, max_iter=10, **init).fit(Xr)
        np.testing.assert_allclose(a.means_, b.means_, rtol=1e-10)
        np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=1e-9)
        assert a.lower_bound_ == pytest.approx(b.lower_bound_, rel=1e-10)


def test_dask_input_gives_lazy_outputs_with_input_chunks():
    X = DATA["blobs"]
    Xd = da.from_array(X, chunks=(700, -1))
    km = dkm.KMeans(7, random_state=0).fit(Xd)
    assert isinstance(km.labels_, da.Array) and km.labels_.chunks == (Xd.chunks[0],)
    np.testing.assert_array_equal(km.labels_.compute(), km.predict(X))
    assert isinstance(km.predict(Xd), da.Array)
    assert km.transform(Xd).chunks == (Xd.chunks[0], (7,))
    assert km.score(Xd) == pytest.approx(km.score(X), rel=1e-10)
    gm = dkm.GaussianMixture(3, random_state=0).fit(Xd)
    proba = gm.predict_proba(Xd)
    assert isinstance(proba, da.Array) and proba.chunks == (Xd.chunks[0], (3,))
    np.testing.assert_allclose(proba.compute(), gm.predict_proba(X), rtol=1e-12)
    assert gm.score(Xd) == pytest.approx(gm.score(X), rel=1e-12)
    np.testing.assert_array_equal(gm.fit_predict(Xd).compute(), gm.predict(X))


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical", "identity"])
@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_fit_predict_equals_fit_then_predict(ct, assignment):
    X = DATA["blobs"]
    a = dkm.GaussianMixture(4, covariance_type=ct, assignment=assignment, random_state=1)
    b = dkm.GaussianMixture(4, covariance_type=ct, assignment=assignment, random_state=1)
    np.testing.assert_array_equal(a.fit_predict(X), b.fit(X).predict(X))
    assert np.all(np.isfinite(a.means_))


def test_hard_gmm_is_classification_em():
    """assignment=hard: the classification likelihood never decreases."""
    X = DATA["blobs"]
    gm = dkm.GaussianMixture(5, assignment="hard", random_state=0, tol=0, max_iter=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(X)
    bounds = np.array(gm.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-9)


def test_soft_kmeans_is_identity_gmm():
    X = DATA["blobs"]
    gm = dkm.GaussianMixture(7, covariance_type="identity", random_state=0).fit(X)
    np.testing.assert_allclose(gm.weights_, 1 / 7)
    np.testing.assert_allclose(gm.covariances_, 1.0)
    assert np.all(np.diff(gm.lower_bounds_) >= -1e-9)  # EM never decreases the likelihood


def test_gmm_sample():
    gm = dkm.GaussianMixture(3, random_state=0).fit(DATA["iris"])
    Xs, ys = gm.sample(500)
    assert Xs.shape == (500, 4) and ys.shape == (500,)
    assert set(np.unique(ys)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="n_samples"):
        gm.sample(0)


def test_collapsed_component_error_is_clear():
    X = np.vstack([np.zeros((50, 2)), np.random.default_rng(0).normal(size=(50, 2)) + 5])
    gm = dkm.GaussianMixture(
        2,
        means_init=[[0.0, 0.0], [5.0, 5.0]],
        weights_init=[0.5, 0.5],
        precisions_init=np.stack([np.eye(2)] * 2),
        reg_covar=0.0,
    )
    with pytest.raises(dkm.DegenerateComponentError, match=r"component\(s\) 0: .*reg_covar"):
        gm.fit(X)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_clusters=0), "n_clusters must be an integer >= 1"),
        (
            dict(n_clusters=2, init="kmeans"),
            "init: expected one of k-means\\+\\+, k-means\\|\\|, random",
        ),
        (dict(n_clusters=2, init=np.zeros((3, 2))), "shape of the initial centers"),
        (dict(n_clusters=2, max_iter=0), "max_iter must be"),
        (dict(n_clusters=2, split_every=1), "split_every must be"),
        (dict(n_clusters=50), "n_samples=10 .*should be >= n_clusters=50"),
    ],
)
def test_kmeans_bad_parameters(kwargs, message):
    X = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match=message):
        dkm.KMeans(**kwargs).fit(X)


def test_bad_input_names_row_and_chunk():
    X = np.random.default_rng(0).normal(size=(100, 2))
    X[57, 1] = np.inf
    with pytest.raises(ValueError, match=r"1 row\(s\), the first at row 57 \(chunk 2\)"):
        dkm.KMeans(2).fit(da.from_array(X, chunks=(25, -1)))
    with pytest.raises(ValueError, match=r"negative or non-finite.*row 3"):
        w = np.ones(100)
        w[3] = -1
        dkm.KMeans(2).fit(X[:50], sample_weight=w[:50])
    with pytest.raises(ValueError, match="sums to zero"):
        dkm.KMeans(2).fit(da.from_array(X[:50]), sample_weight=np.zeros(50))
    with pytest.raises(ValueError, match="expecting 2 features"):
        dkm.KMeans(2).fit(X[:50]).predict(da.from_array(np.zeros((3, 3))))
