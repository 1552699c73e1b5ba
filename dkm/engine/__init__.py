"""The EM loop over a Dask array: E-step per chunk, merged per task, M-step on the client.

Knows no YAML, no files and no CLI. Works on whatever Dask scheduler is current: the
threaded scheduler by default, or a ``distributed.Client`` if one is active.

- :mod:`~dkm.engine.data`: the points, their weights and origin (:class:`ChunkedData`),
  and the checks of non-finite rows;
- :mod:`~dkm.engine.passes`: the one builder of a pass over the data
  (:func:`~dkm.engine.passes.run_pass`), the E-step pass and the summary pass;
- :mod:`~dkm.engine.em`: the EM loop (:func:`fit_em_many`) and what it reports;
- :mod:`~dkm.engine.init`: initial centres and mixtures;
- :mod:`~dkm.engine.outputs`: per-row outputs of a fitted model;
- :mod:`~dkm.engine._dask`: the only module that touches Dask's private API.
"""

from dkm.engine.data import (
    DROP_REMEDY,
    LABEL_REMEDY,
    ChunkedData,
    NonFiniteInputError,
)
from dkm.engine.em import (
    Callback,
    EMOptions,
    EMResult,
    FitBounds,
    IterationInfo,
    ResumeState,
    fit_em,
    fit_em_many,
)
from dkm.engine.init import (
    gaussian_from_partition,
    gaussian_from_partition_many,
    init_centres,
    sample_points,
)
from dkm.engine.outputs import (
    apply_in_memory,
    lazy_distances,
    lazy_labels,
    lazy_proba,
    lazy_score_samples,
)
from dkm.engine.passes import (
    PassJob,
    PassOptions,
    StackedStats,
    one_blas_thread,
    release_held,
    stats_pass,
    stats_pass_many,
    summarize,
)

__all__ = [
    "DROP_REMEDY",
    "LABEL_REMEDY",
    "Callback",
    "ChunkedData",
    "EMOptions",
    "EMResult",
    "FitBounds",
    "IterationInfo",
    "NonFiniteInputError",
    "PassJob",
    "PassOptions",
    "ResumeState",
    "StackedStats",
    "apply_in_memory",
    "fit_em",
    "fit_em_many",
    "gaussian_from_partition",
    "gaussian_from_partition_many",
    "init_centres",
    "lazy_distances",
    "lazy_labels",
    "lazy_proba",
    "lazy_score_samples",
    "one_blas_thread",
    "release_held",
    "sample_points",
    "stats_pass",
    "stats_pass_many",
    "summarize",
]
