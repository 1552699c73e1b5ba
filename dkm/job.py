"""A clustering job: config in, model, labels, metrics and report out (atomically)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import dask
import dask.array as da
import numpy as np
from numpy.typing import NDArray

from dkm import io
from dkm._version import __version__
from dkm.cluster import cluster_memory, connect
from dkm.config import ConfigError, JobConfig, ModelConfig, ModelInit
from dkm.engine import IterationInfo, ResumeState
from dkm.engine.schedule import sampled_iterations
from dkm.estimators import GaussianMixture, KMeans
from dkm.models import load_model, save_model
from dkm.monitor import Progress, scheduler_publisher
from dkm.selection import SweepResult, sweep
from dkm.stats import uniform_from_rows

#: Points sampled for the report's projection.
REPORT_SAMPLE = 5000


def open_data(config: JobConfig) -> io.Points:
    """The points a config names, as a lazy Dask array (nothing is read yet)."""
    return io.open_source(config.data)


def build_estimator(
    model: ModelConfig,
    split_every: int,
    callback: Callable[..., None] | None,
    nan_policy: str = "raise",
    init: Any = None,
) -> KMeans | GaussianMixture:
    """The estimator a model config describes (k-means is the (identity, hard) pair);
    ``init``, if given, replaces the config's (a fitted model: a warm start)."""
    common: dict[str, Any] = {
        "tol": model.resolved("tol"),
        "max_iter": model.resolved("max_iter"),
        "n_init": model.n_init,
        "random_state": model.seed,
        "split_every": split_every,
        "init_sample_size": model.init_sample_size,
        "schedule": model.schedule,
        "sample_trials": model.sample_trials,
        "callback": callback,
        "nan_policy": nan_policy,
    }
    assignment = model.resolved("assignment")
    if init is None:
        init = model.resolved("init")
    if isinstance(init, ModelInit):  # warm start: yesterday's model is today's start
        init = load_model(init.model)
    if model.mode == "kmeans" and assignment == "hard":
        return KMeans(
            model.k,
            init=init,
            oversampling_factor=model.oversampling_factor,
            init_rounds=model.init_rounds,
            **common,
        )
    return GaussianMixture(
        model.k,
        covariance_type=model.resolved("covariance_type"),
        assignment=assignment,
        reg_covar=model.reg_covar,
        on_degenerate=model.on_degenerate,
        init_params=init if model.mode == "gmm" or not isinstance(init, str) else "kmeans",
        **common,
    )


def should_persist(policy: str, X: da.Array, memory: int) -> bool:
    if policy != "auto":
        return policy == "always"
    return memory > 0 and X.nbytes < memory / 2


def _sample_block(
    block: NDArray[Any], p: float, seed: int, block_info: dict[Any, Any] | None = None
) -> NDArray[Any]:
    start = 0 if block_info is None else block_info[0]["array-location"][0][0]
    rows = np.arange(start, start + block.shape[0], dtype=np.int64)
    chosen = block[uniform_from_rows(rows, seed) < p]
    return chosen[np.isfinite(chosen).all(axis=1)]


def sample_rows(X: da.Array, size: int, seed: int) -> da.Array:
    """A uniform sample of about ``size`` rows, chosen per chunk on the workers (lazy)."""
    p = min(1.0, size / max(1, X.shape[0]))
    return da.map_blocks(
        _sample_block,
        X,
        p,
        seed,
        chunks=((np.nan,) * X.numblocks[0], X.chunks[1]),
        dtype=X.dtype,
        name=f"dkm-sample-{uuid.uuid4().hex[:8]}",
    )


@dataclass
class JobResult:
    summary: dict[str, Any]
    output: str


