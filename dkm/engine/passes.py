"""Passes over the data: a function per row chunk, merged by a fixed tree.

:func:`run_pass` is the one builder of a pass's graph: the E-step passes of the EM loop
(:func:`stats_pass_many`), the data summary (:func:`summarize`) and k-means‖'s sampling
passes (:mod:`dkm.kmeans_parallel`) are each a per-chunk function and what it needs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import dask
import dask.local
import dask.threaded
import numpy as np
from dask.base import get_scheduler, tokenize
from dask.system import CPU_COUNT
from numpy.typing import NDArray
from threadpoolctl import OpenBLASController, ThreadpoolController

from dkm._typing import Assignment, Moments
from dkm.engine import _dask
from dkm.engine import data as data_module
from dkm.engine._dask import Ref
from dkm.engine.data import (
    BlockBundle,
    ChunkedData,
    ChunkPlan,
    NonFiniteInputError,
    without_nonfinite,
)
from dkm.errors import InvalidDataError
from dkm.kernels import expectation as K
from dkm.kernels.params import MixtureParams
from dkm.reduce import tree_top
from dkm.stats import DataSummary, Mergeable, SuffStats, merge_all

F64 = NDArray[np.float64]
M = TypeVar("M", bound=Mergeable)

#: Largest total size of the copies of a pass's shared inputs (parameters, origin) that
#: its chunk tasks carry inline, one copy each; above it they are keys of the graph.
EMBED_PARAMS_BYTES = 8 << 20


# --------------------------------------------------------------------------- the builder


@dataclass(frozen=True)
class Shared:
    """An input every chunk task of a pass receives: ``value`` as the chunk function's
    argument ``keyword``; when it enters the graph as a key, the key is named
    ``prefix``-token (the name the Dask dashboard shows)."""

    keyword: str
    prefix: str
    value: Any


def run_pass(
    data: ChunkedData,
    chunk: Callable[..., M],
    *,
    name: str,
    token: str,
    split_every: int,
    shared: Sequence[Shared] = (),
    shared_nbytes: int = 0,
    held: list[Any] | None = None,
) -> M:
    """``chunk(X, w, row_offset=…, drop_nonfinite=…, **shared)`` on every row chunk of
    ``data``, merged into one total: one graph, run by the current scheduler (a
    distributed ``Client`` if one is the default, else Dask's configured or threaded
    scheduler).

    A pass is one task per worker thread, each running a group of chunks one after the
    other and merging their results where it runs: the client receives one result per
    task, never one per chunk. The groups are, on a distributed cluster holding every
    block of X in memory, the blocks each worker thread holds
    (:meth:`ChunkedData.worker_groups`); otherwise contiguous ranges of chunks, one per
    thread of the cluster or of the local scheduler, whose tasks compute their blocks
    themselves (the blocks' own graph, e.g. the reads from a store, runs inside the
    task, one block at a time: :class:`~dkm.engine.data.PassPlans`). A task of the
    former depends on one key standing for its persisted blocks
    (:meth:`ChunkedData.block_bundles`), not one per block: the scheduler's work per
    pass does not grow with the chunks. The client merges
    the tasks' results by a tree of fan-in ``split_every``. Keys are
    ``(name-token-grouping, g)``; ``token`` must name everything the pass computes.

    The graph is built by hand on top of the blocks' graph, planned once per dataset
    and grouping: ``dask.compute`` on ``Delayed`` objects would re-tokenise the inputs
    for every task and re-optimise the graph in every pass.

    ``shared`` inputs travel inside every task while all their copies together
    (``shared_nbytes`` each) stay under :data:`EMBED_PARAMS_BYTES`: a worker starts a
    task as soon as it receives it. Larger ones enter the graph once, as keys every
    task depends on, which each worker receives once per pass; but such a key is
    fetched from one worker by the others before their first task, which is why small
    inputs are embedded.

    ``held``: a loop of passes on a distributed client keeps each pass's result futures
    in this list until the next pass has been submitted, and releases them with
    :func:`release_held` when it ends (see :func:`_run_on_client`); None releases them
    at once.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    schedule = get_scheduler() or dask.threaded.get
    client = getattr(schedule, "__self__", None)
    on_client = is_client(client)
    groups = data.worker_groups(client) if on_client else None
    by_worker = groups is not None
    if groups is None:
        groups = data.range_groups(_cluster_threads(client) if on_client else _threads(schedule))
    plans = data.pass_plans(groups)
    bundles = data.block_bundles(client, plans) if by_worker else None
    if bundles is None:
        graph = _dask.base(plans.graph, data.block_futures)
    else:
        graph = _dask.base(plans.graph, lambda: {f.key: f for f in bundles})
    inputs: dict[str, Any] = {}
    if shared_nbytes * len(groups) <= EMBED_PARAMS_BYTES:
        fn: Callable[..., M] = partial(_run_chunks, chunk, **{s.keyword: s.value for s in shared})
    else:
        fn = partial(_run_chunks, chunk)
        for s in shared:
            shared_key = f"{s.prefix}-{token}"
            graph[shared_key] = _dask.data(shared_key, s.value)
            inputs[s.keyword] = Ref(shared_key)
    unbundled = partial(_unbundled, fn)
    # the grouping is part of the keys: a key never names two different tasks
    gtoken = f"{token}-{plans.token}"
    keys = []
    drop = data.nan_policy == "drop"
    for g, plan in enumerate(plans.plans):
        key = (f"{name}-{gtoken}", g)
        if bundles is None:
            refs = [Ref(k) for k in plan.inputs]
            graph[key] = _dask.task(key, fn, plan, *refs, drop_nonfinite=drop, **inputs)
        else:
            bundle = Ref(bundles[g].key)
            graph[key] = _dask.task(key, unbundled, plan, bundle, drop_nonfinite=drop, **inputs)
        keys.append(key)
    with _blas_limit(data.X.numblocks[0]):  # by chunks, as ever: the same BLAS, the same bits
        if on_client:
            parts = _run_on_client(client, graph, keys, gtoken, held)
        else:
            parts = schedule(graph, keys)
    return merge_all(tree_top(parts, split_every, "", lambda group, _key: merge_all(group)))


