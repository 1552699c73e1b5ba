"""The totals of a pass do not depend on where its chunks ran (issue 21).

Each pass merges its chunks in whatever groups the cluster gives (one task per worker
thread, each merging the chunks it holds); the merges are exact, so any grouping, any
order, any ``split_every``, any number of workers and either scheduler give the same
bits. Hypothesis draws the groupings: random partitions of the chunks into tasks, in
random order, on the threaded scheduler and on real worker processes.
"""

from __future__ import annotations

import itertools

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dkm.engine.data
from dkm.engine import summarize
from dkm.engine.data import ChunkedData
from dkm.engine.passes import PassOptions, stats_pass_many
from dkm.kernels.params import MixtureParams

N_CHUNKS = 16
ROWS = 125

rng = np.random.default_rng(7)
# far from the origin and of mixed scales: float sums in another order would differ
X = rng.normal(size=(N_CHUNKS * ROWS, 4)) * [1.0, 10.0, 1e-3, 1e4] + [5e3, -3.0, 0.5, 1e6]
W = rng.uniform(0.1, 3.0, len(X))
MEANS = X[rng.choice(len(X), 5, replace=False)]


def totals(Xd: da.Array, wd: da.Array, split_every: int) -> list:
    """The summary and an E-step pass of three kinds (hard, soft full, soft diag)."""
    data = ChunkedData.from_dask(Xd, wd)
    summary = summarize(data, sample_size=40, seed=1, split_every=split_every)
    data = data.with_origin(summary.mean)
    centred = MixtureParams.identity(MEANS - data.origin)
    jobs = [
        (centred, None, PassOptions("hard", "none", n_farthest=3)),
        (centred, centred.means, PassOptions("soft", "full", n_farthest=2)),
        (centred, None, PassOptions("soft", "diag")),
    ]
    stats = stats_pass_many(data, jobs, split_every=split_every)
    return [
        summary.mean,
        summary.m2,
        summary.weight,
        *[(s.nk, s.sx, s.sxx, s.objective, s.n, s.count) for s in stats],
        *[(f.rows, f.distances, f.points) for f in (s.farthest for s in stats) if f is not None],
    ]


def assert_same_bits(a, b, path="totals"):
    if isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_bits(x, y, f"{path}[{i}]")
    elif a is None:
        assert b is None, path
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path, strict=True)


def arrays(chunks: int = ROWS) -> tuple[da.Array, da.Array]:
    return da.from_array(X, chunks=(chunks, -1)), da.from_array(W, chunks=chunks)


@pytest.fixture(autouse=True)
def each_chunk_a_run(monkeypatch):
    """One chunk a call of the chunk function (no small chunks joined into runs), so that
    the groups below may split the chunks anywhere."""
    monkeypatch.setattr(dkm.engine.data, "RUN_BYTES", 0)


@pytest.fixture(scope="module")
def reference() -> list:
    """The totals on the threaded scheduler, one task per chunk, in chunk order."""
    with (
        dask.config.set(scheduler="threads", num_workers=N_CHUNKS),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setattr(dkm.engine.data, "RUN_BYTES", 0)
        return totals(*arrays(), split_every=8)


@st.composite
def groupings(draw) -> list[list[int]]:
    """A random partition of the chunks into 1 to 8 tasks, chunks and tasks in random
    order."""
    order = draw(st.permutations(range(N_CHUNKS)))
    n_tasks = draw(st.integers(1, 8))
    cuts = sorted(draw(st.sets(st.integers(1, N_CHUNKS - 1), max_size=n_tasks - 1)))
    bounds = [0, *cuts, N_CHUNKS]
    return [list(order[a:b]) for a, b in itertools.pairwise(bounds)]


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(groups=groupings(), split_every=st.sampled_from([2, 8, 32]))
def test_any_grouping_on_the_threaded_scheduler_gives_the_same_bits(
    monkeypatch, reference, groups, split_every
):
    monkeypatch.setattr(ChunkedData, "range_groups", lambda self, n: groups)
    with dask.config.set(scheduler="threads", num_workers=4):
        got = totals(*arrays(), split_every=split_every)
    assert_same_bits(got, reference)


@pytest.mark.distributed
def test_any_placement_on_worker_processes_gives_the_same_bits(dask_processes, reference):
    """Blocks persisted on two worker processes, then merged in random groups (the tasks
    fetch the blocks they do not hold): the threaded scheduler's bits every time."""
    from distributed import Client, wait

    with Client(dask_processes) as client:
        Xp, wp = client.persist(list(arrays()))
        wait([Xp, wp])
        assert ChunkedData.from_dask(Xp, wp).worker_groups(client) is not None
        assert_same_bits(totals(Xp, wp, split_every=8), reference)  # the cluster's own groups

        @SETTINGS
        @given(groups=groupings(), split_every=st.sampled_from([2, 8, 32]))
        def placed(groups, split_every):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ChunkedData, "_ask_worker_groups", staticmethod(lambda *a: groups))
                assert_same_bits(totals(Xp, wp, split_every=split_every), reference)

        placed()


