"""A pass on persisted blocks moves each run of chunks to one worker once, and never
fetches blocks again (issue 21: merge where the data lives).

Small consecutive chunks are joined into one block (a run) where they are processed,
so a run whose blocks a persist spread over several workers would be fetched by its
task in every pass: each pass would move most of the data between workers, and leave
copies that the scheduler drops again. The pass moves such blocks to one worker the
first time, and every later pass (and fit) runs where they are.
"""

from __future__ import annotations

from collections import Counter

import dask.array as da
import numpy as np
import pytest
from distributed import Client, wait

import dkm
import dkm.engine._dask
import dkm.engine.data
from dkm.engine.data import ChunkedData

pytestmark = pytest.mark.distributed

N_CHUNKS, ROWS, D = 16, 125, 4
X = np.random.default_rng(5).normal(size=(N_CHUNKS * ROWS, D)) + np.repeat(
    np.arange(4)[:, None] * 6.0, N_CHUNKS * ROWS // 4, axis=0
)


def incoming(client: Client) -> dict[str, int]:
    """Blocks each worker has fetched from its peers for its tasks, so far."""
    counts: dict[str, int] = client.run(lambda dask_worker: len(dask_worker.transfer_incoming_log))
    return counts


def fit(Xd: da.Array) -> dkm.KMeans:
    return dkm.KMeans(4, init=X[:: N_CHUNKS * ROWS // 4], n_init=1, max_iter=5).fit(Xd)


def test_runs_spread_over_workers_are_moved_once_then_never_fetched(dask_processes, monkeypatch):
    # four chunks a run, each run's chunks dealt alternately to the two workers
    monkeypatch.setattr(dkm.engine.data, "RUN_BYTES", 4 * ROWS * D * X.itemsize)
    moves: list[int] = []
    move_blocks = dkm.engine._dask.move_blocks
    monkeypatch.setattr(
        dkm.engine._dask,
        "move_blocks",
        lambda client, m: moves.append(len(m)) or move_blocks(client, m),
    )
    threaded = fit(da.from_array(X, chunks=(ROWS, -1)))
    with Client(dask_processes) as client:
        workers = sorted(client.scheduler_info()["workers"])
        parts = [
            client.persist(
                da.from_array(X[i * ROWS : (i + 1) * ROWS], chunks=(ROWS, -1), name=f"co-{i}"),
                workers=[workers[i % 2]],
            )
            for i in range(N_CHUNKS)
        ]
        Xp = client.persist(da.concatenate(parts))
        wait(Xp)
        del parts
        keys = [b.key for b in Xp.to_delayed().ravel()]
        who_has = client.who_has(Xp)
        assert [who_has[k] for k in keys] == [(workers[i % 2],) for i in range(N_CHUNKS)]
        runs = ChunkedData.from_dask(Xp).runs
        assert [len(r) for r in runs] == [4, 4, 4, 4]
        before = incoming(client)

        first = fit(Xp)
        who_has = client.who_has(Xp)
        assert Counter(len(h) for h in who_has.values()) == {1: N_CHUNKS}  # moved, not copied
        for run in runs:
            assert len({who_has[keys[i]] for i in run}) == 1  # each run on one worker
        assert Counter(who_has[keys[run[0]]] for run in runs) == {(w,): 2 for w in workers}
        assert len(moves) == 1 and moves[0] == 8  # half of each run, at the first pass
        assert incoming(client) == before  # no task fetched a block

        second = fit(Xp)
        assert client.who_has(Xp) == who_has
        assert len(moves) == 1  # nothing more to move
        assert incoming(client) == before
    for model in (first, second):
        np.testing.assert_array_equal(
            model.cluster_centers_, threaded.cluster_centers_, strict=True
        )
        assert model.inertia_ == threaded.inertia_
