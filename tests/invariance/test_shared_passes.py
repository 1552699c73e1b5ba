"""Restarts and candidate numbers of clusters share their passes over the data (issue 4).

- ``fit_em_many`` gives every model exactly what ``fit_em`` gives it alone, in fewer
  passes: one per iteration of the slowest model, with converged models dropping out;
- ``n_init > 1`` picks the same best model as scikit-learn's restarts from the same seed;
- ``sweep`` fits a list of k together and its BIC/AIC equal scikit-learn's
  ``GaussianMixture.bic``/``aic`` for the same parameters; it recovers the true k.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import blobs
from dask.system import CPU_COUNT
from dask.utils import key_split
from sklearn import cluster, mixture
from sklearn.exceptions import ConvergenceWarning

import dkm
from dkm.engine import (
    ChunkedData,
    EMOptions,
    IterationInfo,
    PassOptions,
    fit_em,
    fit_em_many,
    stats_pass_many,
)
from dkm.kernels.params import MixtureParams
from dkm.selection import check_candidates


class PassCounter:
    """Counts E-step passes (graphs with ``dkm-estep`` tasks) and models per pass."""

    def __init__(self) -> None:
        self.passes: list[int] = []  # E-step tasks per pass
        self.models: list[int] = []  # models in each pass

    def __enter__(self) -> PassCounter:
        counter = self

        def get(dsk, keys, **kwargs):
            estep = [k for k in dsk if key_split(k) == "dkm-estep"]
            if estep:
                counter.passes.append(len(estep))
                counter.models.append(len(pass_jobs(dsk, estep[0])))
            return dask.threaded.get(dsk, keys, **kwargs)

        self._config = dask.config.set(scheduler=get)
        self._config.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._config.__exit__(*exc)


def pass_jobs(graph: dict, estep_key: object) -> tuple:
    """The models of a pass: carried by each E-step task, or one shared graph literal."""
    params = [v for k, v in graph.items() if key_split(k) == "dkm-params"]
    if params:
        return getattr(params[0], "value", params[0])
    return graph[estep_key].func.keywords["jobs"]


def chunked(X: np.ndarray, rows: int) -> ChunkedData:
    return ChunkedData.from_dask(da.from_array(X, chunks=(rows, -1)), None, "raise").with_origin(
        X.mean(axis=0)
    )


# --------------------------------------------------------------------------- engine


@pytest.mark.parametrize("kind", ["kmeans", "gmm"])
def test_fit_em_many_is_each_fit_alone_bit_for_bit(kind):
    X = blobs(4000, 3, 5, seed=1)
    data = chunked(X, 512)
    rng = np.random.default_rng(0)
    # different k too: candidates of a sweep iterate in the same passes
    inits = [
        MixtureParams.identity(X[rng.choice(len(X), k, replace=False)] - data.origin)
        for k in (3, 5, 5, 7)
    ]
    if kind == "kmeans":
        options = EMOptions("identity", "hard", tol=1e-4, max_iter=50)
        kw = {"tol_abs": 1e-4}
    else:
        options = EMOptions("spherical", "soft", tol=1e-3, max_iter=50)
        inits = [
            MixtureParams(
                "spherical",
                np.full(p.n_components, 1 / p.n_components),
                p.means,
                np.ones(p.n_components),
            )
            for p in inits
        ]
        kw = {}
    seen: list[IterationInfo] = []
    together = fit_em_many(data, inits, options, callback=seen.append, **kw)
    for i, (init, got) in enumerate(zip(inits, together, strict=True)):
        alone = fit_em(data, init, options, **kw)
        assert got.n_iter == alone.n_iter and got.converged == alone.converged
        assert got.objective == alone.objective
        np.testing.assert_array_equal(got.params.means, alone.params.means)
        np.testing.assert_array_equal(got.params.weights, alone.params.weights)
        assert [h.objective for h in got.history] == [h.objective for h in alone.history]
        assert [h.iteration for h in seen if h.run == i] == list(range(1, alone.n_iter + 1))


def test_converged_models_stop_costing_work(monkeypatch):
    import dkm.engine.data

    monkeypatch.setattr(dkm.engine.data, "RUN_BYTES", 0)  # each chunk a run: many tasks
    X = blobs(4000, 3, 5, seed=2)
    data = chunked(X, 500)
    rng = np.random.default_rng(1)
    inits = [MixtureParams.identity(X[rng.choice(len(X), 5)] - data.origin) for _ in range(4)]
    options = EMOptions("identity", "hard", tol=0.0, max_iter=100)
    with PassCounter() as counter:
        results = fit_em_many(data, inits, options)
    n_iter = [r.n_iter for r in results]
    assert len(set(n_iter)) > 1  # the restarts converge at different iterations
    # one pass per iteration of the slowest model, plus the final inertia pass
    assert len(counter.passes) == max(n_iter) + 1
    assert set(counter.passes) == {min(CPU_COUNT, data.X.numblocks[0])}  # a task per thread
    # a pass carries only the models still iterating
    expected = [sum(n >= it for n in n_iter) for it in range(1, max(n_iter) + 1)] + [4]
    assert counter.models == expected


def test_stats_pass_many_merges_model_by_model():
    X = blobs(3000, 4, 3, seed=3)
    data = chunked(X, 256)
    p3 = MixtureParams.identity(X[:3] - data.origin)
    p6 = MixtureParams.identity(X[:6] - data.origin)
    jobs = [(p3, None, PassOptions("hard", "none")), (p6, p6.means, PassOptions("soft", "full"))]
    stacked = stats_pass_many(data, jobs, split_every=3)
    for job, got in zip(jobs, stacked, strict=True):
        (alone,) = stats_pass_many(data, [job], split_every=3)
        np.testing.assert_array_equal(got.nk, alone.nk)
        np.testing.assert_array_equal(got.sx, alone.sx)
        assert got.objective == alone.objective
    assert stats_pass_many(data, []) == []


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_n_init_restarts_equal_scikit_learns(seed):
    """Same seed, same k-means++ draws in the same order, same best run."""
    X = blobs(3000, 4, 6, seed=seed)
    ref = cluster.KMeans(6, n_init=4, random_state=seed, algorithm="lloyd").fit(X)
    seen: list[IterationInfo] = []
    with PassCounter() as counter:
        got = dkm.KMeans(6, n_init=4, random_state=seed, callback=seen.append).fit(X)
    np.testing.assert_allclose(got.cluster_centers_, ref.cluster_centers_, rtol=1e-10)
    np.testing.assert_array_equal(got.labels_, ref.labels_)
    assert got.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)
    # one pass per iteration of the slowest restart (all four in the first), one final
    assert {h.run for h in seen} == {0, 1, 2, 3} and counter.models[0] == 4
    assert len(counter.passes) == max(h.iteration for h in seen) + 1


def test_gmm_restarts_share_their_kmeans_inits_and_equal_separate_fits():
    X = blobs(2000, 2, 3, seed=4)
    together = dkm.GaussianMixture(3, n_init=3, random_state=5, covariance_type="diag").fit(X)
    # the same draws, made one by one: three fits whose init is each restart's centres
    rng = np.random.RandomState(5)
    best = None
    summary_est = dkm.GaussianMixture(3, random_state=5)
    data, _ = summary_est._as_data(X, None, reset=True, min_samples=2)
    summary = summary_est._summarize(data, 3, rng, "n_components")
    from dkm.engine import init_centres

    for _ in range(3):
        centres = init_centres(summary, summary.mean, 3, "k-means++", rng) + summary.mean
        km = dkm.KMeans(3, init=centres, n_init=1, max_iter=300, tol=1e-4).fit(X)
        one = dkm.GaussianMixture(3, init_params=km, covariance_type="diag", random_state=5).fit(X)
        if best is None or one.lower_bound_ > best.lower_bound_:
            best = one
    assert best is not None
    np.testing.assert_allclose(together.means_, best.means_, rtol=1e-10)
    np.testing.assert_allclose(together.covariances_, best.covariances_, rtol=1e-10)
    assert together.lower_bound_ == pytest.approx(best.lower_bound_, rel=1e-12)


# --------------------------------------------------------------------------- sweep


def gmm_data(covariance_type: str, k: int, seed: int) -> np.ndarray:
    ref = mixture.GaussianMixture(k, covariance_type=covariance_type)
    rng = np.random.default_rng(seed)
    d = 3
    ref.weights_ = np.full(k, 1 / k)
    # well apart: vertices of a simplex 20 units across, jittered
    ref.means_ = 20 * np.eye(k, d) + rng.normal(size=(k, d))

    def spd() -> np.ndarray:
        a = rng.normal(size=(d, d))
        return a @ a.T + np.eye(d)

    cov = {
        "full": lambda: np.stack(
            [(a := rng.normal(size=(d, d))) @ a.T + np.eye(d) for _ in range(k)]
        ),
        "tied": lambda: (a := rng.normal(size=(d, d))) @ a.T + np.eye(d),
        "diag": lambda: rng.uniform(0.5, 2, size=(k, d)),
        "spherical": lambda: rng.uniform(0.5, 2, size=k),
    }[covariance_type]()
    ref.covariances_ = cov
    ref.random_state = seed
    X, _ = ref.sample(6000)
    return rng.permutation(X)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_sweep_recovers_k_and_its_bic_is_scikit_learns(covariance_type):
    X = gmm_data(covariance_type, 4, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # large k may not converge
        result = dkm.sweep(
            dkm.GaussianMixture(covariance_type=covariance_type, random_state=0, n_init=2),
            X,
            range(1, 9),
        )
    assert result.best_n_clusters == 4
    assert [c.n_clusters for c in result.candidates] == list(range(1, 9))
    for cand, model in zip(result.candidates, result.models, strict=True):
        sk = mixture.GaussianMixture(cand.n_clusters, covariance_type=covariance_type)
        sk.weights_, sk.means_ = model.weights_, model.means_
        sk.covariances_, sk.precisions_cholesky_ = model.covariances_, model.precisions_cholesky_
        assert cand.bic == pytest.approx(sk.bic(X), rel=1e-10)
        assert cand.aic == pytest.approx(sk.aic(X), rel=1e-10)
        assert cand.bic == pytest.approx(model.bic(X), rel=1e-10)
        assert model.n_components == cand.n_clusters


def test_kmeans_sweep_bic_is_the_equal_variance_spherical_model():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [20, 5]])
    X = np.vstack([rng.normal(size=(800, 2)) * 0.6 + c for c in centres])
    result = dkm.sweep(dkm.KMeans(random_state=0, n_init=3), X, [2, 3, 4, 5, 6, 7, 8])
    assert result.best_n_clusters == 5
    for cand, model in zip(result.candidates, result.models, strict=True):
        # naive: per-point log-density of the hard-assignment spherical model
        labels = model.predict(X)
        n, d = X.shape
        resid = X - model.cluster_centers_[labels]
        var = (resid**2).sum() / (n * d)
        nk = np.bincount(labels, minlength=cand.n_clusters)
        ll = np.sum(
            np.log(nk[labels] / n)
            - d / 2 * np.log(2 * np.pi * var)
            - (resid**2).sum(axis=1) / (2 * var)
        )
        p = cand.n_clusters * d + cand.n_clusters
        assert cand.log_likelihood == pytest.approx(ll, rel=1e-10)
        assert cand.bic == pytest.approx(-2 * ll + p * math.log(n), rel=1e-10)
        assert cand.aic == pytest.approx(-2 * ll + 2 * p, rel=1e-10)
    picked = dkm.sweep(dkm.KMeans(random_state=0), X, [2, 5, 8], criterion="aic")
    assert picked.criterion == "aic" and picked.best_model is picked.models[1]


def test_sweep_candidates_share_passes():
    X = blobs(4000, 3, 4, seed=5)
    with PassCounter() as counter:
        result = dkm.sweep(dkm.KMeans(random_state=0, max_iter=50), X, [2, 3, 4, 5])
    most = max(m.n_iter_ for m in result.models)
    assert len(counter.passes) == most + 1  # every k in the same passes; then final inertia
    assert counter.models[0] == 4 and Counter(counter.models)[4] >= 2


@pytest.mark.parametrize(
    "candidates, message",
    [
        ([], "at least one"),
        ([3, 0], "positive integers"),
        ([2, 2.5], "positive integers"),
        ([3, 4, 3], "repeat"),
        ([True], "positive integers"),
    ],
)
def test_bad_candidates_are_named(candidates, message):
    with pytest.raises(ValueError, match=message):
        check_candidates(candidates)
    with pytest.raises(ValueError, match=message):
        dkm.sweep(dkm.KMeans(), blobs(100, 2, 2), candidates)


def test_bad_criterion_and_estimator():
    X = blobs(100, 2, 2)
    with pytest.raises(ValueError, match="criterion"):
        dkm.sweep(dkm.KMeans(), X, [2], criterion="hqc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dkm KMeans or GaussianMixture"):
        dkm.sweep(cluster.KMeans(), X, [2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_clusters=9"):
        dkm.sweep(dkm.KMeans(), X[:5], [2, 9])


# --------------------------------------------------------------------------- the job


def test_config_candidates():
    from dkm.config import ConfigError, ModelConfig, validate_config

    assert ModelConfig(n_clusters=5).candidates() is None
    assert ModelConfig(n_clusters=[8, 4, 16]).candidates() == [8, 4, 16]
    assert ModelConfig(n_clusters={"min": 2, "max": 8, "step": 3}).candidates() == [2, 5, 8]
    assert ModelConfig(n_clusters={"min": 3, "max": 3}).k == 3
    for bad, message in [
        ({"n_clusters": []}, "at least one candidate"),
        ({"n_clusters": [4, 4]}, "candidates repeat"),
        ({"n_clusters": [4, 0]}, r"n_clusters\[1\]: expected an integer ≥ 1, got 0"),
        ({"n_clusters": {"min": 9, "max": 3}}, "must not exceed max"),
        ({"n_clusters": {"min": 2}}, "max"),
        ({"criterion": "hqc"}, "criterion"),
    ]:
        raw = {"output": {"path": "x"}, "model": bad}
        with pytest.raises(ConfigError, match=message):
            validate_config(raw)


def test_dkm_run_chooses_k_and_reports_the_criteria(tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    config = {
        "data": {"kind": "synthetic", "n": 30000, "d": 3, "k": 5, "seed": 4, "chunk_rows": 5000},
        "model": {"mode": "kmeans", "n_clusters": {"min": 2, "max": 8}, "n_init": 2},
        "cluster": {"kind": "local", "n_workers": 2, "processes": False},
        "output": {"path": "out"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "dkm.cli", "run", "c.yaml", "--log-format", "json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    selection = summary["selection"]
    table = selection["candidates"]
    assert [c["n_clusters"] for c in table] == list(range(2, 9))
    assert selection["criterion"] == "bic" and summary["n_clusters"] == selection["n_clusters"]
    assert selection["n_clusters"] == min(table, key=lambda c: c["bic"])["n_clusters"] == 5
    model = dkm.load_model(str(tmp_path / "out" / "model"))
    assert model.cluster_centers_.shape == (5, 3)
    assert len(summary["cluster_sizes"]) == 5
    report = tmp_path / "out" / "report"
    assert (report / "criterion.png").stat().st_size > 10_000
    assert "Choosing k" in (report / "index.html").read_text()
    # every model's iterations were logged, told apart by their index
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    models = {r["model"] for r in lines if r.get("event") == "iteration"}
    assert models == set(range(7 * 2))
