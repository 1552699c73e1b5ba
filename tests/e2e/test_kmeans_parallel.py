"""k-means‖ initialisation (dkm.kmeans_parallel): passes, reproducibility, weights, quality."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import blobs
from sklearn.cluster import KMeans as SKKMeans

import dkm.kmeans_parallel as kmp
from dkm.engine import ChunkedData, summarize
from dkm.kernels.init import candidate_capacity
from dkm.kmeans_parallel import kmeans_parallel
from dkm.stats import CandidateSample


def grid_blobs(
    n: int, side: int = 5, spacing: float = 20.0, seed: int = 0, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """side² round Gaussian clusters (sd 1) on a square grid: an A-/S-set in miniature."""
    rng = np.random.default_rng(seed)
    g = np.arange(side) * spacing
    truth = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    labels = rng.integers(len(truth), size=n)
    return (truth[labels] + rng.normal(size=(n, 2))).astype(dtype), truth


def centroid_index(found: np.ndarray, truth: np.ndarray) -> int:
    """Fränti's CI: orphans (centres nobody maps to) in either direction, the larger."""

    def orphans(a: np.ndarray, b: np.ndarray) -> int:
        nearest = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).argmin(axis=1)
        return int(len(b) - len(np.unique(nearest)))

    return max(orphans(found, truth), orphans(truth, found))


def prepared(
    X: np.ndarray,
    chunks: int,
    weights: np.ndarray | None = None,
    nan_policy: str = "raise",
    seed: int = 0,
) -> tuple[ChunkedData, Any]:
    """ChunkedData centred on the mean, and the summary the estimators would have."""
    w = None if weights is None else da.from_array(weights, chunks=chunks)
    data = ChunkedData.from_dask(da.from_array(X, chunks=(chunks, -1)), w, nan_policy)
    summary = summarize(data, sample_size=min(1000, len(X)), seed=seed)
    return data.with_origin(summary.mean), summary


def init(X: np.ndarray, k: int, seed: int, chunks: int = 1000, **kw: Any) -> np.ndarray:
    """k-means‖ centres in data coordinates."""
    weights = kw.pop("weights", None)
    nan_policy = kw.pop("nan_policy", "raise")
    data, summary = prepared(X, chunks, weights, nan_policy, seed)
    return kmeans_parallel(data, k, seed, summary=summary, **kw) + data.origin


def as_set(points: np.ndarray) -> set[tuple[float, ...]]:
    """The distinct points, to 8 decimals (centring and un-centring rounds the last bit)."""
    return {tuple(p) for p in np.round(np.asarray(points, np.float64), 8)}


# --------------------------------------------------------------------------- passes


class ChunkReads:
    """Counts how often each chunk of a Dask array is computed."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, block: np.ndarray) -> np.ndarray:
        with self._lock:
            self.count += 1
        return block


@pytest.mark.parametrize("n_rounds", [1, 5])
@pytest.mark.parametrize("with_summary", [True, False])
def test_passes_over_the_data_are_rounds_plus_one(
    monkeypatch: pytest.MonkeyPatch, n_rounds: int, with_summary: bool
) -> None:
    X, _ = grid_blobs(6000, side=3)
    reads = ChunkReads()
    Xd = da.from_array(X, chunks=(1000, -1)).map_blocks(reads, dtype=X.dtype)
    data = ChunkedData.from_dask(Xd)
    summary = summarize(data, sample_size=500, seed=0)
    data = data.with_origin(summary.mean)

    computes = []

    def counting_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        computes.append(keys)
        return dask.threaded.get(dsk, keys, **kwargs)

    reads.count = 0
    with dask.config.set(scheduler=counting_get):
        centres = kmeans_parallel(
            data, 9, 0, n_rounds=n_rounds, summary=summary if with_summary else None
        )
    expected = n_rounds + 1 + (0 if with_summary else 1)
    assert centres.shape == (9, 2)
    assert reads.count == expected * Xd.numblocks[0]  # each pass reads every chunk once
    assert len(computes) == expected  # one graph submission per pass


def test_candidates_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client memory: at most 1 + rounds · capacity(l) candidates, whatever n."""
    seen: list[int] = []
    real = kmp.recluster

    def spy(points: np.ndarray, *args: Any) -> np.ndarray:
        seen.append(points.shape[0])
        return real(points, *args)

    monkeypatch.setattr(kmp, "recluster", spy)
    X, _ = grid_blobs(40_000)
    init(X, 25, 0, chunks=5000, n_rounds=5, oversampling_factor=2.0)
    (m,) = seen
    assert 25 <= m <= 1 + 5 * candidate_capacity(50.0)
    # the expected count is 1 + Σ_rounds E[chosen] <= 1 + 5·l; far below n
    assert m < 1 + 5 * 50 * 1.5


