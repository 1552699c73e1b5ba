"""Compiled (numba) row passes of the E-step: what NumPy cannot fuse after the GEMMs.

k-means: the distances to all centres come from one BLAS GEMM per row block, centre-
major (``Gᵀ = (−2C) @ Xᵀ``, in X's dtype); :func:`nearest_cols` then adds ``‖c_k‖²``
and takes the argmin (every row of the block keeps its own running minimum while the
centres are scanned in order); rows of at most :data:`SMALL_D` features are searched by
:func:`nearest_rows` instead, one pass that never writes the distances out. Then
:func:`accumulate_rows` takes the exact distance to the
chosen centre, the sums ``nk`` and ``Σ w x`` per centre, and the farthest-point
candidates, with float32 kept as float32 and float64 used only for the accumulators
(the distance to the chosen centre is taken in float64 from the exact differences).
Between passes, Hamerly's bounds spare most rows the GEMM (:mod:`dkm.kernels.bounds`).

Ties: the label is the *lowest* index among the centres with the smallest
``G[i, j] + ‖c_j‖²`` (a strict ``<`` scan in centre order, what ``np.argmin`` and
scikit-learn's Lloyd loop do); above :data:`SMALL_D` features the labels are those of
:func:`dkm.kernels.expectation.nearest` bit for bit.

Mixtures: the log-density passes after the Mahalanobis GEMMs, the two halves of the
softmax around NumPy's ``exp``, and the per-row features of the moments GEMM.

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
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from dkm._compiled import _jit

F = TypeVar("F", bound=Callable[..., Any])


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
def nearest_cols(GT: Any, c2: Any, best: Any, labels: Any) -> None:
    """``labels[i] = argmin_j GT[j, i] + c2[j]`` (lowest index on ties), in GT's dtype.

    ``GT = (−2C) @ Xᵀ`` is centre-major, so the scan runs over centres in the outer
    loop and over the block's rows in the inner one: every row keeps its own running
    minimum (``best``, scratch of the block's length) and a strict ``<`` updates it,
    so the lowest index wins ties. The inner loop is contiguous and branch-free after
    if-conversion and vectorises, which a row-major block's scalar scan does not.
    ``labels`` should be int32: with float32 ``best`` the minimum and its index then
    fill SIMD lanes of the same width (int64 halves the index lanes). Figures:
    ``benchmarks/README.md``.
    """
    k, n = GT.shape
    c = c2[0]
    for i in range(n):
        best[i] = GT[0, i] + c
        labels[i] = 0
    for j in range(1, k):
        c = c2[j]
        for i in range(n):
            v = GT[j, i] + c
            if v < best[i]:
                best[i] = v
                labels[i] = j


# --------------------------------------------------------------------------- small d
# With few features the GEMM is memory-bound: it writes one distance per 2d flops and the
# argmin reads it back. For d <= SMALL_D the search is one compiled pass instead, with
# the distances kept in SIMD registers, as a GEMM micro-kernel would keep them: a tile
# of TILE rows (transposed, a few vectors of rows per feature, :func:`tile_plan`)
# against a few centres at a time, ``Σ_f (−2c_f)·x_f`` by fused multiply-adds in
# feature order, then ``+ ‖c‖²`` (the order of OpenBLAS's GEMM kernels and the scan
# after them, so float32 distances are the GEMM's bits in every case compared and
# float64 ones but for a few last bits at k = 1000; labels are scikit-learn's too,
# whose Lloyd step adds ‖c‖² by the GEMM's beta: iris's k-means++ fit took another
# label on a tie with ‖c‖² added first), then the running minimum, its index and (for
# the bounds) the runner-up, centre by centre in order, as vectors. numba's own loops
# do not keep a tile in registers (the row loop vectorises, but every centre then loads
# and stores the running minimum), so the tile is written as LLVM vector code (an
# ``intrinsic``); ``<16 x float>`` is one AVX-512 register, or two AVX2 ones, and how
# many centres a step takes depends on how many registers the CPU has (:func:`tile_plan`).
# Every row is computed by the same instructions wherever it sits (a tile's padding is
# zeros), so a row's label and distance are the same bits in a block, alone, or gathered.
# This pass against GEMM + scan, by d and k: ``benchmarks/README.md``.

#: Widest rows searched by the fused small-d pass; wider rows use the GEMM, which is as
#: fast from here on.
SMALL_D = 64

#: Rows per tile of the small-d pass (the transposed copy :func:`nearest_rows` fills).
TILE = 32

#: The register tile where the CPU has AVX-512 (32 vector registers of 64 bytes):
#: vectors of 16 lanes, 2 vectors of rows (the TILE) against 6 centres per step, 12
#: running sums in registers (the fastest of the tiles compared: ``benchmarks/README.md``).
AVX512_PLAN = (16, 2, 6)

#: The register tile elsewhere (16 vector registers of 32 bytes, AVX2), by the rows'
#: itemsize: 2 centres per step, as 6 spill the running sums (the AVX-512 plan against
#: these on an AVX2 CPU: ``benchmarks/README.md``).
AVX2_PLANS = {4: (16, 2, 2), 8: (8, 2, 2)}


def _has_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512F: the host's, unless
    ``NUMBA_CPU_NAME`` names another target (then its ``NUMBA_CPU_FEATURES`` tell)."""
    if getattr(numba.config, "CPU_NAME", None):  # set from the environment at import
        return "+avx512f" in (getattr(numba.config, "CPU_FEATURES", None) or "")
    try:
        import llvmlite.binding as ll

        return bool(ll.get_host_cpu_features().get("avx512f"))
    except RuntimeError:  # features unknown on this host: the narrower plan is safe
        return False


def tile_plan(itemsize: int) -> tuple[int, int, int]:
    """``(lanes, row vectors, centres per step)`` of the small-d pass for rows of
    ``itemsize`` bytes on the CPU numba compiles for. Any plan gives every row the same
    bits (each row's sum runs over the features in order, its minimum over the centres
    in order); the plan only decides how many of them stay in registers."""
    lanes, vectors, step = AVX512_PLAN if _has_avx512() else AVX2_PLANS[itemsize]
    assert TILE % (lanes * vectors) == 0
    return lanes, vectors, step


def _tile_search_typer(
    typingctx: Any, XT: Any, nC: Any, c2: Any, best: Any, second: Any, labels: Any, shape: Any
) -> Any:
    """One tile: ``XT`` (d, TILE) C-contiguous, ``nC = −2C`` (k, d) C-contiguous, ``c2``
    (k,); ``best``/``second`` (TILE,) of XT's dtype, ``labels`` (TILE,) int32, all
    scratch, start at (inf, inf, 0) and are updated in place. ``second`` None: no
    runner-up. ``shape``: a tuple of d elements (d as a compile-time constant)."""
    if not isinstance(shape, types.UniTuple):
        return None
    d = shape.count
    want_second = not isinstance(second, types.NoneType)
    sig = types.void(XT, nC, c2, best, second, labels, shape)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        xt_t, nc_t, c2_t, best_t, second_t, labels_t = signature.args[:6]
        fty = context.get_value_type(xt_t.dtype)
        L, R, G = tile_plan(xt_t.dtype.bitwidth // 8)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vf, vi = ir.VectorType(fty, L), ir.VectorType(i32, L)
        xt = context.make_array(xt_t)(context, builder, args[0])
        nc = context.make_array(nc_t)(context, builder, args[1])
        c2v = context.make_array(c2_t)(context, builder, args[2])
        arrays = [context.make_array(best_t)(context, builder, args[3])]
        if want_second:
            arrays.append(context.make_array(second_t)(context, builder, args[4]))
        lab = context.make_array(labels_t)(context, builder, args[5])

        def vptr(data: Any, offset: int, vty: Any) -> Any:
            return builder.bitcast(builder.gep(data, [ir.Constant(i64, offset)]), vty.as_pointer())

        # running minimum (and runner-up) and label per vector of rows, in registers
        slots = [[cgutils.alloca_once(builder, vf) for _ in range(R)] for _ in arrays]
        lslots = [cgutils.alloca_once(builder, vi) for _ in range(R)]
        # llvm.fma, not fmuladd: always fused, so a row's bits do not depend on how the
        # backend schedules each call (without FMA hardware it is a slow library call)
        name = f"llvm.fma.v{L}{fty.intrinsic_name}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf] * 3), name)
        lanes0 = ir.Constant(vi, [0] * L)

        def splat(value: Any, vty: Any) -> Any:
            undef = ir.Constant(vty, ir.Undefined)
            one = builder.insert_element(undef, value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, undef, lanes0)

        def step(first: int, j0: Any, count: int) -> None:
            """Centres j0 … j0 + count − 1 against the rows ``first`` … ``first + L·R −
            1`` of the tile, then the minimum in order."""
            acc: list[list[Any]] = [[None] * R for _ in range(count)]
            base = builder.mul(j0, ir.Constant(j0.type, d))
            for f in range(d):
                row_f = f * TILE + first
                xs = [builder.load(vptr(xt.data, row_f + r * L, vf), align=1) for r in range(R)]
                for g in range(count):
                    at = builder.add(base, ir.Constant(j0.type, g * d + f))
                    a = splat(builder.load(builder.gep(nc.data, [at])), vf)
                    for r in range(R):
                        prev = acc[g][r]
                        acc[g][r] = (
                            builder.fmul(a, xs[r])
                            if prev is None
                            else builder.call(fma, [a, xs[r], prev])
                        )
            for g in range(count):
                j = builder.add(j0, ir.Constant(j0.type, g))
                # ‖c‖² last: the GEMM's order (its dot product, then the scan's addition)
                c = splat(builder.load(builder.gep(c2v.data, [j])), vf)
                index = splat(builder.trunc(j, i32), vi)
                for r in range(R):
                    v = builder.fadd(acc[g][r], c)
                    b = builder.load(slots[0][r])
                    lt = builder.fcmp_ordered("<", v, b)
                    if want_second:  # second = min(second, max(b, v)), as nearest2_cols
                        hi = builder.select(builder.fcmp_ordered(">", v, b), v, b)
                        s = builder.load(slots[1][r])
                        lo = builder.select(builder.fcmp_ordered("<", hi, s), hi, s)
                        builder.store(lo, slots[1][r])
                    builder.store(builder.select(lt, v, b), slots[0][r])
                    builder.store(builder.select(lt, index, builder.load(lslots[r])), lslots[r])

        k = builder.extract_value(nc.shape, 0)
        step_g = ir.Constant(k.type, G)
        steps = builder.udiv(k, step_g)
        one = ir.Constant(k.type, 1)
        for first in range(0, TILE, L * R):  # the tile in parts of L·R rows, each in turn
            for r in range(R):
                at = first + r * L
                for slot, arr in zip(slots, arrays, strict=True):
                    builder.store(builder.load(vptr(arr.data, at, vf), align=1), slot[r])
                builder.store(builder.load(vptr(lab.data, at, vi), align=1), lslots[r])
            with cgutils.for_range(builder, steps) as loop:
                step(first, builder.mul(loop.index, step_g), G)
            with cgutils.for_range_slice(builder, builder.mul(steps, step_g), k, one) as (j, _):
                step(first, j, 1)
            for r in range(R):
                at = first + r * L
                for slot, arr in zip(slots, arrays, strict=True):
                    builder.store(builder.load(slot[r]), vptr(arr.data, at, vf), align=1)
                builder.store(builder.load(lslots[r]), vptr(lab.data, at, vi), align=1)
        return context.get_dummy_value()

    return sig, codegen


#: called as ``_tile_search(XT, nC, c2, best, second, labels, shape)`` in compiled code
_tile_search: Any = intrinsic(_tile_search_typer)


@_jit
def nearest_rows(
    X: Any, origin: Any, nC: Any, c2: Any, best: Any, second: Any, labels: Any, shape: Any
) -> None:
    """``labels[i] = argmin_j c2[j] + Σ_f nC[j, f]·x_f`` (lowest index on ties) and
    ``best[i]`` that minimum, in X's dtype, for the rows ``x = X[i] − origin`` (the
    difference taken in X's dtype as they are read: the bits of :func:`centre_rows`,
    without the copy) of ``d = len(shape)`` <= SMALL_D features; ``nC = −2C`` and
    ``c2 = ‖c‖²`` as for :func:`nearest_cols`. With ``second`` (not None), also the
    runner-up of :func:`nearest2_cols`. Each row's results are the same bits wherever
    it sits in X (see the section's comment)."""
    n, d = X.shape
    XT = np.zeros((d, TILE), X.dtype)
    b = np.empty(TILE, X.dtype)
    s = np.empty(TILE, X.dtype)
    lab = np.empty(TILE, np.int32)
    for start in range(0, n, TILE):
        r = min(TILE, n - start)
        for i in range(r):
            for f in range(d):
                XT[f, i] = X[start + i, f] - origin[f]
        for i in range(r, TILE):
            for f in range(d):
                XT[f, i] = 0.0
        b[:] = np.inf
        s[:] = np.inf
        lab[:] = 0
        if second is None:
            _tile_search(XT, nC, c2, b, None, lab, shape)
        else:
            _tile_search(XT, nC, c2, b, s, lab, shape)
            for i in range(r):
                second[start + i] = s[i]
        for i in range(r):
            best[start + i] = b[i]
            labels[start + i] = lab[i]


@_jit
def centre_rows(src: Any, origin: Any, out: Any) -> None:
    """``out = src − origin`` row by row, in out's dtype (one rounding, as NumPy's).

    NumPy broadcasts ``origin`` with an inner loop of only d elements per row, slower
    than a plain copy; this loop runs at the copy's speed (``benchmarks/README.md``).
    """
    n, d = src.shape
    for i in range(n):
        for f in range(d):
            out[i, f] = src[i, f] - origin[f]


#: ``reassoc`` lets LLVM vectorise the float64 sum of squared differences per row (its
#: order is then the SIMD lanes', not left to right); it cannot change a single addition,
#: comparison or the labels, which :func:`nearest_cols` computes without it.
_REASSOC = {"reassoc", "nsz"}


@_jit(fastmath=_REASSOC)
def accumulate_rows(
    X: Any,
    origin: Any,
    index: Any,
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
    dists: Any,
) -> None:
    """One pass over a row block whose labels are known; accumulates in place.

    The labels come from :func:`nearest_cols` after the block's GEMM, or from the
    bounds kept between passes (:mod:`dkm.kernels.bounds`): both paths call this one
    compiled function on the same row blocks, so their statistics are the same bits.

    Parameters
    ----------
    X : (n, d) rows, float32 or float64, C-contiguous.
    origin : (d,) in X's dtype: the rows are ``X − origin``, subtracted here in X's dtype
        (the bits of :func:`centre_rows`); zeros for rows already centred.
    index : (n,) int32, the nearest centre of each row.
    C : (k, d) the centres in X's dtype.
    w : (n,) float64 sample weights (≥ 0).
    row_offset : global index of the block's first row.
    labels : (n,) int64, out: ``index`` widened.
    nk : (k,) float64, += ``Σ w`` per centre.
    s1 : (k, d) float64, += ``Σ w x`` per centre.
    objective : (1,) float64, += ``Σ w ‖x − c_label‖²`` (differences taken in float64).
    heap_d, heap_r, heap_l : (m,) float64, int64, int64: the farthest rows of positive
        weight so far (squared distance, global row, label) as a min-heap; m may be 0.
    heap_n : (1,) int64, number of entries in the heap.
    dists : (n,) float64, out: each row's squared distance to its centre.
    """
    n, d = X.shape
    m = heap_d.shape[0]
    total = 0.0
    for i in range(n):
        lab = np.int64(index[i])
        labels[i] = lab
        wi = w[i]
        dist = 0.0
        for f in range(d):
            xf = np.float64(X[i, f] - origin[f])
            diff = xf - np.float64(C[lab, f])
            dist += diff * diff
            s1[lab, f] += wi * xf
        nk[lab] += wi
        dists[i] = dist
        total += wi * dist
        if m > 0 and wi > 0.0 and (heap_n[0] < m or dist >= heap_d[0]):
            _heap_offer(heap_d, heap_r, heap_l, heap_n, dist, row_offset + i, lab)
    objective[0] += total


# ----------------------------------------------------------------- k-means bounds
# Hamerly's bounds, kept per chunk between passes (dkm.kernels.bounds): an upper bound
# on each row's distance to its centre and a lower bound on its distance to every other
# centre. Distances are Euclidean, in float64; "margin" is the row's rounding allowance
# (squared units) that keeps the labels those of the GEMM and argmin.


@_jit
def nearest2_cols(GT: Any, c2: Any, best: Any, second: Any, labels: Any) -> None:
    """:func:`nearest_cols` (the same labels, the same ``best``) that also keeps the
    runner-up ``second[i] = min_{j ≠ labels[i]} GT[j, i] + c2[j]`` (inf for k = 1)."""
    k, n = GT.shape
    c = c2[0]
    for i in range(n):
        best[i] = GT[0, i] + c
        second[i] = np.inf
        labels[i] = 0
    for j in range(1, k):
        c = c2[j]
        for i in range(n):
            v = GT[j, i] + c
            b = best[i]
            second[i] = min(second[i], max(b, v))
            if v < b:
                best[i] = v
                labels[i] = j


#: Relative widening of every moved bound (two float64 roundings): the bounds then
#: stay bounds however many passes move them.
_ROUNDING = 4.5e-16


@_jit
def _margin(u2: float, scale: float, c2max: float) -> float:
    """A row's rounding allowance in squared units, ``scale · (‖x‖² + max ‖c‖²)``,
    from ``u2 ≥ ‖x − c_a‖²`` (``‖x‖² ≤ 2 u2 + 2 max ‖c‖²``)."""
    return scale * (2.0 * u2 + 3.0 * c2max)


@_jit
def set_bounds(
    best: Any,
    second: Any,
    dists: Any,
    rows: Any,
    upper: Any,
    lower: Any,
    scale: float,
    c2max: float,
) -> None:
    """Bounds of the rows ``rows`` of a block just searched: ``best[r]``, ``second[r]``
    from :func:`nearest2_cols` for row ``rows[r]``, ``dists`` the block's exact squared
    distances to the chosen centres (:func:`accumulate_rows`). The runner-up's squared
    distance is ``second − best + dist``, less the margin."""
    for r in range(rows.shape[0]):
        i = rows[r]
        d1 = dists[i]
        upper[i] = np.sqrt(d1)
        d2 = np.float64(second[r]) - np.float64(best[r]) + d1 - _margin(d1, scale, c2max)
        lower[i] = np.sqrt(max(d2, 0.0))


@_jit
def set_bounds_all(
    best: Any, second: Any, dists: Any, upper: Any, lower: Any, scale: float, c2max: float
) -> None:
    """:func:`set_bounds` for every row of the block, in order (vectorised)."""
    for i in range(dists.shape[0]):
        d1 = dists[i]
        upper[i] = np.sqrt(d1)
        d2 = np.float64(second[i]) - np.float64(best[i]) + d1 - _margin(d1, scale, c2max)
        lower[i] = np.sqrt(max(d2, 0.0))


@_jit
def _lower_bound(
    lower: float, u: float, a: int, drift_other: Any, drift_rest: float, near: Any, near_movers: Any
) -> float:
    """A lower bound on a row's distance to every centre but its own, ``a``, after the
    centres moved: ``lower`` held before the move, ``u`` holds now, for its own centre.

    The largest of: Hamerly's ``lower − max_{j≠a} δ_j``; the other centres by the
    triangle inequality through ``c_a``, ``‖c_j − c_a‖ − u ≥ near[a] − u``; and, as the
    first passes move a few centres far, ``lower − δ_rest`` (the largest drift outside
    the centres that moved most) for the rest, ``near_movers[a] − u`` for the movers.
    """
    hamerly = lower - drift_other[a]
    movers = min(lower - drift_rest, near_movers[a] - u)
    lo = max(hamerly, movers, near[a] - u)
    return lo - abs(lo) * _ROUNDING


@_jit
def filter_bounds(
    labels: Any,
    upper: Any,
    lower: Any,
    drift: Any,
    drift_other: Any,
    drift_rest: float,
    near: Any,
    near_movers: Any,
    scale: float,
    c2max: float,
    out: Any,
) -> int:
    """Move the bounds by the centres' drift (``upper += drift[a]``, ``lower`` to
    :func:`_lower_bound`) and list in ``out`` the rows whose label the bounds no longer
    settle (``upper² + margin < lower²`` settles it); returns how many. The listed rows
    keep their previous lower bound, for :func:`tighten_bounds`."""
    m = 0
    for i in range(labels.shape[0]):
        a = labels[i]
        u = upper[i] + drift[a]
        u += abs(u) * _ROUNDING  # pass after pass, rounding never tightens a bound
        upper[i] = u
        lo = _lower_bound(lower[i], u, a, drift_other, drift_rest, near, near_movers)
        if lo > 0.0 and u * u + _margin(u * u, scale, c2max) < lo * lo:
            lower[i] = lo
        else:
            out[m] = i
            m += 1
    return m


@_jit(fastmath=_REASSOC)
def tighten_bounds(
    X: Any,
    origin: Any,
    rows: Any,
    count: int,
    C: Any,
    drift_other: Any,
    drift_rest: float,
    near: Any,
    near_movers: Any,
    labels: Any,
    upper: Any,
    lower: Any,
    scale: float,
    c2max: float,
) -> int:
    """For the rows ``rows[:count]`` of the block ``X − origin`` (as in
    :func:`accumulate_rows`; the bounds arrays are the block's too) that
    :func:`filter_bounds` listed: the upper bound becomes the exact
    distance to the labelled centre, and the lower bound :func:`_lower_bound` with it.
    The rows still unsettled, which need a full search, move to the front of ``rows``;
    returns how many."""
    d = X.shape[1]
    m = 0
    for r in range(count):
        i = rows[r]
        a = labels[i]
        dist = 0.0
        for f in range(d):
            diff = np.float64(X[i, f] - origin[f]) - np.float64(C[a, f])
            dist += diff * diff
        u = np.sqrt(dist)
        upper[i] = u
        lo = _lower_bound(lower[i], u, a, drift_other, drift_rest, near, near_movers)
        lower[i] = lo
        if not (lo > 0.0 and dist + _margin(dist, scale, c2max) < lo * lo):
            rows[m] = i
            m += 1
    return m


# --------------------------------------------------------------------------- mixtures
# Row passes of the Gaussian-mixture E-step. Each fills or transforms an (n, k) block of
# log-densities that stays in cache; the GEMMs around them are NumPy's (BLAS).


@_jit(fastmath=_REASSOC)
def log_density_stacked(Y: Any, shift: Any, const: Any, out: Any) -> None:
    """``out[i, j] = const[j] − ½ Σ_f (Y[i, f·k + j] − shift[f, j])²`` (full covariances).

    ``Y = X @ S`` is one GEMM for every component, its columns feature-major
    (``S[:, f·k + j] = P_j[:, f]``) so that the inner loop runs over the k components
    (contiguous, vectorised); ``shift[f, j] = (μ_j P_j)_f``.
    """
    n = Y.shape[0]
    d, k = shift.shape
    for i in range(n):
        for j in range(k):
            out[i, j] = 0.0
        for f in range(d):
            base = f * k
            for j in range(k):
                t = Y[i, base + j] - shift[f, j]
                out[i, j] += t * t
        for j in range(k):
            out[i, j] = const[j] - 0.5 * out[i, j]


@_jit(fastmath=_REASSOC)
def log_density_diag(X: Any, meansT: Any, precT: Any, const: Any, out: Any) -> None:
    """``out[i, j] = const[j] − ½ Σ_f precT[f, j] (X[i, f] − meansT[f, j])²``.

    Diag and spherical covariances; tied too, on ``X P`` against ``μ P`` with unit
    precisions. The differences are taken exactly, not expanded into ``x² − 2xμ + μ²``.
    Parameters are feature-major (d, k): the inner loop runs over the components.
    """
    n, d = X.shape
    k = meansT.shape[1]
    for i in range(n):
        for j in range(k):
            out[i, j] = 0.0
        for f in range(d):
            x = X[i, f]
            for j in range(k):
                t = x - meansT[f, j]
                out[i, j] += precT[f, j] * t * t
        for j in range(k):
            out[i, j] = const[j] - 0.5 * out[i, j]


# exp(x) = 2^m · e^r with m = round(x / ln 2) and r = x − m·ln 2 (|r| <= ln 2 / 2): ln 2
# in two parts (Cody and Waite's, fdlibm's: m·_LN2_HI is exact for |m| < 2^11); e^r by
# its Taylor polynomial to r^13 (the first term left out is below 5e-18 of the sum),
# evaluated by Estrin's scheme (a shorter chain of dependent operations than Horner's,
# which is within 1 ulp where this is within 2, but slower); 2^m added to the result's
# exponent bits. NumPy's SIMD exp is AVX-512 only: on an AVX2 CPU np.exp is glibc's
# scalar exp, a large share of a diagonal or spherical mixture's E-step. Figures:
# ``benchmarks/README.md``.
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
#: 1.5 · 2^52: the low mantissa bits of ``y + _ROUNDER`` hold round(y), |y| < 2^51
_ROUNDER = 6755399441055744.0


def _bitcast(to: Any) -> Any:
    """An intrinsic reinterpreting a float64 as int64 or back (LLVM's ``bitcast``)."""
    source = types.int64 if to == types.float64 else types.float64

    def typer(typingctx: Any, value: Any) -> Any:
        if value != source:
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], context.get_value_type(to))

        return to(value), codegen

    return intrinsic(typer)


