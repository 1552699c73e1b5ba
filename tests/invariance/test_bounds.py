"""Hamerly bounds kept between k-means passes: the same bits as searching every row."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from conftest import blobs

import dkm
import dkm.engine
from dkm.engine import IterationInfo
from dkm.kernels import MixtureParams, _fused, bounds, estep, kmeans_centres
from dkm.stats import SuffStats


def assert_same_stats(got: SuffStats, ref: SuffStats) -> None:
    np.testing.assert_array_equal(got.nk, ref.nk)
    np.testing.assert_array_equal(got.sx, ref.sx)
    assert got.objective == ref.objective
    if ref.sxx is not None:
        np.testing.assert_array_equal(got.sxx, ref.sxx)
    if ref.farthest is not None:
        assert got.farthest is not None
        np.testing.assert_array_equal(got.farthest.rows, ref.farthest.rows)
        np.testing.assert_array_equal(got.farthest.distances, ref.farthest.distances)
        np.testing.assert_array_equal(got.farthest.labels, ref.farthest.labels)


def lloyd_both_ways(
    X, C0, passes, key, *, w=None, n_farthest=0, moments="none", jump=None, origin=None
):
    """Lloyd from ``C0``: each pass searching every row and with the bounds under
    ``key``; asserts the statistics are the same bits; returns the bounds' history of
    (passes used, rows searched)."""
    C, history = np.asarray(C0, np.float64), []
    for p in range(passes):
        params = MixtureParams.identity(C)
        kw = {"assignment": "hard", "moments": moments, "n_farthest": n_farthest, "origin": origin}
        ref = estep(X, params, sample_weight=w, shift=None, **kw)
        got = estep(X, params, sample_weight=w, bounds_key=key, **kw)
        assert_same_stats(got, ref)
        held = bounds.CACHE.peek(key)
        assert held is not None
        history.append((held.passes, held.searched))
        C, _ = kmeans_centres(ref)
        if jump is not None and p == jump:
            C = C.copy()
            C[0] += 40.0  # one centre leaps across the data (a re-seed does that)
    return history


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(bounds, "CACHE", bounds.BoundsCache())  # each test its own


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [3, 32, _fused.SMALL_D + 8])  # the fused search; the GEMM
@pytest.mark.parametrize("weighted", [False, True])
def test_bounds_give_the_bits_of_a_full_search(dtype, d, weighted):
    X = blobs(6000, d, 12, seed=1, dtype=dtype)
    X = X - X.mean(axis=0)  # the engine's kernels see centred rows
    w = np.random.default_rng(2).uniform(0.0, 2.0, len(X)) if weighted else None
    C0 = X[np.random.default_rng(3).choice(len(X), 12, replace=False)]
    history = lloyd_both_ways(X, C0, 12, ("fit", 0, 0), w=w, n_farthest=12)
    assert [p for p, _ in history] == list(range(12))  # kept, then used, every pass
    # once the centres settle, the bounds settle most rows: far fewer searched
    assert history[-1][1] < 0.2 * len(X)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_centre_that_leaps_second_moments_and_rows_centred_as_read(dtype):
    X = blobs(4000, 5, 8, seed=4, dtype=dtype) + 100.0  # the kernels centre the rows
    origin = X.mean(axis=0, dtype=np.float64)
    C0 = X[:8] - origin
    history = lloyd_both_ways(
        X, C0, 8, ("fit", 0, 0), n_farthest=8, moments="diag", jump=3, origin=origin
    )
    assert history[4][1] > history[3][1]  # the leap unsettled rows: they were searched


def test_rows_on_the_bisectors_keep_the_lowest_index():
    """Rows exactly between two centres (ties, lowest index wins) and rows within
    rounding of a tie, under centres that creep by less than the rounding: the bounds
    must leave every such row to the full search."""
    rng = np.random.default_rng(5)
    grid = np.stack(np.meshgrid(np.arange(-4, 5), np.arange(-4, 5)), -1).reshape(-1, 2)
    X = np.repeat(grid, 20, axis=0).astype(np.float32)
    X += rng.normal(scale=1e-6, size=X.shape).astype(np.float32) * (rng.random((len(X), 1)) < 0.5)
    C = np.array([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    key = ("ties", 0, 0)
    for p in range(8):
        params = MixtureParams.identity(C)
        ref = estep(X, params, assignment="hard", moments="none")
        got = estep(X, params, assignment="hard", moments="none", bounds_key=key)
        assert_same_stats(got, ref)
        C = C + rng.normal(scale=1e-7, size=C.shape) * (p % 2)


def test_bounds_are_given_up_where_they_settle_too_few_rows(monkeypatch):
    X = blobs(3000, 4, 6, seed=6)
    X = X - X.mean(axis=0)
    monkeypatch.setattr(bounds, "GIVE_UP", -1.0)  # any share searched is too many
    key = ("fit", 0, 0)
    lloyd_both_ways(X, X[:6], 6, key)
    held = bounds.CACHE.peek(key)
    assert held is not None and held.off and held.labels.size == 0
    assert held.passes == bounds.TRIAL_PASSES + 1  # stopped counting when it gave up


def test_no_room_no_bounds(monkeypatch):
    monkeypatch.setattr(bounds, "CACHE_BYTES", 0)
    X = blobs(1000, 3, 4)
    params = MixtureParams.identity(X[:4])
    estep(X, params, assignment="hard", moments="none", bounds_key=("fit", 0, 0))
    assert not bounds.CACHE.fits_held()


def test_cache_evicts_other_fits_first_and_never_its_own():
    cache = bounds.BoundsCache()
    C = np.zeros((2, 3))

    def entry(n):
        return bounds.Bounds.empty(n, C)

    size = entry(100).nbytes
    assert cache.put(("a", 0, 0), entry(100), capacity=3 * size)
    assert cache.put(("a", 0, 1), entry(100), capacity=3 * size)
    assert cache.put(("b", 0, 0), entry(100), capacity=3 * size)
    assert cache.put(("b", 0, 1), entry(100), capacity=3 * size)  # evicts a's oldest
    assert cache.fits_held() == {"a", "b"} and cache.peek(("a", 0, 0)) is None
    assert cache.put(("b", 0, 2), entry(100), capacity=3 * size)  # evicts a's last
    assert cache.fits_held() == {"b"}
    assert not cache.put(("b", 0, 3), entry(100), capacity=3 * size)  # not its own
    assert len(cache) == 3
    taken = cache.take(("b", 0, 0), 100, C)  # taking removes: no two tasks share one
    assert taken is not None and cache.peek(("b", 0, 0)) is None
    assert cache.take(("b", 0, 1), 99, C) is None  # another chunk's shape: dropped
    assert cache.peek(("b", 0, 1)) is None
    assert len(cache) == 1  # b's third
    assert cache.has_room(("c", 0, 0), 100, C, capacity=size + size // 2)  # b's gives way
    assert not cache.has_room(("b", 0, 9), 100, C, capacity=size + size // 2)  # b's own: no
    cache.release("b")
    assert len(cache) == 0 and cache.nbytes == 0


def test_cache_costs_no_more_per_chunk_with_more_chunks(monkeypatch):
    """Storing a chunk's bounds and asking for room look at that entry alone, not at
    every chunk's (which made a pass quadratic in the number of chunks)."""
    cache = bounds.BoundsCache()
    C = np.zeros((2, 3))
    looked = []
    nbytes = bounds.Bounds.nbytes.fget
    monkeypatch.setattr(bounds.Bounds, "nbytes", property(lambda b: looked.append(1) or nbytes(b)))
    for chunk in range(2000):
        assert cache.has_room(("a", 0, chunk), 10, C, capacity=1 << 30)
        assert cache.put(("a", 0, chunk), bounds.Bounds.empty(10, C), capacity=1 << 30)
    assert len(looked) <= 2 * 2000
    assert cache.nbytes == 2000 * nbytes(bounds.Bounds.empty(10, C))
    cache.release("a")
    assert cache.nbytes == 0 and cache.has_room(("a", 0, 0), 10, C, capacity=1000)


