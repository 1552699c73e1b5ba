"""The workloads of issue 5: KM-1, KM-2, GMM-1, scaling and overhead.

Each builds its data once and runs every contender on it, one after the other in this
process, from the same initial parameters. dkm always runs through Dask on a persisted
Dask array: on the threaded scheduler (``dkm threads``, the reference of every ratio)
and, unless disabled, on a ``LocalCluster`` of one single-threaded worker process per
core (``dkm LocalCluster``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import sklearn.mixture
from dask.callbacks import Callback
from numpy.typing import NDArray

import dkm
from benchmarks import contenders as C
from benchmarks.common import Run, Size, make_blobs, quiet, random_rows
from dkm import covariance
from dkm.engine import release_held

GMM_INIT_ROWS = 50_000
#: the mixtures' covariance types (identity is k-means, measured by KM-1 and KM-2)
COVARIANCE_TYPES = tuple(name for name, kind in covariance.TYPES.items() if not kind.unit)
ESTEP_PREFIX = "dkm-estep-"
# the LocalCluster's round trip: ROUND_TRIPS rounds timed, after ROUND_TRIPS_WARM untimed
ROUND_TRIPS, ROUND_TRIPS_WARM = 40, 5


@dataclass(frozen=True)
class Options:
    iters: int
    chunks: int  # row chunks of the persisted Dask array dkm and dask-ml get
    faiss: bool = True
    dask_ml: bool = True
    local_cluster: bool = True
    spark: bool = True


@dataclass
class Bench:
    """Options plus the lazily started LocalCluster shared by all workloads."""

    options: Options
    runs: list[Run] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    #: the chunks workload's table (``benchmarks.bench_chunks.ChunkRow``)
    chunk_rows: list[Any] = field(default_factory=list)
    #: the time-to-model table (``benchmarks.bench_ttm.TtmRow``)
    ttm_rows: list[Any] = field(default_factory=list)
    _cluster: Any = None
    _spark: Any = None

    def spark(self, driver_memory: str | None = None) -> Any:
        """The run's one SparkSession (``benchmarks.spark.Spark``), started on first use
        (with a JVM heap of ``driver_memory``, default ``spark.DRIVER_MEMORY``)."""
        if self._spark is None:
            from benchmarks.spark import Spark

            self._spark = Spark(driver_memory=driver_memory)
            for line in self._spark.environment():
                print(line, flush=True)
        return self._spark

    def cluster(self) -> Any:
        if self._cluster is None:
            from distributed import LocalCluster

            n = max(1, os.cpu_count() or 1)
            self._cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            )
        return self._cluster

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
        if self._spark is not None:
            self._spark.close()
            self._spark = None

    def add(self, run: Run) -> None:
        self.runs.append(run)
        print_progress(run)


@dataclass(frozen=True)
class Measurement:
    """A figure that is not a contender's time: scaling ratio, overhead fraction."""

    name: str
    value: float
    detail: str


def print_progress(run: Run) -> None:
    iters = ", ".join(f"{1e3 * s:.4g}" for s in run.iter_seconds)
    differenced = run.extra.get("differenced seconds")
    cross_check = "" if differenced is None else f" (differenced: {1e3 * differenced:.4g} ms)"
    print(
        f"  {run.workload:<14} {run.contender:<29} fit {run.fit_seconds:7.2f} s, "
        f"n_iter {run.n_iter}, iterations [{iters}] ms{cross_check}, "
        f"objective {run.objective:.10g}",
        flush=True,
    )


def persisted(X: NDArray[Any], chunks: int) -> da.Array:
    """X as a Dask array of ``chunks`` row chunks, computed into memory (threads)."""
    rows = max(1, math.ceil(X.shape[0] / chunks))
    return da.from_array(X, chunks=(rows, -1)).persist(scheduler="threads")


@contextlib.contextmanager
def threads() -> Iterator[None]:
    with dask.config.set(scheduler="threads"):
        yield


def on_local_cluster(
    bench: Bench, X: NDArray[Any], run: Callable[[da.Array], Run], chunks: int | None = None
) -> Run:
    """``run`` with X persisted on the LocalCluster's workers (``chunks`` row chunks,
    default the options'), a Client current."""
    from distributed import Client, wait

    with Client(bench.cluster()) as client:
        rows = max(1, math.ceil(X.shape[0] / (chunks or bench.options.chunks)))
        parts = client.scatter([X[i : i + rows] for i in range(0, X.shape[0], rows)])
        Xc = da.concatenate(
            [
                da.from_delayed(p, (min(rows, X.shape[0] - i * rows), X.shape[1]), X.dtype)
                for i, p in enumerate(parts)
            ]
        ).persist()
        wait(Xc)
        return run(Xc)


