"""Time to model (issue 22, item 3): every contender with its own defaults, to labels.

Unlike the per-iteration workloads, nothing is shared but the data: each contender
starts from its own default initialisation and stops by its own default rule, then gives
every point a label. Reported per contender: the wall time of the fit and of the labels
(data generation and any conversion into the contender's format excluded and reported
apart), the full-data passes made (see :data:`PASSES`), and the final objective, by one
evaluator for all: :func:`benchmarks.common.inertia` of the final centres for k-means,
``score(X)`` of a scikit-learn ``GaussianMixture`` holding each contender's fitted
parameters for the mixture (:func:`benchmarks.spark.mixture_score`).

Passes are counted, not estimated, where the contender reads X through Dask (dkm,
dask-ml): X is wrapped in :class:`CountingArray`, which counts the rows it hands out, and
passes = rows handed out / n. Spark's come from its status store (:func:`spark_passes`);
scikit-learn's and FAISS's from their code paths and iteration counts.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import dask
import dask.array as da
import numpy as np
import sklearn.cluster
import sklearn.mixture
from numpy.typing import NDArray

import dkm
from benchmarks.common import Size, inertia, make_blobs, quiet, rel_diff, timed
from benchmarks.spark import mixture_score
from benchmarks.workloads import Bench
from dkm.estimators import _auto_chunk_rows

WORKLOADS = ("ttm",)

#: dkm's default against the fastest contender within KMEANS_BAND of the best inertia
KMEANS_TARGET = 0.5
KMEANS_BAND = 5e-3
KMEANS_MAX_PASSES = 5
#: dkm's default mixture against scikit-learn's default fit; score within GMM_BAND of the best
GMM_TARGET = 0.25
GMM_BAND = 1e-3
SEED = 0
#: the JVM heap for the full suite's 8,000,000 × 32 rows (cached as columns, then as
#: the block solver's blocks: ~2 GB each)
FULL_SPARK_MEMORY = "12g"

#: How each contender's passes are counted (the README's table repeats this).
PASSES = {
    "dkm": "measured: rows read through Dask / n (the summary pass, iterations on all "
    "the data, k-means' final pass, the labels pass)",
    "dask-ml": "measured: rows read through Dask / n",
    "scikit-learn": "from its code path: see the README",
    "FAISS": "from its code path: training reads a sample only, the labels 1 pass",
    "Spark": "measured: stages that read the cached data, each weighted by the share "
    "of partitions it read",
}


@dataclass(frozen=True)
class TtmSuite:
    kmeans: Size
    gmm: Size
    #: where Spark's mixture cannot run at ``gmm``'s size in reasonable time on 2 cores:
    #: the size it runs at, a group of its own with dkm's and scikit-learn's mixtures
    spark_gmm: Size | None = None


SUITES = {
    "full": TtmSuite(
        kmeans=Size(8_000_000, 32, 64),
        gmm=Size(2_000_000, 16, 16),
    ),
    # large enough for dkm's default ("auto") to take the sampled schedule on both
    "quick": TtmSuite(kmeans=Size(200_000, 8, 4), gmm=Size(150_000, 4, 4)),
}


@dataclass(frozen=True)
class TtmRow:
    """One contender's time to model on one workload."""

    workload: str
    contender: str
    #: the data's conversion into the contender's format (not counted in ``total``)
    convert_seconds: float
    fit_seconds: float
    labels_seconds: float
    #: full-data passes, and how they add up
    passes: float
    passes_detail: str
    #: the one evaluator's figure: inertia (k-means, lower is better) or score(X) (mixture)
    objective: float
    n_iter: str
    #: where the time went (dkm: summary, sample phase, full passes, labels)
    profile: str = ""
    is_dkm: bool = False

    @property
    def total(self) -> float:
        return self.fit_seconds + self.labels_seconds


