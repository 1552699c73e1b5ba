"""The data of a fit: points partitioned by rows, their weights and centring origin, and
the checks of non-finite rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import dask.array as da
import numpy as np
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