_as_int: Any = _bitcast(types.int64)
_as_float: Any = _bitcast(types.float64)


@_jit(inline="always")
def _exp_shifted(x: float) -> float:
    """``exp(x)`` for x in [:data:`NEGLIGIBLE_LOG`, 0] or NaN (a row's log-densities less
    their maximum, clamped): within 2 ulp of NumPy's, exactly 1 at 0, NaN for NaN.
    Inlined into callers compiled without reassociation (it would undo the two-part
    ln 2); vectorises where they loop over a row."""
    rounded = x * _LOG2E + _ROUNDER
    m = rounded - _ROUNDER
    r = (x - m * _LN2_HI) - m * _LN2_LO
    r2 = r * r
    r4 = r2 * r2
    s0 = (1.0 + r) + (0.5 + r * (1.0 / 6.0)) * r2
    s1 = (1.0 / 24.0 + r * (1.0 / 120.0)) + (1.0 / 720.0 + r * (1.0 / 5040.0)) * r2
    s2 = (1.0 / 40320.0 + r * (1.0 / 362880.0)) + (1.0 / 3628800.0 + r * (1.0 / 39916800.0)) * r2
    s3 = 1.0 / 479001600.0 + r * (1.0 / 6227020800.0)
    p = (s0 + s1 * r4) + (s2 + s3 * r4) * (r4 * r4)
    # the low bits of ``rounded`` are m (two's complement): shifted into the exponent
    e = _as_float(_as_int(p) + (_as_int(rounded) << 52))
    return e if x == x else x


