"""Spark MLlib as a contender: k-means and the full-covariance Gaussian mixture.

Neither ``pyspark.ml.clustering.KMeans`` nor ``GaussianMixture`` takes initial parameters
(pyspark 4.3: no ``initialModel``; k-means starts from ``initMode`` random or k-means||,
the mixture from a random sample, both by ``seed``). Their RDD-based counterparts do:
``org.apache.spark.mllib.clustering.KMeans.setInitialModel`` (the iterations
``ml.KMeans(solver="row")`` runs: it delegates to this class) and
``mllib.clustering.GaussianMixture.setInitialModel`` (weights, means and covariances; its
own EM, older than ``ml``'s). Both are driven here through Py4J on an RDD cached in the
JVM, so no Python runs inside a fit. The ``ml`` estimators run too, from their own start
(seed 0), timed but not compared: ``ml.KMeans`` picks its "block" solver for dense rows,
which the RDD API does not have, and ``ml.GaussianMixture`` is its own EM.

Per-iteration times are Spark's own: every iteration is one Spark job (k-means'
``collectAsMap``, the mixtures' ``treeAggregate`` / ``collect``), whose submission and
completion times its status store keeps. As a cross-check, fits of 1 and ``iters``
iterations (``tol`` 0) are differenced: ``(t(iters) − t(1)) / (n_iter(iters) − n_iter(1))``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.mixture
from numpy.typing import NDArray
from sklearn.mixture._gaussian_mixture import (
    _compute_precision_cholesky,
    _estimate_gaussian_parameters,
    _estimate_log_gaussian_prob,
)

from benchmarks.common import Run, inertia

TIMING = "Spark's job times"
#: the JVM's heap: the cached RDD of KM-1's 2,000,000 × 32 float64 rows as Java objects
#: takes ~0.8 GB, the Arrow table on its way in as much again
DRIVER_MEMORY = "6g"
#: set by ``.ci/run`` once it installed Java: a missing Spark is then a failure
REQUIRE_VAR = "DKM_REQUIRE_SPARK"
JAVA_PACKAGE = "openjdk-17-jre-headless"
KMEANS = "Spark MLlib KMeans"
GMM = "Spark MLlib GaussianMixture"
ML_KMEANS = "Spark ml KMeans block, own start"
ML_GMM = "Spark ml GaussianMixture, own start"

_LOG4J2 = """\
# warn, the level Spark gives the shell (else it announces the difference); the start-up
# warnings of a local run (SPARK_LOCAL_IP, no native Hadoop) are not the benchmark's
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = stderr
appender.console.type = Console
appender.console.name = stderr
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n%ex
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
"""


def required() -> bool:
    """Whether a missing Spark must fail the run: in CI, or where ``.ci/run`` installed Java."""
    return os.environ.get(REQUIRE_VAR) == "1" or os.environ.get("CI", "").lower() == "true"


def java() -> str | None:
    """The ``java`` Spark would start: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home, "bin", "java")
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which("java")


def missing() -> str | None:
    """Why Spark cannot run here, or None."""
    reasons = []
    if importlib.util.find_spec("pyspark") is None:
        reasons.append('pyspark is not installed (python -m pip install -e ".[bench]")')
    if java() is None:
        where = "$JAVA_HOME/bin/java" if os.environ.get("JAVA_HOME") else "java on PATH"
        reasons.append(
            f"no Java runtime ({where} not found): install Java 17, e.g. Debian's "
            f"{JAVA_PACKAGE} (apt-get install {JAVA_PACKAGE})"
        )
    return "; ".join(reasons) or None