class CountingArray:
    """X behind ``__getitem__``, counting the rows it hands out (thread-safe): wrapped in
    a Dask array it counts what every pass over the Dask array reads."""

    def __init__(self, X: NDArray[Any]) -> None:
        self.X = X
        self.shape = X.shape
        self.dtype = X.dtype
        self.ndim = X.ndim
        self.rows = 0
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> NDArray[Any]:
        out = self.X[key]
        with self._lock:
            self.rows += int(out.shape[0]) if out.ndim == 2 else 1
        return out

    def passes(self) -> float:
        """Rows handed out / n since the last :meth:`reset`."""
        return self.rows / self.shape[0]

    def reset(self) -> None:
        self.rows = 0

    def dask(self, rows: int) -> da.Array:
        """A Dask array of row chunks of ``rows`` over this wrapper (read when computed)."""
        return da.from_array(
            self, chunks=(rows, -1), name=False, asarray=False, meta=self.X[:0], lock=False
        )


def dkm_chunk_rows(X: NDArray[Any]) -> int:
    """The rows per chunk dkm picks for a NumPy X (``chunk_size="auto"``)."""
    return _auto_chunk_rows(X.shape[0], X.shape[1], X.dtype.itemsize)


@dataclass
class _Clock:
    """Times of a fit's callbacks, to split its wall time."""

    t0: float = 0.0
    calls: list[float] = dataclasses.field(default_factory=list)

    def __call__(self, info: Any) -> None:
        self.calls.append(time.perf_counter())


def _dkm_profile(est: Any, clock: _Clock, fit_end: float, labels: float) -> tuple[str, str]:
    """(iterations, profile) of a dkm fit: the summary pass and initialisation (start to
    the first iteration's start; with ``sample_trials`` > 1 this includes the trials on
    the first sample, whose iterations reach the callback once the best is chosen), the
    sample phase, the iterations on all the data, the rest (k-means' final pass), the
    labels."""
    history = est.history_
    sampled = [h for h in history if h.sample is not None]
    full = [h for h in history if h.sample is None]
    first = clock.calls[0] - history[0].seconds if clock.calls else fit_end
    sample_s = sum(h.seconds for h in sampled)
    full_s = sum(h.seconds for h in full)
    last = clock.calls[-1] if clock.calls else fit_end
    profile = (
        f"summary+init+trials {first - clock.t0:.2f} s, sample phase {sample_s:.2f} s "
        f"({len(sampled)} it., up to {max((h.sample for h in sampled), default=0):,} rows), "
        f"full passes {full_s:.2f} s ({len(full)} it.), final {fit_end - last:.2f} s, "
        f"labels {labels:.2f} s"
    )
    return f"{est.n_iter_} (+{len(sampled)} on samples)", profile


# --------------------------------------------------------------------------- k-means


@dataclass
class _DkmRun:
    """A dkm estimator's default fit and labels, its passes counted."""

    est: Any
    fit_s: float
    labels_s: float
    fit_passes: float
    passes: float
    n_iter: str
    profile: str


def _dkm_run(
    X: NDArray[Any], make: Callable[..., Any], labels_of: Callable[[Any, Any], Any]
) -> _DkmRun:
    """``make(random_state=SEED)``'s fit on X as a Dask array chunked as dkm chunks a NumPy
    X, the threaded scheduler, after a warm-up; then ``labels_of(est, X)`` computed."""
    counter = CountingArray(X)
    Xd = counter.dask(dkm_chunk_rows(X))
    clock = _Clock()
    with dask.config.set(scheduler="threads"), quiet():
        _warm_dkm(partial(make, random_state=SEED), X)
        est = make(random_state=SEED, callback=clock)
        clock.t0 = time.perf_counter()
        est.fit(Xd)
        fit_end = time.perf_counter()
        fit_passes = counter.passes()
        labels_s, labels = timed(lambda: np.asarray(labels_of(est, Xd).compute()))
    assert labels.shape == (X.shape[0],)
    n_iter, profile = _dkm_profile(est, clock, fit_end, labels_s)
    return _DkmRun(est, fit_end - clock.t0, labels_s, fit_passes, counter.passes(), n_iter, profile)


