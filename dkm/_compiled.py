"""Compiled loops below the kernels' layer: numba's ``njit`` as dkm uses it, and the data
summary's per-feature moments (:class:`dkm.stats.DataSummary`), which the statistics
layer computes and may not take from :mod:`dkm.kernels`.

Compiled on first call (per process); with ``cache=True`` the machine code is stored
beside this file (``__pycache__``) or, where that is read-only, in numba's user-wide
cache directory (see :mod:`dkm.kernels._fused`).
"""

from __future__ import annotations

import math
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


# ----------------------------------------------------------------------- data summary
# The first pass's per-feature moments (dkm.stats.DataSummary), read straight from the
# chunk in its own dtype: no float64 copy, no temporaries. The sums are NumPy's for rows
# whose features are the inner axis (``X.sum(axis=0)`` of such an array adds the rows in
# order, one running float64 sum per column, from −0.0), so a one-chunk summary's mean
# is scikit-learn's ``X.mean(axis=0)`` bit for bit, and its variance ``np.var``'s.
# No fastmath: reassociation would change the order of the additions.


@_jit
def column_sums(X: Any, scale: float, s: Any, amax: Any) -> None:
    """Per column ``f``: ``s[f] += scale·x_if`` for the rows in order (float64) and
    ``amax[f] = max(amax[f], |x_if|)`` in X's dtype.

    A NaN or ±inf in a column leaves ``s[f]`` non-finite, and so do finite values whose
    sum overflows (``scale``, a power of two, keeps that sum in range).
    """
    n, d = X.shape
    for i in range(n):
        for f in range(d):
            x = X[i, f]
            a = abs(x)
            if a > amax[f]:
                amax[f] = a
            s[f] += np.float64(x) * scale


@_jit
def centred_square_sums(X: Any, mean: Any, s: Any) -> None:
    """Per column ``f``: ``s[f] += (x_if − mean[f])²`` for the rows in order, the
    difference taken in float64."""
    n, d = X.shape
    for i in range(n):
        for f in range(d):
            dx = np.float64(X[i, f]) - mean[f]
            s[f] += dx * dx


# ------------------------------------------------------------------------ exact sums
# The per-element arithmetic of dkm.exact.ExactSum (its docstring has the grid), for
# finite values and K = 3 bins: the same integers and the same rounding as its NumPy
# code, one element at a time with no temporaries (on a (k, d, d) array of full
# moments at d = 784 the NumPy code's temporaries made the exact sums most of a pass).
# Every function leaves non-finite values to the NumPy code.

#: an element holding only zeros (dkm.exact._NONE)
EXACT_NONE = -64
#: bits per bin (dkm.exact.W), a compile-time constant of the loops: a division by it is
#: a multiplication, not an integer division (~40 cycles) per element
EXACT_W = 40


#: 2^s for s in [−EXACT_HALF, EXACT_HALF] (normal numbers): x·2^s as two exact products
EXACT_HALF = 560
EXACT_POW2 = np.ldexp(1.0, np.arange(-EXACT_HALF, EXACT_HALF + 1))


@_jit(inline="always")
def _exact_level(x: float, bits: int) -> int:
    """p with ``2^p ≤ |x| < 2^(p+1)`` for finite x ≠ 0, from its exponent bits (frexp's
    exponent less one; subnormals by frexp)."""
    e = (bits >> 52) & 0x7FF
    if e == 0:
        return math.frexp(x)[1] - 1
    return e - 1023


