"""The contenders: one function per library, each a timed fit from given initial parameters.

Per-iteration times come from each library where it reports them, else from a thin
wrapper around its iteration (the only reach into other libraries' internals):

* scikit-learn ``KMeans``: the Lloyd pass ``lloyd_iter_chunked_dense``, wrapped.
* scikit-learn ``GaussianMixture``: ``_e_step`` + ``_m_step``, timed in a subclass.
* FAISS: ``Kmeans.iteration_stats[i]["time"]`` (cumulative seconds), differenced.
* dask-ml: its own "Lloyd loop" timer, read from its logger.
* dkm: ``history_[i].seconds``.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import dask
import dask.array as da
import numpy as np
import sklearn.cluster
import sklearn.cluster._kmeans as sk_kmeans
import sklearn.mixture
from numpy.typing import NDArray

import dkm
import dkm.engine
from benchmarks.common import Run, inertia, quiet, timed

# --------------------------------------------------------------------------- scikit-learn


@contextlib.contextmanager
def lloyd_pass_timer(times: list[float], algorithm: str = "lloyd") -> Iterator[None]:
    """Record the wall time of each centre-updating pass of scikit-learn's KMeans.

    ``_kmeans_single_lloyd`` (``_elkan``) looks ``lloyd_iter_chunked_dense``
    (``elkan_iter_chunked_dense``) up in its module on every call, so swapping the
    module attribute is enough; it is restored on exit. The final labels-only pass
    (``update_centers=False``) is not an iteration.
    """
    name = f"{algorithm}_iter_chunked_dense"
    original = getattr(sk_kmeans, name, None)
    if original is None:  # scikit-learn moved it: fit/iter only
        yield
        return

    def timed_pass(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        if kwargs.get("update_centers", True):
            times.append(time.perf_counter() - t0)
        return result

    setattr(sk_kmeans, name, timed_pass)
    try:
        yield
    finally:
        setattr(sk_kmeans, name, original)


#: scikit-learn's Elkan keeps an (n, k) float64 array of lower bounds: it runs only
#: where that stays under this many bytes (KM-1: 1 GB; KM-2 would need 16 GB).
ELKAN_BYTES = 2 << 30


def sklearn_kmeans(
    workload: str, X: NDArray[Any], C0: NDArray[Any], iters: int, algorithm: str = "lloyd"
) -> Run:
    k = C0.shape[0]

    def make(max_iter: int) -> sklearn.cluster.KMeans:
        return sklearn.cluster.KMeans(
            k, init=C0, n_init=1, max_iter=max_iter, tol=0.0, algorithm=algorithm
        )

    with quiet():
        make(1).fit(X[: min(len(X), 20 * k)])  # warm-up: thread pools, code paths
        times: list[float] = []
        with lloyd_pass_timer(times, algorithm):
            seconds, est = timed(make(iters).fit, X)
    return Run(
        workload,
        f"scikit-learn KMeans {algorithm}",
        seconds,
        int(est.n_iter_),
        tuple(times),
        inertia(X, est.cluster_centers_),
        f"{algorithm.capitalize()} pass",
        extra={"own objective": float(est.inertia_)},
    )


class TimedGaussianMixture(sklearn.mixture.GaussianMixture):
    """scikit-learn's GaussianMixture, recording the time of each E-step and M-step."""

    def fit(self, X: Any, y: Any = None) -> TimedGaussianMixture:
        self.e_seconds_: list[float] = []
        self.m_seconds_: list[float] = []
        super().fit(X, y)
        return self

    def _e_step(self, X: Any, xp: Any = None) -> Any:
        t0 = time.perf_counter()
        result = super()._e_step(X, xp=xp)
        self.e_seconds_.append(time.perf_counter() - t0)
        return result

    def _m_step(self, X: Any, log_resp: Any, xp: Any = None) -> None:
        t0 = time.perf_counter()
        super()._m_step(X, log_resp, xp=xp)
        self.m_seconds_.append(time.perf_counter() - t0)

    def iteration_seconds(self) -> tuple[float, ...]:
        """E + M per iteration (the E-step after the last M-step is not an iteration)."""
        return tuple(e + m for e, m in zip(self.e_seconds_, self.m_seconds_, strict=False))


def sklearn_gmm(
    workload: str, X: NDArray[Any], init: dict[str, Any], covariance_type: str, iters: int
) -> Run:
    k = len(init["weights_init"])

    def make(max_iter: int) -> TimedGaussianMixture:
        # With all three *_init given scikit-learn still computes (then discards) an
        # initialisation: the default init_params="kmeans" runs a full k-means on X,
        # "random_from_data" costs one M-step. The fitted model is the same either way.
        return TimedGaussianMixture(
            k,
            covariance_type=covariance_type,
            tol=0.0,
            max_iter=max_iter,
            init_params="random_from_data",
            random_state=0,
            **init,
        )

    with quiet():
        make(1).fit(X[: min(len(X), 20 * k)])
        seconds, est = timed(make(iters).fit, X)
    return Run(
        workload,
        "scikit-learn GaussianMixture",
        seconds,
        int(est.n_iter_),
        est.iteration_seconds(),
        float(est.score(X)),
        "E-step + M-step",
    )


# --------------------------------------------------------------------------- FAISS


