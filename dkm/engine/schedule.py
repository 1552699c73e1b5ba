"""The sampled schedule: a fit's early iterations on growing samples of the data, the
last ones on all of it.

What exists: FAISS trains k-means on at most 256 points per centroid and never looks at
the rest; Sculley's mini-batch k-means and stochastic (online) EM take every step on a
small random batch and stop without a full-data fixed point; progressive ("coarse to
fine") sampling fits on a sample and refits on a larger one from there. dkm takes the
last: it iterates, to a tolerance set by each sample's own sampling error, on a nested
sequence of Bernoulli samples drawn once, in the data summary's pass (the rows whose
hashed uniform number falls below a rate: :class:`~dkm.stats.RowSample`, the same rows
whatever the chunking or the workers), growing :data:`GROWTH`-fold from
:data:`FIRST_ROWS_PER_COMPONENT` rows per component to the largest sample; then
ordinary EM/Lloyd on all the data from there, with the fit's own ``max_iter`` and
``tol``. The model is therefore a fixed point of the full data under the same rule as
without the schedule; what changes is how many full passes it takes to get there,
because it starts from a model as good as the largest sample can make it. Mini-batch
steps would not give that fixed point, and stochastic EM's step sizes would need
tuning per data set.

The sample's iterations run on this process's threads (the sample is at most
:data:`MAX_SAMPLE_BYTES` of float64 points), through the same pass builder as the full
data's, and reach the callback and ``history_`` with ``IterationInfo.sample`` set to
the sample's rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from numpy.typing import NDArray

from dkm import covariance
from dkm._typing import SAMPLING_SCHEDULES, parse_schedule
from dkm.covariance import DegenerateComponentError
from dkm.engine.data import ChunkedData
from dkm.engine.em import Callback, EMOptions, EMResult, IterationInfo, fit_em_many
from dkm.engine.passes import one_blas_thread
from dkm.kernels.params import MixtureParams
from dkm.stats import RowSample

F64 = NDArray[np.float64]

#: Rows per component of the first sample (FAISS's training sample size).
FIRST_ROWS_PER_COMPONENT = 256
#: Rows per component of the largest sample, at most.
LARGEST_ROWS_PER_COMPONENT = 4096
#: Each sample this many times the previous one.
GROWTH = 4
#: The largest sample's float64 points, at most (it lives in the client's memory).
MAX_SAMPLE_BYTES = 64 << 20
#: ``"auto"`` samples when the data has at least this many times the largest sample's
#: rows (below, the sample's iterations would save few full passes).
AUTO_MIN_RATIO = 8
#: A sample's iterations stop once a step is below this share of the sample's own
#: sampling error (or, earlier, at the fit's ``tol``).
NOISE_SHARE = 1 / 8
#: ``sample_trials="auto"``: at most this many initialisations tried per run.
MAX_AUTO_TRIALS = 16
#: ``sample_trials="auto"``: the iterations a trial is reckoned to make on the first sample.
TRIAL_ITERATIONS = 20
#: Rows per chunk of a sample: chunks of about this many bytes (fixed by the sample and
#: the width alone, so that a sample's passes give the same bits on any machine).
SAMPLE_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Schedule:
    """The samples of a sampled fit: ``sizes``, the rows of each (increasing; the last
    is the whole sample drawn), and ``rate``, the share of rows the summary pass draws."""

    sizes: tuple[int, ...]
    rate: float

    @classmethod
    def plan(cls, schedule: str, n: int, k: int, d: int) -> Schedule | None:
        """The schedule of a fit of ``k`` components to ``n`` rows of ``d`` features;
        None when it iterates on the full data only (``"full"``, or ``"auto"`` on data
        smaller than :data:`AUTO_MIN_RATIO` times the largest sample)."""
        if parse_schedule(schedule) not in SAMPLING_SCHEDULES or n <= 0:
            return None
        largest = min(LARGEST_ROWS_PER_COMPONENT * k, MAX_SAMPLE_BYTES // (8 * d))
        if schedule == "auto" and n < AUTO_MIN_RATIO * largest:
            return None
        largest = max(min(largest, n // 2), min(n, 2 * k))
        sizes = []
        size = FIRST_ROWS_PER_COMPONENT * k
        while size < largest:
            sizes.append(size)
            size *= GROWTH
        sizes.append(largest)
        return cls(tuple(sizes), min(1.0, largest / n))


def auto_trials(schedule: Schedule, n: int, k: int, init_rows: int, runs: int = 1) -> int:
    """``sample_trials="auto"``: as many initialisations per run as fit, for all the
    fit's ``runs`` together, in about one pass over the ``n`` rows, at most
    :data:`MAX_AUTO_TRIALS`. A trial is reckoned as a greedy k-means++ on ``init_rows``
    rows (``2 + ln k`` candidate centres each, as a pass over those rows: the work of
    ``(2 + ln k) · init_rows`` rows of a pass) and :data:`TRIAL_ITERATIONS` iterations on
    the schedule's first sample."""
    cost = (2 + math.log(max(k, 1))) * init_rows + TRIAL_ITERATIONS * schedule.sizes[0]
    return int(min(MAX_AUTO_TRIALS, max(1, n // max(cost * max(runs, 1), 1))))


def sample_data(sample: RowSample, origin: F64, nan_policy: str) -> ChunkedData:
    """A sample as the data of a fit, centred on the full data's ``origin``."""
    d = sample.points.shape[1]
    rows = max(256, SAMPLE_CHUNK_BYTES // (8 * max(d, 1)))
    X = da.from_array(sample.points, chunks=(rows, -1))
    w = da.from_array(sample.weights, chunks=rows)
    data = ChunkedData.from_dask(X, w, nan_policy)
    return data.with_origin(origin)


@dataclass
class SampledPhase:
    """What the sampled iterations leave for the full data's: each model's parameters
    (centred on the data's origin), covariances and iterations."""

    params: list[MixtureParams]
    covariances: list[F64 | None]
    histories: list[list[IterationInfo]]


def run_sampled(
    schedule: Schedule,
    sample: RowSample,
    origin: F64,
    inits: Sequence[MixtureParams],
    options: EMOptions,
    *,
    total_weight: float,
    nan_policy: str = "raise",
    tol_abs: float | None = None,
    init_covariances: Sequence[F64 | None] | None = None,
    callback: Callback | None = None,
    trials: int = 1,
) -> SampledPhase:
    """EM (or Lloyd's k-means) from each of ``inits`` on the nested samples of
    ``schedule``, on this process's threads: each sample's iterations start where the
    previous sample's stopped and stop at the fit's tolerance or at a step below
    :data:`NOISE_SHARE` of the sample's sampling error, whichever is larger (at most
    ``options.max_iter`` each).

    The iterations reach ``callback`` with ``sample`` set to the sample's rows, numbered
    on from one sample to the next; a k-means inertia is scaled to the full data's
    weight (``total_weight``), an estimate, so that the history reads on one scale.

    ``trials`` > 1: ``inits`` are groups of that many consecutive starts, one group per
    run. Every start iterates on the first sample; the best of each group on that
    sample (the lowest inertia, the highest lower bound; the first of equals) goes on
    as its run, and the others are dropped, their iterations in no history and not
    passed to ``callback`` (the winners' are, once chosen, numbered as its run).
    """
    if trials < 1 or len(inits) % trials:
        raise ValueError(f"{len(inits)} starts do not make groups of {trials} trials")
    nested = sample.nested()
    params = list(inits)
    covs: list[F64 | None] = (
        list(init_covariances) if init_covariances is not None else [None] * len(inits)
    )
    histories: list[list[IterationInfo]] = [[] for _ in inits]
    marker = _Marker(histories, callback, options.is_kmeans)
    spread = [math.nan] * len(inits)  # k-means: the last mean squared distance to a centre
    # the last sample is all the rows drawn (about the planned largest)
    sizes = [m for m in schedule.sizes[:-1] if m < nested.size] + [nested.size]
    for m in sizes:
        part = nested.first(m)
        data = sample_data(part, origin, nan_policy)
        weight = float(part.weights.sum())
        if weight <= 0:
            continue
        stage = dataclasses.replace(options, tol=_gmm_tol(options, params, m))
        marker.start(m, total_weight / weight, hold=trials > 1)
        try:
            results = _iterate(data, params, stage, options, tol_abs, spread, m, covs, marker)
        except DegenerateComponentError:
            if trials == 1:
                raise
            # a trial collapsed on the small first sample (on_degenerate="error"): go on
            # from each run's first start alone, as without trials, which raises if that
            # one collapses too
            marker.restart()  # nothing of it was passed on: it was held
            keep = list(range(0, len(params), trials))
            params, covs, spread, histories = _kept(keep, params, covs, spread, marker)
            trials = 1
            marker.start(m, total_weight / weight)
            results = _iterate(data, params, stage, options, tol_abs, spread, m, covs, marker)
        for i, result in enumerate(results):
            info = marker.last.get(i)
            if info is not None and info.centred is not None:
                params[i] = info.centred
            covs[i] = result.covariances
            if result.final is not None and result.final.n > 0:
                spread[i] = result.final.objective / max(float(result.final.nk.sum()), 1e-300)
        if trials > 1:
            keep = _best_of_groups([r.objective for r in results], trials, options.is_kmeans)
            params, covs, spread, histories = _kept(keep, params, covs, spread, marker)
            trials = 1
    if trials > 1:  # no sample had weight: the first start of each group
        keep = list(range(0, len(params), trials))
        params, covs, spread, histories = _kept(keep, params, covs, spread, marker)
    return SampledPhase(params, covs, histories)


def _iterate(
    data: ChunkedData,
    params: list[MixtureParams],
    stage: EMOptions,
    options: EMOptions,
    tol_abs: float | None,
    spread: list[float],
    m: int,
    covs: list[F64 | None],
    marker: _Marker,
) -> list[EMResult]:
    """One sample's iterations from ``params``: on this process's threads, BLAS on one
    thread (a small sample is one chunk, whose small products gain nothing from BLAS's
    threads and lose a time slice each when the OS has descheduled one on a busy
    machine)."""
    with dask.config.set(scheduler="threads"), one_blas_thread():
        return fit_em_many(
            data,
            params,
            stage,
            tol_abs=_kmeans_tol(options, tol_abs, params, spread, m),
            init_covariances=covs,
            callback=marker,
        )


def _kept(
    keep: Sequence[int],
    params: list[MixtureParams],
    covs: list[F64 | None],
    spread: list[float],
    marker: _Marker,
) -> tuple[list[MixtureParams], list[F64 | None], list[float], list[list[IterationInfo]]]:
    return (
        [params[i] for i in keep],
        [covs[i] for i in keep],
        [spread[i] for i in keep],
        marker.choose(keep),
    )


def _best_of_groups(objectives: Sequence[float], trials: int, kmeans: bool) -> list[int]:
    """The index of the best start of each group of ``trials`` consecutive ones: the
    lowest inertia (k-means) or the highest lower bound, the first of equals; a NaN
    objective is the worst."""
    keep = []
    for first in range(0, len(objectives), trials):
        group = range(first, first + trials)
        score = [-o if kmeans else o for o in (objectives[i] for i in group)]
        score = [s if not math.isnan(s) else -math.inf for s in score]
        keep.append(group[max(range(trials), key=lambda j: (score[j], -j))])
    return keep


class _Marker:
    """The callback of a sample's iterations: marks each with the sample's rows,
    numbers it on from the previous samples', keeps it in its model's history and
    passes it on."""

    def __init__(
        self, histories: list[list[IterationInfo]], callback: Callback | None, kmeans: bool
    ) -> None:
        self.histories, self.callback, self.kmeans = histories, callback, kmeans
        self.done = self.offset = self.rows = 0
        self.scale = 1.0
        self.hold = False
        self.last: dict[int, IterationInfo] = {}

    def start(self, rows: int, scale: float, hold: bool = False) -> None:
        """A new sample of ``rows`` rows, whose weight is the data's over ``scale``;
        ``hold``: keep its iterations from the callback until :meth:`choose`."""
        self.offset, self.rows, self.scale, self.hold = self.done, rows, scale, hold
        self.last = {}

    def restart(self) -> None:
        """Forget the iterations of the sample begun (none passed on yet: held)."""
        self.histories = [[i for i in h if i.iteration <= self.offset] for h in self.histories]
        self.done, self.last = self.offset, {}

    def choose(self, keep: Sequence[int]) -> list[list[IterationInfo]]:
        """Keep the histories of the runs ``keep`` (renumbered as 0, 1, ...), pass their
        held iterations on to the callback, and return the kept histories."""
        self.histories = [
            [dataclasses.replace(info, run=run) for info in self.histories[i]]
            for run, i in enumerate(keep)
        ]
        self.last = {run: self.last[i] for run, i in enumerate(keep) if i in self.last}
        self.done = max((h[-1].iteration for h in self.histories if h), default=self.offset)
        if self.callback is not None and self.hold:
            for info in sorted(
                (i for h in self.histories for i in h), key=lambda i: (i.iteration, i.run)
            ):
                self.callback(info)
        self.hold = False
        return self.histories

    def __call__(self, info: IterationInfo) -> None:
        marked = dataclasses.replace(
            info,
            iteration=self.offset + info.iteration,
            objective=info.objective * self.scale if self.kmeans else info.objective,
            sample=self.rows,
        )
        self.done = max(self.done, marked.iteration)
        self.last[info.run] = info
        self.histories[info.run].append(marked)
        if self.callback is not None and not self.hold:
            self.callback(marked)


def _kmeans_tol(
    options: EMOptions,
    tol_abs: float | None,
    params: Sequence[MixtureParams],
    spread: Sequence[float],
    m: int,
) -> float | None:
    """k-means: the squared centre shift below which a sample's iterations stop. The
    centres of a sample of ``m`` rows lie about ``k·s²/m`` (summed over the ``k``
    centres: ``k²·s²/m``) from the full data's, ``s²`` the mean squared distance of a
    row to its centre (the previous sample's, or the data's variance at first)."""
    if not options.is_kmeans:
        return tol_abs
    base = 0.0 if tol_abs is None else tol_abs
    k = max(p.n_components for p in params)
    s2 = min((s for s in spread if math.isfinite(s)), default=math.nan)
    if not math.isfinite(s2):
        return base  # no estimate yet: the fit's own tolerance
    return max(base, NOISE_SHARE * k * k * s2 / m)


def _gmm_tol(options: EMOptions, params: Sequence[MixtureParams], m: int) -> float:
    """Mixtures: the change of the mean log-likelihood below which a sample's iterations
    stop. A maximum-likelihood fit to ``m`` rows lies about ``p/(2m)`` (``p`` free
    parameters) above the full data's fixed point in mean log-likelihood."""
    if options.is_kmeans:
        return options.tol
    k = max(p.n_components for p in params)
    d = params[0].means.shape[1]
    p = covariance.of(options.covariance_type).n_parameters(k, d)
    return max(options.tol, NOISE_SHARE * p / (2 * m))


def sampled_iterations(history: Sequence[IterationInfo]) -> int:
    """How many of ``history``'s iterations ran on a sample."""
    return sum(1 for info in history if info.sample is not None)


__all__ = [
    "SampledPhase",
    "Schedule",
    "auto_trials",
    "run_sampled",
    "sample_data",
    "sampled_iterations",
]