#: Below this, ``exp(L − max)`` (< 2e-300) is taken as exactly 0: such terms cannot
#: change a row's sum, and exp would otherwise return subnormal numbers, on which every
#: later multiply-add (the GEMMs against the responsibilities) takes a ~100-cycle
#: microcode assist on x86 (the moments GEMM's figures: ``benchmarks/README.md``).
#: :func:`exp_shifted_rows` clamps such differences up to this value rather than to
#: −inf (its exp builds 2^m in the exponent bits: m must stay normal), and
#: :func:`normalise_rows` then sets the clamped terms to exactly 0.
NEGLIGIBLE_LOG = -690.0

#: ``exp`` of a clamped term is ``exp(NEGLIGIBLE_LOG)`` ≈ 2.2e-300; terms up to this
#: (that, plus a margin far above an exp's last-bit differences) are set to 0.
NEGLIGIBLE_EXP = float(np.exp(NEGLIGIBLE_LOG)) * (1.0 + 1e-9)


@_jit
def exp_shifted_rows(L: Any, top: Any, labels: Any = None) -> None:
    """``top[i] = max_j L[i, j]``, then ``L[i] = exp(L[i] − top[i])`` (the first half of
    a softmax), differences below :data:`NEGLIGIBLE_LOG` raised to it first (their exp is
    a normal number that :func:`normalise_rows` zeroes); the exp is
    :func:`_exp_shifted`, vectorised over the row. With ``labels``, also
    ``labels[i] = np.argmax(L[i])`` (the first maximum) from the row as it came in, in
    the same pass rather than by NumPy's argmax over the block (``benchmarks/README.md``)."""
    n, k = L.shape
    for i in range(n):
        m = L[i, 0]
        for j in range(1, k):
            m = max(m, L[i, j])
        top[i] = m
        if labels is not None:  # the first j at the maximum: a min-reduction, vectorised
            a = k
            for j in range(k):
                a = min(a, j if L[i, j] == m else k)
            labels[i] = 0 if a == k else a
        for j in range(k):
            t = L[i, j] - m
            L[i, j] = _exp_shifted(NEGLIGIBLE_LOG if t < NEGLIGIBLE_LOG else t)  # NaN stays


