"""Shared fixtures: datasets, and real `dask scheduler` + `dask worker` processes."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def blobs(n: int = 3000, d: int = 4, k: int = 5, seed: int = 0, dtype: type = np.float64):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(k, d))
    labels = rng.integers(k, size=n)
    scales = rng.uniform(0.5, 2.0, size=(k, d))
    return (centres[labels] + rng.normal(size=(n, d)) * scales[labels]).astype(dtype)


def chunk_estep(X, w, offset, moments, assignment, means, n_farthest):
    """A chunk's E-step statistics under a fixed model of ``means``: spherical
    (variance 0.7, equal weights), or k-means' identity for hard assignment without
    moments; ``row_offset`` is the chunk's first global row."""
    from dkm.kernels.expectation import estep
    from dkm.kernels.params import MixtureParams

    k = len(means)
    params = MixtureParams("spherical", np.full(k, 1 / k), means, np.full(k, 0.7))
    if moments == "none" and assignment == "hard":
        params = MixtureParams.identity(means)
    return estep(
        X,
        params,
        assignment=assignment,
        moments=moments,
        shift=means,
        sample_weight=w,
        n_farthest=n_farthest,
        row_offset=offset,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dask_cli() -> list[str]:
    exe = shutil.which("dask", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "distributed.cli.dask_spec"]


@dataclass
class ProcessCluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    log: Path

    def worker_process(self, pid: int) -> subprocess.Popen[bytes]:
        (proc,) = [p for p in self.workers if p.pid == pid]
        return proc


@contextlib.contextmanager
def process_cluster(
    workdir: Path,
    n_workers: int,
    *,
    nanny: bool = True,
    protocol: str = "tcp",
    extra_args: Sequence[str] = (),
    security: Any = None,
    scheduler_args: Sequence[str] = (),
) -> Iterator[ProcessCluster]:
    """A ``dask scheduler`` and ``n_workers`` single-threaded ``dask worker`` processes.

    All on 127.0.0.1, logging to ``workdir/dask.log``. Without a nanny the process
    started here *is* the worker: SIGKILL it and it stays dead; with a nanny the worker
    is the nanny's child and is restarted when it dies. ``extra_args`` go to both
    commands (the TLS options, say) and ``security`` to the client that waits for them;
    ``scheduler_args`` to the scheduler alone (``--preload dkm.dashboard``, say).
    """
    from distributed import Client

    port = _free_port()
    address = f"{protocol}://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
        # What a nanny sets in its worker (distributed.nanny.pre-spawn-environ): one BLAS
        # thread per single-threaded worker; without it, --no-nanny workers on two cores
        # each start a BLAS pool and the GMM E-step runs twice as slow.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    log_path = workdir / "dask.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in the teardown

    def start(*args: str) -> subprocess.Popen[bytes]:
        cmd = [*_dask_cli(), *args, *extra_args]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)

    scheduler = start(
        "scheduler",
        *("--protocol", protocol, "--host", "127.0.0.1", "--port", str(port)),
        *("--dashboard-address", "127.0.0.1:0", "--no-show"),
        *scheduler_args,
    )
    workers = [
        start(
            "worker",
            address,
            *("--nthreads", "1", "--nworkers", "1", "--nanny" if nanny else "--no-nanny"),
            *("--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "2GiB"),
            *("--local-directory", str(workdir)),
        )
        for _ in range(n_workers)
    ]
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with Client(address, security=security, timeout=5) as client:
                    client.wait_for_workers(n_workers, timeout=max(1, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "dask scheduler/workers did not start:\n" + log_path.read_text()
                    ) from None
                time.sleep(0.5)
        yield ProcessCluster(address, scheduler, workers, log_path)
    finally:
        # workers first: a worker whose scheduler is gone retries to reach it instead
        # of exiting
        for p in [*workers, scheduler]:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=20)
        log.close()


@pytest.fixture(scope="session")
def dask_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two single-threaded workers as real processes; yields the address."""
    with process_cluster(tmp_path_factory.mktemp("dask"), 2) as cluster:
        yield cluster.address


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """An in-process LocalCluster over TCP (one worker, two threads); yields its address,
    for ``cluster: {kind: address}`` configs run in the test's process."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster.scheduler_address


# --------------------------------------------------------------------------- report data

COV_TYPES = ("full", "tied", "diag", "spherical")


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def covariances_of(ct: str, rng: np.random.Generator, k: int, d: int) -> np.ndarray | None:
    """scikit-learn's shapes for each covariance type."""
    if ct == "full":
        return np.stack([random_spd(rng, d) for _ in range(k)])
    if ct == "tied":
        return random_spd(rng, d)
    if ct == "diag":
        return rng.uniform(0.3, 2.0, size=(k, d))
    if ct == "spherical":
        return rng.uniform(0.3, 2.0, size=k)
    return None


def history(t: int, mode: str = "kmeans") -> list[dict[str, float]]:
    steps = 0.5 ** np.arange(t)
    obj = 1000.0 * steps + 10 if mode == "kmeans" else -4.0 - steps
    change = [math.inf, *np.abs(np.diff(obj))]
    return [
        {"iteration": i + 1, "objective": float(o), "change": float(c), "seconds": 0.01}
        for i, (o, c) in enumerate(zip(obj, change, strict=False))
    ]


def report_args(
    mode: str = "kmeans",
    ct: str = "identity",
    *,
    k: int = 4,
    d: int = 3,
    m: int = 300,
    iters: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of write_report for a small blob data set."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=6.0, size=(k, d))
    labels = rng.integers(k, size=m)
    sample = means[labels] + rng.normal(size=(m, d))
    sizes = np.bincount(labels, minlength=k).astype(float) * 100
    hist = history(iters, mode)
    final = hist[-1]["objective"] - 0.25 if mode == "kmeans" and hist else -4.0
    return {
        "title": f"{mode}, k={k}, {m * 100:,} x {d} (synthetic)",
        "mode": mode,
        "covariance_type": ct,
        "history": hist,
        "objective": hist[-1]["objective"] if mode == "gmm" and hist else final,
        "sample": sample,
        "sample_labels": labels,
        "means": means,
        "weights": sizes / sizes.sum(),
        "covariances": covariances_of(ct, rng, k, d) if mode == "gmm" else None,
        "cluster_sizes": sizes,
        "summary": {"n": m * 100, "d": d, "k": k, "converged": True, "objective": 12.5},
    }
