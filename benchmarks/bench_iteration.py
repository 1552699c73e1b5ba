"""Time one EM iteration of dkm against scikit-learn on the same data and initial parameters.

Workloads (sizes overridable with ``--n/--d/--k``; ``--quick`` makes them tiny):

* ``kmeans``: 2,000,000 x 32 float32 blobs, k=64. ``sklearn.cluster.KMeans`` (Lloyd) and
  ``dkm.KMeans``, both from the same k random rows of X, ``tol=0``, ``max_iter=--iters``.
* ``gmm``: 1,000,000 x 16 float64 anisotropic blobs, k=16, one workload per
  ``--covariance`` type. Both mixtures start from the same weights/means/precisions
  (scikit-learn's one-iteration fit on a 50k-row subsample), ``tol=0``.

dkm runs on Dask's default threaded scheduler, once with the NumPy array (dkm's own
chunking, as a user would call it) and once with X as a persisted Dask array of 8 row
chunks. A third dkm row, ``dkm numpy blas=1``, repeats the NumPy fit under
``threadpool_limits(1)`` (one BLAS thread per Dask task, as scikit-learn's KMeans does
inside its OpenMP loop): a diagnostic for thread oversubscription, not a user call.
Per-iteration time is measured two ways for every contender:

* ``fit/iter``: fit wall time / ``n_iter_``. Includes each library's set-up and final
  passes (validation, dkm's summary pass, final labels/inertia or E-step).
* ``iter``: median wall time of the EM iterations alone: dkm's ``history_[i].seconds``;
  for scikit-learn, the Lloyd pass (``lloyd_iter_chunked_dense``) or E-step + M-step,
  timed by wrapping them (the benchmark's only reach into scikit-learn's internals).

Run from the repository root, leaving OpenBLAS to detect the CPU itself::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_iteration.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import sklearn
import sklearn.cluster
import sklearn.cluster._kmeans as sk_kmeans
import sklearn.mixture
from numpy.typing import NDArray
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_info, threadpool_limits

import dkm

SEED = 0
#: Objectives (k-means inertia, GMM mean log-likelihood) must agree this closely.
RTOL = 1e-4
GMM_INIT_ROWS = 50_000
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
BLAS_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


@dataclass(frozen=True)
class Size:
    n: int
    d: int
    k: int


FULL_SIZES = {"kmeans": Size(2_000_000, 32, 64), "gmm": Size(1_000_000, 16, 16)}
QUICK_SIZES = {"kmeans": Size(20_000, 8, 8), "gmm": Size(10_000, 4, 4)}


@dataclass(frozen=True)
class Run:
    """One fit of one contender on one workload."""

    workload: str
    contender: str
    fit_seconds: float
    n_iter: int
    iter_seconds: tuple[float, ...]  # wall time of each EM iteration inside the fit
    objective: float

    @property
    def fit_ms_per_iter(self) -> float:
        return 1e3 * self.fit_seconds / self.n_iter if self.n_iter else math.nan

    @property
    def iter_ms(self) -> float:
        return 1e3 * statistics.median(self.iter_seconds) if self.iter_seconds else math.nan


# --------------------------------------------------------------------------- data


def make_blobs(size: Size, dtype: type[np.floating[Any]], *, anisotropic: bool) -> NDArray[Any]:
    """k Gaussian blobs of equal expected size; unit or random full covariances."""
    rng = np.random.default_rng(SEED)
    centres = rng.normal(scale=3.0, size=(size.k, size.d)).astype(dtype)
    labels = rng.integers(size.k, size=size.n)
    X = rng.standard_normal(size=(size.n, size.d), dtype=dtype)
    if anisotropic:
        for j in range(size.k):
            rows = labels == j
            A = (np.eye(size.d) + rng.normal(scale=0.4, size=(size.d, size.d))).astype(dtype)
            X[rows] = X[rows] @ A
    X += centres[labels]
    return X


def persisted(X: NDArray[Any]) -> da.Array:
    """X as a Dask array of 8 row chunks, computed into memory (threaded scheduler)."""
    return da.from_array(X, chunks=(max(1, X.shape[0] // 8), -1)).persist()


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def lloyd_pass_timer(times: list[float]) -> Iterator[None]:
    """Record the wall time of each centre-updating Lloyd pass of scikit-learn's KMeans.

    ``_kmeans_single_lloyd`` looks ``lloyd_iter_chunked_dense`` up in its module on
    every call, so swapping the module attribute is enough; it is restored on exit.
    The final labels-only pass (``update_centers=False``) is not an iteration.
    """
    original = getattr(sk_kmeans, "lloyd_iter_chunked_dense", None)
    if original is None:  # scikit-learn moved it: report fit/iter only
        yield
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        if kwargs.get("update_centers", True):
            times.append(time.perf_counter() - t0)
        return result

    sk_kmeans.lloyd_iter_chunked_dense = timed
    try:
        yield
    finally:
        sk_kmeans.lloyd_iter_chunked_dense = original


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


def timed_fit(est: Any, X: Any, blas_threads: int | None = None) -> float:
    """Wall time of ``est.fit(X)``; ``blas_threads`` caps BLAS threads (None: as is)."""
    with warnings.catch_warnings(), threadpool_limits(limits=blas_threads, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        est.fit(X)
        return time.perf_counter() - t0


def best_of(repeat: int, once: Callable[[], Run]) -> Run:
    """The fastest (by fit wall time) of ``repeat`` identical runs."""
    return min((once() for _ in range(repeat)), key=lambda run: run.fit_seconds)


def dkm_iteration_seconds(est: Any) -> tuple[float, ...]:
    return tuple(info.seconds for info in est.history_)


def run_contenders(
    X: NDArray[Any],
    sklearn_once: Callable[[], Run],
    dkm_once: Callable[[Any, str, int | None], Run],
    repeat: int,
) -> list[Run]:
    """scikit-learn, then dkm on NumPy X (as a user calls it), the same with one BLAS
    thread per task (a diagnostic: Dask threads x BLAS threads oversubscribe), and dkm on
    X as a persisted Dask array."""
    runs = [best_of(repeat, sklearn_once)]
    report(runs[0], runs[0])
    Xd = persisted(X)
    for label, data, blas_threads in (
        ("dkm numpy", X, None),
        ("dkm numpy blas=1", X, 1),
        ("dkm dask persisted", Xd, None),
    ):
        runs.append(best_of(repeat, functools.partial(dkm_once, data, label, blas_threads)))
        report(runs[-1], runs[0])
    return runs


# --------------------------------------------------------------------------- workloads


def bench_kmeans(size: Size, iters: int, repeat: int) -> list[Run]:
    X = make_blobs(size, np.float32, anisotropic=False)
    rng = np.random.default_rng(SEED + 1)
    C0 = X[rng.choice(size.n, size=size.k, replace=False)]
    name = f"kmeans {size.n}x{size.d} k={size.k} f32"

    def sklearn_once() -> Run:
        est = sklearn.cluster.KMeans(
            n_clusters=size.k, init=C0, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd"
        )
        times: list[float] = []
        with lloyd_pass_timer(times):
            seconds = timed_fit(est, X)
        return Run(name, "sklearn", seconds, est.n_iter_, tuple(times), float(est.inertia_))

    def dkm_once(data: Any, label: str, blas_threads: int | None) -> Run:
        est = dkm.KMeans(size.k, init=C0, n_init=1, max_iter=iters, tol=0.0)
        seconds = timed_fit(est, data, blas_threads)
        return Run(
            name, label, seconds, est.n_iter_, dkm_iteration_seconds(est), float(est.inertia_)
        )

    warm = X[: min(size.n, 20 * size.k)]  # first calls start thread pools, load code
    timed_fit(sklearn.cluster.KMeans(size.k, init=C0, n_init=1, max_iter=1), warm)
    timed_fit(dkm.KMeans(size.k, init=C0, n_init=1, max_iter=1), warm)
    return run_contenders(X, sklearn_once, dkm_once, repeat)


def gmm_init(X: NDArray[Any], k: int, covariance_type: str) -> dict[str, Any]:
    """Starting parameters: scikit-learn's one-iteration fit on a random subsample."""
    rng = np.random.default_rng(SEED + 2)
    sub = X[rng.choice(X.shape[0], size=min(GMM_INIT_ROWS, X.shape[0]), replace=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = sklearn.mixture.GaussianMixture(
            k, covariance_type=covariance_type, max_iter=1, random_state=0
        ).fit(sub)
    return {
        "weights_init": gm.weights_,
        "means_init": gm.means_,
        "precisions_init": gm.precisions_,
    }


def bench_gmm(size: Size, covariance_type: str, iters: int, repeat: int) -> list[Run]:
    X = make_blobs(size, np.float64, anisotropic=True)
    init = gmm_init(X, size.k, covariance_type)
    name = f"gmm-{covariance_type} {size.n}x{size.d} k={size.k} f64"

    def sklearn_once() -> Run:
        # With all three *_init given scikit-learn still computes (then discards) an
        # initialisation: the default init_params="kmeans" runs a full k-means on X,
        # "random_from_data" costs one M-step. The fitted model is the same either way.
        est = TimedGaussianMixture(
            size.k,
            covariance_type=covariance_type,
            tol=0.0,
            max_iter=iters,
            init_params="random_from_data",
            random_state=0,
            **init,
        )
        seconds = timed_fit(est, X)
        return Run(name, "sklearn", seconds, est.n_iter_, est.iteration_seconds(), est.score(X))

    def dkm_once(data: Any, label: str, blas_threads: int | None) -> Run:
        est = dkm.GaussianMixture(
            size.k, covariance_type=covariance_type, tol=0.0, max_iter=iters, **init
        )
        seconds = timed_fit(est, data, blas_threads)
        return Run(name, label, seconds, est.n_iter_, dkm_iteration_seconds(est), est.score(X))

    warm = X[: min(size.n, 20 * size.k)]  # first calls start thread pools, load code
    for cls in (TimedGaussianMixture, dkm.GaussianMixture):
        timed_fit(cls(size.k, covariance_type=covariance_type, max_iter=1, **init), warm)
    return run_contenders(X, sklearn_once, dkm_once, repeat)


# --------------------------------------------------------------------------- output


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), np.finfo(np.float64).tiny)