def _unbundled(fn: Callable[..., M], plan: ChunkPlan, bundle: BlockBundle, **kwargs: Any) -> M:
    """``fn(plan, *values)`` on the values of ``plan.inputs`` held by ``bundle``."""
    return fn(plan, *bundle.values, **kwargs)


def _run_chunks(chunk: Callable[..., M], plan: ChunkPlan, *values: Any, **kwargs: Any) -> M:
    """``chunk`` on each run of chunks of ``plan`` in turn (its blocks joined into one),
    merged left to right: one task's result. ``values`` are those of ``plan.inputs``."""
    cache = dict(zip(plan.inputs, values, strict=True))
    total: M | None = None
    xs: list[Any] = []
    ws: list[Any] = []
    done: list[Any] = []
    first = 0
    for steps, x_key, w_key, offset, release, run_end in plan.chunks:
        for key, node in steps:
            cache[key] = _dask.run_node(node, cache)
        if not xs:
            first = offset
        xs.append(cache[x_key])
        if w_key is not None:
            ws.append(cache[w_key])
        done += release
        if not run_end:
            continue
        X, w = joined(xs), (joined(ws) if ws else None)
        xs, ws = [], []
        for key in done:
            del cache[key]
        done = []
        part = chunk(X, w, row_offset=first, **kwargs)
        del X, w
        total = part if total is None else total.merge(part)
    assert total is not None and not xs  # a plan holds whole runs, at least one
    return total


def joined(blocks: list[NDArray[Any]]) -> NDArray[Any]:
    """Consecutive row blocks as one array: a read-only view when they lie one after
    the other in the same buffer (slices of one array), else a copy."""
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    if all(b.flags.c_contiguous and b.dtype == first.dtype for b in blocks) and all(
        b.shape[1:] == first.shape[1:] for b in blocks
    ):
        root = _root(first)
        end = first.__array_interface__["data"][0]
        for b in blocks:
            if b.__array_interface__["data"][0] != end or _root(b) is not root:
                break
            end += b.nbytes
        else:
            rows = sum(b.shape[0] for b in blocks)
            return np.lib.stride_tricks.as_strided(
                first, (rows, *first.shape[1:]), first.strides, writeable=False
            )
    return np.concatenate(blocks)


