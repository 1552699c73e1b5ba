"""EM passes pipelined on a distributed cluster: the M-step runs in the next pass's tasks.

A pass done one at a time (:func:`dkm.engine.stats_pass_many`) costs a round trip per
iteration that the workers sit out: the client asks the scheduler where the blocks
are, sends the pass's graph, waits for the statistics to come back through the
scheduler, and runs the M-step before the next pass can start (on a two-worker
LocalCluster, KM-1 in 16 chunks: ~35 ms of a ~250 ms iteration). Here the next pass's
tasks take the previous pass's per-block statistics as their inputs, and each runs the
M-step itself (a few milliseconds) before its E-step: the scheduler starts them as
soon as the last block of the previous pass is done. The client keeps one pass in
flight ahead of the one it is reading: while the workers run pass ``j + 1`` it
gathers pass ``j``'s statistics, runs the same M-step (the one it reports, checks for
convergence and hands to the callback) and submits pass ``j + 2``.

The client learns that a model stopped one pass late, so every model runs one more
pass than it iterates:

* k-means needs that pass anyway: it is the final pass (the inertia of the final
  centres), so nothing is wasted;
* a Gaussian mixture that converged does not: the extra pass is cancelled once the
  client knows, and a worker's M-step that fails there (a degenerate component, say)
  only leaves that model's state as it was; the client raises the error if the model
  was still iterating.

The results are the same bits as the one-at-a-time passes': the same blocks run the
same E-step, their statistics are merged in the same tree order
(:func:`dkm.engine.merge_grouped`), and every M-step is :func:`dkm.engine.mstep` on
the same totals. (Workers on different CPUs or libraries could round a Gaussian
mixture's M-step differently from each other and from the client, by an ulp; k-means's
is elementwise and exact.)
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple

from dask._task_spec import DataNode, Task, TaskRef, Tuple
from distributed.metrics import context_meter

from dkm.engine import (
    Callback,
    ChunkedData,
    EMOptions,
    PassJob,
    PassOptions,
    StackedStats,
    _estep_chunk_many,
    _estep_chunks,
    _ref,
    _Run,
    apply_mstep,
    merge_grouped,
    mstep,
)
from dkm.kernels.params import MixtureParams

#: The label under which the group tasks meter the M-step they run (seconds).
MSTEP_METRIC = "m-step"


class Seed(NamedTuple):
    """A model's state as a pass searches with it: its (centred) parameters and its
    lower bound (the previous M-step's; -inf before the first)."""

    params: MixtureParams
    lower_bound: float


#: What a group task returns: the states its models searched with, and the statistics
#: of each of its blocks (``grouped[j]`` for block ``group[j]``).
GroupResult = tuple[tuple[Seed, ...], tuple[StackedStats, ...]]


def _next_states(
    previous: Sequence[GroupResult],
    layout: tuple[tuple[int, ...], ...],
    positions: tuple[int, ...],
    options: EMOptions,
    tol: float,
) -> tuple[Seed, ...]:
    """The M-step of the previous pass, for the models at ``positions`` of it: its
    totals, merged in the tree's order, then :func:`dkm.engine.mstep` from the states
    the pass searched with. A model whose M-step raises keeps its state: the client,
    which runs the same M-step, raises the error if the model was still iterating."""
    before = previous[0][0]
    totals = merge_grouped(layout, [stats for _, stats in previous], options.split_every)
    states = []
    for i in positions:
        state = before[i]
        try:
            step = mstep(state.params, state.lower_bound, totals[i], options, tol)
        except Exception:  # the client's own M-step raises it
            states.append(state)
        else:
            states.append(Seed(step.params, step.lower_bound))
    return tuple(states)


def _estep_group(
    seeds: tuple[Seed, ...] | None,
    previous: tuple[GroupResult, ...] | None,
    layout: tuple[tuple[int, ...], ...],
    positions: tuple[int, ...],
    options: EMOptions,
    tol: float,
    pass_options: tuple[PassOptions, ...],
    offsets: tuple[int, ...],
    *blocks: Any,
    origin: Any,
    drop_nonfinite: bool,
) -> GroupResult:
    """One worker thread's blocks for every model of a pass (a task): from ``seeds``
    (the first pass) or from the previous pass's group results, whose M-step every
    group task of this pass runs for itself (a few milliseconds, against a round trip
    through the scheduler to fetch it from one task)."""
    if seeds is None:
        assert previous is not None
        # metered apart from the E-step (the dashboard's fine performance metrics): what
        # the task spends outside the chunk kernels
        with context_meter.meter(MSTEP_METRIC):
            seeds = _next_states(previous, layout, positions, options, tol)
    kmeans = options.is_kmeans
    jobs = tuple(
        (s.params, None if kmeans else s.params.means, o)
        for s, o in zip(seeds, pass_options, strict=True)
    )
    estep = partial(_estep_chunk_many, jobs=jobs, origin=origin)
    return seeds, _estep_chunks(estep, offsets, *blocks, drop_nonfinite=drop_nonfinite)


@dataclass(eq=False)
class _Pass:
    runs: list[_Run]
    keys: list[Any]
    futures: list[Any]
    layout: tuple[tuple[int, ...], ...]


def fit_pipelined(
    client: Any,
    data: ChunkedData,
    runs: list[_Run],
    options: EMOptions,
    tol: float,
    job: Callable[[_Run], PassJob],
    callback: Callback | None,
) -> None:
    """Run every model of ``runs`` to convergence (or ``max_iter``) on ``client``,
    as :func:`dkm.engine._fit_serial` would, k-means's final pass included."""
    kmeans = options.is_kmeans
    fit = uuid.uuid4().hex
    passes: deque[_Pass] = deque()
    numbers = itertools.count()
    blocks = data.block_tasks()
    drop = data.nan_policy == "drop"

    def submit(members: list[_Run], source: _Pass | None) -> None:
        """The next pass for ``members``: from their states (the first pass), or from
        the group results of ``source``, a pass that ran every member."""
        groups = data.worker_groups(client)
        if groups is None:  # blocks lost and not yet recomputed: one task per block
            groups = [[i] for i in range(len(blocks))]
        name = f"{fit}-{next(numbers)}"
        graph = dict(data.block_graph)
        seeds: Any = None
        if source is None:
            # one key that the group tasks share, however large the models
            skey = f"dkm-seeds-{name}"
            graph[skey] = DataNode(skey, tuple(Seed(r.params, r.lower_bound) for r in members))
            seeds, previous = TaskRef(skey), None
            positions = tuple(range(len(members)))
            layout: tuple[tuple[int, ...], ...] = ()
        else:
            previous = Tuple(*(TaskRef(key) for key in source.keys))
            positions = tuple(source.runs.index(r) for r in members)
            layout = source.layout
        pass_options = tuple(job(r)[2] for r in members)
        keys = []
        for g, group in enumerate(groups):
            key = (f"dkm-estep-{name}", g)
            refs = [ref for i in group for ref in (TaskRef(blocks[i][0].key), _ref(blocks[i][1]))]
            graph[key] = Task(
                key,
                _estep_group,
                seeds,
                previous,
                layout,
                positions,
                options,
                tol,
                pass_options,
                tuple(blocks[i][2] for i in group),
                *refs,
                origin=data.origin,
                drop_nonfinite=drop,
            )
            keys.append(key)
        futures = client.get(graph, keys, sync=False)
        passes.append(_Pass(members, keys, futures, tuple(tuple(g) for g in groups)))

    def stopped(run: _Run) -> bool:
        return run.converged or run.n_iter >= options.max_iter

    try:
        t0 = time.perf_counter()
        submit(list(runs), None)
        while passes:
            head = passes[0]
            if len(passes) == 1:
                # the pass after this one, from this one's results: for each model still
                # iterating, its next iteration or (k-means) its final pass
                following = [
                    r
                    for r in head.runs
                    if not stopped(r) and (kmeans or r.n_iter + 1 < options.max_iter)
                ]
                if following:
                    submit(following, head)
            results: list[GroupResult] = client.gather(head.futures)
            passes.popleft()
            head.futures.clear()  # the next pass's tasks hold the results they still need
            totals = merge_grouped(
                head.layout, [stats for _, stats in results], options.split_every
            )
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            for run, stats in zip(head.runs, totals, strict=True):
                if not stopped(run):
                    step = mstep(run.params, run.lower_bound, stats, options, tol)
                    apply_mstep(run, step, options, data.origin, seconds, callback)
                elif kmeans:  # the pass after its last iteration: its final pass
                    run.final = replace(stats, farthest=None)
            if passes and not kmeans and all(stopped(r) for r in passes[0].runs):
                client.cancel(passes.popleft().futures)  # nothing left to learn from it
    finally:
        for p in passes:
            client.cancel(p.futures)