def dkm_kmeans(workload: str, X: NDArray[Any], k: int) -> TtmRow:
    """``dkm.KMeans(k)`` with its defaults (k-means++, ``tol`` 1e-4, the sampled schedule
    where ``"auto"`` picks it) on X as a Dask array chunked as dkm chunks a NumPy X,
    the threaded scheduler; then its lazy ``labels_`` computed."""
    run = _dkm_run(X, partial(dkm.KMeans, k), lambda est, Xd: est.labels_)
    est, fit_passes, passes = run.est, run.fit_passes, run.passes
    expected = 1 + est.n_iter_ + 1 + 1
    return TtmRow(
        workload,
        "dkm KMeans",
        0.0,
        run.fit_s,
        run.labels_s,
        passes,
        f"{fit_passes:g} fit + {passes - fit_passes:g} labels "
        f"(summary 1 + {est.n_iter_} it. + final 1 + labels 1 = {expected})",
        inertia(X, est.cluster_centers_),
        run.n_iter,
        run.profile,
        is_dkm=True,
    )


def _warm_dkm(make: Callable[..., Any], X: NDArray[Any]) -> None:
    """Untimed fits and labels on a small slice, on all of it and on samples (the sampled
    schedule's own kernels): thread pools and numba's kernels (compiled or loaded from
    its cache) outside the timed fit."""
    part = X[: min(X.shape[0], 20_000)]
    for schedule in ("full", "sampled"):
        np.asarray(make(schedule=schedule).fit(part).predict(da.from_array(part)).compute())


def sklearn_kmeans(workload: str, X: NDArray[Any], k: int) -> TtmRow:
    """``sklearn.cluster.KMeans(k)`` with its defaults (k-means++ on all of X, one init,
    ``tol`` 1e-4, Lloyd) on NumPy X; ``labels_`` come with the fit."""
    with quiet():
        sklearn.cluster.KMeans(k, random_state=SEED).fit(X[: min(X.shape[0], 20 * k)])
        seconds, est = timed(sklearn.cluster.KMeans(k, random_state=SEED).fit, X)
    n_iter = int(est.n_iter_)
    passes = 3 + k + n_iter + 2
    return TtmRow(
        workload,
        "scikit-learn KMeans",
        0.0,
        seconds,
        0.0,
        passes,
        f"set-up 3 (finite check, variance for tol, row norms) + k-means++ {k} "
        f"+ {n_iter} it. + labels 1 + inertia 1",
        inertia(X, est.cluster_centers_),
        str(n_iter),
    )


def faiss_kmeans(workload: str, X: NDArray[Any], k: int) -> TtmRow:
    """``faiss.Kmeans(d, k)`` with its defaults (25 iterations on at most 256 points per
    centroid, its seed), then one search of all of X in its index for the labels."""
    import faiss

    d = X.shape[1]
    convert, Xc = timed(np.ascontiguousarray, X, dtype=np.float32)
    faiss.Kmeans(d, k).train(Xc[: min(X.shape[0], 256 * k)])  # warm-up
    km = faiss.Kmeans(d, k)
    seconds, _ = timed(km.train, Xc)
    labels_s, (_, labels) = timed(km.index.search, Xc, 1)
    assert labels.shape == (X.shape[0], 1)
    train_rows = min(X.shape[0], km.cp.max_points_per_centroid * k)
    passes = train_rows / X.shape[0] + 1
    return TtmRow(
        workload,
        "FAISS Kmeans",
        convert,
        seconds,
        labels_s,
        passes,
        f"training {train_rows:,} sampled rows ({train_rows / X.shape[0]:.3g}) + labels 1",
        inertia(X, km.centroids),
        str(len(km.iteration_stats)),
    )


