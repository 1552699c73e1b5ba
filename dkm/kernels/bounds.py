"""Hamerly's bounds for k-means, kept per chunk between the passes of one fit.

Lloyd's E-step searches every centre for every row. After the first passes most rows
keep their centre, and the triangle inequality says which: if a row's distance to its
centre (at most ``u``) stays below its distance to every other centre (at least ``l``)
after the centres moved by ``δ_j``, i.e. ``u + δ_a < l − max_{j≠a} δ_j``, its label
cannot have changed (Hamerly, "Making k-means even faster", SDM 2010). Those rows skip
the GEMM and the argmin; the others get the exact distance to their centre (a tighter
``u``) and, if still unsettled, a full search. The statistics are then accumulated over
every row by the same compiled pass as without bounds, so they are the same bits.

Rounding: the labels the engine must reproduce are those of the float GEMM and argmin
(:func:`dkm.kernels.expectation.nearest`), which may differ from the exact nearest centre
when two centres are within rounding of each other. A row is therefore settled only when
``u² + margin < l²``, where the margin, at least ``scale · (‖x‖² + max ‖c‖²)`` with
``scale = 8 (d + 2) ε`` of the compute dtype, is four times the worst-case error of the
GEMM's squared distances; the computed lower bounds are lowered by the same margin.

State: per chunk and per model, the labels (int32), ``u`` and ``l`` (float64): 20 bytes
a row, in the process that ran the chunk's task (a Dask worker, or the client
under the threaded scheduler), in a cache bounded in bytes (:data:`CACHE_BYTES`, and a
sixteenth of a Dask worker's memory limit). A chunk whose task runs elsewhere, or whose
bounds were evicted, is searched in full and its bounds are built again: the bounds
speed passes up, they are never needed for a result. Bounds refer to the centres they
were computed against (kept with them), so any later centres can use them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]

#: The centres that moved most: a row's lower bound for them comes from how far they
#: are from its own centre, and the others' drift, usually far smaller, moves its bound
#: for the rest (Hamerly's single bound decays by the largest drift of all, and in the
#: first passes a few centres move far).
MOVERS = 8

#: A chunk's bounds are dropped for the rest of the fit when a pass after the first
#: TRIAL_PASSES that used them still searched more than this share of its rows: so few
#: settled rows do not pay for keeping bounds, which costs a runner-up in every full
#: search (a longer argmin scan). The shares on KM-2: ``benchmarks/README.md``.
GIVE_UP = 0.8
TRIAL_PASSES = 2

#: Bytes of bounds one process keeps (``DKM_BOUNDS_BYTES`` overrides it): 256 MiB holds
#: ~9.6M rows, e.g. every chunk of 2M rows for four models at once.
CACHE_BYTES = int(os.environ.get("DKM_BOUNDS_BYTES", 256 << 20))


def margin_scale(d: int, dtype: np.dtype[Any]) -> float:
    """``scale`` of the rounding margin ``scale · (‖x‖² + max ‖c‖²)`` (squared units)."""
    return float(8 * (d + 2) * np.finfo(dtype).eps)


def margin_c2(c2max: float, dtype: np.dtype[Any]) -> float:
    """``max ‖c‖²`` as the margin uses it: at least ``tiny / (3 ε)``, so that the margin
    is at least ``8 (d + 2) · tiny`` (the smallest normal number). Among subnormal
    numbers a rounding error is absolute (up to their spacing), not relative: data
    around 1e-22 in float32 would otherwise leave ties to the bounds."""
    info = np.finfo(dtype)
    return max(c2max, float(info.tiny) / (3.0 * float(info.eps)))


@dataclass(eq=False)
class Bounds:
    """One chunk's bounds for one model: valid for ``centres`` (the compute dtype).

    ``off``: the bounds settled too few rows to pay for themselves (more than
    :data:`GIVE_UP` of the rows searched in a pass after :data:`TRIAL_PASSES` passes);
    the entry only remembers that, and the chunk's later passes of this fit search
    every row without keeping bounds.
    """

    centres: NDArray[Any]
    labels: NDArray[np.int32]
    upper: F64
    lower: F64
    #: passes that used these bounds
    passes: int = 0
    #: rows searched in full in the last of those passes (diagnostics, tests)
    searched: int = 0
    off: bool = False

    @classmethod
    def empty(cls, n: int, centres: NDArray[Any]) -> Bounds:
        return cls(centres.copy(), np.empty(n, np.int32), np.empty(n), np.empty(n))

    def give_up(self) -> Bounds:
        """The ``off`` marker that replaces these bounds."""
        return Bounds(self.centres[:0], self.labels[:0], self.upper[:0], self.lower[:0],
                      self.passes, self.searched, True)  # fmt: skip

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.centres, self.labels, self.upper, self.lower))

    def fits(self, n: int, centres: NDArray[Any]) -> bool:
        return self.off or (
            self.labels.shape[0] == n
            and self.centres.shape == centres.shape
            and self.centres.dtype == centres.dtype
        )

    def drift(self, centres: NDArray[Any]) -> Drift:
        """How the centres moved since these bounds, and how far apart they are now."""
        return Drift.between(self.centres, centres)


@dataclass(frozen=True)
class Drift:
    """What :func:`dkm.kernels._fused.filter_bounds` needs of the centres' move."""

    #: (k,) how far each centre moved (float64)
    moved: F64
    #: (k,) for each label a, ``max_{j≠a}`` of ``moved``
    other: F64
    #: the largest move outside the :data:`MOVERS` centres that moved most
    rest: float
    #: (k,) for each label a, ``min_{j≠a} ‖c_j − c_a‖`` (inf for k = 1)
    near: F64
    #: (k,) the same over the :data:`MOVERS` only
    near_movers: F64

    @classmethod
    def between(cls, old: NDArray[Any], new: NDArray[Any]) -> Drift:
        """Memoised per process: every chunk of a pass asks with the same centres."""
        digest = hashlib.blake2b(digest_size=16)
        for a in (old, new):
            digest.update(repr((a.shape, a.dtype.str)).encode())
            digest.update(np.ascontiguousarray(a).data)
        key = digest.digest()
        with _DRIFTS_LOCK:
            found = _DRIFTS.get(key)
        if found is None:
            found = cls._between(old, new)
            with _DRIFTS_LOCK:
                _DRIFTS[key] = found
                while len(_DRIFTS) > 8:
                    _DRIFTS.popitem(last=False)
        return found

    @classmethod
    def _between(cls, old: NDArray[Any], new: NDArray[Any]) -> Drift:
        C = new.astype(np.float64)
        moved = np.sqrt(((C - old.astype(np.float64)) ** 2).sum(axis=1))
        k, d = C.shape
        order = np.argsort(-moved, kind="stable")
        other = np.full_like(moved, moved[order[0]])
        other[order[0]] = moved[order[1]] if k > 1 else 0.0
        movers = order[: min(MOVERS, k - 1)]
        rest = float(moved[order[movers.shape[0]]]) if k > 1 else 0.0
        c2 = (C * C).sum(axis=1)

        def apart(rows: NDArray[Any], cols: NDArray[Any]) -> F64:
            """``‖c_i − c_j‖`` less its rounding (a lower bound), inf where i = j."""
            sums = c2[rows, None] + c2[None, cols]
            sq = sums - 2.0 * (C[rows] @ C[cols].T)
            dist = np.sqrt(np.maximum(sq, 0.0)) - np.sqrt(64 * (d + 2) * _EPS64 * sums)
            dist = np.maximum(dist, 0.0)
            dist[rows[:, None] == cols[None, :]] = np.inf
            return dist

        everyone = np.arange(k)
        near_movers = apart(everyone, movers).min(axis=1) if movers.size else np.full(k, np.inf)
        if k <= NEAR_LIMIT:  # k × k distances, in blocks of bounded size
            step = max(1, (1 << 20) // k)
            near = np.concatenate(
                [apart(everyone[i : i + step], everyone).min(axis=1) for i in range(0, k, step)]
            )
        else:  # k² d flops in every pass would cost more than the bound saves
            near = np.full(k, -np.inf)
        return cls(moved, other, rest, near, near_movers)


_EPS64 = float(np.finfo(np.float64).eps)

#: Above this many centres the bound through the nearest other centre is left out.
NEAR_LIMIT = 4096

_DRIFTS: OrderedDict[bytes, Drift] = OrderedDict()
_DRIFTS_LOCK = threading.Lock()


#: A fit starts keeping bounds after an M-step in which the centres beyond the
#: :data:`MOVERS` moved at most this fraction of the typical distance between a centre
#: and its nearest neighbour (``worth_keeping``). Building bounds makes a pass dearer
#: (the runner-up in the argmin scan) and they settle few rows while most centres
#: still travel. The ratios on KM-1 and KM-2 behind the value: ``benchmarks/README.md``.
#: A warm start qualifies after one pass.
START_RATIO = 0.15

#: Centres sampled for the typical nearest-neighbour distance when k is larger.
NEAR_SAMPLE = 512


def worth_keeping(old: NDArray[Any], new: NDArray[Any]) -> bool:
    """Whether bounds would pay from the next pass on, judging by the last M-step's move
    from the centres ``old`` to ``new`` (see :data:`START_RATIO`)."""
    k = new.shape[0]
    if k < 2:
        return True
    C = np.asarray(new, np.float64)
    moved = np.sqrt(((C - np.asarray(old, np.float64)) ** 2).sum(axis=1))
    rest = float(np.sort(moved)[::-1][MOVERS]) if k > MOVERS else 0.0
    S = C[:NEAR_SAMPLE]
    c2 = (C * C).sum(axis=1)
    apart = c2[: len(S), None] + c2[None, :] - 2.0 * (S @ C.T)
    apart[np.arange(len(S)), np.arange(len(S))] = np.inf
    near = np.sqrt(np.maximum(apart.min(axis=1), 0.0))
    return rest <= START_RATIO * float(np.median(near))


def _capacity() -> int:
    """:data:`CACHE_BYTES`, at most a sixteenth of a Dask worker's memory limit: bounds
    are unmanaged memory that the worker's memory monitor counts against its spill and
    pause thresholds."""
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        return CACHE_BYTES
    return min(CACHE_BYTES, limit // 16) if limit else CACHE_BYTES


class BoundsCache:
    """Bounds by key ``(fit, model, chunk)``, least recently used first out.

    :meth:`take` removes the entry it returns, and :meth:`put` stores it again once the
    pass has updated it: two tasks never share one entry, and a task that fails half-way
    leaves nothing stale behind. A new entry evicts those of other fits, oldest first,
    but never one of its own fit (a fit larger than the cache keeps bounds for the
    chunks that fitted, rather than evicting them all in turn).
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[Hashable, ...], Bounds] = OrderedDict()
        #: bytes of each entry when it was stored, of all of them, and of each fit's
        self._sizes: dict[tuple[Hashable, ...], int] = {}
        self._used = 0
        self._by_fit: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        #: fits released lately: a task still running when its fit failed must not
        #: store bounds after the release
        self._released: deque[Hashable] = deque(maxlen=256)

    def take(self, key: tuple[Hashable, ...], n: int, centres: NDArray[Any]) -> Bounds | None:
        with self._lock:
            bounds = self._pop(key)
        return bounds if bounds is not None and bounds.fits(n, centres) else None

    def put(self, key: tuple[Hashable, ...], bounds: Bounds, capacity: int | None = None) -> bool:
        """Keep ``bounds``; False if they do not fit beside this fit's other entries."""
        capacity = _capacity() if capacity is None else capacity
        with self._lock:
            if key[0] in self._released:
                return False
            self._pop(key)
            nbytes = bounds.nbytes
            if self._used + nbytes > capacity:
                for other in [k for k in self._entries if k[0] != key[0]]:
                    self._pop(other)
                    if self._used + nbytes <= capacity:
                        break
            if self._used + nbytes > capacity:
                return False
            self._entries[key] = bounds
            self._sizes[key] = nbytes
            self._used += nbytes
            self._by_fit[key[0]] = self._by_fit.get(key[0], 0) + nbytes
            return True

    def _pop(self, key: tuple[Hashable, ...]) -> Bounds | None:
        """Remove the entry under ``key`` and its bytes from the totals (lock held)."""
        bounds = self._entries.pop(key, None)
        if bounds is not None:
            nbytes = self._sizes.pop(key)
            self._used -= nbytes
            left = self._by_fit.pop(key[0]) - nbytes
            if left:
                self._by_fit[key[0]] = left
        return bounds

    def has_room(
        self, key: tuple[Hashable, ...], n: int, centres: NDArray[Any], capacity: int | None = None
    ) -> bool:
        """Whether bounds for ``n`` rows under ``key`` would be kept: beside this fit's
        other entries (other fits' give way). A chunk that would not be kept builds none:
        building makes the pass dearer for nothing (out of core, where most chunks do not
        fit; ``benchmarks/README.md``)."""
        capacity = _capacity() if capacity is None else capacity
        nbytes = centres.nbytes + 20 * n
        with self._lock:
            own = self._by_fit.get(key[0], 0)
        return own + nbytes <= capacity

    def peek(self, key: tuple[Hashable, ...]) -> Bounds | None:
        """The entry under ``key``, left in place (diagnostics and tests)."""
        with self._lock:
            return self._entries.get(key)

    def fits_held(self) -> set[Hashable]:
        """The fits that have entries here."""
        with self._lock:
            return {key[0] for key in self._entries}

    def release(self, fit: Hashable) -> None:
        """Drop every entry of ``fit`` (the fit ended), and refuse its later ones."""
        with self._lock:
            self._released.append(fit)
            for key in [k for k in self._entries if k[0] == fit]:
                self._pop(key)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._used


#: The process's bounds (a Dask worker's, or the client's under the threaded scheduler).
CACHE = BoundsCache()
