"""Compiled (numba) row passes of the k-means E-step: argmin, objective and sums fused.

The distances to all centres still come from one BLAS GEMM per row block
(``G = X @ (−2C)ᵀ``, in X's dtype); what NumPy cannot fuse is everything after it:
adding ``‖c_k‖²``, the argmin over the k columns, the exact distance to the chosen
centre, the sums ``nk`` and ``Σ w x`` per centre, and the farthest-point candidates.
:func:`kmeans_rows` does all of that in one pass over the rows, reading each row of X
and of G once, with float32 kept as float32 and float64 used only for the accumulators
(the distance to the chosen centre is taken in float64 from the exact differences).

Ties: the label is the *lowest* index among the centres with the smallest
``G[i, j] + ‖c_j‖²`` (a strict ``<`` scan in column order, what ``np.argmin`` and
scikit-learn's Lloyd loop do), so the labels are those of
:func:`dkm.kernels.expectation.nearest` bit for bit.

The functions are compiled on first call (per process) for float32 and float64 rows;
with ``cache=True`` the machine code is stored beside this file (``__pycache__``) or,
where that is read-only, in numba's user-wide cache directory, and later processes load
it instead of compiling. If no cache location is writable, they compile every time.
The functions release the GIL, so Dask's threaded scheduler runs chunks in parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numba
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


def _jit(fn: F | None = None, **options: Any) -> Any:
    """``numba.njit(nogil=True, cache=True, **options)``; uncached if nowhere to cache."""

    def wrap(fn: F) -> F:
        try:
            return numba.njit(nogil=True, cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function …: no locator available"
            return numba.njit(nogil=True, **options)(fn)

    return wrap if fn is None else wrap(fn)


@_jit
def _worse(d1: float, r1: int, d2: float, r2: int) -> bool:
    """Candidate 1 ranks below candidate 2: smaller distance, or a tie and a later row."""
    return d1 < d2 or (d1 == d2 and r1 > r2)


@_jit
def _heap_offer(
    heap_d: Any, heap_r: Any, heap_l: Any, heap_n: Any, dist: float, row: int, label: int
) -> None:
    """Offer one candidate to a bounded min-heap of the farthest points (root: the worst)."""
    m = heap_d.shape[0]
    n = heap_n[0]
    if n < m:  # not full: insert and sift up
        pos = n
        heap_n[0] = n + 1
        while pos > 0:
            parent = (pos - 1) >> 1
            if _worse(dist, row, heap_d[parent], heap_r[parent]):
                heap_d[pos] = heap_d[parent]
                heap_r[pos] = heap_r[parent]
                heap_l[pos] = heap_l[parent]
                pos = parent
            else:
                break
    elif _worse(heap_d[0], heap_r[0], dist, row):  # beats the worst kept: replace the root
        pos = 0
        while True:
            child = 2 * pos + 1
            if child >= m:
                break
            if child + 1 < m and _worse(
                heap_d[child + 1], heap_r[child + 1], heap_d[child], heap_r[child]
            ):
                child += 1
            if _worse(heap_d[child], heap_r[child], dist, row):
                heap_d[pos] = heap_d[child]
                heap_r[pos] = heap_r[child]
                heap_l[pos] = heap_l[child]
                pos = child
            else:
                break
    else:
        return
    heap_d[pos] = dist
    heap_r[pos] = row
    heap_l[pos] = label


@_jit
def nearest_rows(G: Any, c2: Any, labels: Any) -> None:
    """``labels[i] = argmin_j G[i, j] + c2[j]`` (lowest index on ties), in G's dtype.

    Four rows are scanned together: a single row's scan is a chain of dependent
    compare-and-selects, four independent chains keep the core busy (~1.5× faster).
    """
    n, k = G.shape
    n4 = n - n % 4
    for i in range(0, n4, 4):
        c = c2[0]
        b0, b1, b2, b3 = G[i, 0] + c, G[i + 1, 0] + c, G[i + 2, 0] + c, G[i + 3, 0] + c
        l0 = l1 = l2 = l3 = 0
        for j in range(1, k):
            c = c2[j]
            v0, v1, v2, v3 = G[i, j] + c, G[i + 1, j] + c, G[i + 2, j] + c, G[i + 3, j] + c
            if v0 < b0:
                b0, l0 = v0, j
            if v1 < b1:
                b1, l1 = v1, j
            if v2 < b2:
                b2, l2 = v2, j
            if v3 < b3:
                b3, l3 = v3, j
        labels[i], labels[i + 1], labels[i + 2], labels[i + 3] = l0, l1, l2, l3
    for i in range(n4, n):
        best = G[i, 0] + c2[0]
        lab = 0
        for j in range(1, k):
            v = G[i, j] + c2[j]
            if v < best:
                best, lab = v, j
        labels[i] = lab


#: ``reassoc`` lets LLVM vectorise the float64 sum of squared differences per row (its
#: order is then the SIMD lanes', not left to right); it cannot change a single addition,
#: comparison or the labels, which :func:`nearest_rows` computes without it.
_REASSOC = {"reassoc", "nsz"}


@_jit(fastmath=_REASSOC)
def kmeans_rows(
    X: Any,
    G: Any,
    c2: Any,
    C: Any,
    w: Any,
    row_offset: int,
    labels: Any,
    nk: Any,
    s1: Any,
    objective: Any,
    heap_d: Any,
    heap_r: Any,
    heap_l: Any,
    heap_n: Any,
) -> None:
    """One fused pass over a row block; accumulates into the output arrays in place.

    Parameters
    ----------
    X : (n, d) rows, float32 or float64, C-contiguous.
    G : (n, k) ``X @ (−2C)ᵀ`` in X's dtype.
    c2 : (k,) ``‖c_k‖²`` in X's dtype.
    C : (k, d) the centres in X's dtype.
    w : (n,) float64 sample weights (≥ 0).
    row_offset : global index of the block's first row.
    labels : (n,) int64, out: index of the nearest centre (lowest index on ties).
    nk : (k,) float64, += ``Σ w`` per centre.
    s1 : (k, d) float64, += ``Σ w x`` per centre.
    objective : (1,) float64, += ``Σ w ‖x − c_label‖²`` (differences taken in float64).
    heap_d, heap_r, heap_l : (m,) float64, int64, int64: the farthest rows of positive
        weight so far (squared distance, global row, label) as a min-heap; m may be 0.
    heap_n : (1,) int64, number of entries in the heap.
    """
    n, d = X.shape
    m = heap_d.shape[0]
    nearest_rows(G, c2, labels)  # G was just written by the GEMM: still in cache
    total = 0.0
    for i in range(n):
        lab = labels[i]
        wi = w[i]
        dist = 0.0
        for f in range(d):
            xf = np.float64(X[i, f])
            diff = xf - np.float64(C[lab, f])
            dist += diff * diff
            s1[lab, f] += wi * xf
        nk[lab] += wi
        total += wi * dist
        if m > 0 and wi > 0.0 and (heap_n[0] < m or dist >= heap_d[0]):
            _heap_offer(heap_d, heap_r, heap_l, heap_n, dist, row_offset + i, lab)
    objective[0] += total
