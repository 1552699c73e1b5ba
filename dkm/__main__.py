"""``python -m dkm``: a small demo on an embedded local Dask cluster with generated data.

The full job (YAML configs, ``dkm run``) is a separate piece of work; this shows the
engine end to end: worker processes, the dashboard, k-means and a Gaussian mixture.
"""

from __future__ import annotations

import argparse
import time

import dask.array as da
import numpy as np


def make_blobs(n: int, d: int, k: int, seed: int, chunk_rows: int) -> da.Array:
    """Gaussian blobs generated chunk by chunk on the workers (never on the client)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(k, d))

    def block(block_id: tuple[int, int] | None = None) -> np.ndarray:
        assert block_id is not None
        i = block_id[0]
        r = np.random.default_rng([seed, i])
        rows = min(chunk_rows, n - i * chunk_rows)
        labels = r.integers(k, size=rows)
        return centres[labels] + r.normal(size=(rows, d))

    n_chunks = -(-n // chunk_rows)
    chunks = ((*(chunk_rows,) * (n_chunks - 1), n - chunk_rows * (n_chunks - 1)), (d,))
    return da.map_blocks(block, chunks=chunks, dtype=np.float64, name="dkm-demo-data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dkm", description=__doc__)
    parser.add_argument("--n", type=int, default=400_000, help="points")
    parser.add_argument("--d", type=int, default=8, help="features")
    parser.add_argument("--k", type=int, default=16, help="clusters")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    import dkm

    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            dashboard_address="127.0.0.1:0",
            processes=True,
        ) as cluster,
        Client(cluster) as client,
    ):
        print(f"dkm {dkm.__version__}: dashboard at {client.dashboard_link}")
        X = make_blobs(args.n, args.d, args.k, args.seed, chunk_rows=50_000).persist()
        print(f"data: {args.n:,} x {args.d} in {X.numblocks[0]} chunks on {args.workers} workers")

        def progress(info: dkm.engine.IterationInfo) -> None:
            print(
                f"  iter {info.iteration:3d}  objective {info.objective:14.6g}  "
                f"change {info.change:10.3g}  {info.seconds * 1e3:7.1f} ms"
            )

        t0 = time.perf_counter()
        km = dkm.KMeans(args.k, random_state=args.seed).fit(X)
        print(
            f"k-means: {km.n_iter_} iterations, inertia {km.inertia_:.6g}, "
            f"{time.perf_counter() - t0:.1f}s"
        )
        sizes = np.bincount(km.labels_.compute(), minlength=args.k)
        print(f"  cluster sizes: min {sizes.min():,}, max {sizes.max():,}")

        t0 = time.perf_counter()
        gm = dkm.GaussianMixture(args.k, covariance_type="full", random_state=args.seed)
        gm.fit(X)
        for info in gm.history_:
            progress(info)
        print(
            f"gaussian mixture (full): converged={gm.converged_} after {gm.n_iter_} "
            f"iterations, mean log-likelihood {gm.lower_bound_:.6f}, "
            f"{time.perf_counter() - t0:.1f}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