@_jit
def exact_deposit(X: Any, Xbits: Any, pow2: Any, top: Any, bins: Any) -> None:
    """``ExactSum.of(X).total()`` of finite float64 ``X`` (P, N) (``Xbits``: its bits,
    ``X.view(np.int64)``; ``pow2``: :data:`EXACT_POW2`): ``top`` (N,) int16 and ``bins``
    (3, N) int64, out. A deposit at level t has the digits ``floor(y)``,
    ``floor((y − d0)·2^w)``, … of ``y = x·2^(−tw)`` (two exact products by powers of
    two: |y| is in [1, 2^w)); a total at level T adds digit j of a deposit at level t to
    bin ``j + T − t`` (those below bin 2 dropped)."""
    P, N = X.shape
    w = EXACT_W
    half = (pow2.shape[0] - 1) // 2
    scale = 2.0**w
    for i in range(N):
        T = EXACT_NONE
        for p in range(P):
            x = X[p, i]
            if x != 0.0:
                T = max(T, _exact_level(x, Xbits[p, i]) // w)
        top[i] = T
        b0 = np.int64(0)
        b1 = np.int64(0)
        b2 = np.int64(0)
        for p in range(P):
            x = X[p, i]
            if x == 0.0:
                continue
            t = _exact_level(x, Xbits[p, i]) // w
            s = T - t
            if s >= 3:
                continue
            e = -t * w
            e1 = e // 2
            y = (x * pow2[half + e1]) * pow2[half + e - e1]
            d0 = math.floor(y)
            y = (y - d0) * scale
            d1 = math.floor(y)
            y = (y - d1) * scale
            d2 = math.floor(y)
            if s == 0:
                b0 += d0
                b1 += d1
                b2 += d2
            elif s == 1:
                b1 += d0
                b2 += d1
            else:
                b2 += d0
        bins[0, i] = b0
        bins[1, i] = b1
        bins[2, i] = b2


@_jit
def exact_merge(top_a: Any, bins_a: Any, top_b: Any, bins_b: Any, top: Any, bins: Any) -> None:
    """``ExactSum.sum_of([a, b])`` of finite sums (flat, N elements): the higher level,
    each side's bins moved down to it (those below bin 2 dropped), added."""
    N = top_a.shape[0]
    for i in range(N):
        ta = np.int64(top_a[i])
        tb = np.int64(top_b[i])
        T = max(ta, tb)
        top[i] = T
        sa = T - ta
        sb = T - tb
        for j in range(3):
            v = np.int64(0)
            if j >= sa:
                v += bins_a[j - sa, i]
            if j >= sb:
                v += bins_b[j - sb, i]
            bins[j, i] = v


@_jit
def exact_to_float(top: Any, bins: Any, out: Any) -> None:
    """``ExactSum.to_float`` of finite sums (flat, N elements): each rounded to nearest
    float64 (ties to even) once. The bins are carried into four limbs of w bits of the
    magnitude (``base``: the lowest bin's weight), then the bits above the result's last
    place are taken and rounded by the bit below it and the sticky bits under that."""
    N = top.shape[0]
    w = EXACT_W
    mask = np.int64((1 << w) - 1)
    wu = np.uint64(w)
    one = np.uint64(1)
    limbs = np.zeros(7, np.int64)
    lower = np.zeros(5, np.bool_)
    for i in range(N):
        b0 = bins[0, i]
        b1 = bins[1, i]
        b2 = bins[2, i]
        c0 = b2 & mask
        carry = b2 >> w
        t = b1 + carry
        c1 = t & mask
        carry = t >> w
        t = b0 + carry
        c2 = t & mask
        c3 = t >> w
        negative = c3 < 0
        if negative:
            n0 = -c0
            limbs[0] = n0 & mask
            carry = n0 >> w
            n1 = carry - c1
            limbs[1] = n1 & mask
            carry = n1 >> w
            n2 = carry - c2
            limbs[2] = n2 & mask
            carry = n2 >> w
            limbs[3] = carry - c3
        else:
            limbs[0] = c0
            limbs[1] = c1
            limbs[2] = c2
            limbs[3] = c3
        if limbs[0] == 0 and limbs[1] == 0 and limbs[2] == 0 and limbs[3] == 0:
            out[i] = 0.0
            continue
        base = (int(top[i]) - 2) * w
        h = 3 if limbs[3] != 0 else (2 if limbs[2] != 0 else (1 if limbs[1] != 0 else 0))
        n_bits = w * h + math.frexp(np.float64(limbs[h]))[1]
        q = max(n_bits - 1 + base - 52, -1074)
        sh = q - base
        if sh <= 0:  # nothing below the last place: the magnitude is below 2^53
            small = np.float64(np.uint64(limbs[0]) + (np.uint64(limbs[1]) << wu))
            mag = math.ldexp(small, base)
        else:
            i0 = min(max(sh // w, 0), 4)
            r0 = np.uint64(sh % w)
            g0 = np.uint64(limbs[i0])
            g1 = np.uint64(limbs[i0 + 1])
            g2 = np.uint64(limbs[i0 + 2])
            R = (g0 >> r0) + (g1 << (wu - r0)) + (g2 << min(np.uint64(2) * wu - r0, np.uint64(63)))
            below = max(sh - 1, 0)
            j = min(max(below // w, 0), 4)
            k = np.uint64(below % w)
            at = np.uint64(limbs[j])
            round_bit = (at >> k) & one
            lower[0] = False
            for m in range(4):
                lower[m + 1] = lower[m] or limbs[m] != 0
            sticky = (at & ((one << k) - one)) != 0 or lower[j]
            up = round_bit == one and (sticky or (R & one) == one)
            mag = math.ldexp(np.float64(R + (one if up else np.uint64(0))), q)
        out[i] = -mag if negative else mag


# ------------------------------------------------------------- symmetric moments
# Full and tied second moments (dkm.stats.symmetric): (m, d, d) stacks of symmetric
# matrices, kept as their lower triangles (``np.tril_indices(d)``'s order: row by row,
# each row's columns up to the diagonal).


@_jit
def mirror_lower(A: Any) -> None:
    """Each matrix's upper triangle set to its lower one, in place."""
    m, d, _ = A.shape
    for t in range(m):
        for i in range(d):
            for j in range(i):
                A[t, j, i] = A[t, i, j]


@_jit
def lower_triangles(A: Any, out: Any) -> None:
    """``out[t] = A[t][np.tril_indices(d)]``; out (m, d(d+1)/2)."""
    m, d, _ = A.shape
    for t in range(m):
        at = 0
        for i in range(d):
            for j in range(i + 1):
                out[t, at] = A[t, i, j]
                at += 1


@_jit
def from_lower_triangles(tri: Any, out: Any) -> None:
    """The symmetric matrices (m, d, d) whose lower triangles are ``tri``."""
    m, d, _ = out.shape
    for t in range(m):
        at = 0
        for i in range(d):
            for j in range(i + 1):
                v = tri[t, at]
                out[t, i, j] = v
                out[t, j, i] = v
                at += 1
