"""scikit-learn estimators over the engine: ``KMeans`` and ``GaussianMixture``.

Both accept NumPy arrays and Dask arrays. NumPy input is wrapped in a Dask array
(row chunks, the current scheduler: threads by default, a ``distributed.Client`` if
one is active) and per-point results come back as NumPy; for Dask input per-point
results (``labels_``, ``predict``, ``predict_proba``, …) are lazy Dask arrays with the
input's row chunks.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import dask
import dask.array as da
import numpy as np
from numpy.typing import NDArray
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    DensityMixin,
    TransformerMixin,
    clone,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from dkm import covariance
from dkm._typing import (
    KMEANS_FIT_INIT,
    PARALLEL_INIT,
    Assignment,
    CovarianceType,
    OnDegenerate,
    parse_assignment,
    parse_kmeans_algorithm,
    parse_kmeans_init,
    parse_mixture_init,
    parse_nan_policy,
    parse_on_degenerate,
    parse_schedule,
)
from dkm.engine import (
    ChunkedData,
    EMOptions,
    EMResult,
    IterationInfo,
    PassOptions,
    ResumeState,
    apply_in_memory,
    fit_em_many,
    gaussian_from_partition_many,
    init_centres,
    lazy_distances,
    lazy_labels,
    lazy_proba,
    lazy_score_samples,
    one_blas_thread,
    sample_points,
    stats_pass_many,
    summarize,
)
from dkm.engine.schedule import Schedule, auto_trials, run_sampled, sample_data
from dkm.errors import InvalidDataError
from dkm.kernels import expectation as K
from dkm.kernels.params import MixtureParams
from dkm.kmeans_parallel import kmeans_parallel
from dkm.stats import DataSummary

F64 = NDArray[np.float64]
#: Rows per chunk target for NumPy input: bounded bytes, enough chunks for every core.
_CHUNK_BYTES = 32 * 2**20
_MIN_CHUNK_ROWS = 4096


def _auto_chunk_rows(n: int, d: int, itemsize: int) -> int:
    by_bytes = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // max(1, d * itemsize))
    by_cores = max(_MIN_CHUNK_ROWS, math.ceil(n / (os.cpu_count() or 1)))
    return max(1, min(by_bytes, by_cores, n))


def _weights_array(sample_weight: Any, n: int) -> F64:
    """Sample weights as a float64 (n,) array; their values are checked in the data pass."""
    if isinstance(sample_weight, numbers.Real) and not isinstance(sample_weight, bool):
        return np.full(n, float(sample_weight))
    try:
        w = np.asarray(sample_weight, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidDataError("sample_weight must be numbers, one per sample") from None
    if w.shape != (n,):
        raise InvalidDataError(f"sample_weight.shape == {w.shape}, expected ({n},)")
    return w


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, minimum: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not float(value) >= minimum
    ):
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    return float(value)


def _check_resume(
    resume: ResumeState | None, n_init: int, k: int, d: int, covariance_type: str
) -> None:
    if resume is None:
        return
    if n_init != 1:
        raise ValueError("resuming an interrupted run needs n_init=1 (restarts are not resumable)")
    p = resume.params
    if p.means.shape != (k, d) or p.covariance_type != covariance_type:
        raise ValueError(
            f"the run to resume has {p.means.shape[0]} components, {p.means.shape[1]} "
            f"features and {p.covariance_type} covariances; this fit has {k}, {d} and "
            f"{covariance_type}"
        )


@dataclass(frozen=True, eq=False)
class Mixture:
    """A fitted model as the kernels use it; both estimators keep theirs in ``mixture_``.

    ``params`` are float64 and in the data's coordinates; ``origin`` is the point the
    kernels centre the data on (the fitted data's mean), for accuracy. ``assignment``:
    "hard" or "soft". ``kmeans``: a :class:`KMeans` model, whose objective is the inertia
    (lower is better); else a mixture's, the mean log-likelihood (higher is better).
    """

    params: MixtureParams
    origin: F64
    assignment: Assignment
    kmeans: bool

    @property
    def covariance_type(self) -> CovarianceType:
        return self.params.covariance_type

    @property
    def n_components(self) -> int:
        return self.params.n_components

    @property
    def n_features(self) -> int:
        return self.params.n_features

    @property
    def objective_name(self) -> str:
        return "inertia" if self.kmeans else "mean log-likelihood"

    def centred(self) -> MixtureParams:
        """The parameters relative to ``origin``, as the passes over the data take them."""
        return self.params.translated(-self.origin)


_Est = TypeVar("_Est", bound="_DaskMixtureBase")


def _model_centres(model: Any) -> F64:
    """The centres of a fitted dkm model (k-means centres or mixture means)."""
    check_is_fitted(model)
    centres = model.cluster_centers_ if isinstance(model, KMeans) else model.means_
    return np.asarray(centres, np.float64)


def _warm_params(
    model: GaussianMixture, k: int, d: int, origin: F64
) -> tuple[MixtureParams, F64 | None]:
    """A fitted mixture's parameters as the start of a new fit (warm start)."""
    check_is_fitted(model)
    p = model.mixture_.params
    if p.means.shape != (k, d):
        raise InvalidDataError(
            f"init_params: the model has {p.n_components} components and {p.n_features} "
            f"features; expected {k} and {d}"
        )
    return p.translated(-origin), np.asarray(model.covariances_, np.float64)


class _DaskMixtureBase(BaseEstimator):
    """Input handling shared by the estimators: NumPy or Dask in, ChunkedData out."""

    chunk_size: int | str
    split_every: int
    init_sample_size: int | None
    schedule: str
    sample_trials: int | str
    random_state: Any
    verbose: int
    callback: Callable[[IterationInfo], None] | None
    nan_policy: str
    #: The fitted arrays derived from ``mixture_`` (what :func:`dkm.save_model` stores).
    fitted_arrays: ClassVar[tuple[str, ...]]
    mixture_: Mixture
    n_iter_: int
    converged_: bool
    history_: list[IterationInfo]

    @classmethod
    def from_model(
        cls: type[_Est],
        model: MixtureParams,
        origin: F64,
        *,
        params: dict[str, Any] | None = None,
        objective: float,
        n_iter: int = 0,
        converged: bool = False,
        history: Sequence[IterationInfo] = (),
        objectives: list[float] | None = None,
        covariances: F64 | None = None,
        dtype: Any = np.float64,
        feature_names_in: Sequence[str] | None = None,
        n_dropped: int | None = None,
    ) -> _Est:
        """A fitted estimator of the parameters ``model`` (float64, data coordinates,
        centred on ``origin`` in the passes), as if a fit had ended there.

        ``params``: hyper-parameters (the constructor's); ``objective``: the fit's
        ``objective_``; ``objectives``: a mixture's ``lower_bounds_`` (default: the
        history's objectives); ``covariances``: a mixture's covariances as estimated
        (default: from the precisions); ``dtype``: of the fitted arrays; ``n_dropped``:
        ``n_dropped_``, the rows left out for NaN/inf (unset by default: not known).
        """
        est = cls(**(params or {}))
        est.n_features_in_ = model.n_features
        if feature_names_in is not None:
            est.feature_names_in_ = np.asarray(feature_names_in, dtype=object)
        if n_dropped is not None:
            est.n_dropped_ = n_dropped
        est._set_mixture(
            est._mixture(model, origin),
            dtype=dtype,
            covariances=covariances,
            objective=objective,
            n_iter=n_iter,
            converged=converged,
            history=list(history),
            objectives=objectives,
        )
        return est

    def _mixture(self, model: MixtureParams, origin: F64) -> Mixture:
        """``model`` as this estimator's ``mixture_`` (its assignment and kind)."""
        raise NotImplementedError

    def _set_mixture(
        self,
        mixture: Mixture,
        *,
        dtype: Any,
        covariances: F64 | None,
        objective: float,
        n_iter: int,
        converged: bool,
        history: list[IterationInfo],
        objectives: list[float] | None,
    ) -> None:
        """Every fitted attribute that follows from the model: the one place they are set."""
        raise NotImplementedError

    def _set_common(
        self, mixture: Mixture, n_iter: int, converged: bool, history: list[IterationInfo]
    ) -> None:
        self.mixture_ = mixture
        self.n_iter_ = n_iter
        self.converged_ = converged
        self.history_ = history

    def _as_data(
        self, X: Any, sample_weight: Any, *, reset: bool, min_samples: int = 1
    ) -> tuple[ChunkedData, NDArray[Any] | None]:
        """Validate X (and weights); returns the chunked data and, for NumPy, the array."""
        if isinstance(X, da.Array):
            if X.ndim != 2:
                raise InvalidDataError(
                    f"Expected 2D array, got {X.ndim}D array instead: reshape your data."
                )
            if X.dtype.kind not in "fiub":
                raise InvalidDataError(
                    f"Dask array of dtype {X.dtype} is not supported (real numbers)"
                )
            self._check_n_features_dask(X, reset=reset)
            if X.shape[0] < min_samples:
                raise InvalidDataError(
                    f"Found array with {X.shape[0]} sample(s) while a minimum of "
                    f"{min_samples} is required."
                )
            w = None
            if sample_weight is not None:
                w = (
                    sample_weight
                    if isinstance(sample_weight, da.Array)
                    else da.from_array(np.asarray(sample_weight, np.float64), chunks=-1)
                )
            return ChunkedData.from_dask(X, w, self._nan_policy()), None
        # Non-finite values are left to the first pass over the data, which names how
        # many rows hold them and the first one (scikit-learn's check names neither).
        Xn = validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            ensure_min_samples=min_samples,
            ensure_all_finite=False,
        )
        rows = (
            _auto_chunk_rows(Xn.shape[0], Xn.shape[1], Xn.dtype.itemsize)
            if self.chunk_size == "auto"
            else _check_int("chunk_size", self.chunk_size, 1)
        )
        Xd = da.from_array(Xn, chunks=(rows, -1), name=False)  # no hashing of the whole array
        wd = None
        if sample_weight is not None:
            wd = da.from_array(_weights_array(sample_weight, Xn.shape[0]), chunks=(Xd.chunks[0],))
        return ChunkedData.from_dask(Xd, wd, self._nan_policy()), Xn

    def _nan_policy(self) -> str:
        return parse_nan_policy(self.nan_policy)

    def _check_n_features_dask(self, X: da.Array, *, reset: bool) -> None:
        if reset:
            self.n_features_in_ = int(X.shape[1])
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif X.shape[1] != self.n_features_in_:
            raise InvalidDataError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    def _summarize(
        self,
        data: ChunkedData,
        n_clusters: int,
        rng: np.random.RandomState,
        name: str,
        schedule: Schedule | None = None,
    ) -> DataSummary:
        """The data summary's pass; with a sampled ``schedule``, it draws the
        schedule's sample too."""
        n = int(data.X.shape[0])
        size = self.init_sample_size
        if size is None:
            size = max(10_000, 100 * n_clusters)
        size = _check_int("init_sample_size", size, n_clusters)
        seed = (
            int(self.random_state)
            if isinstance(self.random_state, numbers.Integral)
            else int(rng.randint(np.iinfo(np.int32).max))
        )
        summary = summarize(
            data,
            sample_size=min(size, n),
            seed=seed,
            split_every=self._split_every(),
            rows_rate=0.0 if schedule is None else schedule.rate,
        )
        if summary.n_positive < n_clusters:
            raise InvalidDataError(
                f"n_samples={summary.n_positive} should be >= {name}={n_clusters} "
                "(counting only points with positive sample_weight)."
            )
        return summary

    def _schedule(self, data: ChunkedData, k: int, resume: ResumeState | None) -> Schedule | None:
        """The sampled schedule of this fit, or None (``schedule="full"``, ``"auto"`` on
        data too small for it, or a resumed fit: it resumes the full data's iterations)."""
        schedule = parse_schedule(self.schedule)
        if resume is not None:
            return None
        return Schedule.plan(schedule, int(data.X.shape[0]), k, data.n_features)

    def _trials(
        self,
        schedule: Schedule | None,
        summary: DataSummary,
        k: int,
        runs: int,
        drawn: bool,
        cheap: bool,
    ) -> int:
        """Initialisations tried on the first sample per run: ``sample_trials``, whose
        ``"auto"`` is :func:`~dkm.engine.schedule.auto_trials` (as many as cost about
        one pass for all ``runs`` together) when the init is ``cheap`` (made from
        samples, not from passes over all the data), else 1. Always 1 without a sampled
        ``schedule``, or when the init is not ``drawn`` at random (given centres, a warm
        start)."""
        value = self.sample_trials
        if isinstance(value, str) and value == "auto":
            if schedule is None or not (drawn and cheap):
                return 1
            n, rows = int(summary.count), summary.sample.capacity
            return auto_trials(schedule, n, k, rows, runs)
        trials = _check_int("sample_trials", value, 1)
        return trials if schedule is not None and drawn else 1

    def _fit_em(
        self,
        data: ChunkedData,
        summary: DataSummary,
        schedule: Schedule | None,
        starts: list[MixtureParams],
        options: EMOptions,
        *,
        tol_abs: float | None = None,
        covariances: list[F64 | None] | None = None,
        resume: ResumeState | None = None,
        trials: int = 1,
    ) -> list[EMResult]:
        """EM from each of ``starts`` on all of ``data``; with a sampled ``schedule``,
        after the iterations on the summary's samples, whose history comes first (with
        ``trials`` > 1, ``starts`` are groups of that many, and the best of each group
        on the first sample is the run that goes on)."""
        callback = self._callback()
        sample = None if schedule is None else summary.rows_sample
        sampled = None
        if schedule is not None and sample is not None:
            sampled = run_sampled(
                schedule,
                sample,
                data.origin,
                starts,
                options,
                total_weight=summary.weight,
                nan_policy=data.nan_policy,
                tol_abs=tol_abs,
                init_covariances=covariances,
                callback=callback,
                trials=trials,
            )
            starts, covariances = sampled.params, sampled.covariances
        results = fit_em_many(
            data,
            starts,
            options,
            tol_abs=tol_abs,
            init_covariances=covariances,
            callback=callback,
            resume=resume,
        )
        if sampled is not None:
            for result, history in zip(results, sampled.histories, strict=True):
                result.history[:0] = history
        return results

    def _candidate(self, n_candidates: int, **params: Any) -> Any:
        """The estimator one candidate of a shared fit is stored in: ``self`` when it
        is the only one, else a clone with ``params`` and the fitted feature count."""
        if n_candidates == 1:
            return self
        est = clone(self).set_params(**params)
        est.n_features_in_ = self.n_features_in_
        return est

    def _split_every(self) -> int:
        return _check_int("split_every", self.split_every, 2)

    def _callback(self) -> Callable[[IterationInfo], None] | None:
        user, verbose = self.callback, self.verbose
        if not verbose:
            return user

        def report(info: IterationInfo) -> None:
            print(
                f"Iteration {info.iteration}: objective {info.objective:.6g}, "
                f"change {info.change:.3g}, {info.seconds:.3f}s"
            )
            if user is not None:
                user(info)

        return report

    def _per_point(self, X: Any, fn: Any, lazy: Any, model_dtype: str | None = None) -> Any:
        """Run a per-row kernel on NumPy (eagerly) or Dask (lazily) input.

        ``model_dtype``: an attribute of the fitted model; the result is cast to the
        common float type of X and that attribute (the kernel computes in float64), as
        scikit-learn's results are.
        """
        check_is_fitted(self)
        params, origin = self.mixture_.params, self.mixture_.origin
        if isinstance(X, da.Array):
            data, _ = self._as_data(X, None, reset=False)
            out, x_dtype = lazy(data.with_origin(origin), params), data.X.dtype
        else:
            # NaN/inf rows are the kernel's to find: it names them, and labels them under "drop"
            Xn = validate_data(
                self, X, reset=False, dtype=[np.float64, np.float32], ensure_all_finite=False
            )
            out = apply_in_memory(fn, Xn, params, origin, self._nan_policy())
            x_dtype = Xn.dtype
        if model_dtype is not None:
            out = out.astype(np.result_type(x_dtype, getattr(self, model_dtype)), copy=False)
        return out


