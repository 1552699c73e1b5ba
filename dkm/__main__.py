"""``python -m dkm``: a small demo of the estimators, without a config.

Generates 50,000 points in 4 dimensions around 6 centres as a chunked Dask array, fits
``dkm.KMeans`` (k-means++ with a seed) and then a full-covariance
``dkm.GaussianMixture`` started from the k-means partition, and prints what each found
beside scikit-learn's estimator given the same seed or starting parameters on the same
points. It runs on Dask's threaded scheduler in this process and takes a few seconds.
The job on a Dask cluster is ``dkm run CONFIG``.
"""

from __future__ import annotations

import argparse
import time

import dask.array as da
import numpy as np


def make_blobs(n: int, d: int, k: int, seed: int, chunk_rows: int) -> da.Array:
    """Gaussian blobs generated chunk by chunk by the scheduler (never all at once)."""
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
    parser.add_argument("--n", type=int, default=50_000, help="points")
    parser.add_argument("--d", type=int, default=4, help="features")
    parser.add_argument("--k", type=int, default=6, help="clusters")
    parser.add_argument("--chunk-rows", type=int, default=10_000, help="rows per chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from sklearn.cluster import KMeans as SKKMeans
    from sklearn.mixture import GaussianMixture as SKGaussianMixture

    import dkm

    X = make_blobs(args.n, args.d, args.k, args.seed, args.chunk_rows).persist()
    points = X.compute()
    print(
        f"dkm {dkm.__version__}: {args.n:,} points x {args.d} around {args.k} centres, "
        f"{X.numblocks[0]} chunks of up to {args.chunk_rows:,} rows"
    )

    # k-means++ on all the points (init_sample_size) is scikit-learn's, seed for seed
    t0 = time.perf_counter()
    km = dkm.KMeans(args.k, random_state=args.seed, init_sample_size=args.n).fit(X)
    seconds = time.perf_counter() - t0
    labels = np.asarray(km.labels_.compute())
    sizes = np.bincount(labels, minlength=args.k)
    print(
        f"dkm.KMeans: {km.n_iter_} iterations, inertia {km.inertia_:.10g}, {seconds:.1f}s; "
        f"cluster sizes {sizes.min():,} to {sizes.max():,}"
    )
    sk = SKKMeans(args.k, random_state=args.seed, n_init=1, algorithm="lloyd").fit(points)
    print(
        f"  scikit-learn, same seed: {sk.n_iter_} iterations, inertia "
        f"{sk.inertia_:.10g}; centres differ by at most "
        f"{np.abs(km.cluster_centers_ - sk.cluster_centers_).max():.1e}"
    )

    # the mixture starts from the k-means partition: its weights, means and covariances
    weights = sizes / args.n
    covariances = np.stack(
        [np.cov(points[labels == j].T, bias=True) for j in range(args.k)]
    ) + 1e-6 * np.eye(args.d)
    start = dict(
        weights_init=weights,
        means_init=km.cluster_centers_,
        precisions_init=np.linalg.inv(covariances),
    )
    t0 = time.perf_counter()
    gm = dkm.GaussianMixture(args.k, covariance_type="full", **start).fit(X)
    seconds = time.perf_counter() - t0
    print(
        f"dkm.GaussianMixture (full): {gm.n_iter_} iterations, converged {gm.converged_}, "
        f"mean log-likelihood {gm.lower_bound_:.10g}, {seconds:.1f}s"
    )
    skg = SKGaussianMixture(args.k, covariance_type="full", **start).fit(points)
    print(
        f"  scikit-learn from the same parameters: {skg.n_iter_} iterations, mean "
        f"log-likelihood {skg.lower_bound_:.10g}; means differ by at most "
        f"{np.abs(gm.means_ - skg.means_).max():.1e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
