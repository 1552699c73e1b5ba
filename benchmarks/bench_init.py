"""Quality of scalable k-means initialisation: dkm's k-means‖ against scikit-learn and dask-ml.

Issue 4 asks for k-means‖ whose converged result is no worse than scikit-learn's
``KMeans(init="k-means++", n_init=1)`` in the median over 10 seeds, and better than
dask-ml's k-means‖, on data with known structure. The data are generated here, in the
spirit of the classic clustering benchmarks (Fränti & Sieranoja, "K-means properties on
six clustering benchmark datasets", 2018), scaled to a million points:

* ``birch1``: 100 round Gaussian clusters on a regular 10 × 10 grid (Birch1's layout).
* ``a3``: 50 round Gaussian clusters of equal size on a jittered 10 × 5 grid (A3).
* ``s2``: 15 Gaussian clusters of unequal sizes and spreads on a jittered 4 × 4 grid
  (one cell empty), with some overlap (S2).

For every data set and seed each contender fits k = the true number of clusters:

* ``dkm k-means||``: :func:`dkm.kmeans_parallel.kmeans_parallel` (5 rounds, ℓ = 2k) on
  the Dask array, then ``dkm.KMeans(init=centres, n_init=1)`` (Lloyd to convergence).
* ``sklearn k-means++``: ``sklearn.cluster.KMeans(init="k-means++", n_init=1)`` on the
  NumPy array (greedy k-means++ over all points, then Lloyd).
* ``dask-ml k-means||``: ``dask_ml.cluster.KMeans(init="k-means||", n_init=1)``
  (oversampling factor 2, its defaults otherwise) on the Dask array.

All use ``tol=1e-4`` and ``max_iter=300``. Reported per data set and contender, over
the seeds: the centroid index (CI, Fränti et al. 2014: the number of true clusters left
without a centre, or centres left without a true cluster, whichever is larger; 0 means
every cluster was found), how many seeds reached CI = 0, the final inertia relative to
Lloyd's converged inertia started from the true centres, and the wall time of the fit
(informational only: other work may share the machine). Medians are the headline.

Run from the repository root (needs ``pip install dask-ml``)::

    python benchmarks/bench_init.py                       # 1,000,000 points, 10 seeds
    python benchmarks/bench_init.py --quick               # smoke run, seconds
    python benchmarks/bench_init.py --n 200000 --seeds 5 --datasets a3,s2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import dask
import dask.array as da
import numpy as np
from sklearn.cluster import KMeans as SKKMeans

import dkm
from dkm.engine import ChunkedData, summarize
from dkm.kmeans_parallel import kmeans_parallel

TOL = 1e-4
MAX_ITER = 300


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSet:
    name: str
    X: np.ndarray
    truth: np.ndarray  # (k, d) the generating centres


def _sample(
    rng: np.random.Generator,
    n: int,
    centres: np.ndarray,
    sds: np.ndarray,
    proportions: np.ndarray,
) -> np.ndarray:
    labels = rng.choice(len(centres), size=n, p=proportions)
    return centres[labels] + rng.normal(size=(n, centres.shape[1])) * sds[labels, None]


def birch1(n: int, rng: np.random.Generator) -> DataSet:
    g = np.arange(10) * 10.0
    centres = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    k = len(centres)
    return DataSet("birch1", _sample(rng, n, centres, np.full(k, 1.2), np.full(k, 1 / k)), centres)


def a3(n: int, rng: np.random.Generator) -> DataSet:
    gx, gy = np.meshgrid(np.arange(10) * 10.0, np.arange(5) * 10.0)
    centres = np.stack([gx, gy], -1).reshape(-1, 2) + rng.uniform(-2.0, 2.0, size=(50, 2))
    k = len(centres)
    return DataSet("a3", _sample(rng, n, centres, np.full(k, 1.0), np.full(k, 1 / k)), centres)


def s2(n: int, rng: np.random.Generator) -> DataSet:
    g = np.arange(4) * 10.0
    cells = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    centres = np.delete(cells, rng.integers(16), axis=0) + rng.uniform(-1.5, 1.5, (15, 2))
    sds = rng.uniform(1.0, 2.0, size=15)
    proportions = rng.uniform(0.5, 1.5, size=15)
    return DataSet("s2", _sample(rng, n, centres, sds, proportions / proportions.sum()), centres)


DATASETS: dict[str, Callable[[int, np.random.Generator], DataSet]] = {
    "birch1": birch1,
    "a3": a3,
    "s2": s2,
}


# --------------------------------------------------------------------------- measures


def centroid_index(found: np.ndarray, truth: np.ndarray) -> int:
    """Fränti's CI: orphan centres (nobody maps to them) in either direction, the larger."""

    def orphans(a: np.ndarray, b: np.ndarray) -> int:
        nearest = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).argmin(axis=1)
        return int(len(b) - len(np.unique(nearest)))

    return max(orphans(found, truth), orphans(truth, found))


def inertia(X: np.ndarray, centres: np.ndarray, block: int = 200_000) -> float:
    """Σ min_c ‖x − c‖², in float64, blocked (the same formula for every contender)."""
    total = 0.0
    c_norms = (centres**2).sum(1)
    for s in range(0, len(X), block):
        Xb = X[s : s + block]
        d = (Xb**2).sum(1)[:, None] - 2.0 * Xb @ centres.T + c_norms
        total += float(np.maximum(d.min(axis=1), 0.0).sum())
    return total