@contextmanager
def _quiet_pyspark() -> Iterator[None]:
    """Hide pyspark's warning that it does not yet support pandas 3 (no pandas is used)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
        yield


@dataclass(frozen=True)
class Rows:
    """A data set cached in Spark."""

    #: a DataFrame of ``ml`` dense vectors, column "features" (from an Arrow table,
    #: ``array_to_vector``), for ``pyspark.ml``
    frame: Any
    #: the RDD (JVM) of their ``mllib`` counterparts (``DatasetUtils.columnToOldVector``)
    rdd: Any
    #: the seconds loading and caching took
    seconds: float

    def unpersist(self) -> None:
        self.rdd.unpersist(True)
        self.frame.unpersist(True)


class Spark:
    """One local SparkSession for a benchmark run (``local[2]``, no UI, errors only)."""

    def __init__(self, cores: int = 2, driver_memory: str | None = None) -> None:
        from pyspark.sql import SparkSession

        self.driver_memory = driver_memory or DRIVER_MEMORY
        self._dir = tempfile.TemporaryDirectory(prefix="dkm-bench-spark-")
        log4j = Path(self._dir.name, "log4j2.properties")
        log4j.write_text(_LOG4J2)
        with _quiet_pyspark():
            self.session = (
                SparkSession.builder.master(f"local[{cores}]")
                .appName("dkm benchmarks")
                .config("spark.ui.enabled", "false")
                .config("spark.ui.showConsoleProgress", "false")
                .config("spark.driver.memory", self.driver_memory)
                .config("spark.driver.extraJavaOptions", f"-Dlog4j.configurationFile={log4j}")
                .config("spark.sql.shuffle.partitions", str(cores))
                .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                .getOrCreate()
            )
        self.sc = self.session.sparkContext
        self.sc.setLogLevel("ERROR")
        self.jvm: Any = self.sc._jvm
        self._groups = 0

    def environment(self) -> list[str]:
        """Spark's version, its JVM's and the BLAS its linear algebra uses."""
        system = self.jvm.java.lang.System
        blas = self.jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName()
        lapack = self.jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getName()
        jre = f"{system.getProperty('java.version')} ({system.getProperty('java.vm.name')})"
        heap = self.driver_memory
        return [
            f"spark       {self.sc.version} {self.sc.master}, Java {jre}, heap {heap}",
            f"spark blas  {blas}, lapack {lapack}",
        ]

    def rows(self, X: NDArray[Any], partitions: int) -> Rows:
        """X as float64 vectors cached in Spark, ``partitions`` partitions."""
        import pyarrow as pa
        from pyspark.ml.functions import array_to_vector

        t0 = time.perf_counter()
        flat = np.ascontiguousarray(X, dtype=np.float64).ravel()
        table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(flat), X.shape[1])})
        with _quiet_pyspark():
            frame = self.session.createDataFrame(table)
        features = frame.select(array_to_vector("x").alias("features")).coalesce(partitions)
        features.cache()
        rdd = self.jvm.org.apache.spark.ml.util.DatasetUtils.columnToOldVector(
            features._jdf, "features"
        )
        rdd.cache()
        if rdd.count() != X.shape[0]:
            raise RuntimeError(f"Spark holds {rdd.count()} rows of {X.shape[0]}")
        return Rows(features, rdd, time.perf_counter() - t0)

    @contextmanager
    def job_ids(self) -> Iterator[list[int]]:
        """Run the block's jobs in a job group of their own; on exit the list yielded holds
        their ids (in order), once Spark's status store has seen them complete."""
        self._groups += 1
        group = f"dkm-bench-{self._groups}"
        ids: list[int] = []
        self.sc.setJobGroup(group, "dkm benchmarks")
        try:
            yield ids
        finally:
            self.sc.setJobGroup("", "")
        self.sc._jsc.sc().listenerBus().waitUntilEmpty(60_000)
        ids.extend(sorted(self.sc.statusTracker().getJobIdsForGroup(group)))

    @contextmanager
    def job_group(self) -> Iterator[list[Job]]:
        """As :meth:`job_ids`, the list yielded holding the jobs' names and seconds."""
        jobs: list[Job] = []
        with self.job_ids() as ids:
            yield jobs
        store = self.sc._jsc.sc().statusStore()
        for job_id in ids:
            job = store.job(job_id)
            start, end = job.submissionTime(), job.completionTime()
            if start.isDefined() and end.isDefined():
                seconds = (end.get().getTime() - start.get().getTime()) / 1e3
                jobs.append(Job(str(job.name()), seconds))

    def close(self) -> None:
        self.session.stop()
        self._dir.cleanup()

    # ------------------------------------------------------------------ JVM values

    def _doubles(self, values: NDArray[Any]) -> Any:
        """A Java ``double[]`` of ``values``, passed as bytes (Py4J would take one call
        an element)."""
        flat = np.ascontiguousarray(values, np.float64).ravel()
        out = self.sc._gateway.new_array(self.jvm.double, len(flat))
        nio = self.jvm.java.nio
        buffer = nio.ByteBuffer.wrap(bytearray(flat.tobytes())).order(nio.ByteOrder.nativeOrder())
        buffer.asDoubleBuffer().get(out)
        return out

    def _vector(self, v: NDArray[Any]) -> Any:
        return self.jvm.org.apache.spark.mllib.linalg.Vectors.dense(self._doubles(v))

    def _array(self, java_class: Any, items: list[Any]) -> Any:
        array = self.sc._gateway.new_array(java_class, len(items))
        for i, item in enumerate(items):
            array[i] = item
        return array

    def kmeans_model(self, C: NDArray[Any]) -> Any:
        linalg = self.jvm.org.apache.spark.mllib.linalg
        centres = self._array(linalg.Vector, [self._vector(c) for c in C])
        return self.jvm.org.apache.spark.mllib.clustering.KMeansModel(centres)

    def mixture_model(self, init: dict[str, Any]) -> Any:
        """scikit-learn's ``*_init`` (full precisions) as an ``mllib`` mixture."""
        weights = np.asarray(init["weights_init"], np.float64)
        covariances = np.linalg.inv(np.asarray(init["precisions_init"], np.float64))
        d = covariances.shape[1]
        gaussian = self.jvm.org.apache.spark.mllib.stat.distribution.MultivariateGaussian
        dense = self.jvm.org.apache.spark.mllib.linalg.DenseMatrix
        gaussians = [
            gaussian(self._vector(mu), dense(d, d, self._doubles(cov.ravel(order="F"))))
            for mu, cov in zip(init["means_init"], covariances, strict=True)
        ]
        return self.jvm.org.apache.spark.mllib.clustering.GaussianMixtureModel(
            self._doubles(weights), self._array(gaussian, gaussians)
        )


