"""Restarts in one pass: per-iteration time of ``n_init=4`` against ``n_init=1`` (issue 4).

The points are read from a zarr store every iteration (streamed, not persisted), so
what four restarts share is the read and decompression of every chunk; each chunk task
then runs the E-step of each restart still iterating. Both fits run side by side in
one process on the same store, data, seed and scheduler, several times; the figure is
the median seconds of the iterations in which all four restarts were still running,
over the median seconds per iteration of the single fit.

Run from the repository root (OpenBLAS left to detect the CPU itself)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_restarts.py
    ... --quick     # seconds: a smoke run

It also checks that the best of the four shared restarts is the model of the best of
four separate fits from the same draws (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
from threadpoolctl import threadpool_info

import dkm
from dkm import io
from dkm.engine import IterationInfo


def per_iteration(est: dkm.KMeans, X: object, n_init: int) -> tuple[float, dkm.KMeans]:
    """Median seconds of the passes in which all ``n_init`` restarts iterated."""
    seen: list[IterationInfo] = []
    est.set_params(n_init=n_init, callback=seen.append)
    est.fit(X)
    by_iteration: dict[int, list[IterationInfo]] = {}
    for info in seen:
        by_iteration.setdefault(info.iteration, []).append(info)
    full = [infos[0].seconds for infos in by_iteration.values() if len(infos) == n_init]
    return statistics.median(full), est


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--chunk-rows", type=int, default=125_000)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.chunk_rows, args.iters, args.repeat = (
            40_000,
            8,
            [4],
            5_000,
            4,
            1,
        )
    blas = [
        f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
        f"threads={i.get('num_threads')}"
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    print(f"BLAS: {'; '.join(blas)}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "points.zarr")
        made = io.synthetic(args.n, args.d, 16, seed=0, chunk_rows=args.chunk_rows)
        io.write_array(made.X.astype(np.float32), url, "points")
        X = io.open_zarr(url, "points").X
        print(
            f"data: {args.n:,} x {args.d} float32 in zarr, {X.numblocks[0]} chunks of "
            f"{args.chunk_rows:,} rows; read every iteration; threaded scheduler"
        )
        print(f"{'k':>4}  {'n_init=1 ms/iter':>17}  {'n_init=4 ms/iter':>17}  {'ratio':>6}")
        with dask.config.set(scheduler="threads"):
            for k in args.k:
                one, four = [], []
                for _ in range(args.repeat):
                    base = dkm.KMeans(k, random_state=0, max_iter=args.iters, tol=0)
                    t1, _ = per_iteration(base, X, 1)
                    t4, best = per_iteration(base, X, 4)
                    one.append(t1)
                    four.append(t4)
                r1, r4 = statistics.median(one), statistics.median(four)
                print(f"{k:4d}  {r1 * 1e3:17.1f}  {r4 * 1e3:17.1f}  {r4 / r1:6.2f}")
                # the same best model as four separate fits from the same draws
                separate = [
                    dkm.KMeans(k, init=c, n_init=1, max_iter=args.iters, tol=0).fit(X)
                    for c in _draws(X, k, 4)
                ]
                ref = min(separate, key=lambda e: e.inertia_)
                same = np.allclose(best.cluster_centers_, ref.cluster_centers_, rtol=1e-6)
                print(f"      best of 4 shared == best of 4 separate fits: {same}")
                ok &= bool(same)
    return 0 if ok else 1


def _draws(X: object, k: int, n: int) -> list[np.ndarray]:
    """The initial centres the four restarts of ``random_state=0`` start from."""
    inits: list[np.ndarray] = []

    def record(sample: np.ndarray, n_clusters: int, rng: np.random.RandomState) -> np.ndarray:
        from dkm.kernels.init import kmeans_plusplus

        c = kmeans_plusplus(sample, n_clusters, np.ones(len(sample)), rng)
        inits.append(c)
        return c

    dkm.KMeans(k, init=record, n_init=n, random_state=0, max_iter=1).fit(X)
    return inits


if __name__ == "__main__":
    t0 = time.perf_counter()
    status = main()
    print(f"({time.perf_counter() - t0:.0f} s)")
    sys.exit(status)