def test_a_fit_larger_than_the_cache_builds_bounds_only_where_they_are_kept(monkeypatch):
    X = blobs(4000, 3, 4, seed=11)
    C = X[:4]
    one_chunk = bounds.Bounds.empty(1000, C).nbytes
    monkeypatch.setattr(bounds, "CACHE_BYTES", 2 * one_chunk)
    built = []
    real_set_bounds = bounds_kernels().set_bounds_all
    monkeypatch.setattr(
        bounds_kernels(), "set_bounds_all", lambda *a: built.append(1) or real_set_bounds(*a)
    )
    calls = []
    for _ in range(2):
        for chunk in range(4):
            rows = slice(1000 * chunk, 1000 * (chunk + 1))
            before = len(built)
            estep(X[rows], MixtureParams.identity(C), assignment="hard", moments="none",
                  row_offset=rows.start, bounds_key=("big", 0, chunk))  # fmt: skip
            calls.append(len(built) - before)
    assert len(bounds.CACHE) == 2  # the first two chunks' bounds, kept and used again
    # built in the first pass for the two chunks that fit, never for the others, and
    # the same centres again settle every row: nothing rebuilt
    assert calls[0] > 0 and calls[1] > 0 and calls[2:] == [0] * 6


def bounds_kernels():
    from dkm.kernels import _fused

    return _fused