def run_job(
    config: JobConfig,
    *,
    progress: Progress | None = None,
    config_source: str | None = None,
    resume: bool = False,
) -> JobResult:
    """Fit the model a config describes and write its outputs.

    The outputs are written into a temporary directory beside ``output.path`` and moved
    into place at the end, so a failed or interrupted run leaves the previous output as
    it was and nothing that looks finished. Every ``runtime.checkpoint_every``
    iterations the fit's state is saved (atomically) to ``<output.path>.checkpoint``;
    ``resume`` continues from it, after checking that it comes from the same data and
    the same data/model config. It is removed once the outputs are in place.
    """
    return as_job(
        progress, lambda progress, job_id: _run(config, progress, job_id, config_source, resume)
    )


T = TypeVar("T")


def as_job(progress: Progress | None, body: Callable[[Progress, str], T]) -> T:
    """Run ``body(progress, job_id)`` as a job: a new id; the job's events held until
    :func:`announce` (the dashboard link is the first line); Python warnings as job
    lines; a failure published to the scheduler (the command line reports it itself)."""
    job_id = uuid.uuid4().hex[:12]
    progress = progress or Progress(job_id, quiet=True)
    progress.job_id = job_id
    try:
        with progress.capture_warnings():
            progress.hold()
            return body(progress, job_id)
    except BaseException as e:
        progress.event("failed", f"job {job_id} failed: {type(e).__name__}: {e}", echo=False)
        raise


def output_writer(config: JobConfig, command: str) -> io.AtomicOutput:
    """The atomic writer of a job's ``output.path`` (see :func:`claim_outputs`)."""
    out = config.output
    return io.AtomicOutput(
        out.path,
        storage_options=out.storage_options,
        command=command,
        overwrite=out.overwrite,
        hint=OVERWRITE_HINT,
    )


def checkpoint_url(config: JobConfig) -> str:
    return config.output.path.rstrip("/") + ".checkpoint"


#: How a job's user asks to replace its earlier output.
OVERWRITE_HINT = "pass --overwrite (or set output.overwrite: true)"


def claim_outputs(config: JobConfig) -> None:
    """Before any work: refuse what the job may not replace, and probe that it can write.

    The output path may hold nothing, an empty directory, or (with ``output.overwrite``)
    an earlier dkm output; the checkpoint path nothing or a dkm checkpoint. Anything else
    is :class:`dkm.io.OutputExistsError` (exit 2), and stays as it is.
    """
    out = config.output
    io.claim_output(
        out.path, overwrite=out.overwrite, storage_options=out.storage_options, hint=OVERWRITE_HINT
    )
    io.claim_output(checkpoint_url(config), overwrite=True, storage_options=out.storage_options)


def _identity(config: JobConfig, points: io.Points) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the data, its content and the model."""
    return {
        "data": config.data.model_dump(mode="json"),
        "model": config.model.model_dump(mode="json"),
        "data_fingerprint": points.fingerprint,
    }


def _resume_state(config: JobConfig, points: io.Points, progress: Progress) -> ResumeState | None:
    url, options = checkpoint_url(config), config.output.storage_options
    if not io.checkpoint_exists(url, storage_options=options):
        progress.event("resume", f"no checkpoint at {url}: starting from the beginning")
        return None
    if config.model.n_init != 1:
        raise ConfigError("--resume needs model.n_init: 1 (restarts are not checkpointed)")
    if config.model.candidates() is not None:
        raise ConfigError(
            "--resume needs a single model.n_clusters (a sweep over k is not checkpointed)"
        )
    record, meta = io.load_checkpoint(url, storage_options=options)
    try:
        state = ResumeState.from_dict(record)
    except (KeyError, ValueError, TypeError) as e:
        raise io.unreadable_checkpoint(url, e) from None
    expected = _identity(config, points)
    if meta.get("data_fingerprint") != expected["data_fingerprint"]:
        raise ConfigError(
            f"the checkpoint at {url} was written for different data (fingerprint "
            f"{meta.get('data_fingerprint')}, the data now is {points.fingerprint}); remove "
            "it or run without --resume"
        )
    for section in ("data", "model"):
        if meta.get(section) != expected[section]:
            before, now = meta.get(section) or {}, expected[section]
            keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(
                f"the checkpoint at {url} was written by a different config ({section}."
                f"{', '.join(keys)} changed); remove it or run without --resume"
            )
    progress.prefill(state.history)
    progress.event(
        "resume", f"resuming after iteration {state.iteration} from the checkpoint at {url}"
    )
    return state


class Checkpointer:
    """A callback that saves the fit's state every ``every`` iterations (and the last)."""

    def __init__(
        self,
        url: str,
        every: int,
        metadata: dict[str, Any],
        options: dict[str, Any],
        history: tuple[IterationInfo, ...] = (),
    ) -> None:
        self.url, self.every, self.metadata, self.options = url, every, metadata, options
        self.history = list(history)

    def __call__(self, info: IterationInfo) -> None:
        self.history.append(info)
        # a sample's iterations are redone by a new run; a resumed one starts after them
        if info.sample is not None:
            return
        if self.every and (info.iteration % self.every == 0 or info.converged):
            io.save_checkpoint(
                self.url,
                ResumeState.after(info, tuple(self.history)).to_dict(),
                metadata=self.metadata,
                storage_options=self.options,
            )