# --------------------------------------------------------------------------- k-means


def kmeans_warm(X: NDArray[Any], size: Size) -> da.Array:
    """The rows of dkm's k-means warm-up fit: a sixteenth of the data, in 2 chunks.
    Enough rows that its passes with bounds reach every kernel (a block's unsettled
    rows tightened and searched gathered), so that none is loaded from numba's cache,
    or compiled, inside the timed fit (``20 k`` rows did not: the timed fit's first
    pass with bounds took 103 ms where the next took 76 and 56)."""
    return persisted(X[: min(size.n, max(20 * size.k, size.n // 16))], 2)


def on_spark(bench: Bench, X: NDArray[Any], *runs: Callable[..., Run]) -> None:
    """Each ``run(spark, rows)`` with X's rows cached in Spark (float64, ``--chunks``
    partitions, ``benchmarks.spark.Rows``); the time taken to load them is printed, not
    counted."""
    spark = bench.spark()
    rows = spark.rows(X, bench.options.chunks)
    print(f"  Spark: {X.shape[0]:,} rows loaded and cached in {rows.seconds:.2f} s", flush=True)
    try:
        for run in runs:
            bench.add(run(spark, rows))
    finally:
        rows.unpersist()


def kmeans_workload(bench: Bench, name: str, size: Size, spark: bool = False) -> None:
    """All k-means contenders on float32 blobs, from the same k random rows (Spark MLlib
    too if ``spark`` and the options allow it)."""
    opts = bench.options
    X = make_blobs(size.n, size.d, size.k, np.float32, anisotropic=False)
    C0 = random_rows(X, size.k)
    workload = f"{name} {size}"
    Xd = persisted(X, opts.chunks)
    warm = kmeans_warm(X, size)
    with threads():
        bench.add(C.dkm_kmeans(workload, "dkm threads", Xd, C0, opts.iters, warm, X))
        bench.add(C.dkm_kmeans(workload, "dkm threads", Xd, C0, opts.iters, warm, X, False))
    if opts.local_cluster:
        bench.add(
            on_local_cluster(
                bench,
                X,
                lambda Xc: C.dkm_kmeans(workload, "dkm LocalCluster", Xc, C0, opts.iters, Xc, X),
            )
        )
    bench.add(C.sklearn_kmeans(workload, X, C0, opts.iters))
    if 8 * size.n * size.k <= C.ELKAN_BYTES:
        bench.add(C.sklearn_kmeans(workload, X, C0, opts.iters, "elkan"))
    if opts.faiss:
        bench.add(C.faiss_kmeans(workload, X, C0, opts.iters))
    if opts.dask_ml:
        bench.add(C.daskml_kmeans(workload, Xd, C0, opts.iters, X))
    if spark and opts.spark:
        from benchmarks import spark as S

        on_spark(
            bench,
            X,
            functools.partial(S.kmeans, workload=workload, X=X, C0=C0, iters=opts.iters),
            functools.partial(S.ml_kmeans, workload=workload, X=X, k=size.k, iters=opts.iters),
        )


# --------------------------------------------------------------------------- GMM


def gmm_init(X: NDArray[Any], k: int, covariance_type: str) -> dict[str, Any]:
    """Starting parameters: scikit-learn's one-iteration fit on a random subsample."""
    rng = np.random.default_rng(3)
    sub = X[rng.choice(X.shape[0], size=min(GMM_INIT_ROWS, X.shape[0]), replace=False)]
    with quiet():
        gm = sklearn.mixture.GaussianMixture(
            k, covariance_type=covariance_type, max_iter=1, random_state=0
        ).fit(sub)
    return {
        "weights_init": gm.weights_,
        "means_init": gm.means_,
        "precisions_init": gm.precisions_,
    }


def gmm_workload(bench: Bench, name: str, size: Size, covariance_types: tuple[str, ...]) -> None:
    """scikit-learn's and dkm's mixtures on float64 anisotropic blobs, same start; Spark
    MLlib's too for the full covariances, unless the options leave it out."""
    opts = bench.options
    X = make_blobs(size.n, size.d, size.k, np.float64, anisotropic=True)
    Xd = persisted(X, opts.chunks)
    warm = persisted(X[: min(size.n, 20 * size.k)], 2)
    for ct in covariance_types:
        init = gmm_init(X, size.k, ct)
        workload = f"{name}-{ct} {size}"
        with threads():
            bench.add(C.dkm_gmm(workload, "dkm threads", Xd, init, ct, opts.iters, warm))
        if opts.local_cluster:
            bench.add(on_local_cluster(bench, X, _gmm_on_cluster(workload, init, ct, opts.iters)))
        bench.add(C.sklearn_gmm(workload, X, init, ct, opts.iters))
        if ct == "full" and opts.spark:
            from benchmarks import spark as S

            on_spark(
                bench,
                X,
                functools.partial(S.gmm, workload=workload, X=X, init=init, iters=opts.iters),
                functools.partial(S.ml_gmm, workload=workload, X=X, k=size.k, iters=opts.iters),
            )


def _gmm_on_cluster(
    workload: str, init: dict[str, Any], covariance_type: str, iters: int
) -> Callable[[da.Array], Run]:
    def run(Xc: da.Array) -> Run:  # warm-up: one iteration on all of Xc, every worker
        return C.dkm_gmm(workload, "dkm LocalCluster", Xc, init, covariance_type, iters, Xc)

    return run


# --------------------------------------------------------------------------- scaling


def scaling_workload(bench: Bench, size: Size) -> None:
    """dkm (threads) per iteration on n and on 4n points of KM-1's shape, same chunk rows."""
    opts = bench.options
    X4 = make_blobs(4 * size.n, size.d, size.k, np.float32, anisotropic=False)
    C0 = random_rows(X4[: size.n], size.k)
    warm = kmeans_warm(X4, size)
    rows = math.ceil(size.n / opts.chunks)
    medians = []
    for factor in (1, 4):
        Xs = X4[: factor * size.n]
        Xd = da.from_array(Xs, chunks=(rows, -1)).persist(scheduler="threads")
        with threads():
            name = f"scale x{factor} {size.n * factor:,}"
            run = C.dkm_kmeans(name, "dkm threads", Xd, C0, opts.iters, warm, Xs)
        bench.add(run)
        medians.append(run.iter_ms)
        del Xd
    ratio = medians[1] / medians[0]
    bench.measurements.append(
        Measurement(
            "scaling: 4x points / 1x points per iteration",
            ratio,
            f"{medians[0]:.1f} ms -> {medians[1]:.1f} ms ({rows:,} rows per chunk)",
        )
    )


# --------------------------------------------------------------------------- overhead


class EstepTaskTimer(Callback):
    """Wall time of each ``dkm-estep`` task on the local (threaded) scheduler.

    The threaded scheduler hands a task to a thread only when one is free, so the time
    from its pre-task to its post-task callback is the task's run time (plus the
    scheduler's reaction time, which this therefore counts as kernel, not overhead).
    """

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[Any, float] = {}
        self.by_pass: dict[str, float] = defaultdict(float)

    @staticmethod
    def _name(key: Any) -> str:
        return str(key[0] if isinstance(key, tuple) else key)

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        if self._name(key).startswith(ESTEP_PREFIX):
            self.started[key] = time.perf_counter()

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        t0 = self.started.pop(key, None)
        if t0 is not None:
            self.by_pass[self._name(key)] += time.perf_counter() - t0


def _overhead(kernel_by_pass: dict[str, float], n_threads: int, run: Run) -> tuple[float, str]:
    """Median over the fit's iterations of ``1 − (kernel time / threads) / wall time``.

    Every E-step pass (the iterations, then the final inertia pass) carries its own token
    in its task names; ``kernel_by_pass`` holds them in the order the passes ran, so its
    first ``n_iter`` entries pair with the iterations' wall times. Pass by pass, not a
    median of each: passes differ in cost (k-means bounds make the later ones cheaper),
    and the median kernel time and the median wall time would then be different passes'.
    """
    kernels = list(kernel_by_pass.values())[: len(run.iter_seconds)]
    if not kernels:
        return math.nan, "no dkm-estep tasks seen (task names changed?)"
    pairs = list(zip(kernels, run.iter_seconds, strict=False))
    fraction = statistics.median(1.0 - kernel / n_threads / wall for kernel, wall in pairs)
    detail = (
        f"iteration {1e3 * statistics.median(w for _, w in pairs):.1f} ms, E-step tasks "
        f"{1e3 * statistics.median(k for k, _ in pairs):.1f} ms summed over {n_threads} "
        f"threads (medians; per-iteration fractions "
        + " ".join(f"{100 * (1 - k / n_threads / w):.0f}%" for k, w in pairs)
        + ")"
    )
    return fraction, detail


def overhead_workload(bench: Bench, size: Size, chunks: int = 16) -> None:
    """Time outside the chunk kernels for KM-1 in ``chunks`` chunks."""
    opts = bench.options
    X = make_blobs(size.n, size.d, size.k, np.float32, anisotropic=False)
    C0 = random_rows(X, size.k)
    Xd = persisted(X, chunks)
    warm = kmeans_warm(X, size)
    workload = f"overhead {chunks} chunks"
    timer = EstepTaskTimer()
    with threads():
        # warm-up outside the timer
        with quiet():
            dkm.KMeans(size.k, init=C0, n_init=1, max_iter=1).fit(warm)
        with timer:
            run = C.dkm_kmeans(workload, "dkm threads", Xd, C0, opts.iters, None, X)
    bench.add(run)
    n_threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    fraction, detail = _overhead(timer.by_pass, n_threads, run)
    bench.measurements.append(
        Measurement("overhead: KM-1 16 chunks, dkm threads", fraction, detail)
    )
    if opts.local_cluster:
        bench.measurements.append(_overhead_on_cluster(bench, X, C0, workload, chunks))


def _overhead_on_cluster(
    bench: Bench, X: NDArray[Any], C0: NDArray[Any], workload: str, chunks: int
) -> Measurement:
    from distributed import get_client, get_task_stream

    k = C0.shape[0]

    def run_with_stream(Xc: da.Array) -> tuple[Run, list[dict[str, Any]], float]:
        with quiet():
            dkm.KMeans(k, init=C0, n_init=1, max_iter=1).fit(Xc)
        with get_task_stream() as ts:
            run = C.dkm_kmeans(workload, "dkm LocalCluster", Xc, C0, bench.options.iters, None, X)
        return run, ts.data, round_trip(get_client())

    box: list[tuple[Run, list[dict[str, Any]], float]] = []

    def runner(Xc: da.Array) -> Run:
        box.append(run_with_stream(Xc))
        return box[-1][0]

    bench.add(on_local_cluster(bench, X, runner, chunks))
    run, records, floor = box[0]
    by_pass: dict[str, float] = defaultdict(float)
    for rec in records:
        key = rec.get("key")
        name = str(key[0] if isinstance(key, tuple) else key)
        if not name.startswith(ESTEP_PREFIX):
            continue
        for ss in rec.get("startstops", ()):
            if ss.get("action") == "compute":
                by_pass[name] += float(ss["stop"]) - float(ss["start"])
    workers = bench.cluster().scheduler_info.get("workers", {})
    n_threads = sum(int(w.get("nthreads", 1)) for w in workers.values()) or 1
    fraction, detail = _overhead(by_pass, n_threads, run)
    iteration = statistics.median(run.iter_seconds)
    detail += (
        f"; the cluster's round trip, one trivial task a worker: {1e3 * floor:.1f} ms, "
        f"{100 * floor / iteration:.0f}% of the iteration (the floor of a pass at a time)"
    )
    return Measurement("overhead: KM-1 16 chunks, dkm LocalCluster", fraction, detail)


def _noop(i: int) -> int:
    return i


def round_trip(client: Any, repeats: int = ROUND_TRIPS) -> float:
    """Median seconds from submitting one trivial task to each worker to having their
    results, as a fit's passes do it: the previous round's futures are released only
    after the next round is submitted (see ``dkm.engine.passes._run_on_client``). What a pass
    at a time cannot go below, however short its tasks: the client's, the scheduler's
    and the workers' messages and their batching."""
    workers = sorted(client.scheduler_info()["workers"])
    token = uuid.uuid4().hex
    held: list[Any] = []
    seconds = []
    try:
        for i in range(repeats + ROUND_TRIPS_WARM):
            t0 = time.perf_counter()
            futures = [
                client.submit(_noop, j, key=f"dkm-bench-roundtrip-{token}-{i}-{j}", workers=[w])
                for j, w in enumerate(workers)
            ]
            previous, held[:] = held[:], [futures]
            release_held(previous)
            client.gather(futures)
            seconds.append(time.perf_counter() - t0)
    finally:
        release_held(held)
    return statistics.median(seconds[ROUND_TRIPS_WARM:])