class KMeans(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, _DaskMixtureBase):
    """k-means (Lloyd) over Dask arrays: the identity-covariance, hard-assignment mixture.

    Parameters follow :class:`sklearn.cluster.KMeans`; with the same data and initial
    centres, centres, labels, inertia and iteration count agree with scikit-learn's
    ``algorithm="lloyd"``.

    Parameters
    ----------
    n_clusters : int, default 8.
    init : {"k-means++", "k-means||", "random"}, callable, array (n_clusters, n_features),
        or a fitted dkm model (warm start from its centres or means).
        "k-means||" is k-means‖ (Bahmani et al., 2012) over the whole data:
        ``init_rounds`` sampling passes of ``oversampling_factor · k`` expected
        candidates each, one pass to weight them, reduced to k on the client.
        k-means++ and random run on a uniform (weight-proportional) sample of at most
        ``init_sample_size`` points; on data no larger than that they are exactly
        scikit-learn's. A callable gets ``(sample, n_clusters, random_state)``.
    n_init : "auto" or int. "auto" is 1 for k-means++ or an array, 10 for random.
    max_iter : int, default 300.
    tol : float, default 1e-4, relative to the mean per-feature variance of the data.
    verbose : int.
    random_state : int, RandomState or None.
    chunk_size : "auto" or int, rows per chunk when X is a NumPy array.
    split_every : int, fan-in of the client's merge of a pass's task results.
    init_sample_size : int or None (max(10 000, 100 · n_clusters)).
    schedule : {"auto", "sampled", "full"}, default "auto". "sampled" runs the first
        iterations on growing samples of the data (drawn in the first pass, the same
        rows for the same ``random_state`` whatever the chunking) and then iterates on
        all of it from there, with ``max_iter`` and ``tol`` as without the schedule:
        the result is a fixed point of the full data, reached in fewer full passes
        (:mod:`dkm.engine.schedule`). "full" iterates on all the data from the start,
        as scikit-learn does (and gives its results from the same start). "auto" is
        "sampled" when the data has at least 8 times the largest sample's rows
        (``min(4096 · n_clusters, 64 MB of float64 rows)``), else "full". The sample's
        iterations are in ``history_`` (``IterationInfo.sample`` set), not in
        ``n_iter_``.
    sample_trials : "auto" or int. When the schedule samples, each of the ``n_init``
        runs draws this many initialisations, iterates each on the first sample, and
        goes on from the best (lowest inertia on that sample); the others cost no pass
        over the data. "auto", for "k-means++" and "random": as many as cost about one
        pass over the data for all the runs together, at most 16 a run (k-means++ on
        ``init_sample_size`` rows and about 20 iterations on the first sample each); 1
        for "k-means||" (it reads all the data). Given centres and warm starts are
        tried once. Without sampling it has no effect.
    callback : called with an :class:`~dkm.engine.IterationInfo` after every iteration
        (iteration, objective, change, seconds, params): progress, metrics, checkpoints.
    nan_policy : "raise" (default): NaN or infinity in X is an error naming the first
        row; "drop": such rows are left out of the fit (counted in ``n_dropped_``) and
        labelled -1 (NaN for probabilities, densities and distances). ``predict``,
        ``transform``, ``predict_proba`` and ``score_samples`` follow it too: under
        "raise" they raise :class:`~dkm.NonFiniteInputError` naming the row and its
        chunk (for Dask input when the result is computed).
    oversampling_factor : float, default 2.0, k-means‖ candidates per round / k.
    init_rounds : int, default 5, k-means‖ sampling rounds (passes over the data).
    algorithm : {"auto", "lloyd", "hamerly"}, default "auto". "lloyd" searches every row
        in every pass; "hamerly" keeps Hamerly's bounds between passes once the centres
        settle, and searches only the rows they leave unsettled; "auto" is "hamerly"
        (it was "lloyd" for rows of more than 64 features until they paid there). The
        results are the same, bit for bit (see :class:`dkm.engine.FitBounds`).

    Attributes
    ----------
    cluster_centers_ : (n_clusters, n_features), in X's float dtype.
    labels_ : (n_samples,) NumPy array, or a lazy Dask array for Dask input.
    inertia_ : float, ``Σ w ‖x − μ_label‖²`` under the final centres.
    n_iter_ : int, iterations on all the data.  converged_ : bool.
    history_ : list of IterationInfo, one per iteration of the best run (those on a
        sample first, with ``sample`` set).
    mixture_ : :class:`Mixture`, the model as the kernels use it; ``objective_`` is
        ``inertia_``. :meth:`from_model` builds a fitted estimator from one.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: Any = "k-means++",
        n_init: int | str = "auto",
        max_iter: int = 300,
        tol: float = 1e-4,
        verbose: int = 0,
        random_state: Any = None,
        chunk_size: int | str = "auto",
        split_every: int = 8,
        init_sample_size: int | None = None,
        callback: Callable[[IterationInfo], None] | None = None,
        nan_policy: str = "raise",
        oversampling_factor: float = 2.0,
        init_rounds: int = 5,
        algorithm: str = "auto",
        schedule: str = "auto",
        sample_trials: int | str = "auto",
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.verbose = verbose
        self.random_state = random_state
        self.chunk_size = chunk_size
        self.split_every = split_every
        self.init_sample_size = init_sample_size
        self.callback = callback
        self.nan_policy = nan_policy
        self.oversampling_factor = oversampling_factor
        self.init_rounds = init_rounds
        self.schedule = schedule
        self.sample_trials = sample_trials
        self.algorithm = algorithm

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _n_init(self) -> int:
        if self.n_init == "auto":
            return 1 if not isinstance(self.init, str) or self.init != "random" else 10
        n_init = _check_int("n_init", self.n_init, 1)
        if not isinstance(self.init, str) and not callable(self.init) and n_init != 1:
            warnings.warn(
                "Explicit initial center position passed: performing only one init in "
                f"{type(self).__name__} instead of n_init={n_init}.",
                RuntimeWarning,
                stacklevel=3,
            )
            return 1
        return n_init

    def _initial_centres(
        self, summary: DataSummary, data: ChunkedData, k: int, rng: np.random.RandomState
    ) -> F64:
        d = data.n_features
        if isinstance(self.init, str) and self.init == PARALLEL_INIT:
            return kmeans_parallel(
                data,
                k,
                rng,
                oversampling_factor=self.oversampling_factor,
                n_rounds=self.init_rounds,
                split_every=self._split_every(),
                summary=summary,
            )
        if isinstance(self.init, str):
            return init_centres(summary, data.origin, k, self.init, rng)
        if isinstance(self.init, _DaskMixtureBase):  # warm start from a fitted model
            centres = _model_centres(self.init)
        elif callable(self.init):
            points, _ = sample_points(summary, data.origin)
            centres = np.asarray(self.init(points + data.origin, k, rng), np.float64)
        else:
            centres = np.asarray(self.init, np.float64)
        if centres.shape != (k, d):
            raise ValueError(
                f"The shape of the initial centers {centres.shape} does not match the "
                f"number of clusters {k} and features {d}: expected ({k}, {d})."
            )
        if not np.all(np.isfinite(centres)):
            raise ValueError("init contains NaN or infinity")
        return centres - data.origin

    def fit(
        self,
        X: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        resume: ResumeState | None = None,
    ) -> KMeans:
        """Compute k-means clustering. ``sample_weight``: (n_samples,) non-negative.

        ``n_init`` restarts run together, sharing every pass over the data (each chunk
        is read once per iteration for all of them); the one with the lowest inertia
        wins. ``resume``: continue an interrupted run (a checkpoint) instead of
        initialising; the result is the model the uninterrupted run would have produced.
        """
        k = _check_int("n_clusters", self.n_clusters, 1)
        (fitted,) = self.fit_candidates(X, [k], sample_weight, resume=resume)
        return fitted

    def fit_candidates(
        self,
        X: Any,
        ks: list[int],
        sample_weight: Any = None,
        *,
        resume: ResumeState | None = None,
    ) -> list[KMeans]:
        """Fit one model per number of clusters in ``ks``, all restarts of all sharing passes.

        Returns ``self`` fitted for ``ks[0]`` when there is one candidate, else fitted
        clones of ``self`` (``n_clusters`` set), in the order of ``ks``
        (:func:`dkm.selection.sweep` scores them).
        """
        max_iter = _check_int("max_iter", self.max_iter, 1)
        tol = _check_float("tol", self.tol, 0.0)
        n_init = self._n_init()
        if isinstance(self.init, str):
            parse_kmeans_init(self.init)
        data, Xn = self._as_data(X, sample_weight, reset=True)
        rng = check_random_state(self.random_state)
        schedule = self._schedule(data, max(ks), resume)
        summary = self._summarize(data, max(ks), rng, "n_clusters", schedule)
        data = data.with_origin(summary.mean)
        tol_abs = float(np.mean(summary.variance)) * tol
        options = EMOptions(
            "identity",
            "hard",
            tol=tol,
            max_iter=max_iter,
            split_every=self._split_every(),
            algorithm=parse_kmeans_algorithm(self.algorithm),
        )
        _check_resume(resume, n_init * len(ks), ks[0], data.n_features, "identity")
        drawn = isinstance(self.init, str) or callable(self.init)
        cheap = isinstance(self.init, str) and self.init != PARALLEL_INIT
        trials = self._trials(schedule, summary, max(ks), n_init * len(ks), drawn, cheap)
        # initial centres drawn in the order separate fits would draw them (each run's
        # trials in turn)
        inits = (
            [
                self._initial_centres(summary, data, k, rng)
                for k in ks
                for _ in range(n_init * trials)
            ]
            if resume is None
            else [resume.params_for(data.origin).means]
        )
        results = self._fit_em(
            data,
            summary,
            schedule,
            [MixtureParams.identity(c) for c in inits],
            options,
            tol_abs=tol_abs,
            resume=resume,
            trials=trials,
        )
        fitted = []
        for i, k in enumerate(ks):
            runs = results[i * n_init : (i + 1) * n_init]
            best = min(runs, key=lambda r: r.objective)  # the first of equals, as before
            # the final pass's counts: a centre nearest to no point is a duplicate
            distinct = k if best.final is None else int(np.count_nonzero(best.final.nk > 0))
            if distinct < k:
                warnings.warn(
                    f"Number of distinct clusters ({distinct}) found smaller than "
                    f"n_clusters ({k}). Possibly due to duplicate points in X.",
                    ConvergenceWarning,
                    stacklevel=3,
                )
            est = self._candidate(len(ks), n_clusters=k)
            est._adopt(best, data, Xn, summary)
            fitted.append(est)
        return fitted

    fitted_arrays = ("cluster_centers_",)

    def _adopt(
        self, best: EMResult, data: ChunkedData, Xn: NDArray[Any] | None, summary: DataSummary
    ) -> None:
        self._set_mixture(
            self._mixture(best.params, data.origin),
            dtype=data.X.dtype,
            covariances=None,
            objective=best.objective,
            n_iter=best.n_iter,
            converged=best.converged,
            history=best.history,
            objectives=None,
        )
        self._final = best.final
        self.n_dropped_ = summary.n_nonfinite
        self.labels_: Any = (
            lazy_labels(data, best.params)
            if Xn is None
            else apply_in_memory(K.predict_labels, Xn, best.params, data.origin, data.nan_policy)
        )

    def _mixture(self, model: MixtureParams, origin: F64) -> Mixture:
        return Mixture(model, origin, "hard", kmeans=True)

    def _set_mixture(
        self,
        mixture: Mixture,
        *,
        dtype: Any,
        covariances: F64 | None,
        objective: float,
        n_iter: int,
        converged: bool,
        history: list[IterationInfo],
        objectives: list[float] | None,
    ) -> None:
        self._set_common(mixture, n_iter, converged, history)
        self.cluster_centers_ = mixture.params.means.astype(dtype)
        self.inertia_ = float(objective)

    @property
    def objective_(self) -> float:
        """The fit's objective, ``inertia_`` (``mixture_.objective_name`` names it)."""
        return self.inertia_

    def _log_likelihood(self) -> tuple[float, float]:
        """(log-likelihood, total weight) of the fitted data under the equal-variance
        spherical mixture that k-means fits with hard assignments.

        The classification likelihood ``Σ_j n_j log(n_j/n) − (n d/2)(log(2π σ²) + 1)``
        with the maximum-likelihood variance ``σ² = inertia / (n d)``, from the final
        pass's counts and inertia (no further pass over the data).
        """
        check_is_fitted(self)
        final = self._final
        assert final is not None
        n, d = final.n, self.cluster_centers_.shape[1]
        nk = final.nk[final.nk > 0]
        variance = max(final.objective / (n * d), np.finfo(np.float64).tiny)
        ll = float(np.sum(nk * np.log(nk / n))) - n * d / 2 * (math.log(2 * math.pi * variance) + 1)
        return ll, n

    def _n_parameters(self) -> int:
        """Centres, mixing weights and the one shared variance."""
        k, d = self.cluster_centers_.shape
        return k * d + (k - 1) + 1

    def bic(self, X: Any = None) -> float:
        """BIC of the fitted equal-variance spherical model on the data it was fitted on.

        Lower is better. ``X`` is accepted for symmetry with :class:`GaussianMixture` but
        the criterion comes from the fit's own final statistics (it must be the fitted
        data).
        """
        ll, n = self._log_likelihood()
        return -2 * ll + self._n_parameters() * math.log(n)

    def aic(self, X: Any = None) -> float:
        """AIC of the fitted equal-variance spherical model (see :meth:`bic`)."""
        ll, _ = self._log_likelihood()
        return -2 * ll + 2 * self._n_parameters()

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
        return self.fit(X, sample_weight=sample_weight).labels_

    def predict(self, X: Any) -> Any:
        """Index of the closest centre per row; -1 for a NaN/inf row (nan_policy="drop")."""
        return self._per_point(X, K.predict_labels, lazy_labels)

    def transform(self, X: Any) -> Any:
        """Euclidean distances to every centre; (n_samples, n_clusters).

        A NaN/inf row gets a row of NaN (nan_policy="drop").
        """
        return self._per_point(X, K.distances, lazy_distances)

    def fit_transform(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Opposite of the inertia of X under the fitted centres (of its kept rows, with
        nan_policy='drop'; with 'raise' a NaN/inf row is an error naming it)."""
        check_is_fitted(self)
        if isinstance(X, da.Array):
            labels = self.predict(X)  # -1 for a dropped row
            kept = labels >= 0
            centres = da.from_array(self.mixture_.params.means)[da.maximum(labels, 0)]
            dist = da.where(kept, ((X.astype(np.float64) - centres) ** 2).sum(axis=1), 0.0)
            w = 1.0 if sample_weight is None else sample_weight
            return -float((dist * w).sum().compute())
        Xn = validate_data(
            self, X, reset=False, dtype=[np.float64, np.float32], ensure_all_finite=False
        )
        sw = None if sample_weight is None else _check_sample_weight(sample_weight, Xn)
        if not np.isfinite(Xn).all():
            kept = np.asarray(self.predict(Xn)) >= 0  # under "raise" this names the row
            Xn, sw = Xn[kept], None if sw is None else sw[kept]
        Xc = Xn.astype(np.float64) - self.mixture_.origin
        return -K.inertia(Xc, self.mixture_.centred(), sw)

    @property
    def _n_features_out(self) -> int:
        return int(self.cluster_centers_.shape[0])


class GaussianMixture(DensityMixin, _DaskMixtureBase):
    """Gaussian mixture fitted by EM over Dask arrays.

    Parameters follow :class:`sklearn.mixture.GaussianMixture`; with the same data and
    initial parameters the fitted weights, means, covariances and ``score`` agree with
    scikit-learn's for every covariance type. Beyond scikit-learn:

    covariance_type : also ``"identity"``, unit covariances and equal fixed weights
        (soft k-means with ``assignment="soft"``).
    assignment : ``"soft"`` (EM, default) or ``"hard"`` (classification EM: each point
        wholly to its most likely component).
    on_degenerate : what to do with a component that collapses (no points, or a
        covariance that is not positive definite): ``"error"`` (default) raises
        :class:`~dkm.DegenerateComponentError` naming it; ``"reseed"`` moves it to the
        point the model explains worst; ``"drop"`` removes it (fewer components).
        Either of the last two emits a :class:`DegenerateComponentWarning`.
    init_params : "kmeans" (default), "k-means++", "k-means||" (k-means‖ over the whole
        data, see :class:`KMeans`), "random" or "random_from_data":
        centres by that method, then components from the nearest-centre partition; or a
        fitted dkm model: warm start from its parameters (a mixture of the same
        covariance type) or from its centres (anything else).
    sample_weight : accepted by ``fit``.
    chunk_size, split_every, init_sample_size, callback, nan_policy, schedule : as for
        :class:`KMeans` (the sample's iterations are EM's; with "sampled", the
        ``init_params`` k-means and partition run on the first sample).
    sample_trials : "auto" or int, as for :class:`KMeans`: when the schedule samples,
        each run tries this many initialisations by ``init_params`` (all made on the
        first sample), iterates EM on the first sample from each, and goes on from the
        highest lower bound there. "auto": as for :class:`KMeans`; with ``means_init`` or
        a warm start, 1.

    Attributes
    ----------
    weights_ (k,), means_ (k, d), covariances_, precisions_, precisions_cholesky_
    (shapes by covariance type as in scikit-learn, in X's float dtype), converged_, n_iter_,
    lower_bound_ (mean log-likelihood at the last iteration), lower_bounds_,
    history_, mixture_ (:class:`Mixture`, as for :class:`KMeans`; ``objective_`` is
    ``lower_bound_``).
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        verbose: int = 0,
        assignment: str = "soft",
        on_degenerate: str = "error",
        chunk_size: int | str = "auto",
        split_every: int = 8,
        init_sample_size: int | None = None,
        callback: Callable[[IterationInfo], None] | None = None,
        nan_policy: str = "raise",
        schedule: str = "auto",
        sample_trials: int | str = "auto",
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.verbose = verbose
        self.assignment = assignment
        self.on_degenerate = on_degenerate
        self.chunk_size = chunk_size
        self.split_every = split_every
        self.init_sample_size = init_sample_size
        self.callback = callback
        self.nan_policy = nan_policy
        self.schedule = schedule
        self.sample_trials = sample_trials

    # ----------------------------------------------------------------- init

    def _check_inits(self, k: int, d: int) -> tuple[F64 | None, F64 | None, F64 | None]:
        ct = self.covariance_type
        kind = covariance.of(ct)
        weights = means = precisions = None
        if self.weights_init is not None:
            if kind.unit:
                raise ValueError("weights_init: identity mixtures have equal, fixed weights")
            weights = np.asarray(self.weights_init, np.float64)
            if weights.shape != (k,):
                raise ValueError(f"weights_init should have shape ({k},), got {weights.shape}")
            if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
                raise ValueError("weights_init must be non-negative and sum to 1")
        if self.means_init is not None:
            means = np.asarray(self.means_init, np.float64)
            if means.shape != (k, d):
                raise ValueError(f"means_init should have shape ({k}, {d}), got {means.shape}")
        if self.precisions_init is not None:
            if kind.unit:
                raise ValueError("precisions_init: identity mixtures have unit covariances")
            precisions = np.asarray(self.precisions_init, np.float64)
            expected = kind.precision_shape(k, d)
            if precisions.shape != expected:
                raise ValueError(
                    f"precisions_init should have shape {expected} for covariance_type "
                    f"{ct!r}, got {precisions.shape}"
                )
        return weights, means, precisions

    def _initial_params_many(
        self,
        data: ChunkedData,
        summary: DataSummary,
        rng: np.random.RandomState,
        ks: list[int],
        n_init: int,
    ) -> list[tuple[MixtureParams, F64 | None]]:
        """Initial parameters for ``n_init`` runs of each number of components in ``ks``.

        Random draws happen in the order separate fits would make them, so each run
        starts where a fit of that run alone would. The k-means runs of
        ``init_params="kmeans"`` and the partitions that turn centres into mixtures share
        their passes over the data across all runs.
        """
        d, ct = data.n_features, self._ct
        kind = covariance.of(ct)
        checked = {k: self._check_inits(k, d) for k in ks}
        method = self.init_params

        def all_given(k: int) -> bool:
            weights, means, precisions = checked[k]
            return means is not None and (
                kind.unit or (weights is not None and precisions is not None)
            )

        if (
            isinstance(method, GaussianMixture)
            and method.covariance_type == ct
            and not any(all_given(k) for k in ks)
        ):
            return [_warm_params(method, k, d, data.origin) for k in ks for _ in range(n_init)]
        slots = [(k, i) for k in ks for i in range(n_init)]
        centres: list[F64 | None] = []
        for k, _ in slots:
            if all_given(k):
                centres.append(None)  # everything given: no init to compute
            elif isinstance(method, _DaskMixtureBase):  # a k-means model, or another type
                c = _model_centres(method)
                if c.shape != (k, d):
                    raise InvalidDataError(
                        f"init_params: the model has {c.shape[0]} components and "
                        f"{c.shape[1]} features; expected {k} and {d}"
                    )
                centres.append(c - data.origin)
            else:
                parse_mixture_init(method)
                if method == PARALLEL_INIT:
                    centres.append(
                        kmeans_parallel(
                            data, k, rng, split_every=self._split_every(), summary=summary
                        )
                    )
                    continue
                name = "random" if method in ("random", "random_from_data") else "k-means++"
                centres.append(init_centres(summary, data.origin, k, name, rng))
        if method == KMEANS_FIT_INIT:
            todo = [i for i, c in enumerate(centres) if c is not None]
            km = fit_em_many(
                data,
                [MixtureParams.identity(cast(F64, centres[i])) for i in todo],
                EMOptions("identity", "hard", max_iter=300, split_every=self._split_every()),
                tol_abs=float(np.mean(summary.variance)) * 1e-4,
            )
            for i, result in zip(todo, km, strict=True):
                centres[i] = result.params.means - data.origin
        partitioned: dict[int, tuple[MixtureParams, F64 | None]] = {}
        if not kind.unit:
            todo = [i for i, c in enumerate(centres) if c is not None]
            found = gaussian_from_partition_many(
                data,
                [cast(F64, centres[i]) for i in todo],
                ct,
                self.reg_covar,
                self._split_every(),
                self._policy,
            )
            partitioned = dict(zip(todo, found, strict=True))
        return [
            self._with_given(i, slots[i][0], centres[i], partitioned, checked, data.origin)
            for i in range(len(slots))
        ]

    def _with_given(
        self,
        slot: int,
        k: int,
        centres: F64 | None,
        partitioned: dict[int, tuple[MixtureParams, F64 | None]],
        checked: dict[int, tuple[F64 | None, F64 | None, F64 | None]],
        origin: F64,
    ) -> tuple[MixtureParams, F64 | None]:
        """One run's initial parameters: computed ones, overridden by any ``*_init`` given."""
        ct = self._ct
        kind = covariance.of(ct)
        weights, means, precisions = checked[k]
        cov: F64 | None = None
        if centres is None:
            assert means is not None
            params = MixtureParams.identity(means - origin)
        elif kind.unit:
            params = MixtureParams.identity(centres)
        else:
            params, cov = partitioned[slot]
        if kind.unit:
            if means is not None:
                params = MixtureParams.identity(means - origin)
            return params, np.ones(k)
        new_means = params.means if means is None else means - origin
        new_weights = params.weights if weights is None else weights
        prec_chol: F64 | None = params.precisions_cholesky
        if precisions is not None:
            prec_chol = kind.cholesky_of_precisions(precisions)
            cov = kind.covariances(prec_chol)
        assert prec_chol is not None
        return MixtureParams(ct, new_weights, new_means, prec_chol), cov

    # ----------------------------------------------------------------- fit

    def fit(
        self,
        X: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        resume: ResumeState | None = None,
    ) -> GaussianMixture:
        """Estimate the parameters with EM. ``sample_weight``: (n_samples,) non-negative.

        ``n_init`` restarts run together, sharing every pass over the data; the one
        with the highest lower bound wins. ``resume``: continue an interrupted run (a
        checkpoint) instead of initialising.
        """
        k = _check_int("n_components", self.n_components, 1)
        (fitted,) = self.fit_candidates(X, [k], sample_weight, resume=resume)
        return fitted

    def fit_candidates(
        self,
        X: Any,
        ks: list[int],
        sample_weight: Any = None,
        *,
        resume: ResumeState | None = None,
    ) -> list[GaussianMixture]:
        """Fit one mixture per number of components in ``ks``, all restarts sharing passes.

        Returns ``self`` fitted when there is one candidate, else fitted clones of
        ``self`` (``n_components`` set), in the order of ``ks``
        (:func:`dkm.selection.sweep` scores them).
        """
        covariance.of(self.covariance_type)
        parse_assignment(self.assignment)
        parse_on_degenerate(self.on_degenerate)
        max_iter = _check_int("max_iter", self.max_iter, 0)
        n_init = _check_int("n_init", self.n_init, 1)
        tol = _check_float("tol", self.tol, 0.0)
        reg_covar = _check_float("reg_covar", self.reg_covar, 0.0)
        data, _ = self._as_data(X, sample_weight, reset=True, min_samples=2)
        rng = check_random_state(self.random_state)
        schedule = self._schedule(data, max(ks), resume)
        summary = self._summarize(data, max(ks), rng, "n_components", schedule)
        data = data.with_origin(summary.mean)
        sample = None if schedule is None else summary.rows_sample
        options = EMOptions(
            self._ct,
            cast(Assignment, self.assignment),
            reg_covar,
            tol,
            max_iter,
            self._split_every(),
            self._policy,
        )
        _check_resume(resume, n_init * len(ks), ks[0], data.n_features, self._ct)
        drawn = isinstance(self.init_params, str) and self.means_init is None
        trials = self._trials(
            schedule if sample is not None else None,
            summary,
            max(ks),
            n_init * len(ks),
            drawn,
            drawn,
        )
        if resume is None and sample is not None:
            # the init's k-means and partition on the first sample, on this process
            first = sample.nested().first(schedule.sizes[0] if schedule else sample.size)
            with dask.config.set(scheduler="threads"), one_blas_thread():
                inits = self._initial_params_many(
                    sample_data(first, data.origin, data.nan_policy),
                    summary,
                    rng,
                    ks,
                    n_init * trials,
                )
        elif resume is None:
            inits = self._initial_params_many(data, summary, rng, ks, n_init)
        else:
            params = resume.params_for(data.origin)
            pc = params.precisions_cholesky
            cov = np.ones(ks[0]) if pc is None else covariance.of(self._ct).covariances(pc)
            inits = [(params, cov)]
        results = self._fit_em(
            data,
            summary,
            schedule,
            [p for p, _ in inits],
            options,
            covariances=[c for _, c in inits],
            resume=resume,
            trials=trials,
        )
        fitted = []
        for i, k in enumerate(ks):
            best: EMResult | None = None
            for result in results[i * n_init : (i + 1) * n_init]:
                if best is None or result.objective > best.objective or best.objective == -math.inf:
                    best = result
            assert best is not None
            if not best.converged and max_iter > 0:
                warnings.warn(
                    f"Best of {n_init} EM run(s) with {k} components did not converge in "
                    f"max_iter={max_iter} iterations. Try different init parameters, or "
                    "increase max_iter or tol, or check for degenerate data.",
                    ConvergenceWarning,
                    stacklevel=3,
                )
            est = self._candidate(len(ks), n_components=k)
            est._set_mixture(
                est._mixture(best.params, data.origin),
                dtype=data.X.dtype,
                covariances=best.covariances,
                objective=best.objective,
                n_iter=best.n_iter,
                converged=best.converged,
                history=best.history,
                objectives=None,
            )
            est.n_dropped_ = summary.n_nonfinite
            fitted.append(est)
        return fitted

    @property
    def _ct(self) -> CovarianceType:
        return cast(CovarianceType, self.covariance_type)

    @property
    def _policy(self) -> OnDegenerate:
        return cast(OnDegenerate, self.on_degenerate)

    fitted_arrays = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")

    def _mixture(self, model: MixtureParams, origin: F64) -> Mixture:
        return Mixture(model, origin, parse_assignment(self.assignment), kmeans=False)

    def _set_mixture(
        self,
        mixture: Mixture,
        *,
        dtype: Any,
        covariances: F64 | None,
        objective: float,
        n_iter: int,
        converged: bool,
        history: list[IterationInfo],
        objectives: list[float] | None,
    ) -> None:
        """The fitted arrays in X's float dtype (as scikit-learn's); the float64
        parameters stay in ``mixture_`` for the kernels."""
        p, kind = mixture.params, covariance.of(mixture.covariance_type)
        self._set_common(mixture, n_iter, converged, history)
        prec_chol = np.ones(p.n_components) if kind.unit else p.precisions_cholesky
        assert prec_chol is not None
        cov = covariances
        if cov is None:
            cov = kind.covariances(prec_chol)
        precisions = kind.precisions(prec_chol)
        self.weights_ = p.weights.astype(dtype, copy=False)
        self.means_ = p.means.astype(dtype, copy=False)
        self.precisions_cholesky_ = prec_chol.astype(dtype, copy=False)
        self.precisions_ = precisions.astype(dtype, copy=False)
        self.covariances_ = cov.astype(dtype, copy=False)
        self.lower_bound_ = float(objective)
        self.lower_bounds_ = (
            [info.objective for info in history if info.sample is None]
            if objectives is None
            else objectives
        )

    @property
    def objective_(self) -> float:
        """The fit's objective, ``lower_bound_`` (``mixture_.objective_name`` names it)."""
        return self.lower_bound_

    # ----------------------------------------------------------------- predict

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
        """Fit, then label X with the final parameters (equal to ``fit(X).predict(X)``)."""
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def predict(self, X: Any) -> Any:
        """Most likely component per row; -1 for a NaN/inf row (nan_policy="drop")."""
        return self._per_point(X, K.predict_labels, lazy_labels)

    def predict_proba(self, X: Any) -> Any:
        """Responsibilities; (n_samples, n_components), float32 for float32 X and model; a
        row of NaN for a NaN/inf row (nan_policy="drop")."""
        return self._per_point(X, K.predict_proba, lazy_proba, "means_")

    def score_samples(self, X: Any) -> Any:
        """Log-density of each row under the mixture; (n_samples,), float32 for float32 X
        and model; NaN for a NaN/inf row (nan_policy="drop")."""
        return self._per_point(X, K.score_samples, lazy_score_samples, "means_")

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood of X (of its kept rows, with nan_policy='drop')."""
        density = self._per_point(X, K.score_samples, lazy_score_samples)  # float64
        mean = da.nanmean if isinstance(density, da.Array) else np.nanmean
        if self._nan_policy() == "raise":
            mean = da.mean if isinstance(density, da.Array) else np.mean
        return float(np.asarray(mean(density)))

    def _n_parameters(self) -> int:
        k, d = len(self.weights_), self.means_.shape[1]
        return covariance.of(self.covariance_type).n_parameters(k, d)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion (lower is better)."""
        n = X.shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion (lower is better)."""
        return -2 * self.score(X) * X.shape[0] + 2 * self._n_parameters()

    def sample(self, n_samples: int = 1) -> tuple[F64, NDArray[np.int64]]:
        """Draw ``n_samples`` points and their component labels from the fitted mixture."""
        check_is_fitted(self)
        if (
            isinstance(n_samples, bool)
            or not isinstance(n_samples, numbers.Integral)
            or (n_samples < 1)
        ):
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples}. The sampling requires at "
                "least one sample."
            )
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_)
        kind = covariance.of(self.covariance_type)
        parts = [
            kind.draw(rng, mean, self.covariances_, j, int(count))
            for j, (mean, count) in enumerate(zip(self.means_, counts, strict=True))
        ]
        labels = np.concatenate([np.full(c, j, dtype=np.int64) for j, c in enumerate(counts)])
        return np.vstack(parts), labels


def log_likelihoods(
    models: Sequence[KMeans] | Sequence[GaussianMixture], X: Any, sample_weight: Any = None
) -> list[tuple[float, float]]:
    """(log-likelihood, total weight) of X under each of the models one ``fit_candidates``
    call fitted on X: for k-means, of its equal-variance spherical model, from the fit's
    own final statistics (see :meth:`KMeans.bic`); for mixtures, from one pass over X
    shared by all of them."""
    if not models:
        return []
    first = models[0]
    if isinstance(first, KMeans):
        return [cast(KMeans, m)._log_likelihood() for m in models]
    data, _ = first._as_data(X, sample_weight, reset=False)
    origin = first.mixture_.origin
    data = data.with_origin(origin)
    jobs = [
        (m.mixture_.params.translated(-origin), None, PassOptions("soft", "none")) for m in models
    ]
    totals = stats_pass_many(data, jobs, split_every=first._split_every())
    return [(float(t.objective), float(t.n)) for t in totals]