def _root(a: NDArray[Any]) -> Any:
    """The object that owns ``a``'s memory (the end of its chain of bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else a.base


def _threads(schedule: Callable[..., Any]) -> int:
    """Threads of the local scheduler ``schedule`` (the threaded pool's size unless it
    is the synchronous one)."""
    if schedule is dask.local.get_sync:
        return 1
    return int(dask.config.get("num_workers", None) or CPU_COUNT)


def _cluster_threads(client: Any) -> int:
    """Worker threads of ``client``'s cluster, asked at most once per
    :data:`~dkm.engine.data.GROUPS_MAX_AGE` seconds."""
    cached = _CLUSTER_THREADS.get(client.id)
    now = time.monotonic()
    if cached is not None and now - cached[0] < data_module.GROUPS_MAX_AGE:
        return cached[1]
    n = max(1, sum(client.nthreads().values()))
    _CLUSTER_THREADS[client.id] = (now, n)
    return n


_CLUSTER_THREADS: dict[str, tuple[float, int]] = {}


def is_client(obj: Any) -> bool:
    """Whether ``obj`` is a ``distributed.Client``."""
    from distributed import Client  # imported when a pass runs, not with dkm.engine

    return isinstance(obj, Client)


def _run_on_client(
    client: Any, graph: dict[Any, Any], keys: list[Any], token: str, held: list[Any] | None
) -> list[Any]:
    """``client.get(graph, keys)``, with the messages of consecutive passes in order.

    A client sends the scheduler its messages in batches at most one per 10 ms, and the
    scheduler its workers theirs one per 5 ms (``BatchedSend``, intervals fixed in
    distributed). ``client.get`` releases a pass's results as soon as it has them: that
    message, sent alone, starts the interval, so the next pass's graph, submitted a few
    milliseconds later, waits for the rest of it, and the scheduler's release of the
    results to the workers holds up the next pass's tasks in the same way. With
    ``held``, the previous pass's futures are dropped only after this pass is
    submitted. ``token`` must name the graph (:func:`dkm.engine._dask.submit`).
    """
    futures = _dask.submit(client, graph, keys, token)
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
    return one_blas_thread()


def one_blas_thread() -> AbstractContextManager[Any]:
    """BLAS on one thread in this process, within the ``with`` block: the process's one
    :class:`SharedBlasLimit`, so that limits entered by several threads (a pass's, the
    per-row outputs' tasks) overlap without one restoring BLAS's threads under another
    or leaving the limit behind."""
    return SHARED_BLAS_LIMIT


def _blas_controller() -> ThreadpoolController:
    """The process's thread pools, found again only when Python has imported modules
    since the last search: ``threadpool_limits`` searches the loaded libraries on every
    call (milliseconds), but a library imported later may bring a BLAS of its own (FAISS
    does), which a controller found before would leave unlimited."""
    n_modules = len(sys.modules)
    found = _CONTROLLER.get("blas")
    if found is None or found[0] != n_modules:
        found = (n_modules, ThreadpoolController())
        _CONTROLLER["blas"] = found
    return found[1]


_CONTROLLER: dict[str, tuple[int, ThreadpoolController]] = {}


class SharedBlasLimit:
    """One BLAS thread while anything that entered it is inside, in any thread.

    For tasks that Dask's threaded scheduler runs side by side (the per-row outputs,
    :mod:`dkm.engine.outputs`) and the client's own limits (:func:`one_blas_thread`):
    limits entered and left independently would race (one leaving restores BLAS's
    threads while another is inside, or restores the one it found, leaving it for good);
    this one is set by the first in and lifted by the last out, whichever threads those
    are, and may be entered again by a thread inside it.
    threadpoolctl lets one thread at a time set a pthreads OpenBLAS's threads (other
    threads' calls do nothing), so each change takes that control and gives it back
    (:func:`_set_blas_threads`). Under a ``distributed`` worker BLAS has one thread
    already.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: list[tuple[Any, int | None]] = []

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._saved = _set_blas_threads(1)
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                _restore_blas_threads(self._saved)
                self._saved = []