def daskml_kmeans(workload: str, X: NDArray[Any], k: int) -> TtmRow:
    """``dask_ml.cluster.KMeans(k)`` with its defaults (k-means‖, ``tol`` 1e-4 on the
    centres' shift) on X as the Dask array it makes of a NumPy X (a chunk per core),
    the threaded scheduler; then its lazy ``labels_`` computed."""
    from dask_ml.cluster import KMeans

    counter = CountingArray(X)
    Xd = counter.dask(max(1, X.shape[0] // (os.cpu_count() or 1)))
    with dask.config.set(scheduler="threads"), quiet():
        KMeans(k, random_state=SEED).fit(counter.dask(X.shape[0])[: min(X.shape[0], 20 * k)])
        counter.reset()
        seconds, est = timed(KMeans(k, random_state=SEED).fit, Xd)
        fit_passes = counter.passes()
        labels_s, labels = timed(lambda: np.asarray(est.labels_.compute()))
    assert labels.shape == (X.shape[0],)
    passes = counter.passes()
    return TtmRow(
        workload,
        "dask-ml KMeans",
        0.0,
        seconds,
        labels_s,
        passes,
        f"{fit_passes:.3g} fit (k-means‖, {est.n_iter_} it., inertia) "
        f"+ {passes - fit_passes:.3g} labels",
        inertia(X, est.cluster_centers_),
        str(est.n_iter_),
    )


# --------------------------------------------------------------------------- Spark


def spark_passes(spark: Any, job_ids: list[int], partitions: int) -> float:
    """The passes over the cached data that the jobs made: every stage that read cached
    input, weighted by the share of ``partitions`` its tasks covered (a ``take`` of one
    partition is not a pass)."""
    store = spark.sc._jsc.sc().statusStore()
    passes = 0.0
    seen: set[int] = set()
    for job_id in job_ids:
        stages = store.job(job_id).stageIds()
        for i in range(stages.size()):
            stage_id = int(stages.apply(i))
            if stage_id in seen:
                continue
            seen.add(stage_id)
            stage = store.lastStageAttempt(stage_id)
            if int(stage.inputRecords()) > 0:
                passes += int(stage.numCompleteTasks()) / partitions
    return passes


def spark_frame(spark: Any, X: NDArray[Any]) -> tuple[Any, int, float]:
    """X as a cached DataFrame of ``ml`` dense vectors ("features"), Spark's own
    partitioning; (frame, partitions, seconds)."""
    import pyarrow as pa
    from pyspark.ml.functions import array_to_vector

    from benchmarks.spark import _quiet_pyspark

    t0 = time.perf_counter()
    flat = np.ascontiguousarray(X, dtype=np.float64).ravel()
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(flat), X.shape[1])})
    del flat
    with _quiet_pyspark():
        frame = spark.session.createDataFrame(table)
    del table
    features = frame.select(array_to_vector("x").alias("features"))
    features.cache()
    if features.count() != X.shape[0]:
        raise RuntimeError(f"Spark holds {features.count()} rows of {X.shape[0]}")
    return features, int(features.rdd.getNumPartitions()), time.perf_counter() - t0


def _spark_labels(spark: Any, model: Any, frame: Any, n: int) -> tuple[float, list[int], Any]:
    """(seconds, the jobs, labels): the model's predictions computed in Spark and
    collected to NumPy through Arrow, one job over the cached rows."""
    with spark.job_ids() as jobs:
        t0 = time.perf_counter()
        table = model.transform(frame).select("prediction").toArrow()
        labels = np.asarray(table.column("prediction"))
        seconds = time.perf_counter() - t0
    if labels.shape != (n,):
        raise RuntimeError(f"Spark labelled {labels.shape[0]} rows of {n}")
    return seconds, jobs, labels


def spark_row(
    bench: Bench,
    workload: str,
    X: NDArray[Any],
    contender: str,
    fit: Callable[[Any], Any],
    objective: Callable[[Any], float],
    memory: str | None,
) -> TtmRow:
    """One Spark ``ml`` estimator's default fit (``fit(frame)``) and labels."""
    spark = bench.spark(memory)
    frame, partitions, load = spark_frame(spark, X)
    print(f"  Spark: {X.shape[0]:,} rows loaded and cached in {load:.2f} s", flush=True)
    try:
        with quiet():
            fit(frame.limit(min(X.shape[0], 20_000)))  # warm-up: the JIT
        with spark.job_ids() as fit_jobs:
            seconds, model = timed(fit, frame)
        labels_s, label_jobs, _ = _spark_labels(spark, model, frame, X.shape[0])
        fit_passes = spark_passes(spark, fit_jobs, partitions)
        label_passes = spark_passes(spark, label_jobs, partitions)
        return TtmRow(
            workload,
            contender,
            load,
            seconds,
            labels_s,
            fit_passes + label_passes,
            f"{fit_passes:.3g} fit + {label_passes:.3g} labels ({partitions} partitions)",
            objective(model),
            str(model.summary.numIter),
        )
    finally:
        frame.unpersist(True)


