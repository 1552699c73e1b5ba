"""The EM loop over a Dask array: E-step per chunk, tree reduction, M-step on the client.

Knows no YAML, no files and no CLI. Works on whatever Dask scheduler is current: the
threaded scheduler by default, or a ``distributed.Client`` if one is active.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import cache, cached_property, partial
from typing import Any

import dask
import dask.array as da
import dask.threaded
import numpy as np
from dask._task_spec import DataNode, Task, TaskRef
from dask.base import get_scheduler, tokenize
from dask.delayed import Delayed, delayed
from numpy.typing import NDArray
from threadpoolctl import ThreadpoolController

from dkm import covariance
from dkm._typing import (
    Assignment,
    CovarianceType,
    KMeansAlgorithm,
    Moments,
    OnDegenerate,
    parse_kmeans_algorithm,
    parse_nan_policy,
)
from dkm.codec import NonFinite, float_from_json, float_to_json
from dkm.errors import InvalidDataError, UserError
from dkm.kernels import bounds
from dkm.kernels import expectation as K
from dkm.kernels.init import INIT_METHODS
from dkm.kernels.mstep import gaussian_mstep, kmeans_centres
from dkm.kernels.params import DegenerateComponentWarning, MixtureParams
from dkm.reduce import tree_top
from dkm.stats import DataSummary, SuffStats, merge_all, sxx_shape

_LLGExpr: Any
try:  # a graph with its token already known (distributed's client takes expressions)
    from dask._expr import LLGExpr as _LLGExpr
except ImportError:  # pragma: no cover - older or newer dask: the dict, tokenised again
    _LLGExpr = None

F64 = NDArray[np.float64]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class ChunkedData:
    """Points partitioned by rows, optional weights on the same chunks, and an origin.

    Kernels see ``X − origin``; the origin (the data mean once known) keeps distance
    expansions such as ``‖x‖² − 2x·μ + ‖μ‖²`` accurate for data far from zero.
    """

    X: da.Array
    weights: da.Array | None
    origin: F64
    #: "raise": NaN/inf in X is an error; "drop": such rows get no weight and label -1.
    nan_policy: str = "raise"

    @classmethod
    def from_dask(
        cls, X: da.Array, weights: da.Array | None = None, nan_policy: str = "raise"
    ) -> ChunkedData:
        if X.ndim != 2:
            raise InvalidDataError(f"expected a 2-D array of points, got {X.ndim} dimension(s)")
        if X.dtype.kind not in "fiub":
            raise InvalidDataError(f"expected a real numeric dtype, got {X.dtype}")
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        if len(X.chunks[1]) != 1:
            X = X.rechunk({1: -1})
        if weights is not None:
            if weights.shape != (X.shape[0],):
                raise InvalidDataError(
                    f"sample_weight has shape {weights.shape}, expected ({X.shape[0]},)"
                )
            weights = weights.astype(np.float64).rechunk((X.chunks[0],))
        parse_nan_policy(nan_policy)
        return cls(X, weights, np.zeros(X.shape[1]), nan_policy)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.X.chunks[0]).tolist()][:-1]

    def with_origin(self, origin: F64) -> ChunkedData:
        return replace(self, origin=np.asarray(origin, np.float64))

    @cached_property
    def _blocks(self) -> list[tuple[Any, Any, int]]:
        # to_delayed() optimises the array's graph: do it once per dataset, not per pass.
        xb = self.X.to_delayed().ravel().tolist()
        wb = [None] * len(xb) if self.weights is None else self.weights.to_delayed().tolist()
        return list(zip(xb, wb, self.offsets, strict=True))

    def block_tasks(self) -> list[tuple[Any, Any, int]]:
        """(X block, weight block or None, row offset) per row chunk, as Delayed."""
        return self._blocks

    def worker_groups(self, client: Any) -> list[list[int]] | None:
        """Blocks of X by the worker thread that should run them: each worker's
        persisted blocks dealt round-robin over its threads; None unless every block of
        X is persisted on ``client``'s cluster and every worker holds some.

        Asking the scheduler takes two round trips, so the answer is kept for
        :data:`GROUPS_MAX_AGE` seconds, and asked again at once when a block's future is
        no longer finished (its worker died: the scheduler tells the client without
        being asked). A worker that joins is seen within that age. The groups only say
        where tasks should run: a stale answer can cost a transfer, never a different
        result.
        """
        from distributed import futures_of

        cached = self.__dict__.get("_groups")
        if cached is not None:
            client_id, asked, futures, groups = cached
            if (
                client_id == client.id
                and time.monotonic() - asked < GROUPS_MAX_AGE
                and all(f.status == "finished" for f in futures)
            ):
                return groups
        keys = [b.key for b, _, _ in self._blocks]
        by_key = {f.key: f for f in futures_of(self.X)}
        if any(key not in by_key for key in keys):
            return None  # not persisted (e.g. read from a store in every pass)
        futures = [by_key[key] for key in keys]
        asked = time.monotonic()
        groups = self._ask_worker_groups(client, keys, futures)
        self.__dict__["_groups"] = (client.id, asked, futures, groups)  # frozen: as cached_property
        return groups

    @staticmethod
    def _ask_worker_groups(
        client: Any, keys: list[Any], futures: list[Any]
    ) -> list[list[int]] | None:
        who_has = client.who_has(futures)
        threads = client.nthreads()
        by_worker: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            holders = who_has.get(key) or ()
            if not holders:
                return None
            by_worker.setdefault(holders[0], []).append(i)
        if any(worker not in by_worker for worker in threads):
            # a worker holding none of the blocks (one that joined after the persist, say)
            # would get no E-step work at all: one task per block lets the scheduler use it
            return None
        groups = []
        for worker, members in by_worker.items():
            n = max(1, min(threads.get(worker, 1), len(members)))
            groups += [members[t::n] for t in range(n)]
        return groups

    @cached_property
    def block_graph(self) -> dict[Any, Any]:
        """The (optimised) graph of every block of X and the weights, materialised once:
        the base of the graphs the passes build by hand."""
        graph: dict[Any, Any] = {}
        for xb, wb, _ in self._blocks:
            for block in (xb, wb):
                if block is not None and block.key not in graph:
                    graph.update(block.__dask_graph__())
        return graph


# --------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class PassOptions:
    """What one E-step pass computes."""

    assignment: Assignment
    moments: Moments
    n_farthest: int = 0
    #: k-means: ``(fit, model)`` under which the chunks' Hamerly bounds are kept between
    #: this fit's passes (:mod:`dkm.kernels.bounds`); None searches every row.
    bounds: tuple[str, int] | None = None


#: What to do about NaN/inf rows, said by the errors of ``nan_policy="raise"``.
DROP_REMEDY = "drop them with nan_policy='drop'"
LABEL_REMEDY = "label them -1 with nan_policy='drop'"
#: Rows a per-chunk error names at most.
_NAMED_ROWS = 5


class NonFiniteInputError(UserError, ValueError):
    """NaN or infinity in the points under ``nan_policy="raise"``.

    ``count`` rows hold them (in ``chunk`` alone when ``in_chunk``), the first of which
    are ``rows`` (global row indices); ``chunk`` is the row chunk of the first, or None
    for an in-memory array. ``remedy`` finishes the message ("Remove or impute them,
    or …").
    """

    def __init__(
        self,
        count: int,
        rows: tuple[int, ...],
        chunk: int | None = None,
        in_chunk: bool = False,
        remedy: str = DROP_REMEDY,
    ) -> None:
        super().__init__(count, rows, chunk, in_chunk, remedy)  # what pickling rebuilds from
        self.count, self.rows, self.chunk = count, rows, chunk
        self.in_chunk, self.remedy = in_chunk, remedy

    def __str__(self) -> str:
        where = f" in chunk {self.chunk}" if self.in_chunk and self.chunk is not None else ""
        first = f"row {self.rows[0]}"
        if self.chunk is not None and not where:
            first += f" (chunk {self.chunk})"
        more = ", ".join(map(str, self.rows[1:]))
        if more:
            more += ", …" if self.count > len(self.rows) else ""
            first += f" (then {'rows' if len(self.rows) > 2 else 'row'} {more})"
        return (
            f"Input X contains NaN or infinity: {self.count} row(s){where}, the first at "
            f"{first}. Remove or impute them, or {self.remedy}."
        )

    def with_remedy(self, remedy: str) -> NonFiniteInputError:
        """The same error with another way out (e.g. a command-line option)."""
        return NonFiniteInputError(self.count, self.rows, self.chunk, self.in_chunk, remedy)


def _nonfinite_rows(X: NDArray[Any]) -> NDArray[np.bool_] | None:
    """Mask of the rows holding NaN or infinity; None when there are none.

    A finite sum proves every value finite without a mask as large as ``X``; only a
    chunk whose sum is not finite (bad values, or an overflow) is checked row by row.
    """
    if X.size == 0 or np.isfinite(X.sum()):
        return None
    bad = ~np.isfinite(X).all(axis=1)
    return bad if bad.any() else None


def _without_nonfinite(
    X: NDArray[Any], w: NDArray[Any] | None, origin: F64
) -> tuple[NDArray[Any], NDArray[Any] | None, NDArray[np.bool_] | None]:
    """Rows with NaN/inf moved to the origin with zero weight (nan_policy: drop).

    Every statistic is weighted, so such a row contributes nothing, and the global row
    indices of all other rows are unchanged. Returns the rows' mask too (None: none).
    """
    bad = _nonfinite_rows(X)
    if bad is None:
        return X, w, None
    X = np.where(bad[:, None], origin.astype(X.dtype), X)
    w = np.where(bad, 0.0, np.ones(X.shape[0]) if w is None else w)
    return X, w, bad


@dataclass(frozen=True, eq=False)
class StackedStats:
    """The statistics of several models from one chunk: merged model by model.

    Merging is elementwise, in the order the tree gives, so each model's total is
    bit for bit what a pass for that model alone would have produced.
    """

    parts: tuple[SuffStats, ...]

    def merge(self, other: StackedStats) -> StackedStats:
        return StackedStats(tuple(a.merge(b) for a, b in zip(self.parts, other.parts, strict=True)))


#: One model's share of a pass: parameters (centred), moment shift, what to compute.
PassJob = tuple[MixtureParams, F64 | None, PassOptions]


def _estep_chunk_many(
    X: NDArray[Any],
    w: NDArray[Any] | None,
    jobs: Sequence[PassJob],
    origin: F64,
    row_offset: int,
    drop_nonfinite: bool = False,
) -> StackedStats:
    """The E-step of every model in ``jobs`` on one chunk, read once.

    The kernels centre each row block on ``origin`` as they read it (in cache), rather
    than the chunk being copied whole, centred, every pass.
    """
    if drop_nonfinite:
        X, w, _ = _without_nonfinite(X, w, origin)
    out = []
    for params, shift, options in jobs:
        out.append(
            K.estep(
                X,
                params,
                assignment=options.assignment,
                moments=options.moments,
                shift=shift,
                sample_weight=w,
                n_farthest=options.n_farthest,
                row_offset=row_offset,
                origin=origin,
                bounds_key=None if options.bounds is None else (*options.bounds, row_offset),
            )
        )
    return StackedStats(tuple(out))


def _summary_chunk(
    X: NDArray[Any],
    w: NDArray[Any] | None,
    row_offset: int,
    sample_size: int,
    seed: int,
    drop_nonfinite: bool = False,
) -> DataSummary:
    weights = np.ones(X.shape[0]) if w is None else w
    return DataSummary.from_chunk(X, weights, row_offset, sample_size, seed, drop_nonfinite)


def _blas_limit(n_tasks: int) -> AbstractContextManager[Any]:
    """One BLAS thread per task while several chunk tasks run at once in this process.

    Dask's threaded scheduler runs one task per core; each GEMM would otherwise start
    its own pool of BLAS threads on the same cores (oversubscription). A lone chunk
    keeps BLAS's own threads. Workers of a
    ``distributed`` cluster are separate processes that Dask already starts with one
    BLAS thread each; the limit set here does not reach them.
    """
    if n_tasks < 2:
        return nullcontext()
    return _one_blas_thread()


def _one_blas_thread() -> AbstractContextManager[Any]:
    """BLAS on one thread in this process, within the ``with`` block."""
    return _blas_controller().limit(limits=1, user_api="blas")


@cache
def _blas_controller() -> ThreadpoolController:
    """The process's thread pools, found once: ``threadpool_limits`` searches the loaded
    libraries on every call; by the first pass NumPy's and SciPy's BLAS are loaded (the
    kernels import both)."""
    return ThreadpoolController()


def _reduce_and_compute(parts: list[Delayed], split_every: int, name: str) -> Any:
    """The tree reduction of ``parts``, computed; its root merge runs here, not as a
    task: the client receives the (at most ``split_every``) partial totals, which the
    root would have had fetched from the workers anyway, and saves the root task's
    round trip through the scheduler. The merge order is the tree's, so the total is
    bit for bit the same."""
    with _blas_limit(len(parts)):
        top = dask.compute(*tree_top(parts, split_every, name))
    return merge_all(top)


def stats_pass(
    data: ChunkedData,
    params: MixtureParams,
    options: PassOptions,
    *,
    shift: F64 | None = None,
    split_every: int = 8,
) -> SuffStats:
    """One E-step over all chunks, reduced to totals: a single ``compute``."""
    (total,) = stats_pass_many(data, [(params, shift, options)], split_every=split_every)
    return total


#: Largest total size of the parameters' copies that E-step tasks carry inline (one
#: copy per chunk); above it the parameters are one shared key of the graph.
EMBED_PARAMS_BYTES = 8 << 20


def _params_nbytes(params: MixtureParams, shift: F64 | None) -> int:
    arrays = (params.means, params.weights, params.precisions_cholesky, shift)
    return sum(a.nbytes for a in arrays if a is not None)


def stats_pass_many(
    data: ChunkedData,
    jobs: Sequence[PassJob],
    *,
    split_every: int = 8,
    held: list[Any] | None = None,
) -> list[SuffStats]:
    """One E-step pass over all chunks for several models at once, reduced to totals.

    Each chunk task reads its chunk once and runs the E-step of every model in ``jobs``
    (restarts, candidate numbers of clusters); the tree merges the stacked statistics
    model by model. One graph, run by the current scheduler (a distributed ``Client``
    if one is the default, else Dask's configured or threaded scheduler).

    The graph is built by hand on top of the blocks' graph, materialised once per
    dataset, and handed to the scheduler's ``get``: ``dask.compute`` on ``Delayed``
    objects would re-tokenise the parameters for every task and re-optimise the graph
    in every pass.

    The parameters (and the origin) travel inside every E-step task while all their
    copies together stay under :data:`EMBED_PARAMS_BYTES`: a worker then starts a task
    as soon as it receives it. Larger parameters enter the graph once, as one key every
    E-step task depends on, so each worker receives them once per pass; but that key is
    a task of its own, run on one worker and fetched by the others before their first
    E-step, which is why small parameters are embedded.

    On a distributed cluster holding every block of X in memory, each worker thread
    gets one task for all the blocks it holds (:meth:`ChunkedData.worker_groups`)
    instead of one task per block and the merges: on a small machine the scheduler's
    and the client's few milliseconds per task take CPU from the workers. The tasks
    return each chunk's
    statistics, which the client merges in the tree's order, so the totals are the
    same bits as the ungrouped pass's, wherever the blocks are; passes whose per-chunk
    statistics would exceed :data:`GROUPED_STATS_BYTES` in all stay ungrouped.

    ``held``: a loop of passes on a distributed client (a fit) keeps each pass's result
    futures in this list until the next pass has been submitted, and releases them with
    :func:`release_held` when it ends (:func:`_run_on_client`); None releases them at
    once.
    """
    if not jobs:
        return []
    token = tokenize(
        data.X.name,
        [(p.means, p.precisions_cholesky, p.weights, s, o) for p, s, o in jobs],
        data.origin,
        split_every,
        data.nan_policy,
    )
    blocks = data.block_tasks()
    drop = data.nan_policy == "drop"
    size = data.origin.nbytes + sum(_params_nbytes(p, s) for p, s, _ in jobs)
    graph = dict(data.block_graph)
    estep: Callable[..., StackedStats]
    if size * len(blocks) <= EMBED_PARAMS_BYTES:
        estep = partial(_estep_chunk_many, jobs=tuple(jobs), origin=data.origin)
        inputs: dict[str, Any] = {}
    else:
        jkey, okey = f"dkm-params-{token}", f"dkm-origin-{token}"
        graph[jkey] = DataNode(jkey, tuple(jobs))
        graph[okey] = DataNode(okey, data.origin)
        estep, inputs = _estep_chunk_many, {"jobs": TaskRef(jkey), "origin": TaskRef(okey)}
    schedule = get_scheduler() or dask.threaded.get
    client = getattr(schedule, "__self__", None)
    groups = None
    if _is_client(client) and len(blocks) > 1:
        stats_bytes = sum(_stats_nbytes(p, o) for p, _, o in jobs) * len(blocks)
        if stats_bytes <= GROUPED_STATS_BYTES:
            groups = data.worker_groups(client)
    if groups is not None:
        # the grouping is part of the keys: a key never names two different tasks
        gtoken = tokenize(token, groups)
        keys = []
        for g, members in enumerate(groups):
            key = (f"dkm-estep-{gtoken}", g)
            refs = [ref for i in members for ref in (TaskRef(blocks[i][0].key), _ref(blocks[i][1]))]
            offsets = tuple(blocks[i][2] for i in members)
            graph[key] = Task(
                key, _estep_chunks, estep, offsets, *refs, drop_nonfinite=drop, **inputs
            )
            keys.append(key)
        with _blas_limit(len(blocks)):  # as the ungrouped pass: the same BLAS, the same bits
            grouped = _run_on_client(client, graph, keys, gtoken, held)
        per_chunk: list[Any] = [None] * len(blocks)
        for members, results in zip(groups, grouped, strict=True):
            for i, result in zip(members, results, strict=True):
                per_chunk[i] = result
        # the tree of the ungrouped pass, merged here: the same order, the same bits
        top = tree_top(per_chunk, split_every, "", lambda group, _key: merge_all(group))
        return list(merge_all(top).parts)
    esteps = []
    for i, (xb, wb, off) in enumerate(blocks):
        key = (f"dkm-estep-{token}", i)
        graph[key] = Task(
            key,
            estep,
            TaskRef(xb.key),
            _ref(wb),
            row_offset=off,
            drop_nonfinite=drop,
            **inputs,
        )
        esteps.append(key)

    def merge(group: list[Any], key: tuple[str, int, int]) -> Any:
        graph[key] = Task(key, _merge_args, *(TaskRef(k) for k in group))
        return key

    top = tree_top(esteps, split_every, f"dkm-merge-{token}", merge)
    with _blas_limit(len(esteps)):
        if _is_client(client):
            parts = _run_on_client(client, graph, top, token, held)
        else:
            parts = schedule(graph, top)
    total: StackedStats = merge_all(parts)
    return list(total.parts)


#: Seconds a dataset's :meth:`ChunkedData.worker_groups` answer is used before the
#: scheduler is asked again (at once if a block's future is no longer finished).
GROUPS_MAX_AGE = 2.0

#: Largest total size of the per-chunk statistics a grouped pass sends to the client
#: (the chunks' own statistics, so that it can merge them in the tree's order).
GROUPED_STATS_BYTES = 64 << 20


def _stats_nbytes(params: MixtureParams, options: PassOptions) -> int:
    k, d = params.n_components, params.n_features
    sxx = sxx_shape(options.moments, k, d)
    return 8 * (k + k * d + (math.prod(sxx) if sxx else 0) + options.n_farthest * (d + 4))


def _is_client(obj: Any) -> bool:
    from distributed import Client  # imported when a pass runs, not with dkm.engine

    return isinstance(obj, Client)


def _run_on_client(
    client: Any, graph: dict[Any, Any], keys: list[Any], token: str, held: list[Any] | None
) -> list[Any]:
    """``client.get(graph, keys)``, with the messages of consecutive passes in order.

    A client sends the scheduler its messages in batches at most one per 10 ms, and the
    scheduler its workers theirs one per 5 ms (``BatchedSend``, intervals fixed in
    distributed). ``client.get`` releases a pass's results as soon as it has them: that
    message left alone and started the interval, so the next pass's graph, submitted a
    few milliseconds later, waited for the rest of it, and the scheduler's release of
    the results to the workers held up the next pass's tasks in the same way. With
    ``held``, the previous pass's futures are dropped only after this pass is
    submitted. The graph goes to the client as an expression named by ``token``
    (``token`` must name the graph), which spares tokenising the whole graph again.
    """
    expr: Any = graph
    if _LLGExpr is not None:
        expr = _LLGExpr(graph, _determ_token=token)
    futures = client.get(expr, keys, sync=False)
    if held is not None:
        previous, held[:] = held[:], [futures]
        release_held(previous)  # the previous pass's results, now that this one is submitted
    try:
        results: list[Any] = client.gather(futures)
    finally:
        if held is None:
            release_held([futures])
    return results


def release_held(held: list[Any]) -> None:
    """Release the futures in ``held`` (lists of them) and empty it: explicitly, as
    ``client.get`` does, not when the garbage collector gets to them."""
    for futures in held:
        for future in futures:
            future.release()
    held.clear()


def _estep_chunks(
    estep: Callable[..., StackedStats], offsets: tuple[int, ...], *blocks: Any, **kwargs: Any
) -> tuple[StackedStats, ...]:
    """``estep`` of several chunks in one task: blocks are (X, weights or None) pairs."""
    return tuple(
        estep(blocks[2 * j], blocks[2 * j + 1], row_offset=offset, **kwargs)
        for j, offset in enumerate(offsets)
    )


def _ref(block: Delayed | None) -> TaskRef | None:
    return None if block is None else TaskRef(block.key)


def _merge_args(*parts: Any) -> Any:
    return merge_all(parts)


def summarize(
    data: ChunkedData, *, sample_size: int, seed: int, split_every: int = 8
) -> DataSummary:
    """One pass: counts, mean, variance, a weighted sample, and input checks.

    Raises ValueError naming the first offending row for non-finite values or
    negative/non-finite weights, and for data without positive total weight.
    """
    weights_name = None if data.weights is None else data.weights.name
    token = tokenize(data.X.name, weights_name, sample_size, seed, data.nan_policy)
    parts = [
        delayed(_summary_chunk, pure=True)(
            xb,
            wb,
            off,
            sample_size,
            seed,
            data.nan_policy == "drop",
            dask_key_name=(f"dkm-summary-{token}", i),
        )
        for i, (xb, wb, off) in enumerate(data.block_tasks())
    ]
    summary: DataSummary = _reduce_and_compute(parts, split_every, f"dkm-summary-merge-{token}")
    if summary.n_nonfinite and data.nan_policy != "drop":
        chunk = int(
            np.searchsorted(np.cumsum(data.X.chunks[0]), summary.first_nonfinite_row, side="right")
        )
        raise NonFiniteInputError(summary.n_nonfinite, (summary.first_nonfinite_row,), chunk)
    if summary.n_bad_weights:
        raise InvalidDataError(
            f"sample_weight has {summary.n_bad_weights} negative or non-finite value(s), "
            f"the first at row {summary.first_bad_weight_row}; weights must be finite and >= 0."
        )
    if summary.count and summary.weight <= 0:
        raise InvalidDataError(
            "sample_weight sums to zero: at least one point needs positive weight"
        )
    if data.X.dtype == np.float32:
        # squared distances are summed over features in float32: keep them finite
        limit = float(np.sqrt(np.finfo(np.float32).max / (4 * data.n_features)))
        if summary.max_abs > limit:
            raise InvalidDataError(
                f"Input X holds values up to {summary.max_abs:.3g}: squared distances of "
                f"float32 data that large overflow (the limit here is {limit:.3g}). Use "
                "float64 data (data.dtype: float64 in a config) or scale the features."
            )
    return summary


# --------------------------------------------------------------------------- EM loop


@dataclass(frozen=True, eq=False)
class IterationInfo:
    """What the per-iteration callback receives.

    ``objective`` is the k-means inertia (under the centres the iteration started
    from) or the mean log-likelihood (the lower bound); ``change`` is the squared centre
    shift (k-means) or the change of the lower bound; ``params`` are the new
    parameters, in the data's coordinates; ``converged`` says whether this iteration
    met the convergence rule (the last one of a converged run).
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

    def to_dict(self, nonfinite: NonFinite = "string") -> dict[str, Any]:
        """The iteration's numbers as JSON values: what the saved model, the checkpoint,
        the metrics and the report keep of it (see :mod:`dkm.codec` for ``nonfinite``)."""
        return {
            "iteration": int(self.iteration),
            "objective": float_to_json(self.objective, nonfinite),
            "change": float_to_json(self.change, nonfinite),
            "seconds": float_to_json(self.seconds, nonfinite),
            "converged": bool(self.converged),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> IterationInfo:
        """The iteration :meth:`to_dict` wrote (``params`` None: they are not kept);
        ValueError naming the key when it is not one. ``converged`` may be missing (models
        saved before it was kept)."""
        try:
            return cls(
                int(record["iteration"]),
                float_from_json(record["objective"]),
                float_from_json(record["change"]),
                float_from_json(record["seconds"]),
                None,
                bool(record.get("converged", False)),
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

    held: list[Any] = []  # the last pass's futures on a client (see stats_pass_many)
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
                        fit.wanted(centres.shape[1]) and _worth_keeping(run.params.means, centres)
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
                        _warn_repaired(repaired, options.on_degenerate, run.n_iter)
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
    Lloyd); "hamerly", for rows of any width (wider rows are searched by BLAS, whose bits
    for a few gathered rows are not the block GEMM's, so a block with a gathered row
    within rounding of a tie is searched whole); "auto", where the compiled row pass
    searches (each row's bits its own), i.e. for :func:`dkm.kernels.searches_rows` rows.
    """

    def __init__(self, algorithm: KMeansAlgorithm = "auto") -> None:
        self.algorithm = parse_kmeans_algorithm(algorithm)
        self.name = uuid.uuid4().hex

    def wanted(self, d: int) -> bool:
        """Whether the fit keeps bounds for rows of ``d`` features once centres settle."""
        if self.algorithm == "auto":
            return K.searches_rows(d)
        return self.algorithm == "hamerly"

    def key(self, run: _Run) -> tuple[str, int] | None:
        """The cache key of ``run``'s bounds; None while it keeps none."""
        return (self.name, run.index) if run.bounds else None

    def release(self) -> None:
        """Drop the fit's bounds here and, without waiting, on a distributed cluster's
        workers (bounds that a worker still holds would otherwise only give way to later
        fits' bounds)."""
        bounds.CACHE.release(self.name)
        client: Any = getattr(get_scheduler(), "__self__", None)
        if _is_client(client) and client.status == "running":
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
    with _one_blas_thread():
        return bounds.worth_keeping(old, new)


async def _release_worker_bounds(fit: str) -> None:
    """On a worker's event loop (a coroutine: ``client.run`` need not wait for it)."""
    bounds.CACHE.release(fit)


# --------------------------------------------------------------------------- init


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
            _warn_repaired(repaired, on_degenerate, 0)
        out.append((params, cov))
    return out


def _warn_repaired(components: list[int], policy: str, iteration: int) -> None:
    done = "dropped" if policy == "drop" else "re-seeded on the worst-explained points"
    warnings.warn(
        f"mixture component(s) {', '.join(map(str, components))} collapsed at iteration "
        f"{iteration} and were {done} (on_degenerate={policy!r})",
        DegenerateComponentWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------- predict


def _map_chunks(
    fn: Callable[..., NDArray[Any]],
    data: ChunkedData,
    params: MixtureParams,
    *,
    name: str,
    out_dtype: Any,
    n_columns: int | None = None,
) -> da.Array:
    """Apply a per-row kernel lazily; the result keeps the input's row chunks.

    Rows with NaN/inf follow ``data.nan_policy`` (see :func:`_apply_kernel`): under
    "raise", computing a chunk that holds one raises :class:`NonFiniteInputError`.
    """
    centred_params = params.translated(-data.origin)
    token = tokenize(
        data.X.name, params.means, params.precisions_cholesky, params.weights, data.nan_policy
    )
    kwargs: dict[str, Any] = {"dtype": out_dtype, "name": f"{name}-{token}"}
    if n_columns is None:
        kwargs["drop_axis"] = 1
    else:
        kwargs["chunks"] = (data.X.chunks[0], (n_columns,))
    return da.map_blocks(
        _apply_kernel, data.X, fn, centred_params, data.origin, data.nan_policy, **kwargs
    )


def _apply_kernel(
    X: NDArray[Any],
    fn: Callable[..., NDArray[Any]],
    params: MixtureParams,
    origin: F64,
    nan_policy: str = "raise",
    block_info: Any = None,
) -> NDArray[Any]:
    """``fn`` on one chunk. Rows with NaN/inf: under "drop" label -1 (NaN for floats);
    under "raise" a :class:`NonFiniteInputError` naming them by global row index and the
    chunk (from Dask's ``block_info``; an in-memory array is one chunk, from row 0)."""
    bad = _nonfinite_rows(X)
    if bad is not None:
        if nan_policy != "drop":
            offset, chunk = 0, None
            if isinstance(block_info, dict) and 0 in block_info:
                offset = int(block_info[0]["array-location"][0][0])
                chunk = int(block_info[0]["chunk-location"][0])
            rows = tuple(int(r) + offset for r in np.flatnonzero(bad)[:_NAMED_ROWS])
            raise NonFiniteInputError(
                int(np.count_nonzero(bad)), rows, chunk, in_chunk=True, remedy=LABEL_REMEDY
            )
        X = np.where(bad[:, None], origin.astype(X.dtype), X)
    out = fn(K.centred(X, origin, params.covariance_type), params)
    if bad is not None:  # dropped rows: label -1, no probabilities, distances or density
        out[bad] = -1 if out.dtype.kind == "i" else np.nan
    return out


def lazy_labels(data: ChunkedData, params: MixtureParams) -> da.Array:
    return _map_chunks(K.predict_labels, data, params, name="dkm-predict", out_dtype=np.int64)


def lazy_proba(data: ChunkedData, params: MixtureParams) -> da.Array:
    return _map_chunks(
        K.predict_proba,
        data,
        params,
        name="dkm-proba",
        out_dtype=np.float64,
        n_columns=params.n_components,
    )


def lazy_score_samples(data: ChunkedData, params: MixtureParams) -> da.Array:
    return _map_chunks(K.score_samples, data, params, name="dkm-score", out_dtype=np.float64)


def lazy_distances(data: ChunkedData, params: MixtureParams) -> da.Array:
    dtype = K.compute_dtype(np.dtype(data.X.dtype), "identity")
    return _map_chunks(
        K.distances,
        data,
        params,
        name="dkm-transform",
        out_dtype=dtype,
        n_columns=params.n_components,
    )


def apply_in_memory(
    fn: Callable[..., NDArray[Any]],
    X: NDArray[Any],
    params: MixtureParams,
    origin: F64,
    nan_policy: str = "raise",
) -> NDArray[Any]:
    """The same kernel on an in-memory array (no Dask), for NumPy inputs."""
    return _apply_kernel(X, fn, params.translated(-origin), origin, nan_policy)