def report(run: Run, reference: Run) -> None:
    """One progress line per run, as soon as it finishes."""
    iters = ", ".join(f"{1e3 * s:.4g}" for s in run.iter_seconds)
    print(
        f"  {run.workload:<36} {run.contender:<19} fit {run.fit_seconds:7.2f} s, "
        f"n_iter {run.n_iter}, iterations [{iters}] ms, objective {run.objective:.10g}"
        + (
            ""
            if run is reference
            else f", rel diff {rel_diff(run.objective, reference.objective):.1e}"
        ),
        flush=True,
    )


def print_environment() -> None:
    print(f"date        {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"platform    {platform.platform()}")
    print(f"python      {platform.python_version()}  cpus {os.cpu_count()}")
    print(
        f"versions    numpy {np.__version__}  scikit-learn {sklearn.__version__}  "
        f"dask {dask.__version__}  dkm {dkm.__version__}"
    )
    print(f"scheduler   dask {dask.config.get('scheduler', None) or 'default (threads)'}")
    for var in BLAS_ENV_VARS:
        print(f"env         {var}={os.environ.get(var, 'unset')}")
    for lib in threadpool_info():
        arch = lib.get("architecture") or lib.get("corename") or "-"
        print(
            f"threadpool  {lib.get('internal_api')} {lib.get('version')} "
            f"num_threads={lib.get('num_threads')} arch={arch} "
            f"({os.path.basename(str(lib.get('filepath', '')))})"
        )
    print(flush=True)


COLUMNS = (  # (title, width)
    ("workload", -36),
    ("contender", -19),
    ("n_iter", 6),
    ("fit/iter ms", 11),
    ("iter ms", 9),
    ("x fit/iter", 10),
    ("x iter", 7),
    ("x iter/skl fit", 14),
    ("objective", 16),
    ("rel diff", 8),
)


def cell(value: str | int | float | None, width: int, spec: str = "") -> str:
    text = "" if value is None else format(value, spec)
    return text.ljust(-width) if width < 0 else text.rjust(width)


def print_table(runs: Sequence[Run]) -> None:
    """All runs; ratios are dkm / scikit-learn on the same workload."""
    header = " ".join(cell(title, width) for title, width in COLUMNS)
    print(header)
    print("-" * len(header))
    reference: dict[str, Run] = {}
    for run in runs:
        ref = reference.setdefault(run.workload, run)
        dkm_row = run is not ref
        values: list[tuple[str | int | float | None, str]] = [
            (run.workload, ""),
            (run.contender, ""),
            (run.n_iter, "d"),
            (run.fit_ms_per_iter, ".1f"),
            (run.iter_ms, ".1f"),
            (ratio(run.fit_ms_per_iter, ref.fit_ms_per_iter) if dkm_row else None, ".2f"),
            (ratio(run.iter_ms, ref.iter_ms) if dkm_row else None, ".2f"),
            (ratio(run.iter_ms, ref.fit_ms_per_iter) if dkm_row else None, ".2f"),
            (run.objective, ".9g"),
            (rel_diff(run.objective, ref.objective) if dkm_row else None, ".1e"),
        ]
        print(
            " ".join(
                cell(v, width, spec) for (v, spec), (_, width) in zip(values, COLUMNS, strict=True)
            )
        )
    print()
    print("fit/iter: fit wall time / n_iter_. iter: median wall time of one EM iteration.")
    print("x fit/iter, x iter: dkm / scikit-learn by that measure (< 1: dkm faster).")
    print("x iter/skl fit: dkm's median iteration / scikit-learn's fit/iter.")
    print("objective: k-means inertia_; GMM score(X) (mean log-likelihood).")
    print(
        "dkm numpy blas=1: the same fit under threadpool_limits(1) (diagnostic, not a user call)."
    )


def check_agreement(runs: Sequence[Run]) -> bool:
    reference: dict[str, Run] = {}
    ok = True
    for run in runs:
        ref = reference.setdefault(run.workload, run)
        diff = rel_diff(run.objective, ref.objective)
        if run is not ref and not diff <= RTOL:
            print(f"MISMATCH {run.workload} {run.contender}: rel diff {diff:.2e} > {RTOL:g}")
            ok = False
    if ok:
        print(f"objectives agree with scikit-learn within {RTOL:g} (relative) everywhere")
    return ok


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("kmeans", "gmm", "all"), default="all")
    parser.add_argument("--n", type=int, help="rows (overrides every selected workload)")
    parser.add_argument("--d", type=int, help="features")
    parser.add_argument("--k", type=int, help="clusters / components")
    parser.add_argument("--iters", type=int, default=5, help="EM iterations per fit")
    parser.add_argument(
        "--covariance",
        default="full",
        help=f"GMM covariance type(s), comma-separated from {','.join(COVARIANCE_TYPES)}",
    )
    parser.add_argument("--repeat", type=int, default=1, help="fits per contender; keep fastest")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    args.covariance = [c.strip() for c in args.covariance.split(",") if c.strip()]
    bad = sorted(set(args.covariance) - set(COVARIANCE_TYPES))
    if bad or not args.covariance:
        parser.error(f"--covariance: expected some of {','.join(COVARIANCE_TYPES)}, got {bad}")
    if args.iters < 1 or args.repeat < 1:
        parser.error("--iters and --repeat must be >= 1")
    return args


def size_for(workload: str, args: argparse.Namespace) -> Size:
    base = (QUICK_SIZES if args.quick else FULL_SIZES)[workload]
    return Size(args.n or base.n, args.d or base.d, args.k or base.k)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_environment()
    runs: list[Run] = []
    if args.workload in ("kmeans", "all"):
        runs += bench_kmeans(size_for("kmeans", args), args.iters, args.repeat)
    if args.workload in ("gmm", "all"):
        for covariance_type in args.covariance:
            runs += bench_gmm(size_for("gmm", args), covariance_type, args.iters, args.repeat)
    print()
    print_table(runs)
    return 0 if check_agreement(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