@_jit(fastmath=_REASSOC)
def normalise_rows(E: Any, w: Any, norm: Any, nk: Any, objective: Any) -> None:
    """The second half: ``E[i] = exp(L[i] − top[i])`` in, ``w_i · softmax`` out, sums fused.

    Terms up to :data:`NEGLIGIBLE_EXP` (the clamped ones) become exactly 0 first.
    ``norm[i]`` comes in as ``top[i]`` and leaves as ``log Σ_j exp L[i, j]`` (the
    max-shifted log-sum-exp, as SciPy's); ``nk += Σ_i E[i]`` (after the transform) and
    ``objective += Σ_i w_i norm[i]``. The exp is taken in the first half
    (:func:`exp_shifted_rows`), compiled without reassociation.
    """
    n, k = E.shape
    total = 0.0
    for i in range(n):
        s = 0.0
        for j in range(k):
            e = E[i, j]
            e = 0.0 if e <= NEGLIGIBLE_EXP else e  # NaN stays NaN
            E[i, j] = e
            s += e
        lse = norm[i] + np.log(s)
        norm[i] = lse
        scale = w[i] / s
        for j in range(k):
            r = E[i, j] * scale
            E[i, j] = r
            nk[j] += r
        total += w[i] * lse
    objective[0] += total