def _values(v: Any) -> NDArray[Any]:
    """A JVM vector or matrix's values (column-major) as a NumPy array."""
    return np.array(list(v.toArray()), np.float64)


@dataclass(frozen=True)
class Job:
    """One Spark job of a fit: its call site ("treeAggregate at GaussianMixture.scala:204")
    and wall time (submission to completion, milliseconds)."""

    name: str
    seconds: float


def iteration_seconds(jobs: list[Job], n_iter: int) -> tuple[float, ...]:
    """A fit's iterations among its jobs: those of the call site that ran exactly ``n_iter``
    times (one job an iteration: k-means' ``collectAsMap``, the mixtures' ``treeAggregate``
    or ``collect``), the longest-running if several do; () if none does."""
    by_site: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        by_site[job.name].append(job.seconds)
    candidates = [times for times in by_site.values() if len(times) == n_iter]
    return tuple(max(candidates, key=sum)) if n_iter > 0 and candidates else ()


@dataclass(frozen=True)
class Timing:
    #: the n-iteration fit's iterations, Spark's job times
    iter_seconds: tuple[float, ...]
    #: the n-iteration fit's wall time
    seconds: float
    n_iter: int
    #: the cross-check, (t(n) − t(1)) / (n_iter(n) − n_iter(1)); nan where n_iter did not grow
    differenced: float
    result: Any

    def extra(self) -> dict[str, float]:
        return {"differenced seconds": self.differenced}


