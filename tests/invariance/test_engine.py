"""Tier 2: the reduction is invariant to chunking, fan-in and scheduler."""

from __future__ import annotations

import time

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import blobs

import dkm
from dkm.engine import (
    ChunkedData,
    EMOptions,
    IterationInfo,
    PassOptions,
    fit_em,
    release_held,
    stats_pass,
    stats_pass_many,
)
from dkm.kernels import MixtureParams
from dkm.reduce import tree_top
from dkm.stats import merge_all

X = blobs(4000, 3, 4, seed=11)
INIT_KM = X[[0, 1000, 2000, 3000]].copy()


@pytest.fixture(autouse=True)
def chunk_per_run(monkeypatch):
    """Each chunk a run of its own: these tests count the tasks and groups of chunks of
    small arrays, which would otherwise be one run (the runs have their own tests)."""
    import dkm.engine.data

    monkeypatch.setattr(dkm.engine.data, "RUN_BYTES", 0)


def fit_kmeans(Xd, **kw):
    return dkm.KMeans(4, init=INIT_KM, n_init=1, max_iter=10, tol=0, **kw).fit(Xd)


def gmm_inits(ct="full"):
    import warnings

    from sklearn.mixture import GaussianMixture as SKGMM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SKGMM(4, covariance_type=ct, max_iter=1, random_state=0).fit(X[:500])
    return dict(weights_init=ref.weights_, means_init=ref.means_, precisions_init=ref.precisions_)


def fit_gmm(Xd, ct="full", **kw):
    return dkm.GaussianMixture(4, covariance_type=ct, tol=0, max_iter=8, **gmm_inits(ct), **kw).fit(
        Xd
    )


def assert_same_kmeans(a, b, rtol=1e-10):
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=rtol)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=rtol)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_array_equal(np.asarray(a.labels_), np.asarray(b.labels_))


def assert_same_gmm(a, b, rtol=1e-10):
    np.testing.assert_allclose(a.means_, b.means_, rtol=rtol)
    np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=rtol)
    np.testing.assert_allclose(a.weights_, b.weights_, rtol=rtol)
    assert a.lower_bound_ == pytest.approx(b.lower_bound_, rel=rtol)


CHUNKINGS = [4000, 1000, 333, (1, 999, 0, 2000, 1000)]  # includes an empty chunk


@pytest.fixture(scope="module")
def gmm_reference():
    with pytest.warns(Warning):
        return fit_gmm(X)


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_kmeans_invariant_to_chunking(chunks):
    ref = fit_kmeans(X)
    got = fit_kmeans(da.from_array(X, chunks=(chunks, -1)))
    assert_same_kmeans(ref, got)


@pytest.mark.parametrize("split_every", [2, 4, 13])
def test_invariant_to_split_every(split_every, gmm_reference):
    Xd = da.from_array(X, chunks=(333, -1))  # 13 chunks: 13 merges them all in one level
    assert_same_kmeans(fit_kmeans(X), fit_kmeans(Xd, split_every=split_every))
    with pytest.warns(Warning):
        got = fit_gmm(Xd, split_every=split_every)
    assert_same_gmm(gmm_reference, got)


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("chunks", CHUNKINGS[1:], ids=str)
def test_gmm_invariant_to_chunking(ct, chunks):
    with pytest.warns(Warning):
        ref = fit_gmm(X, ct)
        got = fit_gmm(da.from_array(X, chunks=(chunks, -1)), ct)
    assert_same_gmm(ref, got)


def test_tree_shape_and_order():
    from dask.delayed import delayed

    class Cat:  # a non-commutative "merge" exposes the order of the tree
        def __init__(self, s):
            self.s = s

        def merge(self, other):
            return Cat(self.s + other.s)

    parts = [delayed(Cat)(str(i)) for i in range(10)]
    top = tree_top(parts, 3, "dkm-test")
    assert len(top) == 2  # 10 -> 4 -> 2 partial merges; the root merges on the client
    assert merge_all(dask.compute(*top)).s == "0123456789"
    graph = dask.delayed(top).dask
    levels = {k[1] for k in graph if isinstance(k, tuple) and k[0] == "dkm-test"}
    assert levels == {0, 1}
    assert tree_top(parts[:3], 3, "dkm-test") == parts[:3]  # few enough: no merge task
    with pytest.raises(ValueError, match="split_every"):
        tree_top(parts, 1, "x")
    with pytest.raises(ValueError, match="no chunks"):
        tree_top([], 3, "x")