def test_worth_keeping_after_a_warm_start_not_while_centres_travel():
    rng = np.random.default_rng(7)
    C = rng.normal(scale=10.0, size=(64, 8))
    assert bounds.worth_keeping(C, C + rng.normal(scale=1e-3, size=C.shape))
    assert not bounds.worth_keeping(C, C + rng.normal(scale=3.0, size=C.shape))
    assert bounds.worth_keeping(C[:1], C[:1] + 5.0)  # one centre: nothing to confuse


def fit(Xd, algorithm, callback=None, **kw):
    km = dkm.KMeans(
        16,
        init="random",
        n_init=2,
        random_state=0,
        tol=0.0,
        callback=callback,
        algorithm=algorithm,
        **kw,
    )
    return km.fit(Xd)


def test_fit_with_bounds_is_the_fit_without():
    X = blobs(8000, 6, 16, seed=8, dtype=np.float32)
    Xd = da.from_array(X, chunks=(1000, -1))
    held = []
    with_bounds = fit(Xd, "hamerly", lambda info: held.append(bounds.CACHE.nbytes))
    without = fit(Xd, "lloyd")
    assert max(held) > 0  # the bounds were kept during the fit ...
    assert not bounds.CACHE.fits_held()  # ... and released at its end
    np.testing.assert_array_equal(with_bounds.cluster_centers_, without.cluster_centers_)
    assert with_bounds.inertia_ == without.inertia_
    assert with_bounds.n_iter_ == without.n_iter_
    objectives = [[i.objective for i in m.history_] for m in (with_bounds, without)]
    assert objectives[0] == objectives[1]
    np.testing.assert_array_equal(with_bounds.labels_.compute(), without.labels_.compute())


@pytest.mark.parametrize("d", [6, _fused.SMALL_D, _fused.SMALL_D + 1, 300])
def test_by_default_the_bounds_are_kept_for_rows_of_any_width(d):
    """algorithm="auto" (the default): bounds where the compiled row pass searches
    (each row's bits its own) and for wider rows that BLAS's GEMM searches, with the
    bits of searching every row."""
    assert dkm.KMeans().algorithm == "auto"
    X = blobs(4000, d, 8, seed=11, dtype=np.float32)
    Xd = da.from_array(X, chunks=(1000, -1))
    held = []
    by_default = fit(Xd, "auto", lambda info: held.append(bounds.CACHE.nbytes))
    assert max(held) > 0
    without = fit(Xd, "lloyd")
    np.testing.assert_array_equal(by_default.cluster_centers_, without.cluster_centers_)
    assert by_default.inertia_ == without.inertia_