# --------------------------------------------------------------------------- reproducibility


def test_same_centres_for_any_chunking_and_fan_in() -> None:
    X, _ = grid_blobs(9000)
    ref = init(X, 25, 3, chunks=1000)
    for chunks, split_every in [(9000, 8), (777, 2), (2500, 3)]:
        data, summary = prepared(X, chunks, seed=3)
        got = kmeans_parallel(data, 25, 3, split_every=split_every, summary=summary)
        np.testing.assert_allclose(got + data.origin, ref, rtol=1e-10, atol=1e-8)


def test_same_centres_with_sync_and_threaded_schedulers() -> None:
    X, _ = grid_blobs(9000)
    data, summary = prepared(X, 700, seed=5)
    with dask.config.set(scheduler="synchronous"):
        sync = kmeans_parallel(data, 25, 5, summary=summary)
    with dask.config.set(scheduler="threads"):
        threads = kmeans_parallel(data, 25, 5, summary=summary)
    np.testing.assert_array_equal(sync, threads)


def test_random_state_reproducible_and_seeds_differ() -> None:
    X, _ = grid_blobs(5000)
    data, summary = prepared(X, 1000)
    a = kmeans_parallel(data, 25, np.random.RandomState(7), summary=summary)
    b = kmeans_parallel(data, 25, 7, summary=summary)
    c = kmeans_parallel(data, 25, 8, summary=summary)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_first_centre_pass_without_summary_is_chunking_independent() -> None:
    X, _ = grid_blobs(6000)
    out = []
    for chunks in (1000, 2345):
        data = ChunkedData.from_dask(da.from_array(X, chunks=(chunks, -1)))
        out.append(kmeans_parallel(data, 25, 11))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-10, atol=1e-8)


# --------------------------------------------------------------------------- weights


def test_a_heavy_point_always_gets_a_centre() -> None:
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(2000, 2))
    heavy = 1234
    X[heavy] = [0.9, 0.9]
    w = np.ones(len(X))
    w[heavy] = 1e6
    for seed in range(10):
        centres = init(X, 3, seed, chunks=300, weights=w)
        assert np.sqrt(((centres - X[heavy]) ** 2).sum(1)).min() < 1e-3, seed


def test_zero_weight_rows_are_never_chosen() -> None:
    """k = number of positive-weight rows: the centres are exactly those rows."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 3))
    X[:10] += 100.0  # far away: the likeliest picks if weights were ignored
    w = np.ones(30)
    w[:10] = 0.0
    for seed in range(5):
        centres = init(X, 20, seed, chunks=7, weights=w)
        assert as_set(centres) == as_set(X[10:]), seed
    # and with fewer centres, none lands near the zero-weight rows
    centres = init(X, 3, 0, chunks=7, weights=w)
    assert np.abs(centres).max() < 50


def test_nan_rows_dropped_are_never_chosen() -> None:
    X, truth = grid_blobs(4000, side=3)
    X[::7] = np.nan
    centres = init(X, 9, 0, chunks=500, nan_policy="drop")
    assert np.isfinite(centres).all()
    assert centroid_index(centres, truth) == 0


# --------------------------------------------------------------------------- sizes


def test_k_equals_one() -> None:
    X = blobs(3000, d=3, k=4)
    centres = init(X, 1, 0)
    assert centres.shape == (1, 3)
    assert np.all((centres >= X.min(0)) & (centres <= X.max(0)))


def test_k_equals_n_gives_every_point() -> None:
    X = blobs(12, d=2, k=3)
    for seed in range(3):
        assert as_set(init(X, 12, seed, chunks=5)) == as_set(X)


def test_fewer_rows_than_clusters_is_an_error() -> None:
    X = blobs(5, d=2, k=2)
    data = ChunkedData.from_dask(da.from_array(X, chunks=2))
    with pytest.raises(ValueError, match="n_samples=5 should be >= n_clusters=6"):
        kmeans_parallel(data, 6, 0)


def test_fewer_distinct_points_than_clusters_give_duplicate_centres() -> None:
    """As k-means++ does; the k-means fit then warns (tests/e2e/test_degenerate.py)."""
    points = np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 1.0]])
    X = np.repeat(points, 10, axis=0)
    data = ChunkedData.from_dask(da.from_array(X, chunks=8))
    centres = kmeans_parallel(data, 4, 0)
    assert centres.shape == (4, 2)
    assert as_set(centres) == as_set(points)


@pytest.mark.parametrize("seed", [0, 1])
def test_fewer_distinct_points_stop_at_the_first_round_without_a_new_one(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Distances to the candidates round to tiny non-zero costs, so rounds go on
    choosing copies of candidates: the first round that finds no new distinct point
    ends the sampling (it used to take 100 extra rounds and raise)."""
    points = np.random.default_rng(seed).normal(size=(20, 3))
    X = np.repeat(points, 10, axis=0)
    rounds: list[int] = []
    real = kmp._round_pass

    def spy(*args: Any) -> Any:
        rounds.append(1)
        return real(*args)

    monkeypatch.setattr(kmp, "_round_pass", spy)
    centres = init(X, 30, seed, chunks=37)
    assert len(rounds) <= 5 + 1
    assert centres.shape == (30, 3)
    assert as_set(centres) == as_set(points)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"oversampling_factor": 0.0}, "oversampling_factor"),
        ({"oversampling_factor": float("nan")}, "oversampling_factor"),
        ({"n_rounds": 0}, "n_rounds"),
        ({"split_every": 1}, "split_every"),
    ],
)
def test_bad_parameters(kwargs: dict[str, Any], match: str) -> None:
    data = ChunkedData.from_dask(da.from_array(blobs(50), chunks=10))
    with pytest.raises(ValueError, match=match):
        kmeans_parallel(data, 3, 0, **kwargs)