def test_one_compute_per_iteration_and_callback():
    calls = []
    seen: list[IterationInfo] = []

    def count(*args, **kwargs):
        calls.append(1)
        return dask.threaded.get(*args, **kwargs)

    with dask.config.set(scheduler=count):
        km = dkm.KMeans(4, init=INIT_KM, n_init=1, max_iter=5, tol=0).fit(X)
        data = ChunkedData.from_dask(da.from_array(X, chunks=(1000, -1))).with_origin(X.mean(0))
        fit_em(
            data,
            MixtureParams.identity(INIT_KM - X.mean(0)),
            EMOptions("identity", "hard", max_iter=3),
            tol_abs=0.0,
            callback=seen.append,
        )
    # summary pass + one pass per iteration + final pass, then labels in memory
    assert len(calls) == (1 + km.n_iter_ + 1) + (len(seen) + 1)
    assert [i.iteration for i in seen] == list(range(1, len(seen) + 1))
    assert all(i.seconds > 0 and np.isfinite(i.objective) for i in seen)
    assert seen[-1].params.means.shape == (4, 3)
    np.testing.assert_allclose(seen[-1].params.means, km.history_[-1].params.means)


@pytest.mark.parametrize("embed_limit", [None, 0])
def test_parameters_travel_in_the_tasks_or_enter_the_graph_once(monkeypatch, embed_limit):
    """Small parameters ride inside every E-step task (no task to wait for); past
    EMBED_PARAMS_BYTES they are one key all E-step tasks share. Same totals."""
    import dkm.engine.data
    import dkm.engine.passes

    data = ChunkedData.from_dask(da.from_array(X, chunks=(500, -1)))
    seen = {}

    def spy(dsk, keys, **kwargs):  # the scheduler gets the pass's graph
        seen["graph"] = dict(dsk)
        return dask.threaded.get(dsk, keys, **kwargs)

    params = MixtureParams.identity(INIT_KM)
    with dask.config.set(num_workers=3):
        reference = stats_pass(data, params, PassOptions("hard", "none"))
    if embed_limit is not None:
        monkeypatch.setattr(dkm.engine.passes, "EMBED_PARAMS_BYTES", embed_limit)
    with dask.config.set(scheduler=spy, num_workers=3):
        total = stats_pass(data, params, PassOptions("hard", "none"))
    graph = seen["graph"]
    names = [k if isinstance(k, str) else k[0] for k in graph]
    esteps = [k for k, n in zip(graph, names, strict=True) if n.startswith("dkm-estep")]
    assert len(esteps) == 3  # one task per thread, for the 8 chunks
    shared = sum(n.startswith("dkm-params") for n in names)
    if embed_limit is None:
        assert shared == 0
        assert len({id(graph[k].func.keywords["jobs"]) for k in esteps}) == 1  # one object
    else:
        assert shared == 1
    np.testing.assert_array_equal(total.sx, reference.sx)
    assert total.objective == reference.objective


@pytest.mark.distributed
def test_same_result_on_real_scheduler_and_worker_processes(dask_processes, gmm_reference):
    from distributed import Client, get_task_stream

    Xd = da.from_array(X, chunks=(500, -1))
    threaded_km = fit_kmeans(Xd)
    with Client(dask_processes) as client:
        workers = set(client.scheduler_info()["workers"])
        assert len(workers) == 2
        with get_task_stream(client) as stream:
            dist_km = fit_kmeans(Xd)
        with pytest.warns(Warning):
            dist_gmm = fit_gmm(Xd)
        labels = dist_km.labels_.compute()
    # the E-steps ran in the worker processes, on both of them
    estep_workers = {t["worker"] for t in stream.data if "dkm-estep" in str(t["key"])}
    assert estep_workers == workers
    assert_same_kmeans(threaded_km, dist_km)
    np.testing.assert_array_equal(labels, np.asarray(threaded_km.labels_.compute()))
    assert_same_gmm(gmm_reference, dist_gmm)


