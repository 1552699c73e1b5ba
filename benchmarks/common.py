"""What every workload shares: results, data, the environment report, timing helpers."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from numpy.typing import NDArray
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_info

SEED = 0
#: Environment variables that change OpenBLAS's kernel; read and printed, never set.
BLAS_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    n: int
    d: int
    k: int

    def __str__(self) -> str:
        return f"{self.n:,}x{self.d} k={self.k}"


@dataclass(frozen=True)
class Run:
    """One fit of one contender on one workload."""

    workload: str
    contender: str
    fit_seconds: float
    n_iter: int
    #: wall time of each iteration, as the contender itself reports or as we time it
    iter_seconds: tuple[float, ...]
    objective: float
    #: how ``iter_seconds`` was obtained
    timing: str = ""
    is_dkm: bool = False
    extra: dict[str, float] = field(default_factory=dict)
    #: the objective this run must match, where scikit-learn's run of the workload is not
    #: its reference (Spark's mixture, whose EM is not scikit-learn's)
    reference_objective: float | None = None
    #: started from the library's own initialisation (its API takes none): the objective
    #: is shown, not compared
    own_start: bool = False

    @property
    def iter_ms(self) -> float:
        """Median milliseconds per iteration (``fit/iter`` when no per-iteration times)."""
        if self.iter_seconds:
            return 1e3 * statistics.median(self.iter_seconds)
        return self.fit_ms_per_iter

    @property
    def fit_ms_per_iter(self) -> float:
        return 1e3 * self.fit_seconds / self.n_iter if self.n_iter else math.nan


# --------------------------------------------------------------------------- data


def make_blobs(
    n: int, d: int, k: int, dtype: type[np.floating[Any]], *, anisotropic: bool, seed: int = SEED
) -> NDArray[Any]:
    """k Gaussian blobs of equal expected size; unit or random full covariances."""
    return blobs(n, d, k, dtype, anisotropic=anisotropic, seed=seed)[0]


def blobs(
    n: int, d: int, k: int, dtype: type[np.floating[Any]], *, anisotropic: bool, seed: int = SEED
) -> tuple[NDArray[Any], NDArray[np.int64]]:
    """:func:`make_blobs`'s rows and the blob each was drawn from."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d)).astype(dtype)
    labels = rng.integers(k, size=n)
    X = rng.standard_normal(size=(n, d), dtype=dtype)
    if anisotropic:
        for j in range(k):
            rows = labels == j
            A = (np.eye(d) + rng.normal(scale=0.4, size=(d, d))).astype(dtype)
            X[rows] = X[rows] @ A
    X += centres[labels]
    return X, labels


def first_rows(labels: NDArray[np.int64], n_blobs: int, per_blob: int) -> NDArray[np.int64]:
    """The first ``per_blob`` rows drawn from each of the ``n_blobs`` blobs, in row order."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=n_blobs)
    if counts.min() < per_blob:
        raise ValueError(
            f"a blob drew {counts.min()} rows, fewer than {per_blob}: use more rows or fewer blobs"
        )
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.sort(order[(starts[:, None] + np.arange(per_blob)).ravel()])


def random_rows(X: NDArray[Any], k: int, seed: int = SEED + 1) -> NDArray[Any]:
    """k distinct rows of X: the initial centres every k-means contender gets."""
    rng = np.random.default_rng(seed)
    return np.array(X[np.sort(rng.choice(X.shape[0], size=k, replace=False))])


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide the convergence warnings a fixed iteration count provokes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """``(seconds, fn(*args, **kwargs))``."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


#: Elements of the (rows, k) float64 distance block of :func:`inertia` (128 MB).
INERTIA_BLOCK_ELEMENTS = 1 << 24


def inertia(X: NDArray[Any], centres: NDArray[Any], block: int | None = None) -> float:
    """Σ_i min_k ‖x_i − c_k‖² in float64: one evaluator for every k-means contender's
    final centres (each library's own figure differs in precision and, for dask-ml, in
    meaning: its ``inertia_`` after a run that did not converge sums unsquared distances).
    ``block`` rows at a time; default: :data:`INERTIA_BLOCK_ELEMENTS` distances (KM-3's
    k = 8,192 made the former 65,536-row blocks 4 GB each)."""
    C = np.asarray(centres, np.float64)
    if block is None:
        block = max(1, INERTIA_BLOCK_ELEMENTS // max(C.shape[0], 1))
    c2 = (C * C).sum(axis=1)
    total = 0.0
    for start in range(0, X.shape[0], block):
        x = np.asarray(X[start : start + block], np.float64)
        d2 = (x * x).sum(axis=1)[:, None] - 2.0 * (x @ C.T) + c2
        total += float(np.maximum(d2.min(axis=1), 0.0).sum())
    return total


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), np.finfo(np.float64).tiny)


# --------------------------------------------------------------------------- environment


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def blas_kernels() -> list[str]:
    """One line per thread pool threadpoolctl sees (library, version, threads, kernel)."""
    lines = []
    for lib in threadpool_info():
        arch = lib.get("architecture") or lib.get("corename") or "-"
        lines.append(
            f"{lib.get('internal_api')} {lib.get('version')} "
            f"num_threads={lib.get('num_threads')} arch={arch} "
            f"({os.path.basename(str(lib.get('filepath', '')))})"
        )
    return lines


def print_environment(versions: dict[str, str]) -> None:
    print(f"date        {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"platform    {platform.platform()}")
    print(f"python      {platform.python_version()}  cpus {os.cpu_count()}")
    print("versions    " + "  ".join(f"{name} {v}" for name, v in versions.items()))
    print(f"dkm commit  {_git('log', '-1', '--format=%h %s')}")
    dirty = _git("status", "--short", "--", "dkm").replace("\n", ", ")
    print(f"dkm changes {dirty or 'none (the commit as is)'}")
    print(f"scheduler   dask {dask.config.get('scheduler', None) or 'default (threads)'}")
    for var in BLAS_ENV_VARS:
        print(f"env         {var}={os.environ.get(var, 'unset')}")
    for line in blas_kernels():
        print(f"threadpool  {line}")
    print(flush=True)
