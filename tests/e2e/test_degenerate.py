"""Collapsing components: the on_degenerate policy, and hunting kernel crashes."""

from __future__ import annotations

import pickle
import re
import warnings

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn import cluster
from sklearn.exceptions import ConvergenceWarning

import dkm
from dkm.kernels import DegenerateComponentError, MixtureParams, estep, gaussian_mstep
from dkm.kernels.params import DegenerateComponentWarning

RNG = np.random.default_rng(0)
# 60 copies of one point, and a genuine cluster: a component on the copies collapses
X = np.vstack([np.zeros((60, 2)), RNG.normal(size=(200, 2)) + 6, RNG.normal(size=(200, 2)) - 6])
INIT = {
    "means_init": [[0.0, 0.0], [6.0, 6.0], [-6.0, -6.0]],
    "weights_init": [0.2, 0.4, 0.4],
    "precisions_init": np.stack([np.eye(2)] * 3),
    "reg_covar": 0.0,
}


# (spherical is not listed: averaged over features, its variance here rounds to a tiny
# positive number, which is positive definite, so scikit-learn's rule and ours accept it)
@pytest.mark.parametrize("ct", ["full", "diag"])
def test_error_policy_names_the_component(ct):
    init = {
        **INIT,
        "precisions_init": {
            "full": INIT["precisions_init"],
            "diag": np.ones((3, 2)),
            "spherical": np.ones(3),
        }[ct],
    }
    with pytest.raises(DegenerateComponentError, match=r"component\(s\) 0: ") as e:
        dkm.GaussianMixture(3, covariance_type=ct, **init).fit(X)
    assert e.value.components == [0]


def test_drop_policy_removes_the_component():
    gm = dkm.GaussianMixture(3, on_degenerate="drop", **INIT)
    with pytest.warns(DegenerateComponentWarning, match=r"component\(s\) 0 .* dropped"):
        gm.fit(X)
    assert gm.means_.shape == (2, 2) and gm.weights_.sum() == pytest.approx(1.0)
    assert np.all(np.isfinite(gm.means_)) and np.all(np.isfinite(gm.covariances_))
    assert np.isfinite(gm.score(X))
    assert set(np.unique(gm.predict(X))) <= {0, 1}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_reseed_policy_moves_the_component_and_never_leaves_nan():
    gm = dkm.GaussianMixture(3, on_degenerate="reseed", max_iter=20, **INIT)
    with pytest.warns(DegenerateComponentWarning, match="re-seeded"):
        gm.fit(X)
    assert gm.means_.shape == (3, 2)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.all(np.isfinite(getattr(gm, name))), name
    assert np.isfinite(gm.score(X))


def test_empty_component_under_each_policy():
    stats = estep(
        X,
        MixtureParams.identity(np.array([[0.0, 0], [100.0, 100]])),
        assignment="hard",
        moments="full",
        shift=np.array([[0.0, 0], [100.0, 100]]),
        n_farthest=2,
    )
    shift = np.array([[0.0, 0], [100.0, 100]])
    with pytest.raises(DegenerateComponentError, match="empty component"):
        gaussian_mstep(stats, shift, "full", 1e-6)
    params, _, bad = gaussian_mstep(stats, shift, "full", 1e-6, "drop")
    assert bad == [1] and params.n_components == 1
    params, _, bad = gaussian_mstep(stats, shift, "full", 1e-6, "reseed")
    assert bad == [1] and np.all(np.isfinite(params.means))
    assert stats.farthest is not None
    np.testing.assert_array_equal(params.means[1], stats.farthest.points[0])


def test_tied_collapse_is_always_an_error():
    with pytest.raises(DegenerateComponentError, match="tied"):
        dkm.GaussianMixture(2, covariance_type="tied", reg_covar=0.0, on_degenerate="drop").fit(
            np.zeros((10, 2))
        )