def _run(
    config: JobConfig,
    progress: Progress,
    job_id: str,
    config_source: str | None,
    resume: bool,
) -> JobResult:
    t_start = time.perf_counter()
    points = open_data(config)
    claim_outputs(config)
    progress.event("data", f"data: {points.description}")
    state = _resume_state(config, points, progress) if resume else None
    callback = _callback(config, points, progress, state)
    with connect(config.cluster) as client:
        announce(progress, client, job_id, **describe(config, points, config_source))
        X, weights = points.X, points.weights
        persisted = should_persist(config.runtime.persist, X, cluster_memory(client))
        if persisted:
            X, weights = dask.persist(X, weights)
        t_fit = time.perf_counter()
        estimator, selection = _fit(config, X, weights, callback, state, progress)
        fit = _Fitted(estimator, selection, time.perf_counter() - t_fit, persisted)
        summary = _write_outputs(
            config, points, X, weights, fit, progress, job_id, t_start, config_source
        )
        io.remove(checkpoint_url(config), storage_options=config.output.storage_options)
        progress.event(
            "done",
            f"done: {summary['n_iter']} iterations, objective "
            f"{summary['objective']:.8g}, wrote {config.output.path}",
            output=config.output.path,
            converged=summary["converged"],
            n_iter=summary["n_iter"],
            objective=summary["objective"],
            n_clusters=summary["n_clusters"],
            sizes=summary["cluster_sizes"],
        )
    return JobResult(summary, config.output.path)


@dataclass(frozen=True)
class _Fitted:
    """A job's fitted model: the estimator, the sweep that chose it (if any), the fit's
    seconds, and whether the points were persisted for it."""

    estimator: KMeans | GaussianMixture
    selection: SweepResult | None
    seconds: float
    persisted: bool


def _callback(
    config: JobConfig, points: io.Points, progress: Progress, state: ResumeState | None
) -> Callable[[IterationInfo], None]:
    """The per-iteration callback: the checkpoint (a single fit only), then the progress
    line, so that what was printed is durable."""
    callbacks: list[Callable[[IterationInfo], None]] = []
    if (
        config.runtime.checkpoint_every
        and config.model.n_init == 1
        and config.model.candidates() is None
    ):
        callbacks.append(
            Checkpointer(
                checkpoint_url(config),
                config.runtime.checkpoint_every,
                _identity(config, points),
                config.output.storage_options,
                state.history if state else (),
            )
        )
    callbacks.append(progress)

    def callback(info: IterationInfo) -> None:
        for fn in callbacks:
            fn(info)

    return callback