def faiss_kmeans(workload: str, X: NDArray[Any], C0: NDArray[Any], iters: int) -> Run:
    import faiss

    n, d = X.shape
    k = C0.shape[0]

    def make(rows: int, niter: int) -> Any:
        # max_points_per_centroid above n/k: FAISS would otherwise train on a subsample
        return faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=0,
            max_points_per_centroid=math.ceil(rows / k) + 1,
            min_points_per_centroid=1,
            verbose=False,
        )

    Xc = np.ascontiguousarray(X, dtype=np.float32)
    C = np.ascontiguousarray(C0, dtype=np.float32)
    warm = Xc[: min(n, 20 * k)]
    make(len(warm), 1).train(warm, init_centroids=C)
    km = make(n, iters)
    seconds, _ = timed(km.train, Xc, init_centroids=C)
    cumulative = [0.0, *(float(s["time"]) for s in km.iteration_stats)]
    per_iter = tuple(b - a for a, b in itertools.pairwise(cumulative))
    # FAISS's own inertia of its final centroids (km.obj[-1] is that of the previous
    # ones): its index holds the final centroids after train()
    dist, _ = km.index.search(Xc, 1)
    return Run(
        workload,
        "FAISS Kmeans",
        seconds,
        len(km.iteration_stats),
        per_iter,
        inertia(X, km.centroids),
        "iteration_stats",
        extra={"own objective": float(dist.astype(np.float64).sum())},
    )


# --------------------------------------------------------------------------- dask-ml


class _LloydLoopTimes(logging.Handler):
    """Collects dask-ml's own "Finished Lloyd loop N. in H:MM:SS" timings."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if (
            isinstance(args, tuple)
            and len(args) == 2
            and str(args[0]).startswith("Lloyd loop")
            and isinstance(args[1], datetime.timedelta)
        ):
            self.seconds.append(args[1].total_seconds())


def daskml_kmeans(
    workload: str, Xd: da.Array, C0: NDArray[Any], iters: int, X: NDArray[Any]
) -> Run:
    """dask-ml's KMeans on the persisted Dask array ``Xd`` (``X`` in memory), Dask's
    threaded scheduler."""
    from dask_ml.cluster import KMeans

    k = C0.shape[0]
    logger = logging.getLogger("dask_ml.cluster.k_means")
    handler = _LloydLoopTimes()
    level, propagate = logger.level, logger.propagate
    with dask.config.set(scheduler="threads"):
        KMeans(k, init=C0, max_iter=1, tol=0.0).fit(Xd[: min(Xd.shape[0], 20 * k)])
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            seconds, est = timed(KMeans(k, init=C0, max_iter=iters, tol=0.0).fit, Xd)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
    return Run(
        workload,
        "dask-ml KMeans",
        seconds,
        int(est.n_iter_),
        tuple(handler.seconds),
        inertia(X, est.cluster_centers_),
        "its Lloyd loop timer",
        extra={"own objective": float(est.inertia_)},
    )


# --------------------------------------------------------------------------- dkm


#: Iterations of dkm's k-means warm-up fit (KM-1's centres settle enough for the bounds
#: after three; see dkm.kernels.bounds.START_RATIO).
WARM_ITERS = 8


#: Per-iteration timings are of passes over all the data: the sampled schedule off.
FULL: dict[str, Any] = {"schedule": "full"}


def dkm_kmeans(
    workload: str,
    label: str,
    data: da.Array,
    C0: NDArray[Any],
    iters: int,
    warm: da.Array | None,
    X: NDArray[Any],
    bounds: bool | None = None,
) -> Run:
    """dkm on a persisted Dask array, on the current scheduler (threads or a Client);
    first a :data:`WARM_ITERS`-iteration fit on ``warm`` (None: no warm-up). ``X``: the
    same points in memory, to evaluate the final centres. ``bounds``: with (True) or
    without (False) the Hamerly bounds kept between passes; None: the library's default
    (``algorithm="auto"``)."""
    k = C0.shape[0]
    algorithm = {None: "auto", True: "hamerly", False: "lloyd"}[bounds]
    with quiet():
        if warm is not None:
            # long enough for the bounds to start: their kernels compile (or load from
            # numba's cache) here, not inside the timed fit
            dkm.KMeans(
                k, init=C0, n_init=1, max_iter=WARM_ITERS, tol=0.0, algorithm=algorithm, **FULL
            ).fit(warm)
        model = dkm.KMeans(
            k, init=C0, n_init=1, max_iter=iters, tol=0.0, algorithm=algorithm, **FULL
        )
        seconds, est = timed(model.fit, data)
    return Run(
        workload,
        label if bounds is None else f"{label}, {'bounds' if bounds else 'no bounds'}",
        seconds,
        int(est.n_iter_),
        tuple(info.seconds for info in est.history_),
        inertia(X, est.cluster_centers_),
        "history_",
        is_dkm=True,
        extra={"own objective": float(est.inertia_)},
    )


def dkm_gmm(
    workload: str,
    label: str,
    data: da.Array,
    init: dict[str, Any],
    covariance_type: str,
    iters: int,
    warm: da.Array,
) -> Run:
    k = len(init["weights_init"])

    def make(max_iter: int) -> dkm.GaussianMixture:
        return dkm.GaussianMixture(
            k, covariance_type=covariance_type, tol=0.0, max_iter=max_iter, **init, **FULL
        )

    with quiet():
        make(1).fit(warm)
        seconds, est = timed(make(iters).fit, data)
    return Run(
        workload,
        label,
        seconds,
        int(est.n_iter_),
        tuple(info.seconds for info in est.history_),
        float(est.score(data)),
        "history_",
        is_dkm=True,
    )
