"""Exact, order-independent sums of float64 arrays (binned integer accumulators).

An :class:`ExactSum` holds, for every element of an array, the sum of the values
deposited in it on a fixed global grid: bin ``b`` of the grid holds the bits of weight
``[2^(bW), 2^((b+1)W))``, ``W`` = :data:`W`. An element keeps ``K`` = :data:`K` bins:
its top level ``t`` (the level of the largest ``|value|`` deposited, never of the sum)
and ``K`` int64 bin sums, bin ``j`` at level ``t − j``. A value deposited at level ``t``
adds its integer part on the grid at level ``t`` (signed, ``|·| ≤ 2^W``) to bin 0 and its
base-``2^W`` digits at the levels below (truncation toward −∞, each in ``[0, 2^W)``) to
the other bins; what lies below level ``t − K + 1`` is dropped. Raising ``t`` by ``s``
moves the bins down by ``s`` and drops those that fall off; for every deposit whose bin 0
is still held, the value left is the deposit truncated toward −∞ at the new bottom level,
what depositing at the higher level would have given (a deposit wholly below the bottom
is dropped, i.e. truncated toward zero). Bins are never carried into each other, so each
bin is an exact int64 sum and the bins of a total are ``Σ shift(leaf bins, T − t_leaf)``
over its leaves, ``T`` their highest level, whatever the grouping (shifts compose and
distribute over the sum): merging is associative and commutative bit for bit. The
float64 value is the sum held rounded once, to nearest (ties to even), when it is read
(:meth:`ExactSum.to_float`).

Precision: with ``P`` the exponent of the largest ``|deposit|`` of an element
(``2^P ≤ max|x| < 2^(P+1)``), at least ``W(K − 1)`` = 80 bits below ``2^P`` are kept and
each deposit loses less than ``2^(P − 80)`` in magnitude; the exact sum ``S`` of ``n``
deposits and the value ``V`` read satisfy ``|V − S| ≤ ½ ulp(S) + n · 2^−80 · max|x|``.

Finite values go through compiled loops (:mod:`dkm._compiled`: the same integers and
the same rounding, element by element, without NumPy's temporaries); non-finite deposits
propagate as in IEEE arithmetic through the NumPy code below (see :meth:`ExactSum.of`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dkm import _compiled

#: bits per bin of the global grid
W = 40
#: bins kept per element (the compiled loops of :mod:`dkm._compiled` take three)
K = 3
assert W == _compiled.EXACT_W and K == 3, "dkm._compiled's exact sums take W and K"
#: deposits one accumulator can hold: each adds at most ``2^W`` in magnitude to each int64
#: bin, and reading carries between bins, so ``MAX_PARTS · (2^W + 1)`` must stay below 2^63
MAX_PARTS = 2 ** (63 - W) - 1

#: finite values through the compiled loops (False: the NumPy code alone, which the tests
#: compare them with bit for bit)
COMPILED = True

_MASK = np.int64(2**W - 1)
#: level of an element that holds only zeros: any merge moves its (zero) bins out
_NONE = np.int16(-64)
#: level of an element that holds a non-finite value; bin 0 holds which (bits of _INF_*)
_SPECIAL = np.int16(32767)
_POS_INF, _NEG_INF, _NAN = 1, 2, 4


@dataclass(frozen=True, eq=False)
class ExactSum:
    """The exact sum of ``parts`` deposits of float64 arrays of one shape.

    Attributes
    ----------
    top : level of each element (int16, ``shape``).
    bins : (K, *shape) int64 bin sums, bin ``j`` at level ``top − j``.
    parts : number of deposits summed (each at most :data:`MAX_PARTS`).
    special : whether some element holds a non-finite value.
    """

    top: NDArray[np.int16]
    bins: NDArray[np.int64]
    parts: int
    special: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.top.shape)

    @classmethod
    def zeros(cls, shape: int | tuple[int, ...]) -> ExactSum:
        """The identity of :meth:`merge` (no deposit)."""
        top = np.full(shape, _NONE, np.int16)
        return cls(top, np.zeros((K, *top.shape), np.int64), 0)

    @classmethod
    def of(cls, x: Any, exponent: Any = 0) -> ExactSum:
        """One deposit: ``x · 2^exponent`` elementwise, exactly (``exponent``: ints
        broadcast against ``x``; it may take the value outside float64's range).

        NaN and ±inf are kept as such: the element then reads as the IEEE sum of the
        non-finite values deposited in it (``inf + −inf`` is NaN).
        """
        x = np.asarray(x, np.float64)
        if np.ndim(exponent) == 0 and int(exponent) == 0:
            compiled = cls._compiled_total(x[None])
            if compiled is not None:
                return compiled
        finite = np.isfinite(x)
        special = not bool(finite.all())
        if special:
            code = np.where(np.isnan(x), _NAN, np.where(x > 0, _POS_INF, _NEG_INF))
            x = np.where(finite, x, 0.0)
        # x · 2^exponent = y · 2^(tW) with 1 ≤ |y| < 2^W: ldexp is exact, and so is every
        # step below (floors, differences of a float and its floor, scalings by 2^W)
        p = np.frexp(x)[1].astype(np.int64) + (np.asarray(exponent, np.int64) - 1)
        top = p // W
        y = np.ldexp(x, np.asarray(exponent, np.int64) - top * W)
        bins = np.empty((K, *x.shape), np.int64)
        for j in range(K):
            digit = np.floor(y)  # signed integer part at level top, then digits in [0, 2^W)
            bins[j] = digit
            if j + 1 < K:
                y = (y - digit) * 2.0**W
        top = np.where(x == 0, np.int64(_NONE), top)
        top16 = top.astype(np.int16)
        if special:
            top16 = np.where(finite, top16, _SPECIAL)
            bins[0] = np.where(finite, bins[0], code)
            bins[1:] = np.where(finite, bins[1:], 0)
        return cls(top16, bins, 1, special)

    @classmethod
    def total_of(cls, xs: Any) -> ExactSum:
        """The exact sum of the deposits ``xs[0], xs[1], …`` (``of(xs).total()``)."""
        xs = np.asarray(xs, np.float64)
        compiled = cls._compiled_total(xs)
        return cls.of(xs).total() if compiled is None else compiled

    @classmethod
    def _compiled_total(cls, xs: NDArray[np.float64]) -> ExactSum | None:
        """``of(xs).total()`` by :func:`dkm._compiled.exact_deposit`; None if some value
        is not finite (the NumPy code keeps those)."""
        _check_parts(xs.shape[0])
        if not COMPILED or not np.isfinite(xs).all():
            return None
        shape = xs.shape[1:]
        flat = np.ascontiguousarray(xs.reshape(xs.shape[0], -1))
        top = np.empty(flat.shape[1], np.int16)
        bins = np.empty((K, flat.shape[1]), np.int64)
        _compiled.exact_deposit(flat, flat.view(np.int64), _compiled.EXACT_POW2, top, bins)
        return cls(top.reshape(shape), bins.reshape((K, *shape)), xs.shape[0])

    def merge(self, other: ExactSum) -> ExactSum:
        """The exact sum of both (associative and commutative bit for bit)."""
        return ExactSum.sum_of([self, other])

    @staticmethod
    def sum_of(parts: Sequence[ExactSum]) -> ExactSum:
        """The exact sum of several accumulators of one shape (any order: the same bits)."""
        if not parts:
            raise ValueError("sum_of needs at least one accumulator")
        shape = parts[0].shape
        if any(p.shape != shape for p in parts):
            raise ValueError(f"cannot sum exact accumulators of shapes {[p.shape for p in parts]}")
        n = sum(p.parts for p in parts)
        _check_parts(n)
        if COMPILED and not any(p.special for p in parts):  # pairwise, compiled: same bits
            size = int(np.prod(shape, dtype=np.int64))
            top_a = np.ascontiguousarray(parts[0].top.reshape(size))
            bins_a = np.ascontiguousarray(parts[0].bins.reshape(K, size))
            for p in parts[1:]:
                top_m, bins_m = np.empty(size, np.int16), np.empty((K, size), np.int64)
                _compiled.exact_merge(
                    top_a,
                    bins_a,
                    np.ascontiguousarray(p.top.reshape(size)),
                    np.ascontiguousarray(p.bins.reshape(K, size)),
                    top_m,
                    bins_m,
                )
                top_a, bins_a = top_m, bins_m
            return ExactSum(top_a.reshape(shape), bins_a.reshape((K, *shape)), n)
        top = parts[0].top
        for p in parts[1:]:
            top = np.maximum(top, p.top)
        bins = np.zeros((K, *shape), np.int64)
        for p in parts:
            bins += _shifted(p.bins, top.astype(np.int64) - p.top)
        special = any(p.special for p in parts)
        if special:
            code = np.zeros(shape, np.int64)
            for p in parts:
                if p.special:
                    code |= np.where(p.top == _SPECIAL, p.bins[0], 0)
            is_special = top == _SPECIAL
            bins[0] = np.where(is_special, code, bins[0])
            bins[1:] = np.where(is_special, 0, bins[1:])
        return ExactSum(top, bins, n, special)

    def total(self) -> ExactSum:
        """The exact sum along the first axis, each slice one accumulator: ``of`` of a
        stack of arrays, then ``total``, is the ``sum_of`` of their ``of``, in one pass."""
        n = self.parts * self.top.shape[0]
        _check_parts(n)
        top = self.top.max(axis=0)
        shift = top - self.top  # (n, *shape), int16: levels lie in [-64, 32767]
        summed = np.zeros((K, *top.shape), np.int64)
        for s in range(K):  # deposits moved down s levels; K or more: nothing left
            moved = shift == s
            if moved.all():
                summed[s:] += self.bins[: K - s].sum(axis=1)
            elif moved.any():
                summed[s:] += np.where(moved, self.bins[: K - s], 0).sum(axis=1)
        if self.special:
            code = np.bitwise_or.reduce(np.where(self.top == _SPECIAL, self.bins[0], 0), axis=0)
            is_special = top == _SPECIAL
            summed[0] = np.where(is_special, code, summed[0])
            summed[1:] = np.where(is_special, 0, summed[1:])
        return ExactSum(top, summed, n, self.special)

    def to_float(self) -> NDArray[np.float64]:
        """The exact sums rounded to nearest float64 (ties to even), once."""
        if COMPILED and not self.special:
            size = self.top.size
            out = np.empty(size, np.float64)
            _compiled.exact_to_float(
                np.ascontiguousarray(self.top.reshape(size)),
                np.ascontiguousarray(self.bins.reshape(K, size)),
                out,
            )
            if np.isinf(out).any():  # finite sums past float64's range
                _overflow()
            return out.reshape(self.shape)
        acc = self
        if self.special:  # read apart, below
            finite = self.top != _SPECIAL
            acc = ExactSum(np.where(finite, self.top, _NONE), np.where(finite, self.bins, 0), 0)
        limbs, negative, base = acc._magnitude()
        nz = limbs != 0
        h = np.where(nz[3], 3, np.where(nz[2], 2, np.where(nz[1], 1, 0)))
        lead = np.take_along_axis(limbs, h[None], axis=0)[0]
        n_bits = W * h + np.frexp(lead.astype(np.float64))[1]  # bit length of the magnitude
        q = np.maximum(n_bits - 1 + base - 52, -1074)  # exponent of the result's last bit
        sh = q - base  # bits of the magnitude below it
        # exact when nothing is below it (then the magnitude is below 2^53: two limbs)
        small = (limbs[0].view(np.uint64) + (limbs[1].view(np.uint64) << np.uint64(W))).astype(
            np.float64
        )
        # otherwise the bits above, rounded by the bit below and the sticky bits under it
        pad = np.concatenate([limbs, np.zeros_like(limbs[:3])])
        i0 = np.clip(sh // W, 0, 4)[None]
        r0 = (sh % W).astype(np.uint64)
        g = [np.take_along_axis(pad, i0 + j, axis=0)[0].view(np.uint64) for j in range(3)]
        w = np.uint64(W)
        R = (g[0] >> r0) + (g[1] << (w - r0)) + (g[2] << np.minimum(2 * w - r0, np.uint64(63)))
        below = np.clip(sh - 1, 0, None)
        j = below // W
        k = (below % W).astype(np.uint64)
        at = np.take_along_axis(pad, np.clip(j, 0, 4)[None], axis=0)[0].view(np.uint64)
        round_bit = (at >> k) & np.uint64(1)
        lower = np.concatenate([np.zeros_like(nz[:1]), np.logical_or.accumulate(nz, axis=0)])
        sticky = ((at & ((np.uint64(1) << k) - np.uint64(1))) != 0) | np.take_along_axis(
            lower, np.clip(j, 0, 4)[None], axis=0
        )[0]
        up = (round_bit == 1) & (sticky | ((R & np.uint64(1)) == 1))
        rounded = (R + up.astype(np.uint64)).astype(np.float64)
        mag = np.ldexp(small, base, where=sh <= 0, out=np.zeros(small.shape))
        np.ldexp(rounded, q, where=sh > 0, out=mag)  # inf past float64's range, as IEEE sums
        out = np.where(nz.any(axis=0), np.where(negative, -mag, mag), 0.0)
        if self.special:
            out = np.where(self.top == _SPECIAL, _special_value(self.bins[0]), out)
        return np.asarray(out, np.float64)

    def to_fractions(self) -> list[Fraction | float]:
        """The exact sums, flattened: Fractions, or floats where non-finite."""
        tops = self.top.ravel().tolist()
        cols = [b.ravel().tolist() for b in self.bins]
        out: list[Fraction | float] = []
        for i, t in enumerate(tops):
            if t == _SPECIAL:
                out.append(float(_special_value(np.int64(cols[0][i]))))
                continue
            value = Fraction(0)
            for j in range(K):
                value += Fraction(cols[j][i]) * Fraction(2) ** ((t - j) * W)
            out.append(value)
        return out

    def _magnitude(self) -> tuple[NDArray[np.int64], NDArray[np.bool_], NDArray[np.int64]]:
        """(4, *shape) non-negative limbs of ``|sum| / 2^base`` (limb ``i`` of weight
        ``2^(iW)``, below ``2^W``), the sign, and ``base``, the weight of the lowest bin."""
        b0, b1, b2 = (self.bins[j] for j in range(K))
        c0, carry = b2 & _MASK, b2 >> W
        t = b1 + carry
        c1, carry = t & _MASK, t >> W
        t = b0 + carry
        c2, c3 = t & _MASK, t >> W
        negative = c3 < 0
        n0 = -c0
        d0, carry = n0 & _MASK, n0 >> W
        n1 = carry - c1
        d1, carry = n1 & _MASK, n1 >> W
        n2 = carry - c2
        d2, carry = n2 & _MASK, n2 >> W
        d3 = carry - c3
        limbs = np.where(negative, np.stack([d0, d1, d2, d3]), np.stack([c0, c1, c2, c3]))
        base = (self.top.astype(np.int64) - (K - 1)) * W
        return limbs, negative, base


def _overflow() -> None:
    """What NumPy's ``ldexp`` does under ``np.errstate`` when a read passes float64's
    range: nothing (``ignore``), a ``FloatingPointError`` (``raise``), else a
    ``RuntimeWarning``."""
    mode = np.geterr()["over"]
    if mode == "ignore":
        return
    message = "overflow encountered in to_float"
    if mode == "raise":
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_parts(n: int) -> None:
    if n > MAX_PARTS:
        raise OverflowError(
            f"an exact sum holds at most {MAX_PARTS} deposits and {n} were merged: "
            "use fewer, larger chunks"
        )


def _shifted(bins: NDArray[np.int64], shift: NDArray[np.int64]) -> NDArray[np.int64]:
    """Bins moved ``shift`` levels down (``shift ≥ 0``), those falling off dropped."""
    if not shift.any():
        return bins
    pad = np.concatenate([np.zeros_like(bins), bins])
    index = np.clip(np.arange(K).reshape((K,) + (1,) * shift.ndim) - shift + K, 0, 2 * K - 1)
    return np.take_along_axis(pad, index, axis=0)


def _special_value(code: NDArray[np.int64] | np.int64) -> NDArray[np.float64]:
    code = np.asarray(code)
    nan = ((code & _NAN) != 0) | ((code & (_POS_INF | _NEG_INF)) == (_POS_INF | _NEG_INF))
    return np.where(nan, np.nan, np.where((code & _POS_INF) != 0, np.inf, -np.inf))