def _fit(
    config: JobConfig,
    X: da.Array,
    weights: da.Array | None,
    callback: Callable[[IterationInfo], None],
    state: ResumeState | None,
    progress: Progress,
) -> tuple[KMeans | GaussianMixture, SweepResult | None]:
    """The model the config describes, fitted; a sweep over k fits every candidate in the
    same passes and keeps the one its criterion chooses."""
    estimator = build_estimator(
        config.model, config.runtime.split_every, callback, config.data.nan_policy
    )
    candidates = config.model.candidates()
    if candidates is None:
        estimator.fit(X, sample_weight=weights, resume=state)
        return estimator, None
    criterion = config.model.criterion
    progress.event("sweep", f"fitting k in {candidates} together; choosing by {criterion}")
    selection = sweep(estimator, X, candidates, criterion=criterion, sample_weight=weights)
    progress.event(
        "selected",
        f"k={selection.best_n_clusters} has the lowest {criterion}",
        table=selection.table(),
        n_clusters=selection.best_n_clusters,
    )
    return selection.best_model, selection


def _write_outputs(
    config: JobConfig,
    points: io.Points,
    X: da.Array,
    weights: da.Array | None,
    fit: _Fitted,
    progress: Progress,
    job_id: str,
    t_start: float,
    config_source: str | None,
) -> dict[str, Any]:
    """Labels, responsibilities, model, metrics, report and summary, into a temporary
    directory moved into place at the end (:func:`output_writer`); the summary."""
    out, estimator = config.output, fit.estimator
    # k-means keeps its labels from the fit (scikit-learn's labels_); a mixture predicts
    labels = estimator.labels_ if isinstance(estimator, KMeans) else estimator.predict(X)
    k = _n_clusters(config, fit.selection)
    # shifted by one so that rows dropped for NaN (label -1) fall out of the count
    sizes_lazy = da.bincount(labels + 1, weights=weights, minlength=k + 1)[1:]
    sample_lazy = sample_rows(X, REPORT_SAMPLE, seed=config.model.seed or 0)
    with output_writer(config, "run") as tmp:
        writes = []
        if out.labels:
            writes.append(
                io.write_array(
                    labels,
                    f"{tmp}/labels.zarr",
                    "labels",
                    storage_options=out.storage_options,
                    compute=False,
                )
            )
        if out.responsibilities and not estimator.mixture_.kmeans:
            writes.append(
                io.write_array(
                    cast(GaussianMixture, estimator).predict_proba(X),
                    f"{tmp}/responsibilities.zarr",
                    "responsibilities",
                    storage_options=out.storage_options,
                    compute=False,
                )
            )
        sizes, sample, *_ = dask.compute(sizes_lazy, sample_lazy, *writes)
        summary = _summary(
            config,
            estimator,
            points,
            job_id,
            fit.seconds,
            time.perf_counter() - t_start,
            fit.persisted,
            sizes,
            fit.selection,
            tuple(progress.warnings),
        )
        if out.model:
            save_model(
                estimator,
                f"{tmp}/model",
                metadata=model_metadata(
                    config, config_source, points, job_id, fit_seconds=fit.seconds
                ),
                storage_options=out.storage_options,
            )
        fs_write = io.text_writer(tmp, storage_options=out.storage_options)
        if out.metrics:
            fs_write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in progress.records))
        if out.report:
            _write_report(
                tmp, config, estimator, points, summary, sample, sizes, fit.selection, config_source
            )
        fs_write("summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def announce(progress: Progress, client: Any, job_id: str, **job: Any) -> None:
    """On a new client: publish to its scheduler; the dashboard link, then what was held.

    ``job`` describes the job in the start event (:func:`describe`; the dkm page of the
    dashboard shows it).
    """
    progress.publish = progress.publish or scheduler_publisher(client)
    progress.release(
        lambda: progress.event(
            "start",
            f"dashboard {client.dashboard_link} (job {job_id} on "
            f"{client.scheduler_info()['address']})",
            dashboard=client.dashboard_link,
            **job,
        )
    )


def describe(config: JobConfig, points: io.Points, config_source: str | None) -> dict[str, Any]:
    """What the start event tells of a job: its config, model, data shape and output."""
    m = config.model
    candidates = m.candidates()
    return {
        "config": config_source,
        "mode": m.mode,
        "n_clusters": m.k if candidates is None else list(candidates),
        "n_samples": int(points.X.shape[0]),
        "n_features": int(points.X.shape[1]),
        "output": config.output.path,
    }


def model_metadata(
    config: JobConfig, config_source: str | None, points: io.Points, job_id: str, **extra: Any
) -> dict[str, Any]:
    """What a saved model records of the run that made it (``dkm info`` shows it)."""
    return {
        "config": config.to_dict(),
        "config_source": config_source,
        "data_fingerprint": points.fingerprint,
        "data": points.description,
        "job": job_id,
        **extra,
    }


def _summary(
    config: JobConfig,
    est: KMeans | GaussianMixture,
    points: io.Points,
    job_id: str,
    fit_seconds: float,
    total_seconds: float,
    persisted: bool,
    sizes: NDArray[Any],
    selection: SweepResult | None = None,
    warnings: tuple[str, ...] = (),
) -> dict[str, Any]:
    chosen = {}
    if selection is not None:
        chosen = {
            "selection": {
                "criterion": selection.criterion,
                "n_clusters": selection.best_n_clusters,
                "candidates": selection.table(),
            }
        }
    return {
        "dkm_version": __version__,
        "job": job_id,
        "mode": config.model.mode,
        "covariance_type": config.model.resolved("covariance_type"),
        "assignment": config.model.resolved("assignment"),
        "n_clusters": _n_clusters(config, selection),
        "n_samples": int(points.X.shape[0]),
        "n_features": int(points.X.shape[1]),
        "data": points.description,
        "data_fingerprint": points.fingerprint,
        "dropped_rows": int(est.n_dropped_),
        "n_iter": int(est.n_iter_),
        # the sampled schedule's iterations before those (dkm.engine.schedule)
        "sampled_iterations": sampled_iterations(est.history_),
        "converged": bool(est.converged_),
        "objective_name": est.mixture_.objective_name,
        "objective": float(est.objective_),
        "cluster_sizes": [float(s) for s in sizes],
        "persisted": persisted,
        "fit_seconds": fit_seconds,
        "total_seconds": total_seconds,
        "warnings": list(warnings),
        **chosen,
    }


def _n_clusters(config: JobConfig, selection: SweepResult | None) -> int:
    """The number of clusters the model was fitted with (the chosen one of a sweep)."""
    return config.model.k if selection is None else selection.best_n_clusters


def _write_report(
    tmp: str,
    config: JobConfig,
    est: KMeans | GaussianMixture,
    points: io.Points,
    summary: dict[str, Any],
    sample: NDArray[Any],
    sizes: NDArray[Any],
    selection: SweepResult | None = None,
    config_source: str | None = None,
) -> None:
    from dkm import report

    if isinstance(est, KMeans):  # each kind draws its own fitted attributes
        means, covariances = est.cluster_centers_, None
        weights = sizes / max(sizes.sum(), 1e-300)
    else:
        means, covariances, weights = est.means_, est.covariances_, est.weights_
    # the convergence figure and table: the iterations on all the data (the sampled
    # schedule's are counted in the summary)
    history = [info.to_dict() for info in est.history_ if info.sample is None]
    sample_labels = np.asarray(est.predict(sample)) if len(sample) else np.empty(0, np.int64)
    m = config.model
    k = _n_clusters(config, selection)
    title = f"{m.mode}, k={k}, {summary['n_samples']:,} x {summary['n_features']}"
    with io.local_dir(f"{tmp}/report", storage_options=config.output.storage_options) as target:
        report.write_report(
            target,
            title=title,
            # the estimator's objective: a soft k-means is a mixture, with a log-likelihood
            mode="kmeans" if est.mixture_.kmeans else "gmm",
            covariance_type=m.resolved("covariance_type"),
            history=history,
            objective=summary["objective"],
            sample=sample,
            sample_labels=sample_labels,
            means=means,
            weights=weights,
            covariances=covariances,
            cluster_sizes=sizes,
            summary={
                **{k: v for k, v in summary.items() if k not in ("cluster_sizes", "selection")},
                "config": config_source or "-",
            },
            selection=None if selection is None else selection.table(),
            criterion=m.criterion,
            config=config.to_dict(),
        )