@st.composite
def problems(draw: st.DrawFn):
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    elements = st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False, width=64),
        st.sampled_from([0.0, 1.0, -1.0, 1e-300, 1e15]),
    )
    X = draw(arrays(np.float64, (n, d), elements=elements))
    w = draw(arrays(np.float64, (n,), elements=st.sampled_from([0.0, 0.5, 1.0, 3.0])))
    ct = draw(st.sampled_from(["full", "tied", "diag", "spherical", "identity"]))
    assignment = draw(st.sampled_from(["hard", "soft"]))
    means = X[draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))]
    return X, w, ct, assignment, means


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["error", "drop", "reseed"]))
def test_kernels_never_produce_nan_models(problem, policy):
    X, w, ct, assignment, means = problem
    k, d = means.shape
    if ct == "identity":
        params = MixtureParams.identity(means)
    else:
        pc = {
            "full": np.broadcast_to(np.eye(d), (k, d, d)).copy(),
            "tied": np.eye(d),
            "diag": np.ones((k, d)),
            "spherical": np.ones(k),
        }[ct]
        params = MixtureParams(ct, np.full(k, 1 / k), means, pc)
    moments = "none" if ct == "identity" else ct
    with np.errstate(all="raise"):  # no silent overflow or invalid operation either
        try:
            stats = estep(
                X,
                params,
                assignment=assignment,
                moments=moments,
                shift=means,
                sample_weight=w,
                n_farthest=k,
            )
        except FloatingPointError:
            return  # values like 1e15 squared overflow float64 ranges of exp: reported, not NaN
        try:
            new, cov, _ = gaussian_mstep(stats, means, ct, 1e-6, policy)
        except (DegenerateComponentError, FloatingPointError):
            return
    for arr in (new.weights, new.means, cov, new.precisions_cholesky):
        assert arr is None or np.all(np.isfinite(arr))


def test_degenerate_component_error_survives_pickling():
    """Raised in a worker process, it reaches the client whole (Dask pickles it)."""
    error = DegenerateComponentError([2, 5], "empty component")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is DegenerateComponentError
    assert again.components == [2, 5] and str(again) == str(error)


# --------------------------------------------------------------------------- k-means

# 20 distinct points, 10 copies of each: fewer distinct points than 30 clusters
POINTS20 = np.random.default_rng(0).normal(size=(20, 3))
X20 = np.repeat(POINTS20, 10, axis=0)
FEWER = re.escape(
    "Number of distinct clusters (20) found smaller than n_clusters (30). "
    "Possibly due to duplicate points in X."
)


def _distinct(points):
    """The distinct rows, to 8 decimals (a cluster's mean of copies rounds the last bit)."""
    return {tuple(p) for p in np.round(np.asarray(points, np.float64), 8)}


def _sklearn_n_iter(init):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cluster.KMeans(30, init=init, n_init=1, random_state=0).fit(X20).n_iter_


@pytest.mark.parametrize("dask_input", [False, True])
@pytest.mark.parametrize("init", ["k-means++", "random", "k-means||", "array"])
def test_fewer_distinct_points_than_clusters_warns_and_stops(init, dask_input):
    """Empty clusters re-seeded on copies of points cannot lower the inertia: the fit
    stops (scikit-learn's 2 iterations with k-means++; it takes all 300 with random
    init), is converged, warns as scikit-learn does, and the extra centres are copies."""
    start = cluster.kmeans_plusplus(X20, 30, random_state=0)[0] if init == "array" else init
    X = da.from_array(X20, chunks=37) if dask_input else X20
    km = dkm.KMeans(30, init=start, n_init=1, random_state=0)
    with pytest.warns(ConvergenceWarning, match=FEWER):
        km.fit(X)
    assert km.converged_
    if init == "random":
        assert km.n_iter_ <= 10 < _sklearn_n_iter(init)
    elif init == "k-means||":  # k-means|| used to give up after 100 extra rounds
        assert km.n_iter_ <= _sklearn_n_iter("k-means++")
    else:  # k-means++ on data this small is scikit-learn's, from the same seed
        assert km.n_iter_ == _sklearn_n_iter(start) == 2
    assert _distinct(km.cluster_centers_) == _distinct(POINTS20)
    assert km.inertia_ < 1e-20
    labels = np.asarray(km.predict(X))
    np.testing.assert_array_equal(labels, np.asarray(km.labels_))
    assert len(np.unique(labels)) == 20
    np.testing.assert_allclose(km.cluster_centers_[labels], X20, atol=1e-12)


def test_as_many_distinct_points_as_clusters_do_not_warn():
    km = dkm.KMeans(20, n_init=1, random_state=0).fit(X20)  # warnings are errors
    assert km.converged_ and km.inertia_ < 1e-20
    assert _distinct(km.cluster_centers_) == _distinct(POINTS20)