@pytest.mark.distributed
def test_persisted_blocks_run_as_one_task_per_worker_thread(dask_processes):
    """Blocks persisted on the workers: one E-step task per worker thread and pass, each
    merging the blocks it holds, no merge tasks; the totals the same bits as the threaded
    scheduler's (other groups of chunks, exact merges)."""
    from distributed import Client, get_task_stream, wait

    w = np.random.default_rng(0).uniform(0.5, 2.0, len(X))
    Xd, wd = da.from_array(X, chunks=(500, -1)), da.from_array(w, chunks=500)
    params = MixtureParams.identity(INIT_KM)
    options = PassOptions("hard", "none", n_farthest=3)
    reference = stats_pass(ChunkedData.from_dask(Xd, wd), params, options, split_every=3)
    unweighted = stats_pass(ChunkedData.from_dask(Xd), params, options)
    threaded_km = fit_kmeans(Xd)
    with Client(dask_processes) as client:
        Xp, wp = client.persist([Xd, wd])
        wait([Xp, wp])
        assert ChunkedData.from_dask(Xd, wd).worker_groups(client) is None  # not persisted
        # all blocks on one worker: the other would idle, so some are moved to it, once
        (first, *_) = client.scheduler_info()["workers"]
        on_one = client.persist(da.from_array(X, (500, -1), name="on-one"), workers=[first])
        wait(on_one)
        assert set(client.who_has(on_one).values()) == {(first,)}
        with get_task_stream(client) as one_stream:
            on_one_total = stats_pass(ChunkedData.from_dask(on_one), params, options)
        spread = client.who_has(on_one)
        assert {len(h) for h in spread.values()} == {1}  # moved, not copied
        assert 3 <= sum(h != (first,) for h in spread.values()) <= 4
        del on_one
        data = ChunkedData.from_dask(Xp, wp)
        groups = data.worker_groups(client)
        assert groups is not None
        assert sorted(i for g in groups for i in g) == list(range(8))
        holders = set(client.who_has(Xp).values())
        assert len(groups) == len({h[0] for h in holders})  # one single-threaded each
        with get_task_stream(client) as stream:
            total = stats_pass(data, params, options, split_every=3)
        with get_task_stream(client) as again:
            assert_same_bits(stats_pass(data, params, options, split_every=3), total)
        km = fit_kmeans(Xp)
    names = [str(t["key"]) for t in stream.data]
    # the first pass also makes one bundle of blocks per task, which the next reuses
    assert sum("dkm-estep" in n for n in names) == len(groups)
    assert sum("dkm-blocks" in n for n in names) == len(groups) == len(names) // 2
    assert all("dkm-estep" in str(t["key"]) for t in again.data) and len(again.data) == len(groups)
    # a task per worker thread, each on the blocks its worker holds
    assert sum("dkm-estep" in str(t["key"]) for t in one_stream.data) == 2
    np.testing.assert_array_equal(on_one_total.sx, unweighted.sx, strict=True)
    for name in ("nk", "sx", "objective"):
        np.testing.assert_array_equal(getattr(total, name), getattr(reference, name), strict=True)
    assert total.farthest is not None and reference.farthest is not None
    np.testing.assert_array_equal(total.farthest.rows, reference.farthest.rows)
    np.testing.assert_array_equal(km.cluster_centers_, threaded_km.cluster_centers_, strict=True)
    assert km.inertia_ == threaded_km.inertia_


class ClientReceipts:
    """The results each pass on a client sends back to it: how many, pickled bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import pickle

        import dkm.engine.passes

        self.passes: list[tuple[int, int]] = []
        run = dkm.engine.passes._run_on_client

        def spy(*args, **kwargs):
            results = run(*args, **kwargs)
            self.passes.append((len(results), sum(len(pickle.dumps(r)) for r in results)))
            return results

        monkeypatch.setattr(dkm.engine.passes, "_run_on_client", spy)


@pytest.mark.distributed
@pytest.mark.parametrize("persist", [True, False], ids=["persisted", "from-memory"])
def test_tasks_and_client_results_per_pass_do_not_grow_with_chunks(
    dask_processes, monkeypatch, persist
):
    """16 or 256 chunks: as many E-step tasks as worker threads (2), no other task, and
    the same number and size of results reach the client; the totals agree."""
    from distributed import Client, get_task_stream, wait

    params = MixtureParams.identity(INIT_KM)
    options = PassOptions("soft", "full", n_farthest=3)
    receipts = ClientReceipts(monkeypatch)
    names, totals = {}, {}
    with Client(dask_processes) as client:
        for n_chunks in (16, 256):
            Xd = da.from_array(X, chunks=(len(X) // n_chunks, -1))
            if persist:
                Xd = client.persist(Xd)
                wait(Xd)
            data = ChunkedData.from_dask(Xd)
            stats_pass(data, params, options)  # plans and the first round trips
            with get_task_stream(client) as stream:
                totals[n_chunks] = stats_pass(data, params, options)
            names[n_chunks] = [str(t["key"]) for t in stream.data]
    for n_chunks, keys in names.items():
        assert len(keys) == sum("dkm-estep" in k for k in keys) == 2, (n_chunks, keys)
    (count16, bytes16), (count256, bytes256) = receipts.passes[1], receipts.passes[3]
    assert count16 == count256 == 2
    assert abs(bytes256 - bytes16) <= 0.1 * bytes16
    for name in ("nk", "sx", "sxx"):  # other chunks: other per-chunk roundings
        np.testing.assert_allclose(
            getattr(totals[256], name), getattr(totals[16], name), rtol=1e-12
        )


@pytest.mark.distributed
def test_a_store_is_read_inside_the_grouped_tasks(dask_processes, tmp_path):
    """Blocks read from a zarr store in every pass: one task per worker thread reads its
    range of chunks itself (no read task per chunk), with the totals of the threaded
    scheduler's two ranges."""
    from distributed import Client, get_task_stream

    da.from_array(X, chunks=(250, -1)).to_zarr(str(tmp_path / "x.zarr"))
    Xz = da.from_zarr(str(tmp_path / "x.zarr"))
    params = MixtureParams.identity(INIT_KM)
    options = PassOptions("hard", "none", n_farthest=2)
    with dask.config.set(num_workers=2):
        reference = stats_pass(ChunkedData.from_dask(Xz), params, options)
    with Client(dask_processes) as client, get_task_stream(client) as stream:
        total = stats_pass(ChunkedData.from_dask(Xz), params, options)
    keys = [str(t["key"]) for t in stream.data]
    assert sum("dkm-estep" in k for k in keys) == 2
    assert not [k for k in keys if "from-zarr" in k and "original" not in k], keys
    assert len(keys) <= 3  # at most the store's handle besides
    assert_same_bits(total, reference)


