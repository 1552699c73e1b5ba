"""E-step over one chunk: log-densities by GEMM, assignments, sufficient statistics.

NumPy/SciPy only; one chunk in, one :class:`~dkm.stats.SuffStats` out. All functions
assume validated input: ``X`` is 2-D, finite and already centred on the engine's
origin (``X − origin``), ``params`` are expressed in the same centred coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse

from dkm import covariance
from dkm._typing import Assignment, Moments
from dkm.covariance import Covariance
from dkm.kernels import bounds
from dkm.kernels.params import MixtureParams
from dkm.stats import FarthestPoints, SuffStats, symmetric

F64 = NDArray[np.float64]
LOG_2PI = float(np.log(2.0 * np.pi))

#: Upper bound on the elements of the largest temporary a kernel makes per row block.
BLOCK_ELEMENTS = 1 << 22

#: Elements of the (rows, k) distance block of the fused k-means kernels: small enough
#: (1 MB in float32) that the compiled pass reads it back from cache, not from memory.
FUSED_BLOCK_ELEMENTS = 1 << 18

#: Blocks of the compiled row search (at most SMALL_D features) have this many times
#: FUSED_BLOCK_ELEMENTS elements: with no (rows, k) block to keep in cache, a block's
#: temporaries are a few numbers a row, and fewer blocks are fewer Python round trips
#: (``benchmarks/README.md``).
ROW_SEARCH_BLOCKS = 4

#: k-means with bounds: a row block where more than this share of the rows is unsettled
#: is searched whole (one GEMM on the block as it is) rather than gathered.
PROMOTE = 0.8

#: k-means with bounds on rows the GEMM searches: the unsettled rows of a chunk's blocks
#: are searched in products of a block's shape (:func:`_packed_search`) while they need
#: at most this share of the blocks' products, else the blocks are searched whole (the
#: products' gathered rows cost more than a block read in order).
PACKED_SHARE = 0.5

#: Rows the GEMM searches: where the drift of the centres leaves more than this share of
#: a chunk's rows unsettled, its blocks that have any are searched whole at once, without
#: the exact distances that would settle some (a read of those rows; the packed products
#: would hardly be fewer than the blocks).
TIGHTEN_SHARE = 0.5

#: Elements of the widest per-block temporary of the mixture E-step (``X @ [P_1 … P_k]``
#: for full covariances, the second-moment features): 4 MB in float64, cache-sized.
SOFT_BLOCK_ELEMENTS = 1 << 19

#: Full covariances: the E-step takes component k's log-densities from the moments'
#: features while ``vᵀ |Λ_k| v`` is at most this, ``v = |μ_k| + SPREAD · σ_k`` (absolute
#: values elementwise, ``σ_k`` the standard deviations, ``√diag Σ_k``): the largest
#: terms of the expansion ``Σ Λ_ab x_a x_b − 2μᵀΛx + μᵀΛμ`` for the rows within
#: SPREAD standard deviations of μ_k, whose densities matter. It errs by about float64's
#: epsilon times that, ~1e-9 in the log-density at the limit (the error on GMM-1's
#: components: ``benchmarks/README.md``).
QUADRATIC_LIMIT = 1e7
QUADRATIC_SPREAD = 3.0

#: A component's second moments taken from raw sums (``Σ r x xᵀ − …``) lose about
#: log10(ratio) digits, ratio = ``Σ r ‖x‖² / Σ r ‖x − c‖²``; above this ratio they are
#: summed again from the exact differences ``x − c``.
CANCELLATION_LIMIT = 1e4

#: Fewest rows in a block of the mixture E-step (or all the chunk's): below this, wide
#: rows would shrink the blocks until the GEMMs are matrix-vector products (one row at
#: d = 784 for full covariances).
MIN_BLOCK_ROWS = 256

#: Full covariances on rows of more than this many features take :func:`_wide_full_estep`
#: (one triangular product per component, moments by a rank update over the rows each
#: component holds); up to it, the stacked GEMM and the moments' features, whose width
#: grows as d² (``benchmarks/README.md``).
WIDE_D = 24

#: Bytes of the float64 row block of :func:`_wide_full_estep` (at least
#: :data:`MIN_BLOCK_ROWS` rows): a block's k log-densities and each component's
#: differences and products are of its rows.
WIDE_BLOCK_BYTES = 8 << 20

#: :class:`_Screen` from this many features up: below, a row's k triangular products
#: cost too little for the bounds and the gathered rows to pay (even at d = 48 with
#: 60 % of the pairs left out; ``benchmarks/README.md``).
SCREEN_MIN_D = 64

#: :class:`_Screen`: the columns of each precision factor its bounds take, ``d //
#: SCREEN_COLUMN_RATIO`` but at least SCREEN_MIN_COLUMNS (all of them up to that).
SCREEN_COLUMN_RATIO = 32
SCREEN_MIN_COLUMNS = 4

#: :class:`_Screen`: a block whose bounds leave out less than this share of the
#: (row, component) pairs they could (all but each row's most likely) ends the screening
#: for the rest of the chunk.
SCREEN_MIN_PRUNED = 0.25


def row_blocks(
    n: int, per_row: int, elements: int = BLOCK_ELEMENTS, min_rows: int = 1
) -> Iterator[slice]:
    """Slices of ``elements // per_row`` rows (bounded temporaries), at least ``min_rows``."""
    step = max(1, min_rows, elements // max(per_row, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def searches_rows(d: int) -> bool:
    """Whether rows of ``d`` features are searched by the compiled row pass (at most
    :data:`dkm.kernels._fused.SMALL_D`), each row's bits its own; wider rows: BLAS's
    GEMM (see :class:`_Search`)."""
    return bool(d <= _fused().SMALL_D)


def compute_dtype(dtype: np.dtype[Any], covariance_type: str) -> np.dtype[Any]:
    """float32 distances for float32 k-means (as scikit-learn); float64 otherwise."""
    if covariance.of(covariance_type).unit and dtype == np.float32:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def sq_distances(X: NDArray[Any], means: NDArray[Any]) -> NDArray[Any]:
    """‖x − μ_k‖² for all pairs via one GEMM, in X's dtype; (n, k), clipped at 0."""
    C = means.astype(X.dtype, copy=False)
    D = X @ C.T
    D *= -2.0
    D += (C * C).sum(axis=1)
    D += np.einsum("ij,ij->i", X, X)[:, None]
    np.maximum(D, 0.0, out=D)
    return D


def nearest(X: NDArray[Any], means: NDArray[Any]) -> NDArray[np.int64]:
    """Index of the closest centre: argmin of ``‖μ‖² − 2 μ·x`` (one GEMM, X's dtype).

    The product is centre-major, ``(−2C) @ Xᵀ``, as the compiled kernels compute it for
    rows of more than :data:`dkm.kernels._fused.SMALL_D` features (their labels are
    these bit for bit); narrower rows are searched by a compiled pass whose rounding
    differs, so the two can disagree only where two centres are within rounding.
    """
    C = means.astype(X.dtype, copy=False)
    D = (-2.0 * C) @ X.T  # the factor folded into the small operand: one pass fewer
    D += (C * C).sum(axis=1)[:, None]
    return D.argmin(axis=0).astype(np.int64, copy=False)


def log_gaussian(X: F64, params: MixtureParams) -> F64:
    """``log N(x_i | μ_k, Σ_k)`` for all i, k; (n, k) float64."""
    return _log_density(X, params, np.zeros(params.n_components))


def _log_density(
    X: NDArray[Any], params: MixtureParams, offset: F64, ws: Workspace | None = None
) -> F64:
    """``log N(x_i | μ_k, Σ_k) + offset_k``; (n, k) float64, in bounded row blocks.

    Mahalanobis terms: identity by :func:`sq_distances`; full by one GEMM for all
    components (the k precision-Cholesky factors stacked into a (d, k·d) matrix), then a
    compiled pass subtracting ``μ_k P_k`` and summing squares per component; diag and
    spherical by a compiled pass over the exact differences ``x − μ_k``, weighted by the
    precisions; tied by the GEMM ``X P`` and the same pass against ``μ_k P``. With a
    workspace, the result and the temporaries are its buffers ``L`` and ``Y``.
    """
    n, d = X.shape
    means, pc, kind = params.means, params.precisions_cholesky, params.kind
    k = means.shape[0]
    const = np.ascontiguousarray(
        -0.5 * d * LOG_2PI + kind.log_det(pc, d) + offset, dtype=np.float64
    ).reshape(k)
    out = np.empty((n, k)) if ws is None else ws.get("L", (n, k))
    if kind.unit:
        for rows in row_blocks(n, k):
            out[rows] = const - 0.5 * sq_distances(np.asarray(X[rows], np.float64), means)
        return out
    assert pc is not None
    fused = _fused()
    if kind.dense:
        # columns feature-major: stacked[:, f·k + j] = P_j[:, f]
        stacked = np.ascontiguousarray(pc.transpose(1, 2, 0).reshape(d, d * k))
        shift = np.ascontiguousarray(np.einsum("kd,kde->ek", means, pc))
        for rows in row_blocks(n, k * d, SOFT_BLOCK_ELEMENTS, MIN_BLOCK_ROWS):
            Xb = np.asarray(X[rows], np.float64)
            Y = _product(Xb, stacked, ws)
            fused.log_density_stacked(Y, shift, const, out[rows])
        return out
    # a weighted sum of squares of y = x T (tied) or of the exact differences (diag,
    # spherical), one pass
    T, meansT, precT = kind.diagonal_form(means, pc)
    for rows in row_blocks(n, d + k, SOFT_BLOCK_ELEMENTS, MIN_BLOCK_ROWS):
        if T is None:
            Y = np.ascontiguousarray(X[rows], np.float64)
        else:
            Y = _product(np.asarray(X[rows], np.float64), T, ws)
        fused.log_density_diag(Y, meansT, precT, const, out[rows])
    return out


def _product(A: F64, B: F64, ws: Workspace | None) -> F64:
    """``A @ B`` as a C-contiguous array, in the workspace's ``Y`` buffer if given."""
    if ws is None:
        return np.ascontiguousarray(A @ B)
    return np.matmul(A, B, out=ws.get("Y", (A.shape[0], B.shape[1])))


def weighted_log_prob(X: F64, params: MixtureParams) -> F64:
    """``log π_k + log N(x_i | k)``; (n, k)."""
    return _log_density(X, params, np.log(params.weights))


def _per_row(params: MixtureParams, moments: Moments, quadratic: bool = False) -> int:
    """Elements per row of a block's temporaries (blocks hold ``SOFT_BLOCK_ELEMENTS``).

    Full covariances: ``X P`` (k·d), the log-densities (k) and the moments' features
    (d(d+1)/2 + d) are all live at once, so they are summed: blocks of ~1200 rows at
    k = d = 16, faster than the ~1900-row blocks of the widest temporary alone or
    smaller ones. The others count the widest one. (A soft E-step whose
    log-densities come from the features, :class:`QuadraticForm`, makes no ``X P``:
    its blocks hold k + d(d+1)/2 + d per row, ~3100 rows, faster than half or twice
    that.) The block sizes compared: ``benchmarks/README.md``.
    """
    k, d = params.n_components, params.n_features
    dense_moments = covariance.of_moments(moments).dense
    if quadratic:
        return k + _n_features(d)
    if params.kind.dense:
        return k * d + k + (_n_features(d) if dense_moments else 0)
    width = k * d if params.kind.shared else k + d
    return max(width, d * d + d if dense_moments else 2 * d)


def estep(
    X: NDArray[Any],
    params: MixtureParams,
    *,
    assignment: Assignment,
    moments: Moments,
    shift: F64 | None = None,
    sample_weight: NDArray[Any] | None = None,
    n_farthest: int = 0,
    row_offset: int = 0,
    origin: F64 | None = None,
    bounds_key: tuple[Hashable, ...] | None = None,
) -> SuffStats:
    """Sufficient statistics of one chunk under ``params``.

    Parameters
    ----------
    X : (n, d) centred points (float32 or float64).
    params : current parameters (centred coordinates).
    assignment : ``hard`` (each point to its most likely component) or ``soft``.
    moments : second moments to accumulate (``none`` for k-means); full and tied ones
        exactly symmetric (:func:`dkm.stats.symmetric`).
    shift : (k, d) centres the moments are taken around; None for zero.
    sample_weight : (n,) non-negative weights, or None for ones.
    n_farthest : keep this many points for re-seeding: farthest from their centre
        (k-means) or with the lowest likelihood (mixtures).
    row_offset : global index of the chunk's first row.
    origin : if given, ``X`` is not centred yet: each row block is centred as it is
        read (``X − origin`` in the compute dtype, what :func:`centred` gives), so the
        chunk is never copied whole.
    bounds_key : k-means only: where this chunk's Hamerly bounds are kept between the
        passes of a fit, ``(fit, model, chunk)`` (see :func:`_kmeans_estep`).
    """
    n, d = X.shape
    k = params.n_components
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    cdtype = compute_dtype(X.dtype, params.covariance_type)
    ws = Workspace()
    rows_of = _Rows(X, origin, cdtype, ws)
    hard = assignment == "hard"
    if params.kind.unit and hard:
        kmeans = _kmeans_estep(
            rows_of, params, moments, shift, w, n_farthest, row_offset, bounds_key
        )
        return symmetric(kmeans)
    mkind = covariance.of_moments(moments)
    if params.kind.dense and d > WIDE_D and (mkind.unit or mkind.dense):
        return symmetric(
            _wide_full_estep(rows_of, params, hard, moments, shift, w, n_farthest, row_offset)
        )
    quadratic: QuadraticForm | DiagonalQuadraticForm | None = None
    if params.kind.dense and not hard and mkind.dense:
        quadratic = QuadraticForm(params, np.log(params.weights))
    elif _diagonal(params.kind) and not hard and _diagonal(mkind):
        quadratic = DiagonalQuadraticForm(params, np.log(params.weights))
    if quadratic is not None and not quadratic.useful:
        quadratic = None
    total = SuffStats.zero(k, d, moments, n_farthest)
    per_row = _per_row(params, moments, isinstance(quadratic, QuadraticForm))
    for rows in row_blocks(n, per_row, SOFT_BLOCK_ELEMENTS, MIN_BLOCK_ROWS):
        Xb = rows_of(rows)
        total = total.plus(
            _estep_block(
                Xb,
                params,
                assignment,
                moments,
                shift,
                w[rows],
                n_farthest,
                row_offset + rows.start,
                ws,
                quadratic,
            )
        )
    return symmetric(total)


def _triangular_product(P: F64) -> Any:
    """``B ↦ B P`` for C-contiguous float64 ``B``, in place where BLAS allows: ``trmm``
    (half a GEMM's work) when ``P`` is triangular, as the precision-Cholesky factors are,
    else the GEMM."""
    from scipy.linalg import blas

    side = _fused().triangular_side(np.ascontiguousarray(P, np.float64))
    upper, lower = bool(side & 1), bool(side & 2)
    if not (upper or lower):
        return lambda B: B @ P
    PF = np.asfortranarray(P)
    # (B P)ᵀ = Pᵀ Bᵀ, and a C-contiguous B is Bᵀ in BLAS's column-major order
    return lambda B: blas.dtrmm(1.0, PF, B.T, side=0, lower=int(lower), trans_a=1, overwrite_b=1).T


def _wide_full_estep(
    X: _Rows,
    params: MixtureParams,
    hard: bool,
    moments: Moments,
    shift: F64 | None,
    w: F64,
    n_farthest: int,
    row_offset: int,
) -> SuffStats:
    """The mixture E-step of full covariances on wide rows (more than :data:`WIDE_D`
    features), in row blocks of :data:`WIDE_BLOCK_BYTES` (at least
    :data:`MIN_BLOCK_ROWS` rows).

    Component j's Mahalanobis terms are ``‖(x − μ_j) P_j‖²``: the exact differences from
    the block's rows centred on the origin as read (:class:`_Rows`, the bits of
    :func:`centred`; a pass over the block, against its k products), times the
    triangular ``P_j`` by ``trmm``. The second moments are summed once per chunk into
    one (k, d, d) array: per component, a rank update ``Dᵀ D`` (BLAS's ``syrk``) of
    ``D = √r (x − c_j)`` over the block's rows whose
    weighted responsibility ``r`` is not zero (with hard assignments, its own rows;
    soft responsibilities below ``exp(NEGLIGIBLE_LOG)`` of the row's largest are exactly
    zero), so a row is summed once per component that holds it, not k times. Moments
    from the exact differences lose nothing to cancellation, whatever the origin.
    """
    n, d = X.shape
    k = params.n_components
    full_moments = covariance.of_moments(moments).dense
    around = np.zeros((k, d)) if shift is None else shift
    ws = X.ws
    nk, sx, objective = np.zeros(k), np.zeros((k, d)), np.zeros(1)
    sxx = np.zeros((k, d, d)) if full_moments else None
    farthest = FarthestPoints.empty(n_farthest, d) if n_farthest else None
    wide = _WideLogDensity(params, np.log(params.weights), hard)
    for rows in wide.blocks(n):
        Xb = X(rows)
        m = Xb.shape[0]
        L = wide.log_density(Xb, ws)
        wb = w[rows]
        if hard:
            labels = L.argmax(axis=1)
            best = L[np.arange(m), labels]
            objective[0] += float(wb @ best)
            R = np.zeros((m, k))
            R[np.arange(m), labels] = wb
            np.add.at(nk, labels, wb)
            worst, worst_labels = -best, labels
        else:
            worst_labels = np.empty(m, np.int64) if n_farthest else None
            norm = ws.get("norm", (m,))
            _softmax_rows(L, w[rows], norm, nk, objective, worst_labels)
            R, worst = L, -norm
        if farthest is not None:  # the points the model explains worst, for re-seeding
            assert worst_labels is not None
            farthest = farthest.merge(
                FarthestPoints.from_chunk(
                    n_farthest, worst, Xb, wb, worst_labels, row_offset + rows.start
                )
            )
        for j in range(k):
            r = R[:, j]
            held = np.flatnonzero(r)
            if not held.size:
                continue
            D = np.subtract(Xb[held], around[j])
            rj = r[held]
            sx[j] += rj @ D
            if sxx is not None:
                D *= np.sqrt(rj)[:, None]
                sxx[j] += D.T @ D  # NumPy's syrk for a product with its own transpose
    return SuffStats(moments, nk, sx, sxx, float(objective[0]), float(w.sum()), n, farthest)


class _WideLogDensity:
    """``log N(x | μ_j, Σ_j) + offset_j`` of full covariances on wide rows (more than
    :data:`WIDE_D` features), as :func:`_wide_full_estep` and the per-row outputs take
    them: component j's Mahalanobis terms ``‖(x − μ_j) P_j‖²`` from the exact
    differences times the triangular ``P_j`` (``trmm``), only where they can matter
    (:class:`_Screen`, from :data:`SCREEN_MIN_D` features). ``hard``: only each row's
    most likely component matters (labels), else every one within
    ``exp(NEGLIGIBLE_LOG)`` of it (the softmax zeroes the others)."""

    def __init__(self, params: MixtureParams, offset: F64, hard: bool) -> None:
        pc = params.precisions_cholesky
        assert params.kind.dense and pc is not None
        k, d = params.n_components, params.n_features
        self.means, self.k, self.d = params.means, k, d
        self.const = -0.5 * d * LOG_2PI + covariance.FULL.log_det(pc, d) + offset
        self.products = [_triangular_product(pc[j]) for j in range(k)]
        self.original = _originals(self.means, pc, self.const)
        screened = k > 1 and d >= SCREEN_MIN_D
        self.screen = _Screen(self.means, pc, self.const, hard, self.original) if screened else None

    def blocks(self, n: int) -> list[slice]:
        """Row blocks of :data:`WIDE_BLOCK_BYTES` (at least :data:`MIN_BLOCK_ROWS` rows),
        after a first block of MIN_BLOCK_ROWS where the screen is on: its probe."""
        step = max(MIN_BLOCK_ROWS, WIDE_BLOCK_BYTES // (8 * self.d))
        probe = min(n, MIN_BLOCK_ROWS) if self.screen is not None and self.screen.active else 0
        blocks = [slice(0, probe)] if probe else []
        return blocks + [
            slice(probe + b.start, probe + b.stop) for b in row_blocks(n - probe, 1, step)
        ]

    def log_density(self, Xb: F64, ws: Workspace) -> F64:
        """(m, k) for the block's float64 rows, in the workspace's ``L`` buffer; −∞ where
        the screen left a term out."""
        L = ws.get("L", (Xb.shape[0], self.k))
        if self.screen is not None and self.screen.active:
            self.screen.log_densities(Xb, L, self.products, ws)
        else:
            for j in np.flatnonzero(self.original == np.arange(self.k)).tolist():
                _mahalanobis_terms(Xb, None, j, self.means, self.const, self.products, L, ws)
            _copy_duplicates(L, self.original)
        return L


def _originals(means: F64, pc: F64, const: F64) -> NDArray[np.intp]:
    """(k,): for each component, the first with the same mean, precision factor and
    constant, bit for bit (itself if none): a duplicate's log-densities are copied from
    it, so exactly equal components keep equal bits however their rows are gathered,
    and ties go to the lowest index, as NumPy's argmax and scikit-learn give them."""
    k = means.shape[0]
    original = np.arange(k)
    for j in range(1, k):
        for i in range(j):
            if (
                original[i] == i
                and const[i] == const[j]
                and np.array_equal(means[i], means[j])
                and np.array_equal(pc[i], pc[j])
            ):
                original[j] = i
                break
    return original


def _copy_duplicates(L: F64, original: NDArray[np.intp]) -> None:
    copies = np.flatnonzero(original != np.arange(original.size))
    if copies.size:
        L[:, copies] = L[:, original[copies]]


def _mahalanobis_terms(
    Xb: F64,
    rows: NDArray[np.intp] | None,
    j: int,
    means: F64,
    const: F64,
    products: list[Any],
    L: F64,
    ws: Workspace,
) -> None:
    """``L[rows, j] = const_j − ½‖(x − μ_j) P_j‖²`` for the block's ``rows`` (None: all),
    the differences times the triangular ``P_j`` (``products[j]``)."""
    if rows is None:
        B = np.subtract(Xb, means[j], out=ws.get("B", Xb.shape))
    else:
        B = Xb[rows]
        B -= means[j]
    Y = products[j](B)
    terms = const[j] - 0.5 * np.einsum("ij,ij->i", Y, Y)
    if rows is None:
        L[:, j] = terms
    else:
        L[rows, j] = terms


def _separation(means: F64, pc: F64) -> F64:
    """(k, d): how much of the Mahalanobis distances from component j's mean to the
    others' each column of ``P_j`` carries: ``Σ_i ((μ_i − μ_j)·p_c)² / ‖(μ_i − μ_j) P_j‖²``
    (each other component counts once, however far). A column of large norm may carry
    none: a feature constant in the data has a huge precision (``reg_covar``'s) and the
    same value in every mean."""
    k = means.shape[0]
    out = np.zeros(means.shape)
    for j in range(k):
        proj = (means - means[j]) @ pc[j]  # (k, d)
        proj *= proj
        total = proj.sum(axis=1, keepdims=True)
        np.divide(proj, total, out=proj, where=total > 0)
        proj[total[:, 0] <= 0] = 0.0
        out[j] = proj.sum(axis=0)
    return out


class _Screen:
    """Which of a wide block's log-densities :func:`_wide_full_estep` must compute.

    Component j's Mahalanobis term ``‖(x − μ_j) P_j‖²`` is a sum over the columns of
    ``P_j``; any r of them give a lower bound, and with it an upper bound ``U_j`` on the
    log-density, for all k components in one GEMM of ``k·r`` columns (r/d of a
    triangular product's work per component; r = d / :data:`SCREEN_COLUMN_RATIO`, at
    least :data:`SCREEN_MIN_COLUMNS`). The r columns taken are those that carry most of
    the distances between the means (:func:`_separation`).
    The component of the highest bound is computed exactly first; then only the
    components whose bound reaches within :data:`~dkm.kernels._fused.NEGLIGIBLE_LOG` of
    that log-density (soft assignments; for hard ones, that reach it): any other one's
    responsibility is exactly 0 and its log-density cannot be a row's maximum, so
    leaving it at −∞ adds nothing the computed term would have added (the softmax clamps
    both the same way). The terms computed are computed on the rows gathered for them,
    and BLAS's bits for a row depend on the rows in its product: equal to computing the
    whole block to rounding, not bit for bit (a few rows in a hundred, a last bit); a
    duplicate component (the same mean, factor and constant) is copied from its
    original, so exact ties still go to the lowest index. On well-separated components,
    ~2 of k triangular products a row instead of k.

    The bound allows for rounding: the GEMM's and the exact terms' errors are each at
    most ``γ (‖x‖ + ‖μ_j‖) ‖P_j‖_F`` in ``‖(x − μ_j) P_j‖`` (γ a generous ``(d + r)·u``),
    and the comparison for a slack far above the last bits of the log-densities.
    A chunk's first block is :data:`MIN_BLOCK_ROWS` rows, a probe: where a block leaves out
    less than :data:`SCREEN_MIN_PRUNED` of its pairs, the rest of the chunk is computed
    whole (the screen would cost more than it saves, as on overlapping components).
    """

    def __init__(
        self, means: F64, pc: F64, const: F64, hard: bool, original: NDArray[np.intp]
    ) -> None:
        k, d = means.shape
        self.original = original
        self.copies = np.flatnonzero(original != np.arange(k))
        r = min(d, max(SCREEN_MIN_COLUMNS, d // SCREEN_COLUMN_RATIO))
        norms = np.einsum("jab,jab->jb", pc, pc)  # (k, d): squared column norms
        cols = np.argsort(-_separation(means, pc), axis=1, kind="stable")[:, :r]
        W = np.concatenate([pc[j][:, cols[j]] for j in range(k)], axis=1)  # (d, k r)
        self.W = np.ascontiguousarray(W)
        self.bias = np.einsum("jd,jdc->jc", means, W.reshape(d, k, r).transpose(1, 0, 2))
        self.bias = self.bias.reshape(k * r)
        self.gamma = 4.0 * (d + r + 4) * 2.0**-53
        self.reach = self.gamma * np.sqrt(norms.sum(axis=1))  # γ ‖P_j‖_F
        self.mean_norms = np.linalg.norm(means, axis=1)
        self.means, self.const, self.hard, self.r, self.k = means, const, hard, r, k
        self.active = bool(np.isfinite(W).all() and np.isfinite(self.bias).all())

    def upper(self, Xb: F64, ws: Workspace) -> F64:
        """(m, k) upper bounds on the rows' log-densities (NaN where a row is not finite)."""
        m = Xb.shape[0]
        Z = np.matmul(Xb, self.W, out=ws.get("screen", (m, self.k * self.r)))
        Z -= self.bias
        Z *= Z
        partial = Z.reshape(m, self.k, self.r).sum(axis=2)
        row_norms = np.sqrt(np.einsum("ij,ij->i", Xb, Xb)) * (1.0 + self.gamma)
        low = np.sqrt(partial) * (1.0 - self.gamma)
        low -= (row_norms[:, None] + self.mean_norms) * self.reach
        np.maximum(low, 0.0, out=low)
        return self.const - 0.5 * low * low

    def log_densities(self, Xb: F64, L: F64, products: list[Any], ws: Workspace) -> None:
        """``L`` (m, k): the block's log-densities where they can matter, −∞ elsewhere."""
        from dkm.kernels._fused import NEGLIGIBLE_LOG

        m, k = L.shape
        bound = self.upper(Xb, ws)
        # a duplicate's bound is its original's: argmax takes the original (lowest index);
        # a row with NaN bounds keeps every component below
        first = bound.argmax(axis=1)
        L.fill(-np.inf)
        for j in range(k):
            self._exact(Xb, np.flatnonzero(first == j), j, L, products, ws)
        best = L[np.arange(m), first]
        below = 0.0 if self.hard else -NEGLIGIBLE_LOG
        size = np.abs(bound) + np.abs(best)[:, None]
        # a zero weight's −∞ bound is left out against a finite best
        slack = 1.0 + 1e-9 * np.where(np.isfinite(size), size, 0.0)
        threshold = (best - below)[:, None] - slack
        needed = ~(bound < threshold)  # NaN bounds: needed
        needed[np.arange(m), first] = False
        needed[:, self.copies] = False  # copied from their originals below
        for j in range(k):
            self._exact(Xb, np.flatnonzero(needed[:, j]), j, L, products, ws)
        _copy_duplicates(L, self.original)
        could = m * (k - 1 - self.copies.size)
        pruned = could - int(np.count_nonzero(needed))
        if could == 0 or pruned < SCREEN_MIN_PRUNED * could:
            self.active = False

    def _exact(
        self,
        Xb: F64,
        rows: NDArray[np.intp],
        j: int,
        L: F64,
        products: list[Any],
        ws: Workspace,
    ) -> None:
        if not rows.size:
            return
        whole = rows.size * 2 > Xb.shape[0]  # gathering most of the block costs more
        _mahalanobis_terms(Xb, None if whole else rows, j, self.means, self.const, products, L, ws)


def _n_features(d: int) -> int:
    """Per-row features of the full second moments: ``x_a x_b`` (a ≤ b), then ``x``."""
    return d * (d + 1) // 2 + d


class _ExactComponents:
    """What the quadratic forms share: the components whose log-densities keep the
    exact differences of :func:`_log_density` (their GEMM columns are zero)."""

    def _keep_exact(self, params: MixtureParams, exact: NDArray[np.bool_], offset: F64) -> None:
        pc = params.precisions_cholesky
        assert pc is not None
        self.n_components = params.n_components
        self.exact = np.flatnonzero(exact)
        self.exact_params = MixtureParams(
            params.covariance_type, params.weights[exact], params.means[exact], pc[exact]
        )
        self.exact_offset = np.asarray(offset, np.float64)[exact]

    @property
    def useful(self) -> bool:
        """Whether any component takes the GEMM (else the exact path is cheaper)."""
        return self.exact.size < self.n_components

    def _exact_columns(self, L: F64, X64: F64) -> F64:
        if self.exact.size:
            L[:, self.exact] = _log_density(X64, self.exact_params, self.exact_offset)
        return L


class QuadraticForm(_ExactComponents):
    """Log-densities of full covariances from the moments' features, as one GEMM.

    ``(x − μ)ᵀ Λ (x − μ) = Σ_{a≤b} (2 − δ_ab) Λ_ab x_a x_b − 2 (Λμ)ᵀ x + μᵀΛμ`` with
    ``Λ_k = P_k P_kᵀ``, so ``log N(x | μ_k, Σ_k) + offset_k = F(x) @ W[:, k] + const_k``,
    ``F(x)`` being the features of :func:`_soft_moments` (``x_a x_b`` for a ≤ b, then
    ``x``). A block's log-densities become one GEMM (K = d(d+1)/2 + d) against features
    the moments need anyway, in place of ``X @ [P_1 … P_k]`` (K = d, k·d columns) and a
    pass over its k·d columns per row, which take longer (``benchmarks/README.md``).

    The sum's terms are as large as ``|x|ᵀ|Λ_k||x|``, and the rows whose densities
    matter lie within a few standard deviations of μ_k: that is ``μ_kᵀΛ_kμ_k`` or much
    more when Λ_k's entries cancel (an elongated component, even at μ_k = 0). The
    components beyond :data:`QUADRATIC_LIMIT` (tight, or elongated, or far from the
    origin) keep the exact differences of :func:`_log_density`; their columns of ``W``
    are zero.
    """

    def __init__(self, params: MixtureParams, offset: F64) -> None:
        pc, means = params.precisions_cholesky, params.means
        assert params.kind.dense and pc is not None
        d = params.n_features
        lam = pc @ pc.transpose(0, 2, 1)  # Λ_k = P_k P_kᵀ
        lam_mu = np.einsum("kab,kb->ka", lam, means)
        q = np.einsum("ka,ka->k", lam_mu, means)  # μ_kᵀ Λ_k μ_k
        inv = np.linalg.inv(pc)  # Σ_k = P_k⁻ᵀ P_k⁻¹: diag Σ_k = column sums of squares
        reach = np.abs(means) + QUADRATIC_SPREAD * np.sqrt(np.einsum("kab,kab->kb", inv, inv))
        scale = np.einsum("ka,kab,kb->k", reach, np.abs(lam), reach)
        exact = ~(scale <= QUADRATIC_LIMIT)
        a, b = np.triu_indices(d)
        quad = -0.5 * np.where(a == b, 1.0, 2.0) * lam[:, a, b]  # (k, d(d+1)/2)
        WT = np.concatenate([quad, lam_mu], axis=1)
        WT[exact] = 0.0
        self.WT = np.ascontiguousarray(WT)  # (k, features)
        const = -0.5 * d * LOG_2PI + covariance.FULL.log_det(pc, d) + offset - 0.5 * q
        self.const = np.where(exact, 0.0, const)
        self._keep_exact(params, exact, offset)

    def log_density(self, X64: F64, FT: F64, ws: Workspace) -> F64:
        """``log N(x_i | μ_k, Σ_k) + offset_k`` (n, k) in the workspace's ``L`` buffer,
        from the rows ``X64`` and their features ``FT`` (:func:`_full_features`)."""
        k, n = self.WT.shape[0], X64.shape[0]
        # ``Wᵀ Fᵀ`` then transposed: BLAS is slower for ``F W`` (n, k) with F read
        # transposed (``benchmarks/README.md``).
        LT = np.matmul(self.WT, FT, out=ws.get("LT", (k, n)))
        L = ws.get("L", (n, k))
        np.add(LT.T, self.const, out=L)
        return self._exact_columns(L, X64)


def _diagonal(kind: Covariance) -> bool:
    """Diag or spherical: a precision per component and feature, no cross terms."""
    return not (kind.unit or kind.dense or kind.shared)


class DiagonalQuadraticForm(_ExactComponents):
    """Log-densities of diag and spherical covariances from the moments' features, as
    one GEMM.

    ``Σ_f p_f (x_f − μ_f)² = Σ_f p_f x_f² − 2 Σ_f p_f μ_f x_f + Σ_f p_f μ_f²``, so
    ``log N(x | μ_k, Σ_k) + offset_k = F(x) @ W[:, k] + const_k`` with ``F = [x² | x]``
    (:func:`dkm.kernels._fused.square_rows`), the features the moments' GEMM takes
    anyway: a GEMM (K = 2d) in place of a compiled pass over the exact differences,
    which at d = 128 took half of the E-step (``benchmarks/README.md``). As for
    :class:`QuadraticForm`, a component whose terms ``Σ_f p_f (|μ_f| + SPREAD·σ_f)²``
    exceed :data:`QUADRATIC_LIMIT` keeps the exact differences (its columns of ``W``
    are zero).
    """

    def __init__(self, params: MixtureParams, offset: F64) -> None:
        pc = params.precisions_cholesky
        assert _diagonal(params.kind) and pc is not None
        d, k = params.n_features, params.n_components
        _, meansT, precT = params.kind.diagonal_form(params.means, pc)  # (d, k) each
        reach = ((np.sqrt(precT) * np.abs(meansT) + QUADRATIC_SPREAD) ** 2).sum(axis=0)
        exact = ~(reach <= QUADRATIC_LIMIT)
        W = np.concatenate([-0.5 * precT, precT * meansT], axis=0)  # (2d, k)
        W[:, exact] = 0.0
        self.W = np.ascontiguousarray(W)
        q = (precT * meansT**2).sum(axis=0)
        const = -0.5 * d * LOG_2PI + params.kind.log_det(pc, d) + offset - 0.5 * q
        self.const = np.ascontiguousarray(np.where(exact, 0.0, const)).reshape(k)
        self._keep_exact(params, exact, offset)

    def log_density(self, X64: F64, F: F64, ws: Workspace) -> F64:
        """``log N(x_i | μ_k, Σ_k) + offset_k`` (n, k) in the workspace's ``L`` buffer,
        from the rows ``X64`` and their features ``F`` (:func:`_diag_features`)."""
        L = np.matmul(F, self.W, out=ws.get("L", (X64.shape[0], self.W.shape[1])))
        L += self.const
        return self._exact_columns(L, X64)


def _diag_features(X64: F64, ws: Workspace) -> F64:
    """``F = [x² | x]`` (n, 2d) in the workspace's ``F`` buffer."""
    n, d = X64.shape
    F = ws.get("F", (n, 2 * d))
    _fused().square_rows(np.ascontiguousarray(X64), F)
    return F


def centred(X: NDArray[Any], origin: F64, covariance_type: str) -> NDArray[Any]:
    """``X − origin`` in the kernels' compute dtype (float32 stays float32 for k-means)."""
    dtype = compute_dtype(np.dtype(X.dtype), covariance_type)
    return np.asarray(X, dtype) - origin.astype(dtype)


class Workspace:
    """Buffers reused by every row block of one chunk.

    Under a Dask nanny, workers run with ``MALLOC_TRIM_THRESHOLD_`` set, which turns off
    glibc's adaptive mmap threshold: every temporary over 128 kB is then a fresh ``mmap``
    whose pages the kernel faults in and zeroes, and the per-block temporaries of the
    E-step make it slower in worker processes than in threads (``benchmarks/README.md``).
    One buffer per name, grown when needed, keeps them out of the allocator.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, NDArray[Any]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any = np.float64) -> NDArray[Any]:
        """A C-contiguous uninitialised array of ``shape`` (a view of the named buffer)."""
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = self._buffers[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


class _Rows:
    """Rows of a chunk in the compute dtype, centred on ``origin`` as they are read."""

    def __init__(
        self, X: NDArray[Any], origin: F64 | None, dtype: np.dtype[Any], ws: Workspace
    ) -> None:
        self.X, self.dtype, self.shape, self.ws = X, dtype, X.shape, ws
        self.origin = None if origin is None else origin.astype(dtype)
        self.zeros = np.zeros(X.shape[1], dtype)
        self.offset = self.zeros if self.origin is None else self.origin

    def __call__(self, rows: Any) -> NDArray[Any]:
        """C-contiguous ``X[rows] (− origin)``: the bits :func:`centred` would give.

        Slices land in the workspace's ``rows`` buffer (valid until the next call);
        index arrays get their own array.
        """
        src = self.X[rows]
        if self.origin is None and src.dtype == self.dtype and src.flags.c_contiguous:
            return src
        if isinstance(rows, slice):
            out = self.ws.get("rows", src.shape, self.dtype)
        else:
            out = np.empty(src.shape, self.dtype)
        if self.origin is None:
            out[...] = src
        elif src.dtype == self.dtype:
            _fused().centre_rows(src, self.origin, out)
        else:
            np.subtract(src, self.origin, out=out, dtype=self.dtype)
        return out

    def raw(self, rows: slice) -> tuple[NDArray[Any], NDArray[Any]]:
        """``(block, origin)`` whose difference, taken in the compute dtype, is the bits of
        ``self(rows)``: the chunk's own rows where they are in the compute dtype and
        C-contiguous (no copy; the compiled passes subtract as they read), else the
        centred copy and zeros."""
        src = self.X[rows]
        if src.dtype == self.dtype and src.flags.c_contiguous:
            return src, self.offset
        return self(rows), self.zeros


def _fused() -> ModuleType:
    """The compiled k-means row passes (numba is imported on first use, not with dkm)."""
    from dkm.kernels import _fused

    return _fused


def _kmeans_estep(
    X: _Rows,
    params: MixtureParams,
    moments: Moments,
    shift: F64 | None,
    w: F64,
    n_farthest: int,
    row_offset: int,
    bounds_key: tuple[Hashable, ...] | None = None,
) -> SuffStats:
    """The hard E-step of identity covariances (k-means): the search, then one fused pass.

    Per block of rows, in the compute dtype (float32 stays float32), the argmin of
    ``‖c‖² − 2 c·x`` (lowest index on ties; :class:`_Search`: for more than
    :data:`dkm.kernels._fused.SMALL_D` features ``Gᵀ = (−2C) @ Xᵀ`` by BLAS and
    :func:`dkm.kernels._fused.nearest_cols`, the labels of :func:`nearest`; for fewer,
    :func:`dkm.kernels._fused.nearest_rows`), then
    :func:`dkm.kernels._fused.accumulate_rows` the squared distance to the chosen
    centre from the exact differences (summed in float64), ``nk``, ``Σ w x`` and the
    farthest-point candidates in float64. The rows are not copied to float64 unless
    second moments are asked for.

    With ``bounds_key`` (a fit's passes: ``(fit, model, chunk)``), the labels come from
    the chunk's Hamerly bounds in :data:`dkm.kernels.bounds.CACHE` where it has them
    (only the rows they do not settle are searched), and the bounds are kept for the
    next pass; the statistics are the same bits either way.
    """
    n, d = X.shape
    k = params.n_components
    cdtype = X.dtype
    w = np.ascontiguousarray(w, np.float64)
    C = np.ascontiguousarray(params.means, dtype=cdtype)
    neg2C = -2.0 * C  # as in nearest(): wide rows, the same GEMM and the same labels
    c2 = (C * C).sum(axis=1)
    labels = np.empty(n, np.int64)
    nk, s1, objective = np.zeros(k), np.zeros((k, d)), np.zeros(1)
    heap_d, heap_n = np.empty(n_farthest), np.zeros(1, np.int64)
    heap_r, heap_l = np.empty(n_farthest, np.int64), np.empty(n_farthest, np.int64)
    fused = _fused()
    state = None if bounds_key is None else bounds.CACHE.take(bounds_key, n, C)
    if state is None and bounds_key is not None and not bounds.CACHE.has_room(bounds_key, n, C):
        bounds_key = None  # they would not be kept: do not build them
    search = _Search(X.ws, neg2C, c2, C.dtype)
    kept = state is not None and not state.off  # labels from the bounds
    if kept:
        assert state is not None
        drift = state.drift(C)
        moves = (drift.other, drift.rest, drift.near, drift.near_movers)
        state.searched, state.passes = 0, state.passes + 1
    elif state is None and bounds_key is not None:  # a full search that builds them
        state = bounds.Bounds.empty(n, C)
    build = state is not None and not state.off
    scale = bounds.margin_scale(d, cdtype)
    c2max = bounds.margin_c2(float(c2.max()) if k else 0.0, cdtype)
    zeros = X.zeros
    blocks = list(row_blocks(n, search.per_row, search.block_elements))
    packed = None
    if kept and not search.row_exact:  # the GEMM: settle every block first, then pack
        assert state is not None
        packed = _packed_search(X, search, C, state, blocks, drift, scale, c2max)
    for b, rows in enumerate(blocks):
        # read once, uncentred, where the bounds may settle every row of few features or
        # the fused search centres the rows as it reads them (no centred copy); wide
        # rows are centred into a block that stays in cache, which the pass after it
        # reads faster than the chunk (12 against 15 ms a settled 31,250 × 784 chunk)
        uncentred = (kept and packed is None) or search.row_exact
        Xb, origin = X.raw(rows) if uncentred else (X(rows), zeros)
        m = Xb.shape[0]
        dists = X.ws.get("dists", (m,), np.float64)
        found: tuple[NDArray[Any], NDArray[Any], NDArray[np.int64] | None] | None = None
        index: NDArray[np.int32]
        if not build:
            index = X.ws.get("index", (m,), np.int32)
            search.nearest(Xb, index, origin)
        else:
            assert state is not None
            index, upper, lower = state.labels[rows], state.upper[rows], state.lower[rows]
            if packed is not None:  # labels and runner-ups of the block's unsettled rows
                gbest, gsecond, plans = packed
                picked = plans[b]
                whole = picked is None
                if picked is not None and picked.size:
                    found = (gbest[rows][picked], gsecond[rows][picked], picked)
            else:
                todo, count = X.ws.get("todo", (m,), np.int64), m
                if kept:  # move the bounds by the drift; exact distances where unsettled
                    count = fused.filter_bounds(
                        index, upper, lower, drift.moved, *moves, scale, c2max, todo
                    )
                    if 0 < count <= PROMOTE * m:
                        count = fused.tighten_bounds(
                            Xb, origin, todo, count, C, *moves, index, upper, lower, scale, c2max
                        )
                    state.searched += count
                whole = count > PROMOTE * m or not kept  # one GEMM on the block as it is
                if count and not whole:  # the fused search: each row's bits its own
                    picked = todo[:count]
                    Xs = np.subtract(Xb[picked], origin, dtype=cdtype)  # centre_rows' bits
                    best, second, nearest = search.nearest2(Xs)
                    index[picked] = nearest
                    found = (best, second, picked)
            if whole:  # into the bounds' labels directly
                if not search.row_exact and origin is not zeros:  # the GEMM: centred rows
                    Xb, origin = X(rows), zeros
                found = (*search.nearest2(Xb, index, origin)[:2], None)
        fused.accumulate_rows(
            Xb,
            origin,
            index,
            C,
            w[rows],
            row_offset + rows.start,
            labels[rows],
            nk,
            s1,
            objective,
            heap_d,
            heap_r,
            heap_l,
            heap_n,
            dists,
        )
        if found is not None:
            best, second, rows_found = found
            if rows_found is None:
                fused.set_bounds_all(best, second, dists, upper, lower, scale, c2max)
            else:
                fused.set_bounds(best, second, dists, rows_found, upper, lower, scale, c2max)
    searched = state.searched if kept and state is not None else n
    if bounds_key is not None and state is not None:
        if kept and state.passes > bounds.TRIAL_PASSES and state.searched > bounds.GIVE_UP * n:
            state = state.give_up()
        state.centres = C.copy()  # the bounds now refer to these centres
        bounds.CACHE.put(bounds_key, state)
    c = np.zeros((k, d)) if shift is None else shift
    sx = s1 - nk[:, None] * c
    sxx = None
    mkind = covariance.of_moments(moments)
    if not mkind.unit:  # second moments around c: float64 rows, bounded blocks
        raw = np.zeros(mkind.raw_shape(k, d))
        for rows in row_blocks(n, _per_row(params, moments)):
            X64 = np.asarray(X(rows), np.float64)
            ids = np.arange(X64.shape[0])
            R = sparse.csr_array((w[rows], (labels[rows], ids)), shape=(k, X64.shape[0]))
            raw += mkind.raw_moments(X64, labels[rows], R, w[rows], c)
        sxx = mkind.from_raw(raw, s1, nk, c)
    farthest = None
    if n_farthest:
        m = int(heap_n[0])
        order = np.lexsort((heap_r[:m], -heap_d[:m]))  # farthest first, ties by row
        rows_kept = heap_r[:m][order]
        local = rows_kept - row_offset
        farthest = FarthestPoints(
            n_farthest,
            heap_d[:m][order],
            rows_kept,
            np.asarray(X(local), np.float64),
            w[local],
            heap_l[:m][order],
        )
    return SuffStats(
        moments, nk, sx, sxx, float(objective[0]), float(w.sum()), n, farthest, searched
    )


def _packed_search(
    X: _Rows,
    search: _Search,
    C: NDArray[Any],
    state: bounds.Bounds,
    blocks: list[slice],
    drift: bounds.Drift,
    scale: float,
    c2max: float,
) -> tuple[NDArray[Any], NDArray[Any], list[NDArray[np.int64] | None]]:
    """The bounds of every block of a chunk moved, and the rows they leave unsettled
    searched by the GEMM, for :func:`_kmeans_estep` (rows of more than
    :data:`dkm.kernels._fused.SMALL_D` features).

    BLAS's bits for a row depend on the product's shape and on the row's place in it
    (not on the other rows): a row searched with a few others, or alone (GEMV), can get
    another label than in its block's GEMM where two centres are within rounding, and
    the rows the bounds leave unsettled are those near a bisector. So each unsettled row
    is searched at its own place in a product of its block's shape, and the unsettled
    rows of all the chunk's blocks share such products wherever their places differ:
    about as many products as the most rows unsettled at one place, not one per block.
    A block with more than :data:`PROMOTE` of its rows unsettled is left to be searched
    whole (None), and so are all those with any where more than :data:`TIGHTEN_SHARE`
    of the chunk's rows are, or where packing would save too few products
    (:data:`PACKED_SHARE`).

    Returns ``(best, second, plans)``: the chunk's ``‖c‖² − 2 c·x`` of the labels and
    runner-ups (set at the searched rows), and per block its searched rows (indices in
    the block) or None; the labels go into ``state.labels``.
    """
    fused = _fused()
    moves = (drift.other, drift.rest, drift.near, drift.near_movers)
    n = state.labels.shape[0]
    unsettled = []
    for rows in blocks:
        index, upper, lower = state.labels[rows], state.upper[rows], state.lower[rows]
        todo = X.ws.get("todo", (rows.stop - rows.start,), np.int64)
        count = fused.filter_bounds(index, upper, lower, drift.moved, *moves, scale, c2max, todo)
        unsettled.append(todo[:count].copy())
    plans: list[NDArray[np.int64] | None] = []
    tighten = sum(u.size for u in unsettled) <= TIGHTEN_SHARE * n
    for rows, todo in zip(blocks, unsettled, strict=True):
        count = todo.size
        if count and (not tighten or count > PROMOTE * (rows.stop - rows.start)):
            plans.append(None)  # searched whole
        else:
            if count:  # exact distances to the labels' centres; the rest to be searched
                Xb, origin = X.raw(rows)
                index, upper, lower = state.labels[rows], state.upper[rows], state.lower[rows]
                count = fused.tighten_bounds(
                    Xb, origin, todo, count, C, *moves, index, upper, lower, scale, c2max
                )
            plans.append(todo[:count])
        state.searched += count
    best, second = np.empty(n, search.dtype), np.empty(n, search.dtype)
    shapes: dict[int, list[tuple[int, int, NDArray[np.int64]]]] = {}
    for b, (rows, picked) in enumerate(zip(blocks, plans, strict=True)):
        if picked is not None and picked.size:
            shapes.setdefault(rows.stop - rows.start, []).append((b, rows.start, picked))
    for m, parts in shapes.items():
        places = np.concatenate([p for _, _, p in parts])
        chunk_rows = np.concatenate([start + p for _, start, p in parts])
        order = np.argsort(places, kind="stable")
        first = np.searchsorted(places[order], places[order])  # a place's first in order
        rank = np.empty_like(places)
        rank[order] = np.arange(places.size) - first  # rows before it at its place
        products = int(rank.max()) + 1
        if products > PACKED_SHARE * len(parts):  # hardly fewer: the blocks whole
            for b, _, _ in parts:
                plans[b] = None
            continue
        for r in range(products):
            sel = rank == r
            at, rows_r = places[sel], chunk_rows[sel]
            pack = X.ws.get("pack", (m, X.shape[1]), search.dtype)
            pack.fill(0)
            pack[at] = X(rows_r)
            got_best, got_second, got = search.nearest2(pack)
            state.labels[rows_r] = got[at]
            best[rows_r], second[rows_r] = got_best[at], got_second[at]
    return best, second, plans


class _Search:
    """The full search of a block of rows: the argmin over the centres of
    ``‖c‖² − 2 c·x`` (and the runner-up, for the bounds). Up to
    :data:`dkm.kernels._fused.SMALL_D` features, one compiled pass with the distances in
    registers (:func:`dkm.kernels._fused.nearest_rows`); wider rows, the GEMM
    ``Gᵀ = (−2C) @ Xᵀ`` into the workspace, then a compiled scan of it."""

    def __init__(self, ws: Workspace, neg2C: NDArray[Any], c2: NDArray[Any], dtype: Any) -> None:
        self.ws, self.neg2C, self.c2, self.dtype = ws, neg2C, c2, dtype
        d = neg2C.shape[1]
        #: d as a tuple's length (the fused pass is compiled for each d); None: the GEMM
        self.shape = (0,) * d if searches_rows(d) else None
        #: elements of the temporaries per row of a block: the GEMM's k distances and the
        #: block's centred row (at d = 784, k = 10, ~330-row blocks whose rows are read
        #: from cache by the GEMM and the pass after it, not 26k-row blocks of 80 MB), or
        #: the fused pass's centred row and its few per-row results (blocks of ~950 rows
        #: against 32k for d = 8, k = 1000: fewer Python round trips per chunk)
        self.per_row = neg2C.shape[0] + d if self.shape is None else d + 4
        #: elements of a block's temporaries (see :data:`ROW_SEARCH_BLOCKS`)
        self.block_elements = FUSED_BLOCK_ELEMENTS * (
            1 if self.shape is None else ROW_SEARCH_BLOCKS
        )
        self.zeros = np.zeros(d, dtype)

    @property
    def row_exact(self) -> bool:
        """Whether a row's results are the same bits whichever rows are searched with it
        (the fused pass); a GEMM's bits for a few gathered rows can differ from the
        block's (BLAS picks other kernels)."""
        return self.shape is not None

    def gemm(self, Xb: NDArray[Any]) -> NDArray[Any]:
        shape = (self.neg2C.shape[0], Xb.shape[0])
        return np.matmul(self.neg2C, Xb.T, out=self.ws.get("GT", shape, self.dtype))

    def _origin(self, origin: NDArray[Any] | None) -> NDArray[Any]:
        """The fused pass's origin; the GEMM needs the rows centred already (zeros)."""
        if self.shape is None:
            assert origin is None or not origin.any(), "the GEMM search takes centred rows"
        return self.zeros if origin is None else origin

    def nearest(
        self, Xb: NDArray[Any], index: NDArray[np.int32], origin: NDArray[Any] | None = None
    ) -> None:
        """The labels of the rows ``Xb − origin`` into ``index`` (lowest index on ties);
        ``origin`` in the compute dtype (zeros or None for the GEMM, which does not
        subtract), None: ``Xb`` as is."""
        best = self.ws.get("best", (Xb.shape[0],), self.dtype)
        at = self._origin(origin)
        if self.shape is not None:
            _fused().nearest_rows(Xb, at, self.neg2C, self.c2, best, None, index, self.shape)
        else:
            _fused().nearest_cols(self.gemm(Xb), self.c2, best, index)

    def nearest2(
        self,
        Xb: NDArray[Any],
        index: NDArray[np.int32] | None = None,
        origin: NDArray[Any] | None = None,
    ) -> tuple[NDArray[Any], NDArray[Any], NDArray[np.int32]]:
        """``(best, second, index)``: the labels' ``‖c‖² − 2 c·x`` and the runner-up's
        (:func:`dkm.kernels._fused.nearest2_cols`) for the rows ``Xb − origin`` (as for
        :meth:`nearest`); the labels go to ``index`` if given."""
        m = Xb.shape[0]
        best = self.ws.get("best", (m,), self.dtype)
        second = self.ws.get("second", (m,), self.dtype)
        index = self.ws.get("found", (m,), np.int32) if index is None else index
        at = self._origin(origin)
        if self.shape is not None:
            _fused().nearest_rows(Xb, at, self.neg2C, self.c2, best, second, index, self.shape)
        else:
            _fused().nearest2_cols(self.gemm(Xb), self.c2, best, second, index)
        return best, second, index


def _estep_block(
    X: NDArray[Any],
    params: MixtureParams,
    assignment: Assignment,
    moments: Moments,
    shift: F64 | None,
    w: F64,
    n_farthest: int,
    row_offset: int,
    ws: Workspace,
    quadratic: QuadraticForm | DiagonalQuadraticForm | None = None,
) -> SuffStats:
    """One block of the mixture E-step; ``quadratic``: :class:`QuadraticForm` (full
    covariances, soft assignments, full moments) or :class:`DiagonalQuadraticForm` (diag
    or spherical), whose log-densities come from the moments' features (built first,
    used twice)."""
    n, d = X.shape
    k = params.n_components
    X64 = np.asarray(X, np.float64)
    farthest = None
    FT = F = None
    if assignment == "hard":
        wlp = weighted_log_prob(X64, params)
        labels = wlp.argmax(axis=1)
        best = wlp[np.arange(n), labels]
        objective = float(w @ best)
        if n_farthest:  # the points the model explains worst, for re-seeding
            farthest = FarthestPoints.from_chunk(n_farthest, -best, X64, w, labels, row_offset)
        R: Any = sparse.csr_array((w, (labels, np.arange(n))), shape=(k, n))
        nk = np.bincount(labels, weights=w, minlength=k).astype(np.float64)
    else:
        if quadratic is None:
            resp = _log_density(X64, params, np.log(params.weights), ws)
        elif isinstance(quadratic, QuadraticForm):
            FT = _full_features(X64, ws)
            resp = quadratic.log_density(X64, FT, ws)
        else:
            F = _diag_features(X64, ws)
            resp = quadratic.log_density(X64, F, ws)
        worst_labels = np.empty(n, np.int64) if n_farthest else None  # resp's argmax
        norm, nk, total = np.empty(n), np.zeros(k), np.zeros(1)
        _softmax_rows(resp, w, norm, nk, total, worst_labels)  # resp ← w · responsibilities
        objective = float(total[0])
        if worst_labels is not None:  # the points the model explains worst, for re-seeding
            farthest = FarthestPoints.from_chunk(
                n_farthest, -norm, X64, w, worst_labels, row_offset
            )
        R = resp.T
        labels = None
    c = np.zeros((k, d)) if shift is None else shift
    sxx = None
    mkind = covariance.of_moments(moments)
    if labels is None and not mkind.unit and not mkind.shared:  # full, diag, spherical
        S1, sxx = _soft_moments(X64, R, nk, c, mkind, ws, FT, F)
    else:
        S1 = np.asarray(R @ X64)  # (k, d): Σ w r x
        if not mkind.unit:
            raw = mkind.raw_moments(X64, labels, R, w, c)
            sxx = mkind.from_raw(raw, S1, nk, c)
    return SuffStats(moments, nk, S1 - nk[:, None] * c, sxx, objective, float(w.sum()), n, farthest)


def _softmax_rows(
    L: F64,
    w: F64,
    norm: F64,
    nk: F64,
    objective: F64,
    labels: NDArray[np.int64] | None = None,
) -> None:
    """In place ``L[i] ← w_i · softmax(L[i])``; ``norm[i] = logsumexp(L[i])``, and
    ``nk += Σ_i`` of the result, ``objective += Σ_i w_i norm[i]``: two compiled row
    passes, the first with the exp (:func:`dkm.kernels._fused.exp_shifted_rows`). With
    ``labels``, also each row's ``argmax`` of ``L`` as it came in."""
    fused = _fused()
    fused.exp_shifted_rows(L, norm, labels)
    fused.normalise_rows(L, w, norm, nk, objective)


def _full_features(X64: F64, ws: Workspace) -> F64:
    """``Fᵀ = [x_a x_b (a ≤ b) | x]ᵀ`` (d(d+1)/2 + d, n), feature-major, in the
    workspace's ``Z`` buffer."""
    n, d = X64.shape
    FT = ws.get("Z", (_n_features(d), n))
    _fused().outer_cols(np.ascontiguousarray(X64.T), FT)
    return FT


def _soft_moments(
    X64: F64,
    R: Any,
    nk: F64,
    c: F64,
    kind: Covariance,
    ws: Workspace,
    FT: F64 | None = None,
    F: F64 | None = None,
) -> tuple[F64, F64]:
    """``Σ w r x`` and the second moments around ``c_k`` (full, diag, spherical) under
    soft responsibilities ``R`` (k, n), both from one GEMM ``R @ F`` against per-row
    features: ``F = [x_a x_b (a ≤ b) | x]`` (n, d(d+1)/2 + d) for full (the upper
    triangle: the raw moments are symmetric; ``FT`` if already built), ``[x² | x]``
    (n, 2d) otherwise (``F`` if already built)."""
    d = X64.shape[1]
    k = c.shape[0]
    Xc = np.ascontiguousarray(X64)
    if kind.dense:
        if FT is None:
            FT = _full_features(Xc, ws)
        # ``(FT @ Rᵀ)ᵀ``, not ``R @ FTᵀ``: both operands in their stored (row-major)
        # order; BLAS is slower with both transposed (``benchmarks/README.md``).
        M = (FT @ R.T).T
    else:
        if F is None:
            F = _diag_features(Xc, ws)
        M = R @ F
    width = M.shape[1] - d
    S1 = np.ascontiguousarray(M[:, width:])
    if kind.dense:
        a, b = np.triu_indices(d)
        raw = np.empty((k, d, d))
        raw[:, a, b] = M[:, :width]
        raw[:, b, a] = M[:, :width]
        return S1, _full_moments_from_raw(raw, S1, nk, X64, R, c)
    return S1, kind.from_raw(np.asarray(M[:, :width]), S1, nk, c)


def _full_moments_from_raw(raw: F64, S1: F64, nk: F64, X64: F64, R: Any, c: F64) -> F64:
    """Second moments around ``c_k`` from the raw ones ``Σ r x xᵀ`` (``R Z``).

    The rows' products ``x_a x_b`` (a ≤ b) form the features Z, so the raw moments of
    every component are the single product ``R Z``, mirrored into the full (exactly
    symmetric) square; they are moved to ``c_k`` with the first moments ``S1 = R X``
    (the triangle, built feature-major by :func:`dkm.kernels._fused.outer_cols`, has
    about half of the full square's GEMM and features; ``benchmarks/README.md``). Where that
    subtraction would cancel more than :data:`CANCELLATION_LIMIT` allows (a tight
    component far from the origin), the component is summed again from the exact
    differences, as scikit-learn does.
    """
    sxx = covariance.FULL.around(raw, S1, nk, c)
    raw_trace = np.trace(raw, axis1=1, axis2=2)
    centred_trace = np.trace(sxx, axis1=1, axis2=2)
    for j in np.flatnonzero(raw_trace > CANCELLATION_LIMIT * centred_trace):
        diff = X64 - c[j]
        sxx[j] = (diff * R[j][:, None]).T @ diff
    return np.asarray(sxx)


def predict_labels(X: NDArray[Any], params: MixtureParams) -> NDArray[np.int64]:
    """Most likely component per row (nearest centre for identity)."""
    n = X.shape[0]
    cdtype = compute_dtype(X.dtype, params.covariance_type)
    out = np.empty(n, np.int64)
    if params.kind.unit:  # nearest(), with the argmin compiled
        C = np.ascontiguousarray(params.means, dtype=cdtype)
        ws = Workspace()
        search = _Search(ws, -2.0 * C, (C * C).sum(axis=1), cdtype)
        for rows in row_blocks(n, search.per_row, search.block_elements):
            Xb = np.asarray(X[rows], dtype=cdtype)
            index = ws.get("index", (Xb.shape[0],), np.int32)
            search.nearest(Xb, index)
            out[rows] = index
        return out
    for rows, L, _ in _log_prob_blocks(X, params, hard=True):
        out[rows] = L.argmax(axis=1)
    return out


def _log_prob_blocks(
    X: NDArray[Any], params: MixtureParams, hard: bool = False
) -> Iterator[tuple[slice, F64, Workspace]]:
    """The rows of a mixture's ``X`` in blocks, each with its ``log π_k + log N(x | k)``
    (b, k) in the workspace's buffers (valid until the next block).

    The log-densities are the soft E-step's: from the moments' features by one GEMM
    (:class:`QuadraticForm`, :class:`DiagonalQuadraticForm`) where it takes them so, of
    full covariances on wide rows :class:`_WideLogDensity`'s (−∞ where they cannot
    matter: below ``exp(NEGLIGIBLE_LOG)`` of the row's largest, or with ``hard``, for
    labels only, below the largest), else :func:`_log_density`, in blocks of bounded
    temporaries reused through a workspace. (:func:`weighted_log_prob` of a whole
    chunk, then NumPy's or SciPy's reductions over it, made ``score`` on 10,000,000 ×
    16, k=8 full take ~6× an EM iteration.)
    """
    n, d = X.shape
    k = params.n_components
    offset = np.log(params.weights)
    if params.kind.dense and d > WIDE_D:
        wide = _WideLogDensity(params, offset, hard)
        ws = Workspace()
        for rows in wide.blocks(n):
            yield rows, wide.log_density(np.ascontiguousarray(X[rows], np.float64), ws), ws
        return
    quadratic: QuadraticForm | DiagonalQuadraticForm | None = None
    if params.kind.dense and d <= WIDE_D:
        quadratic = QuadraticForm(params, offset)
    elif _diagonal(params.kind):
        quadratic = DiagonalQuadraticForm(params, offset)
    if quadratic is not None and not quadratic.useful:
        quadratic = None
    if isinstance(quadratic, QuadraticForm):
        per_row = k + _n_features(d)
    elif quadratic is not None:
        per_row = k + 2 * d
    else:
        per_row = _per_row(params, "none")
    ws = Workspace()
    for rows in row_blocks(n, per_row, SOFT_BLOCK_ELEMENTS, MIN_BLOCK_ROWS):
        X64 = np.ascontiguousarray(X[rows], np.float64)
        if quadratic is None:
            L = _log_density(X64, params, offset, ws)
        elif isinstance(quadratic, QuadraticForm):
            L = quadratic.log_density(X64, _full_features(X64, ws), ws)
        else:
            L = quadratic.log_density(X64, _diag_features(X64, ws), ws)
        yield rows, L, ws


def _normalised_blocks(X: NDArray[Any], params: MixtureParams) -> Iterator[tuple[slice, F64, F64]]:
    """:func:`_log_prob_blocks` through the E-step's compiled softmax: each block's
    responsibilities (b, k) and ``log p(x_i)`` (b,), valid until the next block."""
    nk, total = np.zeros(params.n_components), np.zeros(1)
    for rows, L, ws in _log_prob_blocks(X, params):
        b = L.shape[0]
        norm = ws.get("norm", (b,))
        ones = ws.get("ones", (b,))
        ones.fill(1.0)
        _softmax_rows(L, ones, norm, nk, total)
        yield rows, L, norm


def score_samples(X: NDArray[Any], params: MixtureParams) -> F64:
    """``log p(x_i)`` per row; (n,)."""
    out = np.empty(X.shape[0])
    for rows, _, norm in _normalised_blocks(X, params):
        out[rows] = norm
    return out


def predict_proba(X: NDArray[Any], params: MixtureParams) -> F64:
    """Responsibilities; (n, k), rows sum to 1."""
    out = np.empty((X.shape[0], params.n_components))
    for rows, resp, _ in _normalised_blocks(X, params):
        out[rows] = resp
    return out


def distances(X: NDArray[Any], params: MixtureParams) -> NDArray[Any]:
    """Euclidean distance to every centre; (n, k) in the compute dtype."""
    cdtype = compute_dtype(X.dtype, covariance.IDENTITY.name)
    return np.sqrt(sq_distances(np.asarray(X, cdtype), params.means))


def inertia(X: NDArray[Any], params: MixtureParams, sample_weight: NDArray[Any] | None) -> float:
    """``Σ w ‖x − μ_label‖²`` with labels from :func:`predict_labels`."""
    labels = predict_labels(X, params)
    diff = np.asarray(X, np.float64) - params.means[labels]
    dist = np.einsum("ij,ij->i", diff, diff)
    return float(dist.sum() if sample_weight is None else np.asarray(sample_weight) @ dist)
