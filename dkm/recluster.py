"""``dkm recluster``: yesterday's model is today's start; only a better one serves.

One run reads the registry's ``current`` model, fits on the new data starting from it
(or, with ``update``, merges the new data's sufficient statistics into the model's own,
decayed by a half-life, and takes one M-step), compares old and new (the drift report),
checks the promotion guards, and stores the result as a new version: promoted to
``current`` when the guards pass, kept as a candidate otherwise. With no ``current``
yet, the run is a first fit from the config's ``init`` and is promoted.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import dask
import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from dkm import covariance, io
from dkm._typing import OnDegenerate
from dkm._version import __version__
from dkm.cluster import cluster_memory, connect
from dkm.config import ConfigError, JobConfig, RegistryConfig
from dkm.engine import ChunkedData, IterationInfo, PassOptions, stats_pass_many, summarize
from dkm.estimators import GaussianMixture, KMeans, Mixture
from dkm.job import (
    OVERWRITE_HINT,
    announce,
    as_job,
    build_estimator,
    describe,
    model_metadata,
    open_data,
    output_writer,
    sample_rows,
    should_persist,
)
from dkm.kernels.mstep import gaussian_mstep, kmeans_centres
from dkm.kernels.params import MixtureParams
from dkm.models import load_model, save_model
from dkm.monitor import Progress
from dkm.registry import Registry
from dkm.stats import FarthestPoints, SuffStats, symmetric

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

F64 = NDArray[np.float64]
Model = KMeans | GaussianMixture

#: Exit code of ``dkm recluster`` when the guards refused the new model (kept as a
#: candidate version; ``current`` unchanged).
EXIT_REFUSED = 3


# --------------------------------------------------------------------------- statistics


def statistics_pass(
    data: ChunkedData, models: list[Mixture], *, n_farthest: int = 0, split_every: int = 8
) -> list[io.ModelStatistics]:
    """One E-step pass over ``data`` under each model (an estimator's ``mixture_``), all
    in one read of the data.

    Each model's statistics are taken around its own means, which become the
    statistics' ``shift`` (data coordinates); farthest points, if asked for, are
    returned in data coordinates too.
    """
    jobs = []
    origin = data.origin
    for model in models:
        centred = model.params.translated(-origin)
        moments = covariance.of(model.covariance_type).moments
        jobs.append((centred, centred.means, PassOptions(model.assignment, moments, n_farthest)))
    totals = stats_pass_many(data, jobs, split_every=split_every)
    out = []
    for (centred, _, _), stats in zip(jobs, totals, strict=True):
        far = stats.farthest
        if far is not None:
            stats = replace(stats, farthest=replace(far, points=far.points + origin))
        out.append(io.ModelStatistics(stats, centred.means + origin))
    return out


def recentred(ms: io.ModelStatistics, shift: F64) -> io.ModelStatistics:
    """The same statistics with moments taken around ``shift`` instead: with
    c = new shift − old shift, ``sx' = sx − nk c`` and the second moments by the moment
    shift of their type (:meth:`dkm.covariance.Covariance.around`, the E-step's)."""
    s = ms.stats
    shift = np.asarray(shift, np.float64)
    c = shift - ms.shift
    sx = s.sx - s.nk[:, None] * c
    sxx = s.sxx
    if sxx is not None:
        sxx = covariance.of_moments(s.moments).around(sxx, s.sx, s.nk, c)
    # the shift leaves full and tied moments a last bit from symmetric: made exact again
    return io.ModelStatistics(symmetric(replace(s, sx=sx, sxx=sxx)), shift.copy(), ms.updates)


def decayed(ms: io.ModelStatistics, factor: float) -> io.ModelStatistics:
    """Every weighted sum times ``factor`` (the row count ``count`` is kept)."""
    s = ms.stats
    return io.ModelStatistics(
        replace(
            s,
            nk=s.nk * factor,
            sx=s.sx * factor,
            sxx=None if s.sxx is None else s.sxx * factor,
            objective=s.objective * factor,
            n=s.n * factor,
        ),
        ms.shift,
        ms.updates,
    )


def decay_factor(half_life: float | None) -> float:
    """The weight old statistics keep per update: 2^(−1/half_life) (1 without decay)."""
    return 1.0 if half_life is None else float(0.5 ** (1.0 / half_life))


def merge_statistics(
    old: io.ModelStatistics, new: io.ModelStatistics, factor: float = 1.0
) -> io.ModelStatistics:
    """``factor`` × old + new, around ``new``'s shift; ``updates`` is old's plus one."""
    o = decayed(recentred(old, new.shift), factor).stats
    if (o.farthest is None) != (new.stats.farthest is None):
        far = new.stats.farthest
        assert far is not None  # only the new pass collects farthest points
        o = replace(o, farthest=FarthestPoints.empty(far.capacity, o.n_features))
    if o.moments != new.stats.moments or o.sx.shape != new.stats.sx.shape:
        raise ValueError(
            f"cannot merge the model's {o.moments} statistics of shape {o.sx.shape} with "
            f"{new.stats.moments} statistics of shape {new.stats.sx.shape}"
        )
    return io.ModelStatistics(o.merge(new.stats), new.shift, old.updates + 1)


def model_from_statistics(
    ms: io.ModelStatistics,
    old: Mixture,
    *,
    reg_covar: float,
    on_degenerate: OnDegenerate,
) -> tuple[MixtureParams, F64 | None]:
    """An M-step from total statistics: the parameters of a model like ``old`` (its
    kind, covariance type and assignment) and, for a mixture, its covariances."""
    s = ms.stats
    if old.kmeans:
        centres, _ = kmeans_centres(s, shift=ms.shift)
        return MixtureParams.identity(centres), None
    params, cov, _ = gaussian_mstep(s, ms.shift, old.covariance_type, reg_covar, on_degenerate)
    return params, cov


def objective_of(stats: SuffStats, kmeans: bool) -> float:
    """What ``dkm run`` reports: k-means inertia (Σ w d²), else the mean log-likelihood."""
    return float(stats.objective) if kmeans else float(stats.objective / stats.n)


def worsening(old: float, new: float, kmeans: bool) -> float:
    """How much worse ``new`` is than ``old``, as a fraction of ``|old|`` (negative: better)."""
    scale = max(abs(old), 1e-300)
    return (new - old) / scale if kmeans else (old - new) / scale


# --------------------------------------------------------------------------- drift


def _centres(model: Model) -> F64:
    return np.asarray(model.mixture_.params.means, np.float64)


def component_scales(model: Model, stats: SuffStats | None) -> F64:
    """Each component's standard deviation (root of the mean per-feature variance)."""
    mixture = model.mixture_
    k, d = mixture.n_components, mixture.n_features
    if not mixture.kmeans:  # identity mixtures: unit variance
        cov = cast(GaussianMixture, model).covariances_
        variances = covariance.of(mixture.covariance_type).variances(cov, k, d)
        return np.sqrt(np.maximum(variances, 0.0))
    if stats is None or stats.n <= 0:
        return np.ones(k)
    return np.full(k, np.sqrt(max(stats.objective, 0.0) / (stats.n * d)))


def drift_report(
    old: Model,
    new: Model,
    *,
    old_weights: F64,
    new_weights: F64,
    old_scales: F64,
    sample_old_labels: NDArray[Any],
    sample_new_labels: NDArray[Any],
    objective_old: float,
    objective_new: float,
    threshold: float,
) -> dict[str, Any]:
    """Old and new components matched one-to-one on centre distance (Hungarian), with
    each pair's centre shift and weight change, the label churn and the objectives."""
    mo, mn = _centres(old), _centres(new)
    cost = cdist(mo, mn)
    rows, cols = linear_sum_assignment(cost)
    mapping = np.full(len(mo), -1, np.int64)
    mapping[rows] = cols
    components = []
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        shift = float(cost[i, j])
        scale = float(old_scales[i]) if old_scales[i] > 0 else 1.0
        w_old, w_new = float(old_weights[i]), float(new_weights[j])
        components.append(
            {
                "old": i,
                "new": j,
                "centre_shift": shift,
                "centre_shift_sd": shift / scale,
                "weight_old": w_old,
                "weight_new": w_new,
                "weight_change": w_new - w_old,
                "weight_change_fraction": (w_new - w_old) / w_old if w_old > 0 else 0.0,
                "moved": shift / scale > threshold,
            }
        )
    keep = (sample_old_labels >= 0) & (sample_new_labels >= 0)
    mapped = mapping[sample_old_labels[keep]]
    churn = float(np.mean(mapped != sample_new_labels[keep])) if keep.any() else 0.0
    kmeans = new.mixture_.kmeans
    largest = max(components, key=lambda c: c["centre_shift_sd"], default=None)
    return {
        "matching": "scipy.optimize.linear_sum_assignment on Euclidean centre distance",
        "components": components,
        "moved": [c["old"] for c in components if c["moved"]],
        "largest_shift": None if largest is None else largest["old"],
        "drift_threshold_sd": threshold,
        "unmatched_old": sorted(set(range(len(mo))) - set(rows.tolist())),
        "unmatched_new": sorted(set(range(len(mn))) - set(cols.tolist())),
        "label_churn": churn,
        "churn_sample_size": int(keep.sum()),
        "objective_name": new.mixture_.objective_name,
        "objective_old": objective_old,
        "objective_new": objective_new,
        "objective_worsening": worsening(objective_old, objective_new, kmeans),
    }


def check_guards(drift: dict[str, Any], guards: Any, old_k: int) -> list[str]:
    """Why the new model must not be promoted (empty: it may be)."""
    reasons = []
    limit = guards.max_objective_increase
    if limit is not None and drift["objective_worsening"] > limit:
        reasons.append(
            f"the new model's {drift['objective_name']} on the new data "
            f"({drift['objective_new']:.8g}) is worse than the current model's "
            f"({drift['objective_old']:.8g}) by {100 * drift['objective_worsening']:.3g}% "
            f"(registry.guards.max_objective_increase: {100 * limit:.3g}%)"
        )
    limit = guards.max_weight_loss
    if limit is not None:
        for c in drift["components"]:
            loss = -c["weight_change_fraction"]
            if loss > limit:
                reasons.append(
                    f"component {c['old']} (new {c['new']}) lost {100 * loss:.3g}% of its "
                    f"weight ({c['weight_old']:.4g} -> {c['weight_new']:.4g}; "
                    f"registry.guards.max_weight_loss: {100 * limit:.3g}%)"
                )
        for i in drift["unmatched_old"]:
            reasons.append(f"component {i} has no counterpart in the new model (lost all weight)")
    return reasons


def _fit_tick_labels(fig: Figure, ax: Axes, positions: NDArray[Any], names: list[str]) -> None:
    """Label the x ticks of ``ax`` readably: upright if the labels fit, else turned,
    then smaller (down to 6 points), then only every n-th one."""

    def crowding() -> float:
        """The widest label over the room between two ticks (> 1: they overlap)."""
        fig.draw_without_rendering()
        boxes = sorted(
            (t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()),
            key=lambda b: b.x0,
        )
        if len(boxes) < 2:
            return 0.0
        room = min(b.x0 - a.x0 for a, b in itertools.pairwise(boxes))
        return (max(b.width for b in boxes) + 1.0) / max(room, 1e-9)

    ax.set_xticks(positions, names)
    if crowding() <= 1.0:
        return
    ax.tick_params(axis="x", labelrotation=90)
    need = crowding()
    size = float(ax.get_xticklabels()[0].get_fontsize())
    if need > 1.0:
        size = max(6.0, math.floor(size / need))
        ax.tick_params(axis="x", labelsize=size)
        need = crowding()
    step = 1
    while need > 1.0 and step < len(names):
        step = max(step + 1, math.ceil(step * need))
        ax.set_xticks(positions[::step], names[::step])
        need = crowding()


def drift_figure(drift: dict[str, Any], title: str) -> Figure:
    """Two panels: centre shift per component (in standard deviations) and weights."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    comps = drift["components"]
    fig = Figure(figsize=(10, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    names = [f"{c['old']}→{c['new']}" for c in comps]
    x = np.arange(len(comps))
    shifts = [c["centre_shift_sd"] for c in comps]
    colours = ["tab:red" if c["moved"] else "tab:blue" for c in comps]
    ax1.bar(x, shifts, color=colours)
    ax1.axhline(drift["drift_threshold_sd"], color="0.4", linestyle="--", linewidth=1)
    ax1.set_xlabel("component (old → new)")
    ax1.set_ylabel("centre shift (standard deviations)")
    moved = ", ".join(str(m) for m in drift["moved"]) or "none"
    ax1.set_title(f"centre shift; moved: {moved}")
    width = 0.4
    w_old, w_new = [c["weight_old"] for c in comps], [c["weight_new"] for c in comps]
    ax2.bar(x - width / 2, w_old, width, label="old")
    ax2.bar(x + width / 2, w_new, width, label="new")
    ax2.set_xlabel("component (old → new)")
    ax2.set_ylabel("weight")
    # room above the tallest bar for the legend, which would hide bars of equal weights
    ax2.set_ylim(0, 1.25 * max([*w_old, *w_new, 1e-12]))
    ax2.legend(loc="upper right", ncols=2)
    ax2.set_title(f"weights; label churn {100 * drift['label_churn']:.2f}%")
    old, new = drift["objective_old"], drift["objective_new"]
    change = f" ({100 * (new - old) / abs(old):+.3g}%)" if old not in (0.0, -0.0) else ""
    # nine digits: the two objectives usually agree in the first six
    fig.suptitle(
        f"{title}\n{drift['objective_name']} on the new data: old {old:,.9g}, "
        f"new {new:,.9g}{change}"
    )
    for ax in (ax1, ax2):
        _fit_tick_labels(fig, ax, x, names)
    return fig


def write_drift_png(path: str, drift: dict[str, Any], title: str) -> None:
    """:func:`drift_figure` as a PNG at ``path``."""
    drift_figure(drift, title).savefig(path)


# --------------------------------------------------------------------------- the run


@dataclass
class ReclusterResult:
    version: int
    promoted: bool
    reasons: list[str]
    mode: str
    current: int | None
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Previous:
    """The registry's current version when the run starts: its number, its model and the
    statistics saved with it (all ``None`` without a current version; ``statistics``
    also when the version has none and the run does not need them)."""

    version: int | None
    model: Model | None
    statistics: io.ModelStatistics | None

    @property
    def name(self) -> str:
        return "none" if self.version is None else f"v{self.version}"


@dataclass(frozen=True)
class _Run:
    """What a reclustering run works from: the config, the registry, its current version,
    the new data, the mode (``first``, ``refit`` or ``update``) and the job."""

    config: JobConfig
    registry: Registry
    rcfg: RegistryConfig
    previous: _Previous
    points: io.Points
    mode: str
    job_id: str
    config_source: str | None


@dataclass(frozen=True)
class _Fitted:
    """The run's new model: the estimator, the statistics saved with it, the new data's
    statistics under the current model (``None`` on a first run) and under the new one,
    the rows dropped, the iterations and the fit's seconds."""

    estimator: Model
    saved: io.ModelStatistics
    old_pass: io.ModelStatistics | None
    new_pass: io.ModelStatistics
    n_dropped: int
    n_iter: int
    seconds: float

    @property
    def objective(self) -> float:
        """The new model's objective on the new data."""
        return objective_of(self.new_pass.stats, self.estimator.mixture_.kmeans)


def _registry(config: JobConfig) -> tuple[Registry, RegistryConfig]:
    if config.registry is None:
        raise ConfigError(
            "this config has no registry section: dkm recluster and dkm models need "
            "registry.location and registry.name (see configs/recluster.yaml)"
        )
    r = config.registry
    return Registry(r.location, r.name, storage_options=r.storage_options), r


def registry_from_config(config: JobConfig) -> Registry:
    return _registry(config)[0]


def _check_compatible(old: Model, config: JobConfig, d: int, where: str) -> None:
    m, mixture = config.model, old.mixture_
    want = (m.resolved("covariance_type"), m.resolved("assignment"), m.n_clusters, d)
    have = (mixture.covariance_type, mixture.assignment, mixture.n_components, mixture.n_features)
    if want != have:
        raise ConfigError(
            f"the current model {where} is {have[0]}/{have[1]} with k={have[2]} on {have[3]} "
            f"features, but the config and data ask for {want[0]}/{want[1]} with k={want[2]} "
            f"on {want[3]}: reclustering continues the same model; use another "
            "registry.name for a different one"
        )


def _describe(est: Model) -> dict[str, Any]:
    m = est.mixture_
    return {"covariance_type": m.covariance_type, "assignment": m.assignment, "k": m.n_components}


def recluster(
    config: JobConfig,
    *,
    update: bool = False,
    progress: Progress | None = None,
    config_source: str | None = None,
) -> ReclusterResult:
    """One reclustering run (see the module docstring); nothing changes on failure."""
    return as_job(
        progress,
        lambda progress, job_id: _recluster(config, update, progress, config_source, job_id),
    )


def _recluster(
    config: JobConfig,
    update: bool,
    progress: Progress,
    config_source: str | None,
    job_id: str,
) -> ReclusterResult:
    """Check and claim, load the current version, open the data, fit (a refit or the
    update), compare with the current model, store the version, promote and prune."""
    t_start = time.perf_counter()
    registry, rcfg = _open_registry(config)
    previous = _load_previous(registry, rcfg, update)
    points = open_data(config)
    mode = "first" if previous.model is None else ("update" if update else "refit")
    run = _Run(config, registry, rcfg, previous, points, mode, job_id, config_source)
    if previous.model is not None:
        d = int(points.X.shape[1])
        _check_compatible(previous.model, config, d, f"{previous.name} of {registry}")
    progress.event(
        "recluster",
        f"{mode}: registry {registry}, current {previous.name}; data: {points.description}",
    )
    with connect(config.cluster) as client:
        announce(progress, client, job_id, **describe(config, points, config_source))
        X, weights = points.X, points.weights
        if should_persist(config.runtime.persist, X, cluster_memory(client)):
            X, weights = dask.persist(X, weights)
        fit = (_update if mode == "update" else _refit)(run, X, weights, progress)
        drift, reasons = _compare(run, fit, X)
    summary = _summary(run, fit, reasons)
    version = _store(run, fit, summary, drift, progress)
    current, pruned = _promote_and_prune(run, version, promote=not reasons)
    summary["total_seconds"] = time.perf_counter() - t_start
    _announce_end(run, version, summary, pruned, progress)
    return ReclusterResult(version, not reasons, reasons, mode, current, summary)


def _open_registry(config: JobConfig) -> tuple[Registry, RegistryConfig]:
    """The config's registry, after the checks that need no data: one k, the output
    claimed, the registry writable."""
    registry, rcfg = _registry(config)
    if not isinstance(config.model.n_clusters, int):
        raise ConfigError(
            "dkm recluster continues one model: model.n_clusters must be one number, not "
            f"candidates ({config.model.n_clusters}); choose k with dkm run first"
        )
    out = config.output
    io.claim_output(
        out.path, overwrite=out.overwrite, storage_options=out.storage_options, hint=OVERWRITE_HINT
    )
    registry.check_writable()
    return registry, rcfg


def _load_previous(registry: Registry, rcfg: RegistryConfig, update: bool) -> _Previous:
    """The current version's model and, when an update needs them or they were saved,
    its statistics."""
    current = registry.current()
    if current is None:
        return _Previous(None, None, None)
    url, options = registry.model_url(current), rcfg.storage_options
    model = load_model(url, storage_options=options)
    statistics = None
    if update or io.has_model_statistics(url, storage_options=options):
        statistics = io.load_model_statistics(url, storage_options=options)
    return _Previous(current, model, statistics)


def _refit(run: _Run, X: Any, weights: Any, progress: Progress) -> _Fitted:
    """A full fit: from the config's ``init`` on a first run, else warm-started from the
    current model (one init); then, in one pass, the new model's statistics (to save)
    and the current model's (for the drift report)."""
    t_fit = time.perf_counter()
    config, old = run.config, run.previous.model
    split_every = config.runtime.split_every
    model_cfg = config.model if old is None else config.model.model_copy(update={"n_init": 1})
    est = build_estimator(model_cfg, split_every, progress, config.data.nan_policy, old)
    est.fit(X, sample_weight=weights)
    data = ChunkedData.from_dask(X, weights, config.data.nan_policy).with_origin(
        est.mixture_.origin
    )
    models = [est.mixture_] if old is None else [est.mixture_, old.mixture_]
    passes = statistics_pass(data, models, split_every=split_every)
    return _Fitted(
        est,
        saved=passes[0],
        old_pass=passes[1] if old is not None else None,
        new_pass=passes[0],
        n_dropped=int(est.n_dropped_),
        n_iter=int(est.n_iter_),
        seconds=time.perf_counter() - t_fit,
    )


def _update(run: _Run, X: Any, weights: Any, progress: Progress) -> _Fitted:
    """The incremental update: the new data's statistics under the current model merged
    into its saved ones (decayed by the half-life), one M-step. The new model has one
    iteration, with the objectives of the old and the new model on the new data."""
    t_fit = time.perf_counter()
    config, old, old_saved = run.config, run.previous.model, run.previous.statistics
    assert old is not None and old_saved is not None
    m, split_every = config.model, config.runtime.split_every
    current = old.mixture_
    data = ChunkedData.from_dask(X, weights, config.data.nan_policy).with_origin(current.origin)
    # the checks of a fit (NaN/inf rows, bad weights) before the data counts
    checked = summarize(data, sample_size=1, seed=0, split_every=split_every)
    n_dropped = int(checked.n_nonfinite)
    k = current.n_components
    (old_pass,) = statistics_pass(data, [current], n_farthest=k, split_every=split_every)
    saved = merge_statistics(old_saved, old_pass, decay_factor(run.rcfg.half_life))
    params, cov = model_from_statistics(
        saved, current, reg_covar=m.reg_covar, on_degenerate=m.on_degenerate
    )
    mixture = replace(current, params=params)
    (new_stats,) = statistics_pass(data, [mixture], split_every=split_every)
    saved = replace(saved, stats=replace(saved.stats, farthest=None))
    objective_old = objective_of(old_pass.stats, current.kmeans)
    objective_new = objective_of(new_stats.stats, current.kmeans)
    seconds = time.perf_counter() - t_fit
    template = build_estimator(m, split_every, None, config.data.nan_policy)
    est = type(template).from_model(
        params,
        current.origin,
        params=template.get_params(deep=False),
        objective=objective_new,
        n_iter=1,
        converged=False,
        history=[IterationInfo(1, objective_old, objective_new - objective_old, seconds, params)],
        objectives=[objective_new],
        covariances=cov,
        n_dropped=n_dropped,
    )
    progress(est.history_[0])
    return _Fitted(
        est, saved, old_pass, new_stats, n_dropped, n_iter=1, seconds=time.perf_counter() - t_fit
    )


def _compare(run: _Run, fit: _Fitted, X: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """The drift report of the current model against the new one and the guards' reasons
    to refuse the new one (none on a first run)."""
    old, old_pass = run.previous.model, fit.old_pass
    if old is None:
        return None, []
    assert old_pass is not None
    est, rcfg = fit.estimator, run.rcfg
    sample = sample_rows(X, rcfg.churn_sample, seed=run.config.model.seed or 0)
    (sample_np,) = dask.compute(sample)
    sample_np = np.asarray(sample_np)
    labels_old = np.asarray(old.predict(sample_np)) if len(sample_np) else np.empty(0, int)
    labels_new = np.asarray(est.predict(sample_np)) if len(sample_np) else np.empty(0, int)
    # the weights the current model was fitted with: its saved statistics, if any
    ref = run.previous.statistics.stats if run.previous.statistics is not None else old_pass.stats
    drift = drift_report(
        old,
        est,
        old_weights=ref.nk / ref.n,
        new_weights=fit.saved.stats.nk / fit.saved.stats.n,
        old_scales=component_scales(old, ref),
        sample_old_labels=labels_old.astype(np.int64),
        sample_new_labels=labels_new.astype(np.int64),
        objective_old=objective_of(old_pass.stats, est.mixture_.kmeans),
        objective_new=fit.objective,
        threshold=rcfg.drift_threshold,
    )
    return drift, check_guards(drift, rcfg.guards, old.mixture_.n_components)


def _summary(run: _Run, fit: _Fitted, reasons: list[str]) -> dict[str, Any]:
    """``summary.json`` without the version number and the total seconds (added once
    known)."""
    est, points = fit.estimator, run.points
    decision = "first" if run.previous.model is None else ("refused" if reasons else "promoted")
    return {
        "dkm_version": __version__,
        "job": run.job_id,
        "registry": str(run.registry),
        "mode": run.mode,
        "decision": decision,
        "reasons": reasons,
        "parent": run.previous.version,
        "model": _describe(est),
        "data": points.description,
        "data_fingerprint": points.fingerprint,
        "n_samples": int(points.X.shape[0]),
        "dropped_rows": fit.n_dropped,
        "n_iter": fit.n_iter,
        "objective_name": est.mixture_.objective_name,
        "objective": fit.objective,
        "statistics_updates": fit.saved.updates,
        "half_life": run.rcfg.half_life if run.mode == "update" else None,
        "fit_seconds": fit.seconds,
    }


def _store(
    run: _Run,
    fit: _Fitted,
    summary: dict[str, Any],
    drift: dict[str, Any] | None,
    progress: Progress,
) -> int:
    """The new version in the registry (model, statistics and outputs), then the outputs
    at ``output.path``, which also carry the version's number; the version is removed
    again if they cannot be written. Returns the version's number."""
    rcfg, config = run.rcfg, run.config

    def write_version(tmp: str) -> None:
        save_model(
            fit.estimator,
            f"{tmp}/model",
            metadata=model_metadata(
                config,
                run.config_source,
                run.points,
                run.job_id,
                recluster=run.mode,
                parent=run.previous.version,
            ),
            storage_options=rcfg.storage_options,
            statistics=fit.saved,
        )
        _write_outputs(run, tmp, rcfg.storage_options, summary, drift, progress)

    version = run.registry.add_version(write_version, _version_info(run, summary, drift)).number
    summary["version"] = version
    try:
        with output_writer(config, "recluster") as tmp:
            _write_outputs(run, tmp, config.output.storage_options, summary, drift, progress)
    except BaseException:
        run.registry.remove_version(version)  # a failed run adds no version
        raise
    return version


def _version_info(
    run: _Run, summary: dict[str, Any], drift: dict[str, Any] | None
) -> dict[str, Any]:
    """What the registry records about the version (``dkm models`` lists it)."""
    return {
        "decision": summary["decision"],
        "mode": run.mode,
        "parent": run.previous.version,
        "reasons": summary["reasons"],
        "objective_name": summary["objective_name"],
        "objective": summary["objective"],
        "data": run.points.description,
        "data_fingerprint": run.points.fingerprint,
        "dkm_version": __version__,
        "config_source": run.config_source,
        "moved": None if drift is None else drift["moved"],
        "model": summary["model"],
    }


def _write_outputs(
    run: _Run,
    target: str,
    storage_options: dict[str, Any] | None,
    summary: dict[str, Any],
    drift: dict[str, Any] | None,
    progress: Progress,
) -> None:
    """The summary, the metrics and, after a current model, the drift report and figure."""
    fs_write = io.text_writer(target, storage_options=storage_options)
    fs_write("summary.json", json.dumps(summary, indent=2) + "\n")
    fs_write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in progress.records))
    if drift is not None:
        fs_write("drift.json", json.dumps(drift, indent=2) + "\n")
        with io.local_dir(target, storage_options=storage_options) as local:
            write_drift_png(
                f"{local}/drift.png",
                drift,
                f"{run.registry.name}: current {run.previous.name} → new model ({run.mode})",
            )


def _promote_and_prune(run: _Run, version: int, *, promote: bool) -> tuple[int | None, list[int]]:
    """The version made current if it may be, then the old versions beyond
    ``registry.keep`` removed; the current version after that and the removed ones."""
    if promote:
        run.registry.promote(version)
    pruned = run.registry.prune(run.rcfg.keep)
    return run.registry.current(), pruned


def _announce_end(
    run: _Run, version: int, summary: dict[str, Any], pruned: list[int], progress: Progress
) -> None:
    """The last events: versions pruned, then ``done`` or ``refused`` with the reasons."""
    out = run.config.output.path
    if pruned:
        progress.event("prune", f"removed versions {', '.join(f'v{p}' for p in pruned)}")
    if summary["decision"] != "refused":
        progress.event(
            "done", f"v{version} is current ({run.mode}); wrote {out}", **_ended(summary, out)
        )
    else:
        progress.event(
            "refused",
            f"v{version} kept as a candidate; {run.previous.name} stays current: "
            + "; ".join(summary["reasons"]),
            **_ended(summary, out),
        )


def _ended(summary: dict[str, Any], output: str) -> dict[str, Any]:
    """What the last event of a recluster job tells the dashboard's page."""
    return {"output": output, "n_iter": summary["n_iter"], "objective": summary["objective"]}
