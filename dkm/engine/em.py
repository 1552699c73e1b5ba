"""The EM loop: one pass over the data per iteration for every model still running,
the M-step on the client, and what a run reports and resumes from.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dask.base import get_scheduler
from numpy.typing import NDArray

from dkm import covariance
from dkm._typing import (
    Assignment,
    CovarianceType,
    KMeansAlgorithm,
    OnDegenerate,
    parse_kmeans_algorithm,
)
from dkm.codec import NonFinite, float_from_json, float_to_json
from dkm.engine.data import ChunkedData
from dkm.engine.init import warn_repaired
from dkm.engine.passes import (
    PassJob,
    PassOptions,
    is_client,
    one_blas_thread,
    release_held,
    stats_pass_many,
)
from dkm.kernels import bounds
from dkm.kernels.mstep import gaussian_mstep, kmeans_centres
from dkm.kernels.params import MixtureParams
from dkm.stats import SuffStats

F64 = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class IterationInfo:
    """What the per-iteration callback receives.

    ``objective`` is the k-means inertia (under the centres the iteration started
    from) or the mean log-likelihood (the lower bound); ``change`` is the squared centre
    shift (k-means) or the change of the lower bound; ``params`` are the new
    parameters, in the data's coordinates; ``converged`` says whether this iteration
    met the convergence rule (the last one of a converged run). Iterations on a sample
    (``sample`` set) are numbered apart from those on all the data, each from 1.
    """

    iteration: int
    objective: float
    change: float
    seconds: float
    #: None for iterations read back from a saved model or checkpoint.
    params: MixtureParams | None
    converged: bool = False
    #: The parameters exactly as the engine iterates on them (relative to ``origin``).
    centred: MixtureParams | None = None
    origin: F64 | None = None
    #: Which model of a shared run (:func:`fit_em_many`): its index among the inits.
    run: int = 0
    #: The cluster sizes ``nk`` (summed weights) of this iteration's E-step.
    sizes: F64 | None = None
    #: The summed squared movement of the centres (means) in this iteration.
    shift: float | None = None
    #: k-means: the share of rows whose search the Hamerly bounds skipped.
    skipped: float | None = None
    #: The rows of the sample this iteration ran on (a sampled schedule,
    #: :mod:`dkm.engine.schedule`); None for an iteration on all the data.
    sample: int | None = None

    def to_dict(self, nonfinite: NonFinite = "string") -> dict[str, Any]:
        """The iteration's numbers as JSON values: what the saved model, the checkpoint,
        the metrics and the report keep of it (see :mod:`dkm.codec` for ``nonfinite``)."""
        record: dict[str, Any] = {
            "iteration": int(self.iteration),
            "objective": float_to_json(self.objective, nonfinite),
            "change": float_to_json(self.change, nonfinite),
            "seconds": float_to_json(self.seconds, nonfinite),
            "converged": bool(self.converged),
        }
        if self.sample is not None:
            record["sample"] = int(self.sample)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> IterationInfo:
        """The iteration :meth:`to_dict` wrote (``params`` None: they are not kept);
        ValueError naming the key when it is not one. ``converged`` may be missing (models
        saved before it was kept), ``sample`` is there for iterations on a sample only."""
        try:
            sample = record.get("sample")
            return cls(
                int(record["iteration"]),
                float_from_json(record["objective"]),
                float_from_json(record["change"]),
                float_from_json(record["seconds"]),
                None,
                bool(record.get("converged", False)),
                sample=None if sample is None else int(sample),
            )
        except KeyError as e:
            raise ValueError(f"an iteration record without {e}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"an iteration record that is not one ({e}): {record!r}") from None


@dataclass(frozen=True, eq=False)
class ResumeState:
    """Where an interrupted run stopped: enough to finish it as if never interrupted.

    ``params`` are the parameters after ``iteration`` completed iterations, relative to
    ``origin`` (the engine's centring origin, the data mean: exact, since adding and
    removing the origin again would round); ``objective`` is that iteration's objective
    (the previous lower bound of the next GMM convergence test); ``history`` the
    iterations done so far.
    """

    iteration: int
    params: MixtureParams
    origin: F64
    objective: float
    converged: bool
    history: tuple[IterationInfo, ...] = ()

    @classmethod
    def after(cls, info: IterationInfo, history: tuple[IterationInfo, ...] = ()) -> ResumeState:
        """The state after the iteration ``info`` reports."""
        if info.centred is None or info.origin is None:
            raise ValueError("this IterationInfo carries no engine state to resume from")
        return cls(
            info.iteration, info.centred, info.origin, info.objective, info.converged, history
        )

    def to_dict(self) -> dict[str, Any]:
        """The state as a record: the parameters' entries (:meth:`MixtureParams.to_dict`)
        next to ``iteration``, ``origin``, ``objective``, ``converged`` and ``history``
        (:meth:`IterationInfo.to_dict` each), all at one level (a checkpoint's layout)."""
        return {
            **self.params.to_dict(),
            "iteration": int(self.iteration),
            "origin": self.origin,
            "objective": float_to_json(self.objective),
            "converged": bool(self.converged),
            "history": [info.to_dict() for info in self.history],
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ResumeState:
        """The state :meth:`to_dict` gave; ValueError naming what is missing or wrong."""
        try:
            return cls(
                int(record["iteration"]),
                MixtureParams.from_dict(record),
                np.asarray(record["origin"], np.float64),
                float_from_json(record["objective"]),
                bool(record["converged"]),
                tuple(IterationInfo.from_dict(h) for h in record["history"]),
            )
        except KeyError as e:
            raise ValueError(f"a resume state without {e}") from None

    def params_for(self, origin: F64) -> MixtureParams:
        """The parameters relative to ``origin`` (exact when it is the same origin)."""
        if np.array_equal(origin, self.origin):
            return self.params
        return self.params.translated(self.origin - origin)


Callback = Callable[[IterationInfo], None]


@dataclass(frozen=True)
class EMOptions:
    covariance_type: CovarianceType = "full"
    assignment: Assignment = "soft"
    reg_covar: float = 1e-6
    tol: float = 1e-3
    max_iter: int = 100
    split_every: int = 8
    on_degenerate: OnDegenerate = "error"
    #: k-means: whether passes keep Hamerly bounds (:class:`FitBounds`)
    algorithm: KMeansAlgorithm = "auto"

    @property
    def is_kmeans(self) -> bool:
        return covariance.of(self.covariance_type).unit and self.assignment == "hard"


@dataclass(eq=False)
class EMResult:
    """Outcome of one EM run. ``params`` are in the data's coordinates."""

    params: MixtureParams
    n_iter: int
    converged: bool
    objective: float  # k-means: final inertia; otherwise the last lower bound
    covariances: F64 | None
    history: list[IterationInfo] = field(default_factory=list)
    #: k-means: the statistics of the final pass (counts and inertia of the final centres)
    final: SuffStats | None = None


def _notify(callback: Callback | None, history: list[IterationInfo], info: IterationInfo) -> None:
    history.append(info)
    if callback is not None:
        callback(info)


def fit_em(
    data: ChunkedData,
    init: MixtureParams,
    options: EMOptions,
    *,
    tol_abs: float | None = None,
    init_covariances: F64 | None = None,
    callback: Callback | None = None,
    resume: ResumeState | None = None,
) -> EMResult:
    """Run EM from ``init`` (centred coordinates, i.e. relative to ``data.origin``).

    k-means (identity, hard) converges like scikit-learn's Lloyd: when the summed
    squared centre shift is ``<= tol_abs`` (which the caller derives from the data
    variance). Its moments are taken around the fixed origin, so an iteration whose
    labels did not change reproduces the centres bit for bit and stops at shift 0,
    as scikit-learn's strict convergence does. It also stops, converged, at an iteration
    that re-seeds an empty cluster when the inertia has not fallen since the previous
    iteration: every point then lies on a centre (fewer distinct points than clusters),
    and re-seeding would only move copies of points. Every other pair stops when the mean
    log-likelihood changes by less than ``options.tol``, and takes its moments
    around the previous means.

    With ``resume``, ``init`` is ignored: the run continues after ``resume.iteration``
    from ``resume.params`` (and the previous lower bound), so it ends where the
    uninterrupted run would have.
    """
    (result,) = fit_em_many(
        data,
        [init],
        options,
        tol_abs=tol_abs,
        init_covariances=[init_covariances],
        callback=callback,
        resume=resume,
    )
    return result


@dataclass(eq=False)
class _Run:
    """One model's EM state inside :func:`fit_em_many`."""

    index: int
    params: MixtureParams
    covariances: F64 | None
    n_iter: int = 0
    converged: bool = False
    lower_bound: float = -math.inf
    history: list[IterationInfo] = field(default_factory=list)
    final: SuffStats | None = None
    #: k-means: the passes keep Hamerly bounds (from when the centres settle)
    bounds: bool = False
    #: k-means: the previous iteration's objective (inertia)
    previous: float = math.inf


def fit_em_many(
    data: ChunkedData,
    inits: Sequence[MixtureParams],
    options: EMOptions,
    *,
    tol_abs: float | None = None,
    init_covariances: Sequence[F64 | None] | None = None,
    callback: Callback | None = None,
    resume: ResumeState | None = None,
) -> list[EMResult]:
    """Run EM from each of ``inits`` at once, sharing every pass over the data.

    Restarts and candidate numbers of components (the ``inits`` may differ in size)
    iterate together: each iteration is one pass in which every chunk is read once and
    runs the E-step of every model that has not yet converged; a model that has
    converged (or reached ``max_iter``) drops out of the following passes. Each model's
    result is exactly that of :func:`fit_em` from its init alone (the statistics of
    each model are merged in the same fixed order). The callback receives every
    model's iterations; ``IterationInfo.run`` says which model (its index in
    ``inits``). ``resume`` applies to a single init only.
    """
    if resume is not None and len(inits) != 1:
        raise ValueError("resume continues a single EM run; got several inits")
    covs = list(init_covariances) if init_covariances is not None else [None] * len(inits)
    runs = [_Run(i, p, c) for i, (p, c) in enumerate(zip(inits, covs, strict=True))]
    if resume is not None:
        (run,) = runs
        run.params = resume.params_for(data.origin)
        run.history = list(resume.history)
        run.converged, run.n_iter = resume.converged, resume.iteration
        run.lower_bound = run.previous = resume.objective
    kmeans = options.is_kmeans
    tol = (0.0 if tol_abs is None else tol_abs) if kmeans else options.tol
    fit = FitBounds(options.algorithm if kmeans else "lloyd")

    def job(run: _Run) -> PassJob:
        k = run.params.n_components
        if kmeans:
            return run.params, None, PassOptions("hard", "none", k, fit.key(run))
        # re-seeding needs the points the model explains worst: one per component
        n_far = k if options.on_degenerate == "reseed" else 0
        moments = covariance.of(options.covariance_type).moments
        return run.params, run.params.means, PassOptions(options.assignment, moments, n_far)

    held: list[Any] = []  # the last pass's futures on a client (see run_pass)
    try:
        while active := [r for r in runs if not r.converged and r.n_iter < options.max_iter]:
            t0 = time.perf_counter()
            jobs = [job(r) for r in active]
            all_stats = stats_pass_many(data, jobs, split_every=options.split_every, held=held)
            seconds = time.perf_counter() - t0
            for run, stats in zip(active, all_stats, strict=True):
                run.n_iter += 1
                if kmeans:
                    centres, reseeded = kmeans_centres(stats)
                    change = float(((centres - run.params.means) ** 2).sum())
                    objective = stats.objective
                    # Lloyd's steps and the re-seeding of an empty cluster on a point away
                    # from its centre both lower the objective: when it has not fallen and
                    # a cluster is empty again, every point sits on a centre (fewer distinct
                    # points than clusters) and re-seeding can only move duplicates around.
                    stalled = bool(reseeded) and objective >= run.previous
                    run.previous = objective
                    run.bounds = run.bounds or (
                        fit.wanted() and _worth_keeping(run.params.means, centres)
                    )
                    run.params = MixtureParams.identity(centres)
                    run.converged = change <= tol or stalled
                    shift = change
                else:
                    before = run.params.means
                    run.params, run.covariances, repaired = gaussian_mstep(
                        stats,
                        run.params.means,
                        options.covariance_type,
                        options.reg_covar,
                        options.on_degenerate,
                    )
                    if repaired:
                        warn_repaired(repaired, options.on_degenerate, run.n_iter)
                    previous, run.lower_bound = run.lower_bound, stats.objective / stats.n
                    objective, change = run.lower_bound, run.lower_bound - previous
                    run.converged = abs(change) < tol
                    # a dropped component (on_degenerate="drop") has no movement to tell
                    moved = run.params.means.shape == before.shape
                    shift = float(((run.params.means - before) ** 2).sum()) if moved else math.nan
                searched = stats.searched if kmeans else None
                _notify(
                    callback,
                    run.history,
                    IterationInfo(
                        run.n_iter,
                        objective,
                        change,
                        seconds,
                        run.params.translated(data.origin),
                        run.converged,
                        run.params,
                        data.origin,
                        run.index,
                        stats.nk,
                        shift,
                        None if searched is None else 1.0 - searched / max(stats.count, 1),
                    ),
                )
        if kmeans:  # the inertia of the final centres, for every model in one more pass
            finals = stats_pass_many(
                data,
                [(r.params, None, PassOptions("hard", "none", 0, fit.key(r))) for r in runs],
                split_every=options.split_every,
                held=held,
            )
            for run, final in zip(runs, finals, strict=True):
                run.final = final
    finally:
        release_held(held)
        data.release_bundles()
        if any(r.bounds for r in runs):  # else no bounds were kept: nothing to drop
            fit.release()
    return [
        EMResult(
            r.params.translated(data.origin),
            r.n_iter,
            r.converged,
            r.final.objective if r.final is not None else r.lower_bound,
            r.covariances,
            r.history,
            r.final,
        )
        for r in runs
    ]


class FitBounds:
    """The Hamerly bounds one k-means fit keeps between its passes.

    They live in :data:`dkm.kernels.bounds.CACHE` of each process that searches the
    fit's chunks (the client's under the threaded scheduler, every worker's on a
    cluster), under keys ``(name, run)`` of a fresh ``name``, from the pass after the
    centres settle (:func:`dkm.kernels.bounds.worth_keeping`) to :meth:`release` at the
    end of the fit. The results are the same, bit for bit, as searching every row.

    ``algorithm``: "lloyd", never (every row searched in every pass, as scikit-learn's
    Lloyd); "hamerly" and "auto", for rows of any width (rows of more than
    :data:`dkm.kernels._fused.SMALL_D` features are searched by BLAS, whose bits for a
    row depend on the product's shape and the row's place in it, so the rows the bounds
    leave unsettled are searched at their places in products of their blocks' shape).
    """

    def __init__(self, algorithm: KMeansAlgorithm = "auto") -> None:
        self.algorithm = parse_kmeans_algorithm(algorithm)
        self.name = uuid.uuid4().hex

    def wanted(self) -> bool:
        """Whether the fit keeps bounds once the centres settle."""
        return self.algorithm != "lloyd"

    def key(self, run: _Run) -> tuple[str, int] | None:
        """The cache key of ``run``'s bounds; None while it keeps none."""
        return (self.name, run.index) if run.bounds else None

    def release(self) -> None:
        """Drop the fit's bounds here and, without waiting, on a distributed cluster's
        workers (bounds that a worker still holds would otherwise only give way to later
        fits' bounds)."""
        bounds.CACHE.release(self.name)
        client: Any = getattr(get_scheduler(), "__self__", None)
        if is_client(client) and client.status == "running":
            try:
                client.run(_release_worker_bounds, self.name, wait=False, on_error="ignore")
            except Exception as exc:  # clean-up only: never in place of the fit's outcome
                warnings.warn(
                    f"could not drop this fit's k-means bounds on the workers ({exc!r}); "
                    "they give way to later fits' bounds",
                    RuntimeWarning,
                    stacklevel=2,
                )


def _worth_keeping(old: F64, new: F64) -> bool:
    """:func:`dkm.kernels.bounds.worth_keeping` on one BLAS thread. Its (512, k)
    product of centres would otherwise wake BLAS's thread pool here, between passes, and
    OpenBLAS's threads spin-wait for more work into the next pass, taking a core from its
    tasks."""
    with one_blas_thread():
        return bounds.worth_keeping(old, new)


async def _release_worker_bounds(fit: str) -> None:
    """On a worker's event loop (a coroutine: ``client.run`` need not wait for it)."""
    bounds.CACHE.release(fit)
