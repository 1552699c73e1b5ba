"""Compiled loops below the kernels' layer: numba's ``njit`` as dkm uses it, and the data
summary's per-feature moments (:class:`dkm.stats.DataSummary`), which the statistics
layer computes and may not take from :mod:`dkm.kernels`.

Compiled on first call (per process); with ``cache=True`` the machine code is stored
beside this file (``__pycache__``) or, where that is read-only, in numba's user-wide
cache directory (see :mod:`dkm.kernels._fused`).
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
