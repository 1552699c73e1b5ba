"""The chunks workload (issue 21): the same points in more and more row chunks.

KM-1's shape in 16 … 4,096 chunks, on the threaded scheduler and on LocalClusters of
single-threaded worker processes. Per chunking: the median iteration, the tasks of a
pass, and the results (count, pickled bytes) a pass hands to the client's merge. Then
the costs the model of ``benchmarks/README.md`` is built from: the cluster's round trip,
its cost per task, per byte gathered, and per persisted chunk a pass depends on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback
from numpy.typing import NDArray

import dkm
import dkm.engine.passes
from benchmarks.common import Run, Size, inertia, make_blobs, quiet, random_rows, timed
from benchmarks.workloads import Bench, Measurement, round_trip

#: the ratios of issue 21: iteration at this many chunks / at the fewest, at most
CHUNK_TARGETS = {1024: 1.25, 4096: 1.6}
ESTEP = "dkm-estep-"


@dataclass(frozen=True)
class ChunkRow:
    """One chunking on one scheduler."""

    scheduler: str
    chunks: int
    iter_ms: float
    tasks_per_pass: float
    results_per_pass: float
    result_bytes_per_pass: float


@contextlib.contextmanager
def pass_results() -> Iterator[list[tuple[int, int]]]:
    """(results, pickled bytes) of every pass's client-side merge while open."""
    seen: list[tuple[int, int]] = []
    tree_top = dkm.engine.passes.tree_top

    def spy(parts: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((len(parts), sum(len(pickle.dumps(p)) for p in parts)))
        return tree_top(parts, *args, **kwargs)

    dkm.engine.passes.tree_top = spy  # type: ignore[assignment]
    try:
        yield seen
    finally:
        dkm.engine.passes.tree_top = tree_top


class TaskCounter(Callback):
    """Tasks the local scheduler runs, per E-step pass."""

    def __init__(self) -> None:
        super().__init__()
        self.by_pass: list[int] = []

    def _start(self, dsk: Any) -> None:
        self._estep = any(str(_name(k)).startswith(ESTEP) for k in dsk)
        if self._estep:
            self.by_pass.append(0)

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        if self._estep:
            self.by_pass[-1] += 1


def _name(key: Any) -> Any:
    return key[0] if isinstance(key, tuple) else key


def _fit(X: da.Array, C0: NDArray[Any], iters: int) -> Any:
    k = C0.shape[0]
    with quiet():
        km = partial(dkm.KMeans, k, init=C0, n_init=1, tol=0.0, schedule="full")
        km(max_iter=min(iters, 5)).fit(X)  # warm-up
        return timed(km(max_iter=iters).fit, X)


def _row(
    name: str, n_chunks: int, est: Any, tasks: list[int], results: list[tuple[int, int]]
) -> ChunkRow:
    iter_ms = 1e3 * statistics.median(h.seconds for h in est.history_)
    counts = [r for r, _ in results] or [math.nan]
    sizes = [b for _, b in results] or [math.nan]
    return ChunkRow(
        name,
        n_chunks,
        iter_ms,
        statistics.median(tasks) if tasks else math.nan,
        statistics.median(counts),
        statistics.median(sizes),
    )


def _threaded(X: NDArray[Any], C0: NDArray[Any], n_chunks: int, iters: int) -> tuple[Any, Any]:
    rows = math.ceil(X.shape[0] / n_chunks)
    Xd = da.from_array(X, chunks=(rows, -1)).persist(scheduler="threads")
    counter = TaskCounter()
    with dask.config.set(scheduler="threads"):
        _fit(Xd, C0, 2)
        with counter, pass_results() as results:
            seconds, est = _fit(Xd, C0, iters)
    return (seconds, est), (counter.by_pass, results)


def _on_cluster(
    client: Any, X: NDArray[Any], C0: NDArray[Any], n_chunks: int, iters: int
) -> tuple[Any, Any]:
    from distributed import get_task_stream, wait

    rows = math.ceil(X.shape[0] / n_chunks)
    blocks = [X[i : i + rows] for i in range(0, X.shape[0], rows)]
    # contiguous ranges of chunks, one per worker, as a persist of a store places them
    # (scatter's round-robin would split every run of chunks between the workers)
    workers = sorted(client.scheduler_info()["workers"])
    bounds = np.linspace(0, len(blocks), len(workers) + 1).round().astype(int)
    parts = [
        future
        for w, a, b in zip(workers, bounds[:-1], bounds[1:], strict=True)
        for future in client.scatter(blocks[a:b], workers=[w])
    ]
    Xc = da.concatenate(
        [
            da.from_delayed(p, (min(rows, X.shape[0] - i * rows), X.shape[1]), X.dtype)
            for i, p in enumerate(parts)
        ]
    ).persist()
    wait(Xc)
    del parts
    _fit(Xc, C0, 2)
    with get_task_stream(client) as stream, pass_results() as results:
        seconds, est = _fit(Xc, C0, iters)
    by_pass: dict[str, int] = defaultdict(int)
    others = 0
    for t in stream.data:
        name = str(_name(t["key"]))
        if name.startswith(ESTEP):
            by_pass[name] += 1
        else:
            others += 1
    tasks = [n + others / max(1, len(by_pass)) for n in by_pass.values()]
    return (seconds, est), (tasks, results)


def chunks_workload(
    bench: Bench, size: Size, chunk_counts: tuple[int, ...], cluster_workers: tuple[int, ...]
) -> None:
    """dkm k-means on KM-1's points in each of ``chunk_counts`` chunkings: threaded, and
    on a LocalCluster of each of ``cluster_workers`` single-threaded workers."""
    iters = bench.options.iters
    X = make_blobs(size.n, size.d, size.k, np.float32, anisotropic=False)
    C0 = random_rows(X, size.k)
    for n_chunks in chunk_counts:
        (seconds, est), (tasks, results) = _threaded(X, C0, n_chunks, iters)
        _add(bench, size, "dkm threads", n_chunks, seconds, est, X)
        bench.chunk_rows.append(_row("threads", n_chunks, est, tasks, results))
    for workers in cluster_workers:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            name = f"LocalCluster {workers}x1"
            for n_chunks in chunk_counts:
                (seconds, est), (tasks, results) = _on_cluster(client, X, C0, n_chunks, iters)
                _add(bench, size, f"dkm {name}", n_chunks, seconds, est, X)
                bench.chunk_rows.append(_row(name, n_chunks, est, tasks, results))
            bench.measurements.extend(cluster_costs(client, name))


def _add(
    bench: Bench, size: Size, label: str, n_chunks: int, seconds: float, est: Any, X: Any
) -> None:
    bench.add(
        Run(
            f"CHUNKS {size} {n_chunks} chunks",
            label,
            seconds,
            int(est.n_iter_),
            tuple(h.seconds for h in est.history_),
            inertia(X, est.cluster_centers_),
            "history_",
            is_dkm=True,
        )
    )


def _noop(i: int) -> int:
    return i


def _payload(nbytes: int) -> bytes:
    return bytes(nbytes)


def cluster_costs(client: Any, name: str) -> list[Measurement]:
    """The cluster's round trip, its seconds per task of a burst, per byte gathered."""
    trip = round_trip(client)
    token = uuid.uuid4().hex
    n_tasks = 2000
    t0 = time.perf_counter()
    futures = client.map(
        _noop, range(n_tasks), key=[f"dkm-bench-burst-{token}-{i}" for i in range(n_tasks)]
    )
    client.gather(futures)
    per_task = (time.perf_counter() - t0 - trip) / n_tasks
    del futures
    nbytes = 64 << 20
    future = client.submit(_payload, nbytes, key=f"dkm-bench-bytes-{token}")
    client.gather(future)  # computed and held; now time a second gather alone
    t0 = time.perf_counter()
    client.gather(future)
    per_byte = (time.perf_counter() - t0) / nbytes
    del future
    return [
        Measurement(f"cost: {name} round trip", trip, "one trivial task a worker, median"),
        Measurement(f"cost: {name} per task", per_task, f"a burst of {n_tasks} trivial tasks"),
        Measurement(f"cost: {name} per byte gathered", per_byte, f"one {nbytes >> 20} MB result"),
    ]


def print_chunk_table(rows: list[ChunkRow]) -> bool:
    """The table of the chunks workload and its targets; whether all were met."""
    if not rows:
        return True
    print("| scheduler | chunks | iter ms (median) | / fewest chunks | target | met "
          "| tasks/pass | results/pass | result KB/pass |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    ok = True
    base: dict[str, ChunkRow] = {}
    for row in rows:
        first = base.setdefault(row.scheduler, row)
        ratio = row.iter_ms / first.iter_ms
        target = CHUNK_TARGETS.get(row.chunks)
        met = "" if target is None else ("met" if ratio <= target else "MISSED")
        ok = ok and met != "MISSED"
        print(
            f"| {row.scheduler} | {row.chunks:,} | {row.iter_ms:.1f} | {ratio:.2f} "
            f"| {'' if target is None else f'<= {target:g}'} | {met} "
            f"| {row.tasks_per_pass:.1f} | {row.results_per_pass:.0f} "
            f"| {row.result_bytes_per_pass / 1024:.1f} |"
        )
    print()
    print(
        "tasks/pass: tasks run per E-step pass (on a cluster: its E-step tasks plus the "
        "fit's other tasks spread over the passes); results/pass and KB: what a pass's "
        "merge on the client receives (pickled)."
    )
    print()
    return ok
