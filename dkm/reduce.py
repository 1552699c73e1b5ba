"""Tree reductions of per-chunk summaries on Dask, in a fixed order.

The tree is explicit: level by level, consecutive groups of ``split_every`` keys are
merged left to right, so the floating-point order of the sums depends only on the
chunking and the fan-in, never on which task finished first or on which worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dask.delayed import Delayed, delayed

from dkm.errors import InvalidDataError
from dkm.stats import merge_all

T = TypeVar("T")


def _merge_delayed(group: list[Delayed], key: tuple[str, int, int]) -> Delayed:
    return delayed(merge_all, pure=True)(group, dask_key_name=key)


def tree_top(
    parts: Sequence[T],
    split_every: int,
    name: str,
    merge: Callable[[list[T], tuple[str, int, int]], T] = _merge_delayed,  # type: ignore[assignment]
) -> list[T]:
    """A tree of fan-in ``split_every`` over ``parts``, without its root: the at most
    ``split_every`` partial merges (or the parts themselves, if that few) whose
    left-to-right merge (:func:`dkm.stats.merge_all`, where they are gathered) is the
    total. Keys ``(name, level, j)``.

    ``parts`` are ``Delayed`` by default; ``merge(group, key)`` makes the node that
    merges ``group`` under ``key`` (graph keys of a hand-built graph, for instance).
    ``name`` should be unique per reduction (carry a token); its prefix (before the
    token) is what the Dask dashboard shows, e.g. ``dkm-merge``.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    if not parts:
        raise InvalidDataError("nothing to reduce: the data has no chunks")
    level = 0
    current: list[Any] = list(parts)
    while len(current) > split_every:
        current = [
            merge(current[i : i + split_every], (name, level, i // split_every))
            for i in range(0, len(current), split_every)
        ]
        level += 1
    return current