# --------------------------------------------------------------------------- contenders


def fit_dkm(X: np.ndarray, Xd: da.Array, k: int, seed: int) -> np.ndarray:
    data = ChunkedData.from_dask(Xd)
    summary = summarize(data, sample_size=10_000, seed=seed)
    data = data.with_origin(summary.mean)
    centres = kmeans_parallel(data, k, seed, summary=summary) + data.origin
    model = dkm.KMeans(k, init=centres, n_init=1, tol=TOL, max_iter=MAX_ITER, random_state=seed)
    return np.asarray(model.fit(Xd).cluster_centers_, np.float64)


def fit_sklearn(X: np.ndarray, Xd: da.Array, k: int, seed: int) -> np.ndarray:
    model = SKKMeans(k, init="k-means++", n_init=1, tol=TOL, max_iter=MAX_ITER, random_state=seed)
    return np.asarray(model.fit(X).cluster_centers_, np.float64)


def fit_dask_ml(X: np.ndarray, Xd: da.Array, k: int, seed: int) -> np.ndarray:
    from dask_ml.cluster import KMeans as DaskMLKMeans

    model = DaskMLKMeans(
        n_clusters=k, init="k-means||", n_init=1, tol=TOL, max_iter=MAX_ITER, random_state=seed
    )
    with warnings.catch_warnings():  # dask-ml's own deprecation noise
        warnings.simplefilter("ignore")
        model.fit(Xd)
    return np.asarray(model.cluster_centers_, np.float64)


CONTENDERS: dict[str, Callable[[np.ndarray, da.Array, int, int], np.ndarray]] = {
    "dkm k-means||": fit_dkm,
    "sklearn k-means++": fit_sklearn,
    "dask-ml k-means||": fit_dask_ml,
}


# --------------------------------------------------------------------------- driver


@dataclass
class Run:
    dataset: str
    contender: str
    seed: int
    ci: int
    rel_inertia: float
    seconds: float


def run(n: int, seeds: int, datasets: list[str], contenders: list[str], chunk: int) -> list[Run]:
    runs: list[Run] = []
    for name in datasets:
        ds = DATASETS[name](n, np.random.default_rng(12345))
        k = len(ds.truth)
        Xd = da.from_array(ds.X, chunks=(chunk, -1)).persist()
        ref = SKKMeans(k, init=ds.truth, n_init=1, tol=TOL, max_iter=MAX_ITER).fit(ds.X)
        ref_inertia = inertia(ds.X, ref.cluster_centers_)
        print(f"# {name}: n={n:,} d=2 k={k}, reference inertia {ref_inertia:.6g}", flush=True)
        for contender in contenders:
            for seed in range(seeds):
                t0 = time.perf_counter()
                centres = CONTENDERS[contender](ds.X, Xd, k, seed)
                seconds = time.perf_counter() - t0
                r = Run(
                    name,
                    contender,
                    seed,
                    centroid_index(centres, ds.truth),
                    inertia(ds.X, centres) / ref_inertia,
                    seconds,
                )
                print(
                    f"  {contender:18s} seed {seed}: CI {r.ci}, inertia/ref "
                    f"{r.rel_inertia:.5f}, {r.seconds:.1f}s",
                    flush=True,
                )
                runs.append(r)
    return runs


def table(runs: list[Run]) -> str:
    lines = [
        "| data | contender | median CI | mean CI | seeds with CI=0 | median inertia/ref "
        "| worst inertia/ref | median s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = dict.fromkeys((r.dataset, r.contender) for r in runs)
    for dataset, contender in keys:
        rs = [r for r in runs if r.dataset == dataset and r.contender == contender]
        cis = [r.ci for r in rs]
        rel = [r.rel_inertia for r in rs]
        lines.append(
            f"| {dataset} | {contender} | {statistics.median(cis):g} | "
            f"{statistics.mean(cis):.2f} | {sum(c == 0 for c in cis)}/{len(cis)} | "
            f"{statistics.median(rel):.5f} | {max(rel):.5f} | "
            f"{statistics.median(r.seconds for r in rs):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="points per data set")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
    p.add_argument("--chunk", type=int, default=100_000, help="rows per Dask chunk")
    p.add_argument("--quick", action="store_true", help="20,000 points, 2 seeds")
    p.add_argument("--json", help="also write the runs to this file")
    args = p.parse_args(argv)
    n, seeds, chunk = (20_000, 2, 5_000) if args.quick else (args.n, args.seeds, args.chunk)
    datasets = args.datasets.split(",")
    contenders = [c.strip() for c in args.contenders.split(",")]
    for c in contenders:
        if c not in CONTENDERS:
            p.error(f"unknown contender {c!r}; expected some of {', '.join(CONTENDERS)}")
    for d in datasets:
        if d not in DATASETS:
            p.error(f"unknown data set {d!r}; expected some of {', '.join(DATASETS)}")
    with dask.config.set(scheduler="threads"):
        runs = run(n, seeds, datasets, contenders, chunk)
    print()
    print(table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