def test_a_task_holds_one_block_at_a_time(monkeypatch):
    """Blocks computed inside a pass's task (not persisted): each is dropped once its
    chunk is done, and the pass's graph holds one task per thread, none per block."""
    import weakref

    import dkm.engine.data
    from dkm.engine.passes import run_pass

    live: set[int] = set()
    seen: list[int] = []

    def block(block_id=None):
        out = X[500 * block_id[0] : 500 * (block_id[0] + 1)].copy()
        live.add(id(out))
        weakref.finalize(out, live.discard, id(out))
        return out

    Xd = da.map_blocks(block, chunks=((500,) * 8, (3,)), dtype=X.dtype)
    data = ChunkedData.from_dask(Xd)
    graphs = []

    def spy(dsk, keys, **kwargs):
        graphs.append(dict(dsk))
        return dask.threaded.get(dsk, keys, **kwargs)

    def chunk(X, w, row_offset, drop_nonfinite):
        seen.append(len(live))
        return ChunkCount(X.shape[0], row_offset)

    with dask.config.set(scheduler=spy, num_workers=1):
        total = run_pass(data, chunk, name="dkm-test", token="t", split_every=2)
    assert (total.rows, total.offsets) == (len(X), tuple(range(0, len(X), 500)))
    assert seen == [1] * 8
    assert len(graphs[0]) == 1
    # runs of two chunks: two blocks at a time, joined
    monkeypatch.setattr(dkm.engine.data, "RUN_BYTES", 2 * 500 * 3 * X.itemsize)
    seen.clear()
    data = ChunkedData.from_dask(Xd)
    with dask.config.set(scheduler="sync"):
        total = run_pass(data, chunk, name="dkm-test", token="t", split_every=2)
    assert (total.rows, total.offsets) == (len(X), tuple(range(0, len(X), 1000)))
    assert len(seen) == 4 and max(seen) <= 2


def test_small_chunks_run_together(monkeypatch):
    """Consecutive chunks smaller than RUN_BYTES reach the chunk function as one block
    (a view when the blocks are consecutive slices of one array, else a copy), fixed by
    the chunking alone; the totals agree with a chunk at a time."""
    import dkm.engine.data
    from dkm.engine.passes import run_pass

    def runs(chunks, limit):
        monkeypatch.setattr(dkm.engine.data, "RUN_BYTES", limit)
        Xd = da.from_array(np.zeros((sum(chunks), 2), np.float32), chunks=(chunks, -1))
        return [list(r) for r in ChunkedData.from_dask(Xd).runs]

    assert runs((10, 10, 10, 10, 10), 200) == [[0, 1, 2], [3, 4]]
    assert runs((10, 10, 40, 10), 200) == [[0, 1], [2], [3]]  # a large chunk alone
    assert runs((10, 10), 0) == [[0], [1]]

    def view(block_id=None):
        return X[500 * block_id[0] : 500 * (block_id[0] + 1)]

    views = da.map_blocks(view, chunks=((500,) * 8, (3,)), dtype=X.dtype)
    params = MixtureParams.identity(INIT_KM)
    options = PassOptions("soft", "full", n_farthest=3)
    one_by_one = stats_pass(ChunkedData.from_dask(views), params, options)
    monkeypatch.setattr(dkm.engine.data, "RUN_BYTES", 3 * 500 * 3 * X.itemsize)
    data = ChunkedData.from_dask(views)
    copies = ChunkedData.from_dask(da.from_array(X, chunks=(500, -1)))  # dask copies slices
    calls = []

    def chunk(X_run, w, row_offset, drop_nonfinite):
        calls.append((X_run.shape[0], row_offset, np.shares_memory(X_run, X)))
        return ChunkCount(X_run.shape[0], row_offset)

    for workers in (1, 2, 3):
        calls.clear()
        with dask.config.set(scheduler="threads", num_workers=workers):
            run_pass(data, chunk, name="dkm-test", token="t", split_every=2)
            run_pass(copies, chunk, name="dkm-test", token="c", split_every=2)
            total = stats_pass(data, params, options)
            assert_same_bits(stats_pass(copies, params, options), total)
        assert sorted(calls) == [
            *[(1000, 3000, False), (1000, 3000, True)],
            *[(1500, 0, False), (1500, 0, True), (1500, 1500, False), (1500, 1500, True)],
        ]
        for name in ("nk", "sx", "sxx"):
            got, want = getattr(total, name), getattr(one_by_one, name)
            np.testing.assert_allclose(got, want, rtol=1e-12)
        if workers == 1:
            first = total
        assert_same_bits(total, first)  # the same runs, whatever the threads


