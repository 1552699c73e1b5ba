"""Tier 4: pipelined passes on real scheduler and worker processes (:mod:`dkm.pipeline`).

With X persisted on a distributed cluster, each pass's tasks run the previous pass's
M-step themselves and the client stays one pass behind. Every fit must be the very
fit that one pass at a time gives: the same bits, the same iterations, the same
warnings and errors.
"""

from __future__ import annotations

import pickle
import time
import warnings

import dask.array as da
import numpy as np
import pytest
from conftest import blobs

import dkm
import dkm.engine
import dkm.pipeline
from dkm.engine import ChunkedData, EMOptions, fit_em, fit_em_many
from dkm.kernels import DegenerateComponentError, MixtureParams
from dkm.kernels.params import DegenerateComponentWarning

pytestmark = pytest.mark.distributed

X = blobs(4000, 3, 4, seed=11)
# 60 copies of one point, and two genuine clusters: a component on the copies collapses
RNG = np.random.default_rng(0)
X_DEGENERATE = np.vstack(
    [np.zeros((60, 2)), RNG.normal(size=(200, 2)) + 6, RNG.normal(size=(200, 2)) - 6]
)
DEGENERATE_INIT = {
    "means_init": [[0.0, 0.0], [6.0, 6.0], [-6.0, -6.0]],
    "weights_init": [0.2, 0.4, 0.4],
    "precisions_init": np.stack([np.eye(2)] * 3),
    "reg_covar": 0.0,
}


@pytest.fixture
def client(dask_processes):
    from distributed import Client

    with Client(dask_processes) as c:
        yield c


@pytest.fixture
def pipelined(monkeypatch):
    """The covariance type ("identity": k-means) of each fit that ran pipelined."""
    calls = []
    original = dkm.pipeline.fit_pipelined

    def spy(client, data, runs, options, *args, **kwargs):
        calls.append(options.covariance_type)
        return original(client, data, runs, options, *args, **kwargs)

    monkeypatch.setattr(dkm.pipeline, "fit_pipelined", spy)
    return calls


def persist(client, array, chunk):
    from distributed import wait

    Xp = client.persist(da.from_array(array, chunks=(chunk, -1)))
    wait(Xp)
    return Xp


def both_ways(monkeypatch, fit):
    """``fit()`` one pass at a time, then pipelined."""
    monkeypatch.setattr(dkm.engine, "PIPELINE", False)
    serial = fit()
    monkeypatch.setattr(dkm.engine, "PIPELINE", True)
    return serial, fit()


def assert_same_history(a, b):
    assert [(h.run, h.iteration, h.objective, h.change, h.converged) for h in a] == [
        (h.run, h.iteration, h.objective, h.change, h.converged) for h in b
    ]


def test_kmeans_restarts_converging_apart_are_the_serial_fits(client, pipelined, monkeypatch):
    Xp = persist(client, X, 500)
    data = ChunkedData.from_dask(Xp).with_origin(X.mean(0))
    rng = np.random.default_rng(5)
    inits = [MixtureParams.identity(X[rng.choice(len(X), 6)] - X.mean(0)) for _ in range(5)]

    def fit():
        seen = []
        options = EMOptions("identity", "hard", max_iter=50)
        results = fit_em_many(data, inits, options, tol_abs=1e-3, callback=seen.append)
        return results, seen

    (serial, serial_seen), (piped, piped_seen) = both_ways(monkeypatch, fit)
    assert pipelined == ["identity"]
    # the restarts stop at different iterations: models leave the pipeline one by one
    assert len({r.n_iter for r in serial}) > 1
    assert all(r.converged for r in serial)
    for a, b in zip(serial, piped, strict=True):
        np.testing.assert_array_equal(b.params.means, a.params.means)
        assert (b.objective, b.n_iter, b.converged) == (a.objective, a.n_iter, a.converged)
        np.testing.assert_array_equal(b.final.nk, a.final.nk)
        assert b.final.farthest is None and a.final.farthest is None
    assert_same_history(serial_seen, piped_seen)

    def fit_estimator():
        km = dkm.KMeans(4, n_init=3, init="random", random_state=3, max_iter=50)
        return km.fit(Xp)

    serial, piped = both_ways(monkeypatch, fit_estimator)
    np.testing.assert_array_equal(piped.cluster_centers_, serial.cluster_centers_)
    assert (piped.inertia_, piped.n_iter_) == (serial.inertia_, serial.n_iter_)
    np.testing.assert_array_equal(np.asarray(piped.labels_), np.asarray(serial.labels_))
    assert_same_history(serial.history_, piped.history_)


