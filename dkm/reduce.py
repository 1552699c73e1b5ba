"""Tree reductions of per-chunk summaries on Dask, in a fixed order.

The tree is explicit: level by level, consecutive groups of ``split_every`` keys are
merged left to right, so the floating-point order of the sums depends only on the
chunking and the fan-in, never on which task finished first or on which worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dask.delayed import Delayed, delayed

from dkm.stats import merge_all


def tree_top(parts: Sequence[Delayed], split_every: int, name: str) -> list[Delayed]:
    """A tree of fan-in ``split_every`` over ``parts``, without its root: the at most
    ``split_every`` partial merges (or the parts themselves, if that few) whose
    left-to-right merge (:func:`dkm.stats.merge_all`, where they are gathered) is the
    total. Keys ``(name, level, j)``.

    ``name`` should be unique per reduction (carry a token); its prefix (before the
    token) is what the Dask dashboard shows, e.g. ``dkm-merge``.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    if not parts:
        raise ValueError("nothing to reduce: the data has no chunks")
    level = 0
    current: list[Any] = list(parts)
    while len(current) > split_every:
        current = [
            delayed(merge_all, pure=True)(
                current[i : i + split_every], dask_key_name=(name, level, i // split_every)
            )
            for i in range(0, len(current), split_every)
        ]
        level += 1
    return current