def spark_kmeans(
    bench: Bench, workload: str, X: NDArray[Any], k: int, memory: str | None
) -> TtmRow:
    """``pyspark.ml.clustering.KMeans(k=k)`` with its defaults (k-means‖ with 2 steps,
    20 iterations at most, ``tol`` 1e-4, the "block" solver for dense rows, its seed)."""
    from pyspark.ml.clustering import KMeans

    def centres(model: Any) -> float:
        return inertia(X, np.array([np.asarray(c, np.float64) for c in model.clusterCenters()]))

    return spark_row(
        bench, workload, X, "Spark ml KMeans", lambda f: KMeans(k=k).fit(f), centres, memory
    )


# --------------------------------------------------------------------------- mixtures


class _CountingKMeans(sklearn.cluster.KMeans):
    """scikit-learn's KMeans, keeping the iterations of the fits it makes."""

    fits: ClassVar[list[int]] = []

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> _CountingKMeans:
        super().fit(X, y, sample_weight)
        _CountingKMeans.fits.append(int(self.n_iter_))
        return self


@contextmanager
def _kmeans_fits() -> Iterator[list[int]]:
    """The iterations of every KMeans fit scikit-learn's GaussianMixture starts from
    (``init_params="kmeans"``) inside the block."""
    import sklearn.mixture._base as base

    original = base.cluster.KMeans
    _CountingKMeans.fits = []
    base.cluster.KMeans = _CountingKMeans  # type: ignore[misc]
    try:
        yield _CountingKMeans.fits
    finally:
        base.cluster.KMeans = original  # type: ignore[misc]


def sklearn_gmm(workload: str, X: NDArray[Any], k: int) -> TtmRow:
    """``sklearn.mixture.GaussianMixture(k)`` with its defaults (full covariances, a
    k-means fit on all of X to start, ``tol`` 1e-3, 100 iterations at most); labels by
    ``predict``."""
    with quiet():
        sklearn.mixture.GaussianMixture(k, random_state=SEED).fit(X[: min(X.shape[0], 20 * k)])
        with _kmeans_fits() as fits:
            seconds, est = timed(sklearn.mixture.GaussianMixture(k, random_state=SEED).fit, X)
    labels_s, labels = timed(est.predict, X)
    assert labels.shape == (X.shape[0],)
    n_iter = int(est.n_iter_)
    (km_iter,) = fits
    init = 3 + k + km_iter + 2
    passes = init + (k + 1) + n_iter * (k + 2) + 1 + 1
    return TtmRow(
        workload,
        "scikit-learn GaussianMixture",
        0.0,
        seconds,
        labels_s,
        passes,
        f"k-means init {init} (set-up 3 + k-means++ {k} + {km_iter} it. + 2) + first "
        f"M-step {k + 1} + {n_iter} it. × (E 1 + M {k + 1}) + final E-step 1 + labels 1",
        mixture_score(X, est.weights_, est.means_, est.covariances_),
        str(n_iter),
    )