@pytest.mark.parametrize("max_iter", [1, 3])
def test_kmeans_stopped_by_max_iter_gets_its_final_pass(client, pipelined, monkeypatch, max_iter):
    from distributed import get_task_stream

    Xp = persist(client, X, 500)
    init = X[:4]  # far from the clusters' centres: more than three iterations to settle

    def fit():
        with get_task_stream(client) as stream:
            km = dkm.KMeans(4, init=init, n_init=1, max_iter=max_iter, tol=0).fit(Xp)
        km.passes_ = {
            str(t["key"]).split("'")[1] for t in stream.data if "dkm-estep" in str(t["key"])
        }
        return km

    serial, piped = both_ways(monkeypatch, fit)
    assert pipelined == ["identity"]
    assert piped.n_iter_ == serial.n_iter_ == max_iter
    assert piped.inertia_ == serial.inertia_  # the final centres' inertia: the last pass
    np.testing.assert_array_equal(piped.cluster_centers_, serial.cluster_centers_)
    # one pass per iteration and the final one, in both ways
    assert len(piped.passes_) == len(serial.passes_) == max_iter + 1


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_gmm_converging_early_is_the_serial_fit(client, pipelined, monkeypatch, ct):
    Xp = persist(client, X, 500)

    def fit():
        gm = dkm.GaussianMixture(4, covariance_type=ct, n_init=2, random_state=0, tol=1e-3)
        return gm.fit(Xp)

    serial, piped = both_ways(monkeypatch, fit)
    assert pipelined == ["identity", ct]  # the k-means that initialises it, then the fit
    assert serial.converged_ and serial.n_iter_ < serial.max_iter
    for name in ("means_", "covariances_", "weights_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(piped, name), getattr(serial, name), err_msg=name)
    assert piped.lower_bound_ == serial.lower_bound_
    assert (piped.n_iter_, piped.converged_) == (serial.n_iter_, serial.converged_)
    assert_same_history(serial.history_, piped.history_)


def test_gmm_degenerate_component_raises_on_the_client(client, pipelined, monkeypatch):
    Xp = persist(client, X_DEGENERATE, 100)

    def fit():
        with pytest.raises(DegenerateComponentError, match=r"component\(s\) 0: ") as e:
            dkm.GaussianMixture(3, **DEGENERATE_INIT).fit(Xp)
        return e.value

    serial, piped = both_ways(monkeypatch, fit)
    assert pipelined[-1] == "full"
    assert piped.components == serial.components == [0]
    assert str(piped) == str(serial)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_gmm_reseeded_component_warns_as_serial(client, pipelined, monkeypatch):
    Xp = persist(client, X_DEGENERATE, 100)

    def fit():
        gm = dkm.GaussianMixture(3, on_degenerate="reseed", max_iter=20, **DEGENERATE_INIT)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DegenerateComponentWarning)
            gm.fit(Xp)
        gm.warned_ = [str(w.message) for w in caught if w.category is DegenerateComponentWarning]
        return gm

    serial, piped = both_ways(monkeypatch, fit)
    assert pipelined[-1] == "full"
    assert serial.warned_ and piped.warned_ == serial.warned_
    np.testing.assert_array_equal(piped.means_, serial.means_)
    assert piped.lower_bound_ == serial.lower_bound_


def test_a_failing_callback_stops_the_fit_and_its_passes(client, pipelined):
    Xp = persist(client, X, 250)
    data = ChunkedData.from_dask(Xp).with_origin(X.mean(0))
    init = MixtureParams.identity(X[[0, 1000, 2000, 3000]] - X.mean(0))
    seen = []

    def stop_at_two(info):
        seen.append(info.iteration)
        if info.iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_em(
            data,
            init,
            EMOptions("identity", "hard", max_iter=50),
            tol_abs=0.0,
            callback=stop_at_two,
        )
    assert seen == [1, 2] and pipelined == ["identity"]

    def running(dask_scheduler):
        return [
            str(k)
            for k, ts in dask_scheduler.tasks.items()
            if "dkm-estep" in str(k) and ts.state != "released"
        ]

    deadline = time.monotonic() + 10
    while (left := client.run_on_scheduler(running)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "the passes in flight were not cancelled"


def test_not_pipelined_unless_persisted_on_the_cluster(client, pipelined):
    km = dkm.KMeans(4, init=X[[0, 1000, 2000, 3000]], n_init=1, max_iter=3)
    km.fit(da.from_array(X, chunks=(500, -1)))  # read in every pass: nothing to pipeline
    assert not pipelined


def test_degenerate_component_error_survives_pickling():
    error = DegenerateComponentError([2, 5], "empty component")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is DegenerateComponentError
    assert again.components == [2, 5] and str(again) == str(error)