class ChunkCount:
    def __init__(self, rows, offset):
        self.rows, self.offsets = rows, (offset,)

    def merge(self, other):
        out = ChunkCount(self.rows + other.rows, 0)
        out.offsets = self.offsets + other.offsets
        return out


@pytest.mark.distributed
def test_worker_groups_are_kept_until_old_or_a_block_is_lost(dask_processes, monkeypatch):
    """The scheduler is asked where the blocks are once per GROUPS_MAX_AGE, not once per
    pass, and again at once when a block's future is no longer finished."""
    from distributed import Client, futures_of, wait

    import dkm.engine.data
    import dkm.engine.passes

    with Client(dask_processes) as client:
        Xp = client.persist(da.from_array(X, chunks=(500, -1), name="groups-kept"))
        wait(Xp)
        asked = []
        who_has = client.who_has
        monkeypatch.setattr(
            client, "who_has", lambda *a, **kw: asked.append(1) or who_has(*a, **kw)
        )
        data = ChunkedData.from_dask(Xp)
        monkeypatch.setattr(dkm.engine.data, "GROUPS_MAX_AGE", 3600.0)
        groups = data.worker_groups(client)
        assert groups is not None and len(asked) == 1
        assert data.worker_groups(client) is groups and len(asked) == 1  # kept
        monkeypatch.setattr(dkm.engine.data, "GROUPS_MAX_AGE", 0.0)
        assert data.worker_groups(client) == groups and len(asked) == 2  # too old: asked
        monkeypatch.setattr(dkm.engine.data, "GROUPS_MAX_AGE", 3600.0)
        data.worker_groups(client)
        assert len(asked) == 2
        # a block's future lost (as when its worker dies; the scheduler tells the client
        # unasked, here the client is told directly): asked again at once
        (block, *_) = futures_of(Xp)
        block._state.lose()
        assert data.worker_groups(client) == groups and len(asked) == 3
        data.worker_groups(client)
        assert len(asked) == 4  # still not finished: asked every time
        block._state.finish()
        data.worker_groups(client)
        assert len(asked) == 4


@pytest.mark.distributed
def test_a_fits_passes_hold_their_results_until_the_next_is_submitted(dask_processes):
    """On a client, each pass of a loop keeps its result futures until the next pass is
    submitted (so that their release does not delay it), released then and when the
    loop ends, without waiting for the garbage collector; the totals are those of a
    pass that releases them at once."""
    from distributed import Client, wait

    with Client(dask_processes) as client:
        Xp = client.persist(da.from_array(X, chunks=(500, -1), name="held-passes"))
        wait(Xp)
        data = ChunkedData.from_dask(Xp)
        params = MixtureParams.identity(INIT_KM)
        job = (params, None, PassOptions("hard", "none"))
        once = stats_pass_many(data, [job], split_every=3)
        held: list = []
        first = stats_pass_many(data, [job], split_every=3, held=held)
        keys = {f.key for f in held[0]}
        assert keys and keys <= set(client.futures)  # kept after the pass
        moved = (MixtureParams.identity(INIT_KM + 0.5), None, PassOptions("hard", "none"))
        stats_pass_many(data, [moved], split_every=3, held=held)
        assert len(held) == 1
        # Future.release() hands the release to the client's event loop: wait for it
        assert _eventually(lambda: not keys & set(client.futures))  # let go
        release_held(held)
        assert held == []
        assert _eventually(
            lambda: not any(str(_key_tuple(k)[0]).startswith("dkm-estep") for k in client.futures)
        )
    np.testing.assert_array_equal(first[0].sx, once[0].sx)
    assert first[0].objective == once[0].objective