@pytest.mark.distributed
@pytest.mark.parametrize("n_workers", [1, 2, 4])
def test_one_two_or_four_workers_give_the_same_bits(reference, n_workers):
    """Worker processes holding the blocks as a persist spreads them: the same bits
    whatever their number."""
    from distributed import Client, LocalCluster, wait

    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        Xp, wp = client.persist(list(arrays()))
        wait([Xp, wp])
        assert_same_bits(totals(Xp, wp, split_every=8), reference)
        assert_same_bits(totals(*arrays(), split_every=2), reference)  # read in the tasks


def dependency_recorder() -> object:
    """A scheduler plugin recording the dependencies of every task that starts, by key.

    Made inside this function so that cloudpickle sends the class by value: the
    scheduler cannot import this test module.
    """
    from distributed.diagnostics.plugin import SchedulerPlugin

    class RecordDependencies(SchedulerPlugin):
        name = "dkm-test-dependencies"

        def __init__(self) -> None:
            self.seen: dict[object, list[object]] = {}

        def start(self, scheduler) -> None:
            self.scheduler = scheduler

        def transition(self, key, start, finish, *args, **kwargs) -> None:
            if finish == "processing":
                ts = self.scheduler.tasks[key]
                self.seen[key] = [dts.key for dts in ts.dependencies]

    return RecordDependencies()


def chunked(n_chunks: int) -> tuple[tuple[int, ...], ...]:
    """X's rows in ``n_chunks`` chunks of nearly equal sizes."""
    sizes = np.diff(np.linspace(0, len(X), n_chunks + 1).round().astype(int))
    return (tuple(sizes.tolist()),)


@pytest.mark.distributed
@pytest.mark.parametrize("n_chunks", [16, 256])
def test_a_task_of_a_pass_on_persisted_blocks_has_one_dependency(dask_processes, n_chunks):
    """On a cluster holding the blocks, each E-step task depends on one key standing for
    its worker's blocks, made once for the fit's passes, not on one key per block; the
    totals are the threaded scheduler's bits."""
    from dask.utils import key_split
    from distributed import Client, wait

    chunks = chunked(n_chunks)
    Xd, wd = da.from_array(X, chunks=(chunks[0], -1)), da.from_array(W, chunks=chunks)
    with dask.config.set(scheduler="threads", num_workers=4):
        expected = totals(Xd, wd, split_every=8)
    with Client(dask_processes) as client:
        Xp, wp = client.persist([Xd, wd])
        wait([Xp, wp])
        assert ChunkedData.from_dask(Xp, wp).worker_groups(client) is not None
        client.register_plugin(dependency_recorder())
        try:
            assert_same_bits(totals(Xp, wp, split_every=8), expected)
            assert_same_bits(totals(Xp, wp, split_every=2), expected)
            seen = client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.plugins["dkm-test-dependencies"].seen
            )
        finally:
            client.unregister_scheduler_plugin("dkm-test-dependencies")
    tasks = {k: deps for k, deps in seen.items() if key_split(k) in ("dkm-estep", "dkm-summary")}
    estep = [k for k in tasks if key_split(k) == "dkm-estep"]
    assert len(estep) == 4  # two passes, one task per worker
    for key, deps in tasks.items():
        assert [key_split(d) for d in deps] == ["dkm-blocks"], key
    bundles = {d for deps in tasks.values() for d in deps}
    assert len(bundles) % 2 == 0  # one per worker (again only if the grouping changed)
    # they stand for the blocks of X and of the weights, each block in one bundle
    blocks = [k for b in bundles for k in seen[b]]
    assert len(set(blocks)) == 2 * n_chunks and len(blocks) == n_chunks * len(bundles)


@pytest.mark.distributed
def test_a_bundle_runs_where_most_of_its_blocks_are_whichever_copy_is_listed_first(
    dask_processes,
):
    """A block a pass fetched is on two workers, either listed first by ``who_has``: the
    bundle goes to the worker holding most of its blocks, counting every copy, and takes
    them from there without copying any to another worker."""
    from distributed import Client, wait

    with Client(dask_processes) as client:
        holder, other = client.scheduler_info()["workers"]
        Xp = client.persist(da.from_array(X, chunks=(ROWS, -1), name="on-holder"), workers=[holder])
        wait(Xp)
        data = ChunkedData.from_dask(Xp)
        plans = data.pass_plans([list(range(N_CHUNKS))])
        real = client.who_has(Xp)
        assert set(real.values()) == {(holder,)}
        # as if the other worker had fetched half of them, and were listed first for those
        keys = sorted(real, key=lambda k: k[1])
        copies = {k: (other, holder) if i % 2 == 0 else (holder,) for i, k in enumerate(keys)}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(client, "who_has", lambda futures=None, **kw: copies)
            (bundle,) = data.block_bundles(client, plans)
        wait(bundle)
        assert client.who_has([bundle]) == {bundle.key: (holder,)}
        assert client.who_has(Xp) == real  # no block was copied
        data.release_bundles()