def test_the_decision_to_keep_bounds_runs_on_one_blas_thread(monkeypatch):
    """Between passes, a BLAS call on several threads leaves OpenBLAS's threads spinning
    into the next pass; the client's check runs on one."""
    from threadpoolctl import threadpool_info

    threads = []
    real = bounds.worth_keeping

    def spy(old, new):
        threads.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real(old, new)

    monkeypatch.setattr(bounds, "worth_keeping", spy)
    X = blobs(4000, 6, 16, seed=12, dtype=np.float32)
    fit(da.from_array(X, chunks=(1000, -1)), "auto", max_iter=4)
    assert threads and all(t == {1} for t in threads)


@pytest.mark.distributed
def test_bounds_live_in_the_workers_and_leave_with_the_fit(dask_processes):
    from distributed import Client

    X = blobs(8000, 6, 16, seed=9, dtype=np.float32)
    Xd = da.from_array(X, chunks=(1000, -1))
    reference = fit(Xd, "lloyd")
    with Client(dask_processes) as client:
        held = []

        def callback(info):
            held.append(sum(client.run(lambda: bounds.CACHE.nbytes).values()))

        Xp = client.persist(Xd)
        km = fit(Xp, "hamerly", callback)
        left = client.run(lambda: len(bounds.CACHE.fits_held()))
        for _ in range(50):  # the release does not wait for the workers
            if not any(left.values()):
                break
            left = client.run(lambda: len(bounds.CACHE.fits_held()))
    assert max(held) > 0
    assert not any(left.values())
    np.testing.assert_array_equal(km.cluster_centers_, reference.cluster_centers_)
    assert km.inertia_ == reference.inertia_ and km.n_iter_ == reference.n_iter_


def test_rows_within_rounding_of_a_tie_are_searched():
    """Far from the origin, float32's GEMM orders two nearly equidistant centres by
    its rounding, not by the exact distances; as the centres creep by less than that,
    its order flips. The margin leaves such rows to the search, which flips with it."""
    rng = np.random.default_rng(10)
    d = 16
    a, b = np.full(d, 1000.0), np.full(d, 1000.0)
    a[0], b[0] = 990.0, 1010.0
    X = np.repeat(((a + b) / 2)[None, :], 4000, axis=0)
    X[:, 0] += rng.uniform(-0.05, 0.05, len(X))
    X[:, 1:] += rng.normal(scale=3.0, size=(len(X), d - 1))
    X = X.astype(np.float32)
    C = np.stack([a, b, np.full(d, -1000.0)])
    key, searched = ("near-ties", 0, 0), []
    for _ in range(10):
        params = MixtureParams.identity(C)
        ref = estep(X, params, assignment="hard", moments="none")
        got = estep(X, params, assignment="hard", moments="none", bounds_key=key)
        assert_same_stats(got, ref)
        held = bounds.CACHE.peek(key)
        searched.append(held.searched)
        C = C + rng.normal(scale=2e-3, size=C.shape)
    assert max(searched[1:]) > 0


def test_a_near_tie_among_gathered_rows_is_left_to_the_block():
    """A row on a bisector among settled rows is searched alone, gathered: BLAS's bits
    for one row (GEMV) are not the block GEMM's, and on a near-tie the label can differ
    (found by review). The block's own GEMM then decides. (Rows of more than SMALL_D
    features: narrower ones are searched by a pass whose bits do not depend on the rows
    beside them, test_fused's test_small_d_row_bits_do_not_depend_on_the_rows_beside_it.)"""
    dtype, d, k = np.float32, _fused.SMALL_D + 8, 3
    rng = np.random.default_rng(3)
    C = (rng.normal(size=(k, d)) * 10).astype(dtype).astype(np.float64)
    settled = C[rng.integers(0, k, 3000)] + rng.normal(scale=0.1, size=(3000, d))
    mid, axis = (C[0] + C[1]) / 2, (C[1] - C[0]) / np.linalg.norm(C[1] - C[0])
    neg2C, c2 = (-2.0 * C).astype(dtype), (C.astype(dtype) ** 2).sum(axis=1)
    for _ in range(20000):  # a row the two products label differently
        off = rng.normal(scale=3.0, size=d)
        off -= (off @ axis) * axis
        x = (mid + off + rng.uniform(-1, 1) * 30 * np.finfo(dtype).eps * axis).astype(dtype)
        X = np.concatenate([settled.astype(dtype), x[None]])
        whole = ((neg2C @ X.T) + c2[:, None]).argmin(axis=0)[-1]
        if whole != ((neg2C @ x[None].T) + c2[:, None]).argmin(axis=0)[0]:
            break
    else:
        pytest.fail("no row found whose label depends on the product")
    params, key = MixtureParams.identity(C), ("tie", 0, 0)
    ref = estep(X, params, assignment="hard", moments="none")
    estep(X, params, assignment="hard", moments="none", bounds_key=key)
    assert_same_stats(estep(X, params, assignment="hard", moments="none", bounds_key=key), ref)
    assert bounds.CACHE.peek(key).searched >= 1