def _key_tuple(key):
    return key if isinstance(key, tuple) else (str(key),)


def _eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_kmeans_worked_by_hand(dtype):
    """Four points, two clusters: centres (0, .5) and (4, .5), inertia 4 × 0.25 = 1.

    Iteration 1 moves the centres; iteration 2 finds the same labels, so the centres
    do not move (shift exactly 0) and Lloyd stops, as scikit-learn's strict convergence.
    """
    X = np.array([[0, 0], [0, 1], [4, 0], [4, 1]], dtype=dtype)
    km = dkm.KMeans(2, init=np.array([[0, 0], [4, 0]], dtype=dtype), tol=0).fit(X)
    np.testing.assert_array_equal(km.labels_, [0, 0, 1, 1])
    np.testing.assert_array_equal(km.cluster_centers_, [[0, 0.5], [4, 0.5]])
    assert km.cluster_centers_.dtype == dtype
    assert km.inertia_ == 1.0
    assert km.n_iter_ == 2 and km.converged_
    assert [h.change for h in km.history_] == [0.5, 0.0]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("kind", ["kmeans", "gmm-full", "gmm-diag"])
def test_resume_from_any_iteration_gives_the_uninterrupted_model(kind):
    from dkm.engine import ResumeState

    seen: list[IterationInfo] = []

    def make(callback=None):
        if kind == "kmeans":
            return dkm.KMeans(4, random_state=0, tol=0, max_iter=8, callback=callback)
        return dkm.GaussianMixture(
            4, covariance_type=kind[4:], random_state=0, tol=0, max_iter=8, callback=callback
        )

    full = make(seen.append).fit(X)
    for stop in sorted({1, len(seen) // 2 + 1, len(seen)}):
        info = seen[stop - 1]
        state = ResumeState.after(info, tuple(seen[:stop]))
        resumed_seen: list[IterationInfo] = []
        resumed = make(resumed_seen.append).fit(X, resume=state)
        assert [i.iteration for i in resumed_seen] == list(range(stop + 1, full.n_iter_ + 1))
        assert resumed.n_iter_ == full.n_iter_
        assert [h.iteration for h in resumed.history_] == [h.iteration for h in full.history_]
        if kind == "kmeans":
            assert_same_kmeans(full, resumed, rtol=1e-12)
        else:
            assert_same_gmm(full, resumed, rtol=1e-12)


def test_resume_refuses_a_different_model():
    from dkm.engine import ResumeState

    state = ResumeState(2, MixtureParams.identity(np.zeros((3, 3))), np.zeros(3), 1.0, False)
    with pytest.raises(ValueError, match="3 components"):
        dkm.KMeans(4).fit(X, resume=state)
    with pytest.raises(ValueError, match="n_init=1"):
        dkm.KMeans(3, n_init=2).fit(X, resume=state)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_warm_start_from_a_fitted_model_converges_at_once(ct):
    km = dkm.KMeans(4, random_state=0).fit(X)
    warm = dkm.KMeans(4, init=km).fit(X)
    assert warm.n_iter_ <= 2 and warm.converged_
    np.testing.assert_allclose(warm.cluster_centers_, km.cluster_centers_, rtol=1e-12)
    gm = dkm.GaussianMixture(4, covariance_type=ct, random_state=0).fit(X)
    again = dkm.GaussianMixture(4, covariance_type=ct, init_params=gm).fit(X)
    assert again.n_iter_ <= 2 and again.converged_
    np.testing.assert_allclose(again.means_, gm.means_, rtol=1e-6)
    from_kmeans = dkm.GaussianMixture(4, covariance_type=ct, init_params=km).fit(X)
    assert from_kmeans.converged_
    with pytest.raises(ValueError, match="expected 5"):
        dkm.GaussianMixture(5, covariance_type=ct, init_params=gm).fit(X)


def test_blas_limit_one_thread_per_task_then_restored() -> None:
    """Several chunk tasks at once: BLAS runs one thread each inside the pass, and
    its own count again afterwards; a lone task keeps BLAS's threads."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from dkm.engine.passes import _blas_limit

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and max(before) == 2
        for _ in range(2):  # the cached controller works again after restoring
            with _blas_limit(4):
                assert blas_threads() == [1] * len(before)
            assert blas_threads() == before
        with _blas_limit(1):
            assert blas_threads() == before


def test_blas_limit_reaches_a_blas_loaded_after_the_first_pass() -> None:
    """A library imported after dkm's first pass may bring a BLAS of its own (FAISS's
    OpenBLAS): the pass's limit covers it too (the pools are searched again)."""
    import json
    import subprocess
    import sys

    script = """
import json, numpy as np, dask.array as da
from threadpoolctl import threadpool_info, threadpool_limits
import dkm
from dkm.engine.passes import _blas_limit
X = da.from_array(np.random.default_rng(0).normal(size=(4000, 3)), chunks=(1000, -1))
dkm.KMeans(2, n_init=1, random_state=0, max_iter=2).fit(X)  # the pools are found
import faiss  # noqa: F401  (its own OpenBLAS)
with threadpool_limits(limits=2, user_api="blas"):
    with _blas_limit(4):
        print(json.dumps([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(counts) >= 3 and counts == [1] * len(counts)  # NumPy's, SciPy's, FAISS's


@pytest.mark.parametrize("kind", ["kmeans", "gmm"])
def test_each_iteration_tells_sizes_and_centre_movement(kind):
    """The cluster sizes of the E-step (summing to the weight) and the centres' squared
    movement (k-means: the change itself) ride along with every iteration."""
    seen: list[IterationInfo] = []
    Xd = da.from_array(X, chunks=(1000, -1))
    if kind == "kmeans":
        est = dkm.KMeans(4, init=INIT_KM, n_init=1, max_iter=6, tol=0, callback=seen.append)
    else:
        est = dkm.GaussianMixture(4, random_state=0, callback=seen.append)
    est.fit(Xd)
    assert seen and all(i.sizes is not None and i.shift is not None for i in seen)
    for i in seen:
        assert i.sizes.shape == (4,) and i.sizes.sum() == pytest.approx(len(X))
        assert i.shift >= 0.0
    if kind == "kmeans":
        assert [i.shift for i in seen] == [i.change for i in seen]
        assert all(i.skipped is not None for i in seen)
    else:
        assert all(i.skipped is None for i in seen)
        assert len(seen) >= 2
        means = [i.params.means for i in seen]
        assert seen[-1].shift == pytest.approx(((means[-1] - means[-2]) ** 2).sum())


# ------------------------------------------------------- Dask's graph nodes or the public format


def assert_same_bits(a, b, path="total", rtol=0.0):
    """Equal bit for bit, field by field (NaN equal to NaN), through nested dataclasses;
    floats within ``rtol`` when it is not 0 (chunks merged in other groups)."""
    import dataclasses

    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            assert_same_bits(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}", rtol)
    elif isinstance(a, tuple | list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_bits(x, y, f"{path}[{i}]", rtol)
    elif isinstance(a, np.ndarray | float | np.floating):
        if rtol and np.asarray(a).dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=path, strict=True)
        else:
            np.testing.assert_array_equal(a, b, err_msg=path, strict=True)
    else:
        assert a == b, path


def every_pass(Xd, wd):
    """The E-step pass (parameters inline, then as shared keys), the summary and k-means‖'s
    passes over the same data, under the current scheduler."""
    import dkm.engine.passes
    from dkm.engine import summarize
    from dkm.kmeans_parallel import kmeans_parallel

    data = ChunkedData.from_dask(Xd, wd, nan_policy="drop").with_origin(np.nanmean(X, axis=0))
    gmm = MixtureParams.identity(INIT_KM - data.origin)
    jobs = [
        (gmm, None, PassOptions("hard", "none", n_farthest=3)),
        (gmm, gmm.means, PassOptions("soft", "full", n_farthest=2)),
    ]
    out = [stats_pass_many(data, jobs, split_every=3)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dkm.engine.passes, "EMBED_PARAMS_BYTES", 0)  # parameters as graph keys
        out.append(stats_pass_many(data, jobs, split_every=3))
    out.append(summarize(data, sample_size=50, seed=3, split_every=3))
    out.append(kmeans_parallel(data, 4, 0, n_rounds=2, split_every=3))
    return out


def with_nan_row():
    Xn = X.copy()
    Xn[7, 1] = np.nan
    w = np.random.default_rng(1).uniform(0.5, 2.0, len(X))
    return da.from_array(Xn, chunks=(500, -1)), da.from_array(w, chunks=500)


def test_public_graph_format_gives_the_same_bits(monkeypatch):
    """Without Dask's graph nodes (``dkm.engine._dask``'s fallback) the passes build the
    public tuple format, and every pass gives the same bits."""
    import dkm.engine._dask

    Xd, wd = with_nan_row()
    reference = every_pass(Xd, wd)
    seen = []

    def spy(dsk, keys, **kwargs):
        seen.append([v for k, v in dsk.items() if "dkm-" in str(k)])
        return dask.threaded.get(dsk, keys, **kwargs)

    monkeypatch.setattr(dkm.engine._dask, "TASK_SPEC", False)
    with dask.config.set(scheduler=spy):
        public = every_pass(Xd, wd)
    assert seen and all(type(v) is tuple for nodes in seen for v in nodes)
    assert_same_bits(public, reference)


@pytest.mark.distributed
def test_public_graph_format_gives_the_same_bits_on_a_cluster(dask_processes, monkeypatch):
    """The same on real worker processes, blocks read per pass (two ranges of chunks, as
    two threads) and persisted (grouped by worker: other groups, the same bits)."""
    from distributed import Client, wait

    import dkm.engine._dask

    Xd, wd = with_nan_row()
    with dask.config.set(num_workers=2):
        reference = every_pass(Xd, wd)
    with Client(dask_processes) as client:
        Xp, wp = client.persist([Xd, wd])
        wait([Xp, wp])
        assert ChunkedData.from_dask(Xp, wp).worker_groups(client) is not None
        results = {}
        for task_spec in (True, False):
            monkeypatch.setattr(dkm.engine._dask, "TASK_SPEC", task_spec)
            results[task_spec] = (every_pass(Xd, wd), every_pass(Xp, wp))
    for task_spec, (read, persisted) in results.items():
        assert_same_bits(read, reference, f"task_spec={task_spec}")
        assert_same_bits(persisted, reference, f"task_spec={task_spec}, persisted")


def test_only_one_module_imports_dask_private_api():
    """dkm/engine/_dask.py is the only module importing Dask's private modules
    (``dask._*``): import-linter sees external packages whole, so this test checks it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "dkm"
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(n.split(".")[0] == "dask" and "._" in n for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"engine/_dask.py"}