@_jit
def outer_cols(XT: Any, ZT: Any) -> None:
    """Features of the full second moments, feature-major: from ``XT`` (d, n), the rows
    ``ZT[p] = x_a x_b`` for the pairs a ≤ b in row-major upper-triangle order, then
    ``ZT[d(d+1)/2 + a] = x_a``; (d(d+1)/2 + d, n). The inner loop runs over the points
    (contiguous, long: it vectorises, which a per-point triangle does not)."""
    d, n = XT.shape
    p = 0
    for a in range(d):
        for b in range(a, d):
            for i in range(n):
                ZT[p, i] = XT[a, i] * XT[b, i]
            p += 1
    for a in range(d):
        for i in range(n):
            ZT[p + a, i] = XT[a, i]


@_jit
def square_rows(X: Any, F: Any) -> None:
    """``F[i] = [x² | x]`` (elementwise square, then the row): diag moments' features."""
    n, d = X.shape
    for i in range(n):
        for f in range(d):
            x = X[i, f]
            F[i, f] = x * x
            F[i, d + f] = x


@_jit
def triangular_side(P: Any) -> int:
    """1 if the square ``P`` is upper triangular (zeros below the diagonal), 2 if lower,
    3 if diagonal, 0 if neither: stops at the first non-zero on each side."""
    d = P.shape[0]
    upper = True
    for i in range(1, d):
        for j in range(i):
            if P[i, j] != 0.0:
                upper = False
                break
        if not upper:
            break
    lower = True
    for i in range(d - 1):
        for j in range(i + 1, d):
            if P[i, j] != 0.0:
                lower = False
                break
        if not lower:
            break
    return (1 if upper else 0) + (2 if lower else 0)