def _timed(spark: Spark, fit: Callable[[int], tuple[int, Any]], iters: int) -> Timing:
    """``fit(1)``, then ``fit(iters)`` (each returning ``(n_iter, result)``), each in a job
    group of its own, so the second's iterations are read from Spark's job times."""
    t0 = time.perf_counter()
    n_short, _ = fit(1)
    short = time.perf_counter() - t0
    with spark.job_group() as jobs:
        t0 = time.perf_counter()
        n_iter, result = fit(iters)
        seconds = time.perf_counter() - t0
    differenced = (seconds - short) / (n_iter - n_short) if n_iter > n_short else math.nan
    return Timing(iteration_seconds(jobs, n_iter), seconds, n_iter, differenced, result)


def kmeans(
    spark: Spark, rows: Rows, workload: str, X: NDArray[Any], C0: NDArray[Any], iters: int
) -> Run:
    """``mllib`` KMeans from ``C0`` (``epsilon`` 0) on X's cached ``rows``."""
    clustering = spark.jvm.org.apache.spark.mllib.clustering
    start = spark.kmeans_model(C0)

    def fit(max_iter: int) -> tuple[int, Any]:
        model = (
            clustering.KMeans()
            .setK(C0.shape[0])
            .setMaxIterations(max_iter)
            .setEpsilon(0.0)
            .setInitialModel(start)
            .run(rows.rdd)
        )
        return int(model.numIter()), model

    fit(1)  # warm-up: the JIT, on all the rows
    timing = _timed(spark, fit, iters)
    model = timing.result
    centres = np.array([_values(v) for v in model.clusterCenters()])
    return Run(
        workload,
        KMEANS,
        timing.seconds,
        timing.n_iter,
        timing.iter_seconds,
        inertia(X, centres),
        TIMING,
        extra={"own objective": float(model.trainingCost()), **timing.extra()},
    )


def mixture_score(
    X: NDArray[Any], weights: NDArray[Any], means: NDArray[Any], covariances: NDArray[Any]
) -> float:
    """The mean log-likelihood of X under a full-covariance mixture (scikit-learn's score)."""
    gm = sklearn.mixture.GaussianMixture(len(weights), covariance_type="full")
    gm.weights_, gm.means_, gm.covariances_ = weights, means, covariances
    gm.precisions_cholesky_ = _compute_precision_cholesky(covariances, "full")
    return float(gm.score(X))


def spark_em_score(X: NDArray[Any], init: dict[str, Any], iters: int) -> float:
    """score(X) after ``iters`` iterations of the EM ``mllib.GaussianMixture`` runs, from
    ``init``: responsibilities ∝ ε + wₖ·pdfₖ(x) (``MLUtils.EPSILON``, machine ε, added to
    each weighted density, not in logs: a row whose densities all fall below ε gets
    nearly uniform responsibilities), covariances without scikit-learn's ``reg_covar``.
    In scikit-learn's E- and M-step functions."""
    weights = np.asarray(init["weights_init"], np.float64)
    means = np.asarray(init["means_init"], np.float64)
    covariances = np.linalg.inv(np.asarray(init["precisions_init"], np.float64))
    eps = np.finfo(np.float64).eps
    for _ in range(iters):
        cholesky = _compute_precision_cholesky(covariances, "full")
        log_prob = _estimate_log_gaussian_prob(X, means, cholesky, "full") + np.log(weights)
        resp = eps + np.exp(log_prob)
        resp /= resp.sum(axis=1, keepdims=True)
        counts, means, covariances = _estimate_gaussian_parameters(X, resp, 0.0, "full")
        weights = counts / X.shape[0]
    return mixture_score(X, weights, means, covariances)