def _shared_blas_threads() -> list[int]:
    """The threads of the BLAS pools the process's threads share (an OpenMP build's
    limits are each thread's own, e.g. the OpenBLAS FAISS brings, which dkm's kernels
    do not use)."""
    from threadpoolctl import threadpool_info

    return [
        p["num_threads"]
        for p in threadpool_info()
        if p["user_api"] == "blas" and p.get("threading_layer") == "pthreads"
    ]


def test_per_row_outputs_share_one_blas_thread_while_their_tasks_run(monkeypatch) -> None:
    """The per-row outputs' chunk tasks run on one BLAS thread while any of them runs,
    however their entries and exits interleave, and BLAS's own count comes back after
    the last (one limit entered and left by each task would restore it while another
    still runs, or leave the limit behind). (No outer ``threadpool_limits`` here: under
    one set by the main thread, OpenBLAS shows other threads' limits differently.)"""
    import threading

    from dkm.engine.passes import SharedBlasLimit
    from dkm.kernels import expectation as K

    blas_threads = _shared_blas_threads
    before = blas_threads()
    assert before and max(before) >= 2  # CI's machine has 2 cores
    shared = SharedBlasLimit()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[int]] = {}

    def first() -> None:
        with shared:
            first_in.set()
            second_in.wait(10)
            seen["both"] = blas_threads()
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with shared:
            second_in.set()
            first_out.wait(10)
            seen["after the first left"] = blas_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert set(seen["both"]) == {1} and set(seen["after the first left"]) == {1}
    assert blas_threads() == before
    # a lazy output computed on the threaded scheduler: the same, and restored after
    X = da.from_array(np.random.default_rng(0).normal(size=(4000, 3)), chunks=(500, -1))
    gm = dkm.GaussianMixture(2, random_state=0).fit(X)
    inside: list[list[int]] = []
    kernel = K.predict_proba

    def recording(*args):
        inside.append(blas_threads())
        return kernel(*args)

    monkeypatch.setattr(K, "predict_proba", recording)
    with dask.config.set(scheduler="threads"):
        gm.predict_proba(X).compute()
    assert len(inside) >= 8 and all(set(t) == {1} for t in inside)  # 8 chunks
    assert blas_threads() == before


def test_a_pass_limit_and_an_output_task_overlapping_leave_blas_as_found() -> None:
    """A client-thread limit (a pass's, :func:`one_blas_thread`) entered while an output
    task holds the shared limit, the task leaving first: one thread to the end of the
    client's block, BLAS's own count after it (with separate limits the task restored
    two threads under the client's block, whose exit then left one for good)."""
    import threading

    from dkm.engine.passes import SHARED_BLAS_LIMIT, one_blas_thread

    blas_threads = _shared_blas_threads
    before = blas_threads()
    assert before and max(before) >= 2
    in_task, client_in, task_out = threading.Event(), threading.Event(), threading.Event()

    def task() -> None:
        with SHARED_BLAS_LIMIT:
            in_task.set()
            client_in.wait(10)
        task_out.set()

    t = threading.Thread(target=task)
    t.start()
    in_task.wait(10)
    with one_blas_thread():
        client_in.set()
        task_out.wait(10)
        assert set(blas_threads()) == {1}
    t.join(10)
    assert blas_threads() == before