def test_subnormal_data_keeps_the_full_searchs_labels():
    """Around 1e-22 in float32 the GEMM's products are subnormal and its rounding is
    absolute: the margin has a floor (found by review)."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        C = rng.normal(size=(3, 2)) * 5e-22
        X = (C[rng.integers(0, 3, 400)] + rng.normal(size=(400, 2)) * 2e-22).astype(np.float32)
        for _ in range(6):
            params = MixtureParams.identity(C.astype(np.float32).astype(np.float64))
            ref = estep(X, params, assignment="hard", moments="none")
            got = estep(X, params, assignment="hard", moments="none", bounds_key=("sub", seed, 0))
            assert_same_stats(got, ref)
            C = C + rng.normal(size=C.shape) * 2.5e-23


def test_many_centres_leave_out_the_nearest_centre_bound(monkeypatch):
    monkeypatch.setattr(bounds, "NEAR_LIMIT", 4)
    X = blobs(3000, 4, 10, seed=12)
    X = X - X.mean(axis=0)
    lloyd_both_ways(X, X[:10], 6, ("fit", 0, 0))
    moved = bounds.Drift.between(X[:10], X[1:11])
    assert np.all(moved.near == -np.inf) and np.all(np.isfinite(moved.near_movers))


def test_bounds_of_a_released_fit_are_refused():
    cache = bounds.BoundsCache()
    cache.release("gone")
    assert not cache.put(("gone", 0, 0), bounds.Bounds.empty(10, np.zeros((2, 2))))
    assert len(cache) == 0


def test_algorithm_is_a_parameter_checked_at_fit():
    """The bounds are the estimator's ``algorithm``, not a module global; a bad value is
    a ValueError naming the choices, and "lloyd" keeps no bounds at all."""
    X = blobs(2000, 4, 4, seed=3)
    with pytest.raises(ValueError, match=r"algorithm: expected one of auto, lloyd, hamerly"):
        dkm.KMeans(4, algorithm="elkan").fit(X)
    held = []
    dkm.KMeans(
        4,
        init="random",
        random_state=0,
        tol=0.0,
        max_iter=8,
        algorithm="lloyd",
        callback=lambda info: held.append(bounds.CACHE.nbytes),
    ).fit(da.from_array(X, chunks=(500, -1)))
    assert held and max(held) == 0
    assert not hasattr(dkm.engine, "KMEANS_BOUNDS")


def test_each_iteration_tells_the_share_of_rows_the_bounds_skipped():
    """What the dkm page of the dashboard plots: 0 while every row is searched, above 0
    once the bounds settle rows, and always 0 without bounds."""
    X = blobs(8000, 6, 16, seed=8, dtype=np.float32)
    Xd = da.from_array(X, chunks=(1000, -1))
    seen: list[IterationInfo] = []
    fit(Xd, "hamerly", seen.append)
    skipped = [i.skipped for i in seen]
    assert all(s is not None and 0.0 <= s <= 1.0 for s in skipped)
    assert skipped[0] == 0.0 and max(skipped) > 0.5  # type: ignore[type-var]
    seen.clear()
    fit(Xd, "lloyd", seen.append)
    assert {i.skipped for i in seen} == {0.0}


def test_wide_rows_near_a_bisector_do_not_send_their_blocks_to_the_gemm(monkeypatch):
    """Rows of more than SMALL_D features that the bounds leave unsettled lie near a
    bisector, within the GEMM's rounding allowance of a tie: searched in a product of
    their block's shape, at their place in it, they have the block GEMM's bits, and the
    blocks' other rows are not searched again (they were, whole, on KM-4's blobs: a
    pass with 98 % of the rows settled cost as much as Lloyd's)."""
    from dkm.kernels import expectation

    d, k = _fused.SMALL_D + 136, 9
    monkeypatch.setattr(expectation, "FUSED_BLOCK_ELEMENTS", 60 * (k + d))  # 60-row blocks
    X = blobs(6000, d, 8, seed=13, dtype=np.float32)
    X = X - X.mean(axis=0)
    C0 = np.concatenate([X[:8], X[8:9] + 0.5])  # two centres share a blob: a bisector in it
    columns = []
    real = expectation._Search.gemm

    def spy(self, Xb):
        columns.append(Xb.shape[0])
        return real(self, Xb)

    monkeypatch.setattr(expectation._Search, "gemm", spy)
    key = ("wide", 0, 0)
    C = np.asarray(C0, np.float64)
    for _ in range(10):
        params = MixtureParams.identity(C)
        ref = estep(X, params, assignment="hard", moments="none")
        columns.clear()
        got = estep(X, params, assignment="hard", moments="none", bounds_key=key)
        assert_same_stats(got, ref)
        C, _ = kmeans_centres(ref)
    held = bounds.CACHE.peek(key)
    assert held.passes == 9 and 0 < held.searched < 0.3 * len(X)
    assert sum(columns) < 0.4 * len(X)  # before: more than len(X), every block and more