# --------------------------------------------------------------------------- fallbacks


def test_too_few_candidates_take_more_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny oversampling leaves < k candidates after n_rounds: more rounds, not random."""
    X, _ = grid_blobs(3000, side=3, spacing=50.0)
    passes = []
    real = kmp._round_pass

    def spy(*args: Any) -> Any:
        passes.append(args[2])  # the round's l
        return real(*args)

    monkeypatch.setattr(kmp, "_round_pass", spy)
    for seed in range(3):
        passes.clear()
        centres = init(X, 9, seed, chunks=500, n_rounds=1, oversampling_factor=0.01)
        assert len(as_set(centres)) == 9
        assert np.all(np.abs(centres - X.mean(0)) < np.abs(X - X.mean(0)).max(0))
        assert len(passes) > 1
        assert passes[0] == pytest.approx(0.09)
        assert passes[1:] == [18.0] * (len(passes) - 1)  # l = 2k in the extra rounds


def test_extra_rounds_find_a_lone_point_among_duplicates() -> None:
    # A heavy (the first centre), 50 copies of B far away, C near A: duplicates of B
    # are chosen first; the rounds go on until C, the third distinct point, is found.
    A, B, C = [0.0, 0.0], [100.0, 0.0], [10.0, 0.0]
    X = np.array([A] + [B] * 50 + [C])
    w = np.ones(len(X))
    w[0] = 1e6
    for seed in range(3):
        centres = init(X, 3, seed, chunks=10, weights=w, n_rounds=1, oversampling_factor=1e-3)
        assert as_set(centres) == {tuple(A), tuple(B), tuple(C)}


def test_distinct_candidates_without_weight_complete_the_centres(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """k = n where a candidate lost its own point to a neighbour within rounding."""
    X = blobs(12, d=2, k=3)
    real = kmp.stats_pass

    def lossy(*args: Any, **kwargs: Any) -> Any:
        stats = real(*args, **kwargs)
        nk = stats.nk.copy()
        nk[1] = 0.0  # as if candidate 1's point had been assigned to another
        return dataclasses.replace(stats, nk=nk)

    monkeypatch.setattr(kmp, "stats_pass", lossy)
    assert as_set(init(X, 12, 0, chunks=5)) == as_set(X)


def test_an_overfull_round_warns_and_keeps_the_highest_priorities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kmp, "candidate_capacity", lambda expected: 2)
    X, _ = grid_blobs(2000, side=3)
    with pytest.warns(RuntimeWarning, match="chose more than 2 points"):
        centres = init(X, 9, 0, chunks=500)
    assert centres.shape == (9, 2)


def test_candidate_sample_merge_is_the_global_top() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(500, 2))
    w = rng.uniform(0, 2, size=500)
    w[::5] = 0.0
    d2 = (X**2).sum(1)
    whole = CandidateSample.from_chunk(20, X, w, d2, 3.0, 0, 42)
    parts = [
        CandidateSample.from_chunk(20, X[i : i + 64], w[i : i + 64], d2[i : i + 64], 3.0, i, 42)
        for i in range(0, 500, 64)
    ]
    merged = parts[0]
    for p in parts[1:]:
        merged = p.merge(merged)  # another order than the rows'
    np.testing.assert_array_equal(merged.rows, whole.rows)
    np.testing.assert_allclose(merged.cost, whole.cost, rtol=1e-13)
    assert not np.isin(merged.rows, np.flatnonzero(w == 0)).any()
    # chosen iff u < l·w·d²/ψ
    from dkm.stats import uniform_from_rows

    rows = np.arange(500)
    u = uniform_from_rows(rows, 42)
    expect = np.flatnonzero(u < 3.0 * w * d2 / whole.cost)
    assert set(whole.rows[whole.chosen()]) == set(expect)
    assert not whole.truncated


# --------------------------------------------------------------------------- quality


def test_quality_on_grid_blobs_centroid_index_zero_for_most_seeds() -> None:
    X, truth = grid_blobs(20_000, side=6, spacing=12.0)
    cis = [centroid_index(init(X, 36, seed, chunks=4000), truth) for seed in range(10)]
    assert sum(ci == 0 for ci in cis) >= 8, cis
    assert max(cis) <= 1, cis


def test_float32_input() -> None:
    X, truth = grid_blobs(8000, dtype=np.float32)
    centres = init(X, 25, 0, chunks=1000)
    assert centres.dtype == np.float64
    assert centroid_index(centres, truth) == 0
    # and it is a useful start: Lloyd from it reaches the true partition's inertia
    km = SKKMeans(25, init=centres.astype(np.float32), n_init=1).fit(X)
    ref = SKKMeans(25, init=truth.astype(np.float32), n_init=1).fit(X)
    assert km.inertia_ <= ref.inertia_ * (1 + 1e-5)


# --------------------------------------------------------------------------- estimators


def test_kmeans_estimator_with_k_means_parallel_init() -> None:
    """``init="k-means||"``: summary pass, rounds + 1 init passes, then Lloyd; CI 0."""
    import dkm

    X, truth = grid_blobs(20_000, side=5)
    reads = ChunkReads()
    Xd = da.from_array(X, chunks=(2000, -1)).map_blocks(reads, dtype=X.dtype)
    reads.count = 0  # map_blocks ran it once on an empty block for its metadata
    est = dkm.KMeans(25, init="k-means||", init_rounds=3, random_state=0).fit(Xd)
    assert centroid_index(est.cluster_centers_, truth) == 0
    # 1 summary + (3 rounds + 1 weighting) + n_iter Lloyd + 1 final inertia
    assert reads.count == (1 + 4 + est.n_iter_ + 1) * Xd.numblocks[0]
    again = dkm.KMeans(25, init="k-means||", init_rounds=3, random_state=0).fit(X)
    np.testing.assert_allclose(again.cluster_centers_, est.cluster_centers_, rtol=1e-10)
    assert dkm.KMeans(init="k-means||")._n_init() == 1
    with pytest.raises(ValueError, match="oversampling_factor"):
        dkm.KMeans(4, init="k-means||", oversampling_factor=0).fit(X)


def test_gmm_init_params_k_means_parallel_and_the_config() -> None:
    import dkm
    from dkm.config import validate_config
    from dkm.job import build_estimator

    X, truth = grid_blobs(5000, side=3)
    gm = dkm.GaussianMixture(9, init_params="k-means||", random_state=0).fit(X)
    assert centroid_index(gm.means_, truth) == 0
    raw = {
        "model": {"n_clusters": 9, "init": "k-means||", "oversampling_factor": 3, "init_rounds": 2},
        "data": {"kind": "synthetic"},
        "output": {"path": "x"},
    }
    km = build_estimator(validate_config(raw).model, 8, None)
    assert isinstance(km, dkm.KMeans)
    assert (km.init, km.oversampling_factor, km.init_rounds) == ("k-means||", 3.0, 2)
    raw["model"] = {"mode": "gmm", "n_clusters": 9, "init": "k-means||"}
    gmm = build_estimator(validate_config(raw).model, 8, None)
    assert isinstance(gmm, dkm.GaussianMixture) and gmm.init_params == "k-means||"
