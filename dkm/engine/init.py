"""Initial parameters: centres from the summary's sample, and a mixture from the
nearest-centre partition of the data (scikit-learn's initialisation from k-means labels).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from dkm import covariance
from dkm._typing import CovarianceType, OnDegenerate
from dkm.engine.data import ChunkedData
from dkm.engine.passes import PassJob, PassOptions, one_blas_thread, stats_pass_many
from dkm.errors import InvalidDataError
from dkm.kernels.init import INIT_METHODS
from dkm.kernels.mstep import gaussian_mstep
from dkm.kernels.params import DegenerateComponentWarning, MixtureParams
from dkm.stats import DataSummary

F64 = NDArray[np.float64]


def sample_points(summary: DataSummary, origin: F64) -> tuple[F64, F64]:
    """The init sample in centred coordinates and the weights to use with it.

    A complete sample (every positive-weight row) keeps its weights and row order, so
    k-means++ on small data is scikit-learn's k-means++ on the same points; a
    subsample was drawn proportionally to weight and is used unweighted.
    """
    sample = summary.sample.in_row_order()
    points = sample.points - origin
    weights = sample.weights if summary.sample_is_complete else np.ones(len(sample.rows))
    return points, weights


def init_centres(
    summary: DataSummary,
    origin: F64,
    n_clusters: int,
    method: str,
    random_state: np.random.RandomState,
) -> F64:
    """Initial centres (centred coordinates) by ``method`` on the summary's sample."""
    try:
        fn = INIT_METHODS[method]
    except KeyError:
        raise ValueError(
            f"init: expected one of {', '.join(INIT_METHODS)} or an array, got {method!r}"
        ) from None
    points, weights = sample_points(summary, origin)
    if points.shape[0] < n_clusters:
        raise InvalidDataError(
            f"n_samples={points.shape[0]} (with positive weight) should be >= "
            f"n_clusters={n_clusters}."
        )
    # many small products (k-means++: one per centre): on one BLAS thread, since a
    # second thread that the OS has descheduled costs each product a time slice on a
    # busy machine (16 k-means++ starts of k=64 on 10,000 rows: 0.2 s on an idle
    # machine either way, 4 s with two threads on a loaded one)
    with one_blas_thread():
        return fn(points, n_clusters, weights, random_state)


def gaussian_from_partition(
    data: ChunkedData,
    centres: F64,
    covariance_type: CovarianceType,
    reg_covar: float,
    split_every: int = 8,
    on_degenerate: OnDegenerate = "error",
) -> tuple[MixtureParams, F64]:
    """A mixture from the nearest-centre partition of the data (one pass).

    This is scikit-learn's initialisation from k-means labels: one-hot
    responsibilities, then an M-step. ``centres`` are in centred coordinates.
    """
    (found,) = gaussian_from_partition_many(
        data, [centres], covariance_type, reg_covar, split_every, on_degenerate
    )
    return found


def gaussian_from_partition_many(
    data: ChunkedData,
    centres: Sequence[F64],
    covariance_type: CovarianceType,
    reg_covar: float,
    split_every: int = 8,
    on_degenerate: OnDegenerate = "error",
) -> list[tuple[MixtureParams, F64]]:
    """:func:`gaussian_from_partition` for several sets of centres in one pass."""
    if not centres:
        return []
    moments = covariance.of(covariance_type).moments
    jobs: list[PassJob] = [
        (
            MixtureParams.identity(c),
            c,
            PassOptions("hard", moments, len(c) if on_degenerate == "reseed" else 0),
        )
        for c in centres
    ]
    out = []
    for c, stats in zip(centres, stats_pass_many(data, jobs, split_every=split_every), strict=True):
        params, cov, repaired = gaussian_mstep(stats, c, covariance_type, reg_covar, on_degenerate)
        if repaired:
            warn_repaired(repaired, on_degenerate, 0)
        out.append((params, cov))
    return out


def warn_repaired(components: list[int], policy: str, iteration: int) -> None:
    """Warn that an M-step dropped or re-seeded collapsed ``components`` (the warning
    points at the caller of the function that calls this)."""
    done = "dropped" if policy == "drop" else "re-seeded on the worst-explained points"
    warnings.warn(
        f"mixture component(s) {', '.join(map(str, components))} collapsed at iteration "
        f"{iteration} and were {done} (on_degenerate={policy!r})",
        DegenerateComponentWarning,
        stacklevel=3,
    )