def test_wide_rows_mostly_unsettled_are_searched_in_whole_blocks(monkeypatch):
    """Two centres in every blob: at d = 200 in float32 the rounding allowance leaves
    most rows near the bisectors unsettled. The blocks are then searched whole, as
    without bounds (no exact distances first, no product per place in a block), so
    keeping the bounds costs a pass little more than Lloyd's; the bits stay the same."""
    from dkm.kernels import expectation

    d, k = _fused.SMALL_D + 136, 8
    monkeypatch.setattr(expectation, "FUSED_BLOCK_ELEMENTS", 60 * (k + d))  # 60-row blocks
    rng = np.random.default_rng(14)
    means = rng.normal(scale=8.0, size=(4, d))
    X = (means[rng.integers(0, 4, 6000)] + rng.normal(size=(6000, d))).astype(np.float32)
    mean = X.mean(axis=0)
    X, means = X - mean, means - mean
    tightened, columns = [], []
    real_tighten, real_gemm = _fused.tighten_bounds, expectation._Search.gemm

    def tighten(*args):
        tightened.append(args[3])
        return real_tighten(*args)

    def gemm(self, Xb):
        columns.append(Xb.shape[0])
        return real_gemm(self, Xb)

    monkeypatch.setattr(_fused, "tighten_bounds", tighten)
    monkeypatch.setattr(expectation._Search, "gemm", gemm)
    key = ("halves", 0, 0)
    apart = rng.normal(size=(4, d))
    apart *= 3.0 / np.linalg.norm(apart, axis=1, keepdims=True)
    C = np.concatenate([means - apart, means + apart])
    for _ in range(6):
        params = MixtureParams.identity(C)
        ref = estep(X, params, assignment="hard", moments="none")
        tightened.clear()
        columns.clear()
        got = estep(X, params, assignment="hard", moments="none", bounds_key=key)
        assert_same_stats(got, ref)
        C = C + rng.normal(scale=1e-3, size=C.shape)  # centres that creep
    assert not tightened and sum(columns) == len(X)
    held = bounds.CACHE.peek(key)
    assert not held.off and held.searched > expectation.TIGHTEN_SHARE * len(X)