def dkm_gmm(workload: str, X: NDArray[Any], k: int) -> TtmRow:
    """``dkm.GaussianMixture(k)`` with its defaults (full, k-means init, ``tol`` 1e-3, the
    sampled schedule where ``"auto"`` picks it) on X as a Dask array chunked as dkm
    chunks a NumPy X; labels by ``predict``, computed."""
    run = _dkm_run(X, partial(dkm.GaussianMixture, k), lambda est, Xd: est.predict(Xd))
    est, fit_passes, passes = run.est, run.fit_passes, run.passes
    sampled = any(h.sample is not None for h in est.history_)
    # sampled, the init's k-means and partition run on the first sample; else on all of X
    init = "" if sampled else f" + k-means init and partition {fit_passes - 1 - est.n_iter_:g}"
    return TtmRow(
        workload,
        "dkm GaussianMixture",
        0.0,
        run.fit_s,
        run.labels_s,
        passes,
        f"{fit_passes:g} fit + {passes - fit_passes:g} labels (summary 1{init} "
        f"+ {est.n_iter_} it. + labels 1)",
        mixture_score(X, est.weights_, est.means_, est.covariances_),
        run.n_iter,
        run.profile,
        is_dkm=True,
    )


def spark_gmm(bench: Bench, workload: str, X: NDArray[Any], k: int, memory: str | None) -> TtmRow:
    """``pyspark.ml.clustering.GaussianMixture(k=k)`` with its defaults (full covariances,
    its random start, ``tol`` 0.01 on the mean log-likelihood, 100 iterations at most)."""
    from pyspark.ml.clustering import GaussianMixture

    d = X.shape[1]

    def score(model: Any) -> float:
        weights = np.asarray(model.weights, np.float64)
        means = np.array([np.asarray(g.mean, np.float64) for g in model.gaussians])
        covariances = np.array([g.cov.toArray().reshape(d, d) for g in model.gaussians])
        return mixture_score(X, weights, means, covariances)

    return spark_row(
        bench,
        workload,
        X,
        "Spark ml GaussianMixture",
        lambda f: GaussianMixture(k=k).fit(f),
        score,
        memory,
    )


# --------------------------------------------------------------------------- workload


def run(bench: Bench, suite: str, chosen: tuple[str, ...]) -> None:
    """The ttm workloads at the suite's sizes, when chosen."""
    if "ttm" not in chosen:
        return
    sizes = SUITES[suite]
    memory = FULL_SPARK_MEMORY if suite == "full" else None
    opts = bench.options
    size = sizes.kmeans
    gen, X = timed(make_blobs, size.n, size.d, size.k, np.float32, anisotropic=False)
    workload = f"TTM-KM {size}"
    print(f"  {workload}: data generated in {gen:.2f} s (not counted)", flush=True)
    _add(bench, dkm_kmeans(workload, X, size.k))
    _add(bench, sklearn_kmeans(workload, X, size.k))
    if opts.faiss:
        _add(bench, faiss_kmeans(workload, X, size.k))
    if opts.dask_ml:
        _add(bench, daskml_kmeans(workload, X, size.k))
    if opts.spark:
        _add(bench, spark_kmeans(bench, workload, X, size.k, memory))
    del X
    for size, spark in ((sizes.gmm, sizes.spark_gmm is None), (sizes.spark_gmm, True)):
        if size is None or (size is sizes.spark_gmm and not opts.spark):
            continue
        gen, X = timed(make_blobs, size.n, size.d, size.k, np.float64, anisotropic=True)
        workload = f"TTM-GMM {size}"
        print(f"  {workload}: data generated in {gen:.2f} s (not counted)", flush=True)
        _add(bench, dkm_gmm(workload, X, size.k))
        _add(bench, sklearn_gmm(workload, X, size.k))
        if spark and opts.spark:
            _add(bench, spark_gmm(bench, workload, X, size.k, memory))
        del X


def _add(bench: Bench, row: TtmRow) -> None:
    bench.ttm_rows.append(row)
    print(
        f"  {row.workload:<22} {row.contender:<29} fit {row.fit_seconds:7.2f} s, labels "
        f"{row.labels_seconds:6.2f} s, passes {row.passes:.3g}, n_iter {row.n_iter}, "
        f"objective {row.objective:.10g}" + (f"; {row.profile}" if row.profile else ""),
        flush=True,
    )


# --------------------------------------------------------------------------- table


def _is_gmm(row: TtmRow) -> bool:
    return row.workload.startswith("TTM-GMM")