def gmm(
    spark: Spark, rows: Rows, workload: str, X: NDArray[Any], init: dict[str, Any], iters: int
) -> Run:
    """``mllib`` GaussianMixture from scikit-learn's full ``*_init`` (``convergenceTol``
    0: it stops only when the log-likelihood repeats exactly, so it runs ``maxIterations``;
    it does not report its count)."""
    clustering = spark.jvm.org.apache.spark.mllib.clustering
    k = len(init["weights_init"])

    def fit(max_iter: int) -> tuple[int, Any]:
        # a new initial model each time: the fit updates its weights and Gaussians in place
        start = spark.mixture_model(init)
        model = (
            clustering.GaussianMixture()
            .setK(k)
            .setMaxIterations(max_iter)
            .setConvergenceTol(0.0)
            .setInitialModel(start)
            .run(rows.rdd)
        )
        return max_iter, model

    fit(1)  # warm-up
    timing = _timed(spark, fit, iters)
    model = timing.result
    d = X.shape[1]
    weights = np.array(list(model.weights()), np.float64)
    means = np.array([_values(g.mu()) for g in model.gaussians()])
    covariances = np.array(
        [np.reshape(_values(g.sigma()), (d, d), order="F") for g in model.gaussians()]
    )
    return Run(
        workload,
        GMM,
        timing.seconds,
        timing.n_iter,
        timing.iter_seconds,
        mixture_score(X, weights, means, covariances),
        TIMING,
        extra=timing.extra(),
        reference_objective=spark_em_score(X, init, iters),
    )


def ml_kmeans(spark: Spark, rows: Rows, workload: str, X: NDArray[Any], k: int, iters: int) -> Run:
    """``pyspark.ml.clustering.KMeans`` with the solver it picks for dense rows ("auto":
    "block", distances as matrix products), from its own random rows (seed 0): no
    initial centres can be given. Timed the same way; its objective is not compared."""
    from pyspark.ml.clustering import KMeans

    def fit(max_iter: int) -> tuple[int, Any]:
        estimator = KMeans(
            k=k, maxIter=max_iter, tol=0.0, initMode="random", seed=0, solver="block"
        )
        model = estimator.fit(rows.frame)
        return int(model.summary.numIter), model

    fit(1)  # warm-up
    timing = _timed(spark, fit, iters)
    model = timing.result
    centres = np.array([np.asarray(c, np.float64) for c in model.clusterCenters()])
    return Run(
        workload,
        ML_KMEANS,
        timing.seconds,
        timing.n_iter,
        timing.iter_seconds,
        inertia(X, centres),
        TIMING,
        extra={"own objective": float(model.summary.trainingCost), **timing.extra()},
        own_start=True,
    )


def ml_gmm(spark: Spark, rows: Rows, workload: str, X: NDArray[Any], k: int, iters: int) -> Run:
    """``pyspark.ml.clustering.GaussianMixture`` (full covariances, its only kind) from its
    own start (seed 0: means of random rows, the data's diagonal variance): no initial
    parameters can be given. Own objective: ``summary.logLikelihood`` (a sum) / n."""
    from pyspark.ml.clustering import GaussianMixture

    def fit(max_iter: int) -> tuple[int, Any]:
        model = GaussianMixture(k=k, maxIter=max_iter, tol=0.0, seed=0).fit(rows.frame)
        return int(model.summary.numIter), model

    fit(1)  # warm-up
    timing = _timed(spark, fit, iters)
    model = timing.result
    d = X.shape[1]
    weights = np.asarray(model.weights, np.float64)
    means = np.array([np.asarray(g.mean, np.float64) for g in model.gaussians])
    covariances = np.array([g.cov.toArray().reshape(d, d) for g in model.gaussians])
    return Run(
        workload,
        ML_GMM,
        timing.seconds,
        timing.n_iter,
        timing.iter_seconds,
        mixture_score(X, weights, means, covariances),
        TIMING,
        extra={
            "own objective": float(model.summary.logLikelihood) / X.shape[0],
            **timing.extra(),
        },
        own_start=True,
    )