def _set_blas_threads(n: int) -> list[tuple[Any, int | None]]:
    """Every BLAS pool of this process to ``n`` threads, from whichever thread calls;
    returns each pool with the threads it had."""
    libs = _blas_controller().select(user_api="blas").lib_controllers
    saved = [(lib, lib.num_threads) for lib in libs]
    _restore_blas_threads([(lib, n) for lib in libs])
    return saved


def _restore_blas_threads(saved: list[tuple[Any, int | None]]) -> None:
    OpenBLASController.clear_controlling_thread(force=True)  # this thread may set them
    try:
        for lib, threads in saved:
            if threads is not None:
                lib.set_num_threads(threads)
    finally:
        OpenBLASController.clear_controlling_thread(force=True)


#: The process's BLAS limit (:class:`SharedBlasLimit`, :func:`one_blas_thread`).
SHARED_BLAS_LIMIT = SharedBlasLimit()


# --------------------------------------------------------------------------- E-step


@dataclass(frozen=True)
class PassOptions:
    """What one E-step pass computes."""

    assignment: Assignment
    moments: Moments
    n_farthest: int = 0
    #: k-means: ``(fit, model)`` under which the chunks' Hamerly bounds are kept between
    #: this fit's passes (:mod:`dkm.kernels.bounds`); None searches every row.
    bounds: tuple[str, int] | None = None


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
        X, w, _ = without_nonfinite(X, w, origin)
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
    model by model, so each model's totals are those of a pass for it alone. The
    parameters and the origin are the pass's shared inputs, and a pass on a cluster
    holding the data may run grouped (:func:`run_pass`; ``held`` as there).
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
    total = run_pass(
        data,
        _estep_chunk_many,
        name="dkm-estep",
        token=token,
        split_every=split_every,
        shared=(
            Shared("jobs", "dkm-params", tuple(jobs)),
            Shared("origin", "dkm-origin", data.origin),
        ),
        shared_nbytes=data.origin.nbytes + sum(_params_nbytes(p, s) for p, s, _ in jobs),
        held=held,
    )
    return list(total.parts)


def _params_nbytes(params: MixtureParams, shift: F64 | None) -> int:
    arrays = (params.means, params.weights, params.precisions_cholesky, shift)
    return sum(a.nbytes for a in arrays if a is not None)


# --------------------------------------------------------------------------- summary


def _summary_chunk(
    X: NDArray[Any],
    w: NDArray[Any] | None,
    row_offset: int,
    sample_size: int,
    seed: int,
    drop_nonfinite: bool = False,
    rows_rate: float = 0.0,
) -> DataSummary:
    weights = np.ones(X.shape[0]) if w is None else w
    return DataSummary.from_chunk(
        X, weights, row_offset, sample_size, seed, drop_nonfinite, rows_rate
    )


def summarize(
    data: ChunkedData,
    *,
    sample_size: int,
    seed: int,
    split_every: int = 8,
    rows_rate: float = 0.0,
) -> DataSummary:
    """One pass: counts, mean, variance, a weighted sample, and input checks; with
    ``rows_rate`` > 0, also the Bernoulli sample of rows at that rate
    (:class:`~dkm.stats.RowSample`, ``rows_sample``) that a sampled schedule iterates on.

    Raises ValueError naming the first offending row for non-finite values or
    negative/non-finite weights, and for data without positive total weight.
    """
    weights_name = None if data.weights is None else data.weights.name
    token = tokenize(data.X.name, weights_name, sample_size, seed, data.nan_policy, rows_rate)
    summary = run_pass(
        data,
        partial(_summary_chunk, sample_size=sample_size, seed=seed, rows_rate=rows_rate),
        name="dkm-summary",
        token=token,
        split_every=split_every,
    )
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