def _within(row: TtmRow, best: float) -> bool:
    if _is_gmm(row):
        return best - row.objective <= GMM_BAND
    return rel_diff(row.objective, best) <= KMEANS_BAND


def targets(rows: list[TtmRow]) -> list[str]:
    """Issue 22's time-to-model targets, one line each: measured, met or MISSED."""
    lines = []
    for workload in dict.fromkeys(r.workload for r in rows):
        group = [r for r in rows if r.workload == workload]
        dkm_row = next((r for r in group if r.is_dkm), None)
        if dkm_row is None:
            continue
        gmm = _is_gmm(dkm_row)
        best = max(r.objective for r in group) if gmm else min(r.objective for r in group)
        ok_objective = _within(dkm_row, best)
        if gmm:
            ref = next((r for r in group if r.contender.startswith("scikit-learn")), None)
            if ref is None:
                continue
            ratio = dkm_row.total / ref.total
            met = ratio <= GMM_TARGET and ok_objective
            lines.append(
                f"| {workload} | dkm / scikit-learn's default fit <= {GMM_TARGET:g}, "
                f"score within {GMM_BAND:g} of the best | {ratio:.3f}; score "
                f"{best - dkm_row.objective:.2e} below the best | {'met' if met else 'MISSED'} |"
            )
            continue
        eligible = [r for r in group if not r.is_dkm and _within(r, best)]
        if not eligible:
            lines.append(
                f"| {workload} | dkm <= {KMEANS_TARGET:g} x the fastest contender within "
                f"{100 * KMEANS_BAND:g} % of the best inertia | no other contender within "
                f"{100 * KMEANS_BAND:g} % | {'met' if ok_objective else 'MISSED'} |"
            )
            continue
        fastest = min(eligible, key=lambda r: r.total)
        ratio = dkm_row.total / fastest.total
        met = ratio <= KMEANS_TARGET and ok_objective and dkm_row.passes <= KMEANS_MAX_PASSES
        lines.append(
            f"| {workload} | dkm <= {KMEANS_TARGET:g} x the fastest contender within "
            f"{100 * KMEANS_BAND:g} % of the best inertia ({fastest.contender}), its own "
            f"inertia within {100 * KMEANS_BAND:g} %, <= {KMEANS_MAX_PASSES} passes "
            f"| {ratio:.3f}; inertia {100 * rel_diff(dkm_row.objective, best):.3f} % off "
            f"the best; {dkm_row.passes:.3g} passes | {'met' if met else 'MISSED'} |"
        )
    return lines


def print_ttm_table(rows: list[TtmRow]) -> None:
    """The time-to-model table and its targets (markdown)."""
    if not rows:
        return
    print(
        "| workload | contender | conversion s (not counted) | fit s | labels s | total s "
        "| full-data passes | n_iter | objective | vs best | how the passes add up |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for row in rows:
        group = [r for r in rows if r.workload == row.workload]
        if _is_gmm(row):
            best = max(r.objective for r in group)
            versus = f"{row.objective - best:.2e} abs"
        else:
            best = min(r.objective for r in group)
            versus = f"+{100 * rel_diff(row.objective, best):.3f} %"
        print(
            f"| {row.workload} | {row.contender} | {row.convert_seconds:.2f} "
            f"| {row.fit_seconds:.2f} | {row.labels_seconds:.2f} | {row.total:.2f} "
            f"| {row.passes:.3g} | {row.n_iter} | {row.objective:.10g} | {versus} "
            f"| {row.passes_detail} |"
        )
    print()
    print(
        "Objectives: k-means, the inertia of each contender's final centres in float64 "
        "(the harness's one evaluator); mixtures, score(X) of a scikit-learn "
        "GaussianMixture holding each contender's fitted parameters. vs best: relative "
        "to the lowest inertia, or absolute to the highest score."
    )
    for row in rows:
        if row.profile:
            print(f"{row.workload} {row.contender}: {row.profile}")
    print()
    lines = targets(rows)
    if lines:
        print("| workload | time-to-model target | measured | met |")
        print("|---|---|---|---|")
        for line in lines:
            print(line)
        print()
