"""The data of a fit: points partitioned by rows, their weights and centring origin, and
the checks of non-finite rows.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import dask.array as da
import numpy as np
from dask.sizeof import sizeof
from numpy.typing import NDArray

from dkm._typing import parse_nan_policy
from dkm.errors import InvalidDataError, UserError

F64 = NDArray[np.float64]


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

    @cached_property
    def runs(self) -> list[range]:
        """Consecutive row chunks a pass gives its chunk function as one block: chunks
        are joined until a run holds :data:`RUN_BYTES` of X; a chunk that large alone
        is a run of its own. Fixed by the chunking alone (never by the workers), so
        that a pass's sums do not depend on where it runs."""
        row_bytes = self.n_features * self.X.dtype.itemsize
        runs, start, size = [], 0, 0
        for i, rows in enumerate(self.X.chunks[0]):
            nbytes = rows * row_bytes
            if size and nbytes >= RUN_BYTES:
                runs.append(range(start, i))
                start, size = i, 0
            size += nbytes
            if size >= RUN_BYTES:
                runs.append(range(start, i + 1))
                start, size = i + 1, 0
        if start < len(self.X.chunks[0]):
            runs.append(range(start, len(self.X.chunks[0])))
        return runs

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

    def pass_plans(self, groups: list[list[int]]) -> PassPlans:
        """The tasks of a pass that runs ``groups`` (lists of chunk indices), one task
        each: kept for the last grouping asked (the same groups every pass)."""
        cached = self.__dict__.get("_plans")
        if cached is not None and cached.groups == groups:
            return cached
        ends = {run[-1] for run in self.runs}
        plans = PassPlans.build(self.block_graph, self._blocks, groups, ends)
        self.__dict__["_plans"] = plans  # frozen: as cached_property
        return plans

    def range_groups(self, n_tasks: int) -> list[list[int]]:
        """The chunks in at most ``n_tasks`` contiguous ranges of nearly equal numbers
        of :attr:`runs`."""
        runs = self.runs
        n = len(runs)
        bounds = np.linspace(0, n, min(max(1, n_tasks), n) + 1).round().astype(int).tolist()
        return [list(range(runs[a][0], runs[b - 1][-1] + 1)) for a, b in itertools.pairwise(bounds)]

    def worker_groups(self, client: Any) -> list[list[int]] | None:
        """Blocks of X by the worker thread that should run them; None unless every
        block of X is persisted on ``client``'s cluster.

        Each of :attr:`runs` goes to one worker (:func:`place_runs`: the one holding
        most of it, within a fair share of the cluster's threads), and its blocks that
        worker lacks are moved there once (:func:`dkm.engine._dask.move_blocks`): a run
        is joined into one block where it runs, so a run spread over workers would
        otherwise be fetched by its task in every pass, and its copies dropped again by
        the scheduler's memory manager between passes. A worker's runs are dealt
        round-robin over its threads.

        Asking the scheduler takes two round trips, so the answer is kept for
        :data:`GROUPS_MAX_AGE` seconds, and asked again at once when a block's future is
        no longer finished (its worker died: the scheduler tells the client without
        being asked; the blocks recomputed elsewhere are moved to their runs again). A
        worker that joins is seen within that age and given its share. The groups only
        say where tasks should run: a stale answer can cost a transfer, never a
        different result.
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
        # the weights' blocks go with the points' when they are persisted too
        persisted = self.block_futures()
        companions = [
            [wb.key] if wb is not None and wb.key in persisted else [] for _, wb, _ in self._blocks
        ]
        asked = time.monotonic()
        groups = self._ask_worker_groups(
            client, keys, futures, self.runs, list(self.X.chunks[0]), companions
        )
        self.__dict__["_groups"] = (client.id, asked, futures, groups)  # frozen: as cached_property
        return groups

    @staticmethod
    def _ask_worker_groups(
        client: Any,
        keys: list[Any],
        futures: list[Any],
        runs: list[range],
        sizes: list[int],
        companions: list[list[Any]],
    ) -> list[list[int]] | None:
        from dkm.engine import _dask

        who_has = client.who_has([*futures, *(k for c in companions for k in c)])
        threads = client.nthreads()
        if any(not who_has.get(key) for key in keys) or not threads:
            return None
        placed = place_runs(runs, [set(who_has[key]) for key in keys], sizes, threads)
        moves = [
            (key, who_has[key][0], worker)
            for worker, members in placed.items()
            for r in members
            for i in runs[r]
            for key in (keys[i], *companions[i])
            if who_has.get(key) and worker not in who_has[key]
        ]
        if moves:
            _dask.move_blocks(client, moves)
        groups = []
        for worker, members in placed.items():
            n = max(1, min(threads[worker], len(members)))
            groups += [[i for r in members[t::n] for i in runs[r]] for t in range(n)]
        return groups

    def block_bundles(self, client: Any, plans: PassPlans) -> list[Any] | None:
        """One :class:`BlockBundle` future per task of ``plans`` (the persisted blocks
        its plan receives, in ``plan.inputs`` order), so that a pass's task depends on
        one key instead of one per block; None unless every input of every plan is a
        block persisted on ``client``'s cluster.

        Made once per grouping by one small task each, run on the worker holding most
        of the group's blocks (any other if that one is gone), and kept until another
        grouping is asked, :meth:`release_bundles` or this object goes away. A worker
        that dies loses its bundles: the scheduler computes them again from the blocks
        (and the blocks from their lineage) as it does any lost key the client holds.
        """
        cached = self.__dict__.get("_bundles")
        if cached is not None:
            client_id, token, futures = cached
            if client_id == client.id and token == plans.token:
                return futures
            self.release_bundles()
        persisted = self.block_futures()
        if not all(k in persisted for plan in plans.plans for k in plan.inputs):
            return None
        from dask.base import tokenize

        # named by the blocks and the grouping: datasets over the same blocks share them
        name = f"dkm-blocks-{tokenize(plans.token, [plan.inputs for plan in plans.plans])}"
        who_has = client.who_has(list(persisted.values()))
        futures = []
        for g, plan in enumerate(plans.plans):
            held = _holders(who_has.get(k, ()) for k in plan.inputs)
            # on the worker holding most of its blocks (the group's, by design)
            workers = [max(held, key=held.__getitem__)] if held else None
            args = [persisted[k] for k in plan.inputs]
            key = f"{name}-{g}"
            futures.append(
                client.submit(
                    _bundle, *args, key=key, workers=workers, allow_other_workers=bool(workers)
                )
            )
        self.__dict__["_bundles"] = (client.id, plans.token, futures)  # frozen: as cached_property
        return futures

    def release_bundles(self) -> None:
        """Release the futures of :meth:`block_bundles` (the blocks stay persisted)."""
        cached = self.__dict__.pop("_bundles", None)
        if cached is not None:
            for future in cached[2]:
                future.release()

    def block_futures(self) -> dict[Any, Any]:
        """The futures of the blocks of X and the weights persisted on a distributed
        cluster, by key (none when they are not)."""
        from distributed import futures_of

        keys = {b.key for xb, wb, _ in self._blocks for b in (xb, wb) if b is not None}
        held = [self.X] if self.weights is None else [self.X, self.weights]
        return {f.key: f for f in futures_of(held) if f.key in keys}

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


def _holders(who_has: Iterable[Sequence[str]]) -> Counter[str]:
    """How many of the blocks whose holders are ``who_has`` each worker holds: every
    copy counts (a block a pass fetched is on two workers, either listed first)."""
    return Counter(w for holders in who_has for w in holders)


@dataclass(frozen=True, eq=False)
class BlockBundle:
    """The persisted blocks one task of a pass receives (``values``, in its plan's
    ``inputs`` order): references to the worker's arrays, not copies.

    :func:`dask.sizeof.sizeof` counts it as :data:`BUNDLE_NBYTES`: its arrays are
    counted already, as the blocks' own keys, and counting them twice would make the
    worker spill. If the worker spills a block all the same (memory short of the
    persisted data), the bundle keeps the array alive, so spilling it frees nothing
    until the bundle is released (another grouping, the fit's end): persisted blocks
    are data held in memory by choice, read in every pass; data larger than the
    workers' memory is read from its store inside the pass's tasks, without bundles.
    A bundle sent to another worker (a stolen task) or spilled to disk carries its
    arrays.
    """

    values: tuple[Any, ...]


#: What :func:`dask.sizeof.sizeof` says a :class:`BlockBundle` holds.
BUNDLE_NBYTES = 1024


def _bundle(*values: Any) -> BlockBundle:
    return BlockBundle(values)


@sizeof.register(BlockBundle)
def _sizeof_bundle(bundle: BlockBundle) -> int:
    return BUNDLE_NBYTES


#: A chunk in a :class:`ChunkPlan`: (steps, X key, weights key, row offset, keys to
#: drop after its run, whether it ends a run).
PlannedChunk = tuple[tuple[tuple[Any, Any], ...], Any, Any, int, tuple[Any, ...], bool]


class ChunkPlan:
    """The row chunks one task of a pass runs, in order, and how it gets their blocks.

    ``inputs`` are keys of the pass's graph whose values the task receives (blocks
    persisted on a cluster, what several tasks' reads share); ``chunks`` holds, per
    chunk, the steps that compute its blocks inside the task (graph nodes, each run on
    the values computed so far), the keys of its X and weight blocks, its row offset,
    the keys no later chunk of the task needs (dropped after its run), and whether it
    ends a run (:attr:`ChunkedData.runs`: one run's blocks in memory at a time).
    Pickled once: a pass on a cluster sends the same bytes every time.
    """

    __slots__ = ("_pickled", "chunks", "inputs")

    def __init__(self, inputs: tuple[Any, ...], chunks: tuple[PlannedChunk, ...]) -> None:
        self.inputs = inputs
        self.chunks = chunks
        self._pickled: bytes | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        import cloudpickle

        pickled = self._pickled
        if pickled is None:
            pickled = bytes(cloudpickle.dumps((self.inputs, self.chunks)))
            if len(pickled) <= PLAN_PICKLE_KEPT:  # not a copy of the data (blocks inline)
                self._pickled = pickled
        return (_load_plan, (pickled,))


def _load_plan(pickled: bytes) -> ChunkPlan:
    import pickle

    return ChunkPlan(*pickle.loads(pickled))


@dataclass(frozen=True, eq=False)
class PassPlans:
    """A pass's chunks by task: ``plans[g]`` runs the chunks ``groups[g]``; ``graph``
    holds the blocks' graph nodes that tasks receive as inputs rather than run
    themselves (shared by several tasks' reads); ``token`` names the grouping."""

    groups: list[list[int]]
    plans: tuple[ChunkPlan, ...]
    graph: dict[Any, Any]
    token: str

    @classmethod
    def build(
        cls,
        block_graph: dict[Any, Any],
        blocks: list[tuple[Any, Any, int]],
        groups: list[list[int]],
        run_ends: set[int],
    ) -> PassPlans:
        """Each block's ancestry in ``block_graph`` is computed inside the one task that
        needs it; a key several tasks need, or one not in the graph (persisted), is an
        input of the tasks. ``run_ends``: the chunks that end a run (groups hold whole
        runs)."""
        from dask.base import tokenize

        from dkm.engine import _dask

        deps = {k: _dask.dependencies(v) for k, v in block_graph.items()}
        fusable = all(d is not None for d in deps.values())
        block_keys = [tuple(b.key for b in (xb, wb) if b is not None) for xb, wb, _ in blocks]
        owners: dict[Any, set[int]] = {}
        for g, members in enumerate(groups):
            stack = [k for i in members for k in block_keys[i]]
            while stack:
                key = stack.pop()
                seen = owners.setdefault(key, set())
                if g in seen:
                    continue
                seen.add(g)
                stack.extend(deps.get(key) or ())

        def private(key: Any) -> bool:
            return fusable and key in block_graph and len(owners[key]) == 1

        plans = []
        for members in groups:
            inputs: dict[Any, None] = {}
            done: set[Any] = set()
            per_chunk = [
                _steps(block_keys[i], deps, block_graph, private, done, inputs) for i in members
            ]
            # a key is dropped after the last chunk of the task that uses it
            last: dict[Any, int] = {}
            for j, i in enumerate(members):
                stack = list(block_keys[i])
                while stack:
                    key = stack.pop()
                    if key in inputs or last.get(key) == j:
                        continue
                    last[key] = j
                    stack.extend(deps[key] or ())
            release: list[list[Any]] = [[] for _ in members]
            for key, j in last.items():
                release[j].append(key)
            chunks = tuple(
                (
                    tuple(per_chunk[j]),
                    blocks[i][0].key,
                    None if blocks[i][1] is None else blocks[i][1].key,
                    blocks[i][2],
                    tuple(release[j]),
                    i in run_ends,
                )
                for j, i in enumerate(members)
            )
            plans.append(ChunkPlan(tuple(inputs), chunks))
        shared = {k: v for k, v in block_graph.items() if not private(k) and k in owners}
        return cls(groups, tuple(plans), shared, tokenize(groups))


def _steps(
    roots: tuple[Any, ...],
    deps: dict[Any, frozenset[Any] | None],
    graph: dict[Any, Any],
    private: Callable[[Any], bool],
    done: set[Any],
    inputs: dict[Any, None],
) -> list[tuple[Any, Any]]:
    """The nodes computing ``roots`` not ``done`` yet, dependencies first (marked done);
    keys that are not ``private`` are added to ``inputs`` instead."""
    steps: list[tuple[Any, Any]] = []
    stack: list[tuple[Any, bool]] = [(k, False) for k in reversed(roots)]
    while stack:
        key, ready = stack.pop()
        if ready:
            steps.append((key, graph[key]))
            continue
        if key in done:
            continue
        done.add(key)
        if not private(key):
            inputs[key] = None
            continue
        stack.append((key, True))
        stack.extend((dep, False) for dep in deps[key] or ())
    return steps


#: Largest pickled :class:`ChunkPlan` kept for the next pass; larger ones hold blocks
#: (data in the graph itself) and are pickled again rather than held twice.
PLAN_PICKLE_KEPT = 16 << 20

#: Bytes of X up to which consecutive row chunks are joined into one run
#: (:attr:`ChunkedData.runs`): each call of a chunk function costs tens of
#: microseconds besides its rows, which small chunks would otherwise pay each.
RUN_BYTES = 4 << 20


def place_runs(
    runs: list[range],
    holders: list[set[str]],
    sizes: list[int],
    threads: dict[str, int],
    slack: float = 1.1,
) -> dict[str, list[int]]:
    """Indices of ``runs`` by the worker that should run them, in order.

    ``holders[i]`` are the workers holding chunk ``i`` (every copy counts), ``sizes[i]``
    its rows; ``threads`` the cluster's workers and their threads. A run goes to the
    worker holding most of its rows whose load stays within its cap: ``slack`` times its
    fair share (its threads' fraction of all rows), or its share plus the largest run if
    that is more. Some worker is always below its share, so some worker can always take
    the run, and every worker ends within its cap. Then no thread is left without a run
    while another worker has more runs than threads. Runs held most wholly by one worker
    are placed first; a placement this function made (every run on one worker, within
    the caps) is therefore kept as it is when asked again: blocks move once, not back
    and forth. Deterministic: the same answer for the same inputs.
    """
    total = sum(sizes)
    all_threads = sum(threads.values())
    run_sizes = [sum(sizes[i] for i in run) for run in runs]
    largest = max(run_sizes, default=0)
    cap = {
        w: max(slack * total * t / all_threads, total * t / all_threads + largest)
        for w, t in threads.items()
    }
    load = dict.fromkeys(threads, 0)
    held: list[Counter[str]] = []
    for run in runs:
        counter: Counter[str] = Counter()
        for i in run:
            for w in holders[i]:
                if w in threads:
                    counter[w] += sizes[i]
        held.append(counter)

    def wholeness(r: int) -> tuple[float, int]:
        most = max(held[r].values(), default=0)
        return (-most / max(run_sizes[r], 1), r)

    placed: dict[str, list[int]] = {w: [] for w in sorted(threads)}
    for r in sorted(range(len(runs)), key=wholeness):
        size = run_sizes[r]
        # the run's holders first (a few workers, not all of them for each run)
        ranked = sorted(held[r], key=lambda w: (-held[r][w], load[w] / threads[w], w))
        worker = next((w for w in ranked if load[w] + size <= cap[w]), None)
        if worker is None:
            others = [w for w in threads if w not in held[r] and load[w] + size <= cap[w]]
            worker = min(others or threads, key=lambda w: (load[w] / threads[w], w))
        placed[worker].append(r)
        load[worker] += size
    # no thread idle while another worker has more runs than threads: that worker's
    # smallest run goes to a worker short of runs, within its cap
    while True:
        spare = [w for w in placed if len(placed[w]) > threads[w]]
        if not spare:
            break
        giver = max(spare, key=lambda w: (load[w] / threads[w], w))
        r = min(placed[giver], key=lambda r: (run_sizes[r], r))
        short = [
            w for w in placed if len(placed[w]) < threads[w] and load[w] + run_sizes[r] <= cap[w]
        ]
        if not short:
            break
        taker = min(short, key=lambda w: (len(placed[w]) / threads[w], -held[r][w], w))
        placed[giver].remove(r)
        placed[taker].append(r)
        load[giver] -= run_sizes[r]
        load[taker] += run_sizes[r]
    return {w: sorted(members) for w, members in placed.items() if members}


#: Seconds a dataset's :meth:`ChunkedData.worker_groups` answer is used before the
#: scheduler is asked again (at once if a block's future is no longer finished).
GROUPS_MAX_AGE = 2.0

#: What to do about NaN/inf rows, said by the errors of ``nan_policy="raise"``.
DROP_REMEDY = "drop them with nan_policy='drop'"
LABEL_REMEDY = "label them -1 with nan_policy='drop'"
#: Rows a per-chunk error names at most.
NAMED_ROWS = 5


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


def nonfinite_rows(X: NDArray[Any]) -> NDArray[np.bool_] | None:
    """Mask of the rows holding NaN or infinity; None when there are none.

    A finite sum proves every value finite without a mask as large as ``X``; only a
    chunk whose sum is not finite (bad values, or an overflow) is checked row by row.
    """
    if X.size == 0 or np.isfinite(X.sum()):
        return None
    bad = ~np.isfinite(X).all(axis=1)
    return bad if bad.any() else None


def without_nonfinite(
    X: NDArray[Any], w: NDArray[Any] | None, origin: F64
) -> tuple[NDArray[Any], NDArray[Any] | None, NDArray[np.bool_] | None]:
    """Rows with NaN/inf moved to the origin with zero weight (nan_policy: drop).

    Every statistic is weighted, so such a row contributes nothing, and the global row
    indices of all other rows are unchanged. Returns the rows' mask too (None: none).
    """
    bad = nonfinite_rows(X)
    if bad is None:
        return X, w, None
    X = np.where(bad[:, None], origin.astype(X.dtype), X)
    w = np.where(bad, 0.0, np.ones(X.shape[0]) if w is None else w)
    return X, w, bad
