"""The fused (numba) k-means E-step and label kernels against naive NumPy references."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from dkm.kernels import MixtureParams, _fused, estep, predict_labels
from dkm.kernels import expectation as E
from dkm.stats import SuffStats

DTYPES = [np.float32, np.float64]


def naive_labels(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """argmin_k ‖c_k‖² − 2 x·c_k in X's dtype, first index on ties: scikit-learn's rule."""
    Cd = C.astype(X.dtype)
    scores = np.array([[Cd[j] @ Cd[j] - 2 * (x @ Cd[j]) for j in range(len(C))] for x in X])
    return np.array([int(np.flatnonzero(s == s.min())[0]) for s in scores], dtype=np.int64)


def naive_kmeans_stats(
    X: np.ndarray,
    C: np.ndarray,
    w: np.ndarray,
    labels: np.ndarray,
    shift: np.ndarray,
    n_farthest: int,
    row_offset: int,
) -> dict[str, np.ndarray | float]:
    k, d = C.shape
    X64 = X.astype(np.float64)
    centre = C.astype(X.dtype).astype(np.float64)  # the centres the distances use
    nk = np.zeros(k)
    sx = np.zeros((k, d))
    dist = np.zeros(len(X))
    for i, (x, j) in enumerate(zip(X64, labels, strict=True)):
        nk[j] += w[i]
        sx[j] += w[i] * (x - shift[j])
        dist[i] = ((x - centre[j]) ** 2).sum()
    pos = np.flatnonzero(w > 0)
    order = sorted(pos, key=lambda i: (-dist[i], i))[:n_farthest]
    return {
        "nk": nk,
        "sx": sx,
        "objective": float(w @ dist),
        "far_rows": np.array(order, dtype=np.int64) + row_offset,
        "far_dist": dist[order],
        "far_labels": labels[order],
    }


def check_stats(
    got: SuffStats, ref: dict, w: np.ndarray, X: np.ndarray, n_farthest: int, row_offset: int
) -> None:
    np.testing.assert_allclose(got.nk, ref["nk"], rtol=1e-12, atol=0)
    scale = max(1.0, float(np.abs(ref["sx"]).max(initial=0)))
    np.testing.assert_allclose(got.sx, ref["sx"], rtol=1e-12, atol=1e-12 * scale)
    assert got.objective == pytest.approx(ref["objective"], rel=1e-12, abs=1e-300)
    assert got.n == pytest.approx(w.sum(), rel=1e-15) and got.count == len(X)
    if n_farthest:
        assert got.farthest is not None and got.farthest.capacity == n_farthest
        np.testing.assert_array_equal(got.farthest.rows, ref["far_rows"])
        np.testing.assert_array_equal(got.farthest.labels, ref["far_labels"])
        np.testing.assert_allclose(got.farthest.distances, ref["far_dist"], rtol=1e-12)
        local = ref["far_rows"] - row_offset
        assert got.farthest.points.dtype == np.float64
        np.testing.assert_array_equal(got.farthest.points, X[local].astype(np.float64))
        np.testing.assert_array_equal(got.farthest.weights, w[local])
    else:
        assert got.farthest is None


@pytest.fixture(params=[None, 1 << 6], ids=["default-blocks", "tiny-blocks"])
def block_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each case with the default block and with blocks of a few rows (many blocks,
    odd remainders; a block shorter than a SIMD vector)."""
    if request.param is not None:
        monkeypatch.setattr(E, "FUSED_BLOCK_ELEMENTS", request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n", "k", "d"),
    [(0, 3, 2), (1, 1, 1), (3, 4, 2), (7, 1, 4), (301, 5, 1), (1003, 9, 6)],
)
@pytest.mark.parametrize("weights", ["none", "random", "with-zeros"])
@pytest.mark.parametrize("n_farthest", [0, 1, 4])
def test_kmeans_estep_matches_naive(
    dtype, n, k, d, weights, n_farthest, block_elements: None
) -> None:
    rng = np.random.default_rng(n * 100 + k * 10 + d)
    X = (rng.normal(size=(n, d)) * 3 + 1).astype(dtype)
    C = rng.normal(size=(k, d)) * 3
    w = {
        "none": np.ones(n),
        "random": rng.uniform(0.1, 3.0, size=n),
        "with-zeros": np.where(rng.uniform(size=n) < 0.4, 0.0, rng.uniform(0.1, 3.0, size=n)),
    }[weights]
    row_offset = 12345
    got = estep(
        X,
        MixtureParams.identity(C),
        assignment="hard",
        moments="none",
        sample_weight=None if weights == "none" else w,
        n_farthest=n_farthest,
        row_offset=row_offset,
    )
    labels = naive_labels(X, C)
    ref = naive_kmeans_stats(X, C, w, labels, np.zeros((k, d)), n_farthest, row_offset)
    check_stats(got, ref, w, X, n_farthest, row_offset)
    np.testing.assert_array_equal(predict_labels(X, MixtureParams.identity(C)), labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, _fused.SMALL_D, _fused.SMALL_D + 24])
def test_labels_equal_numpy_kernel_and_exact_argmin(dtype, d, block_elements: None) -> None:
    """Equal to the exact float64 argmin except where the two closest centres are within
    the dtype's rounding of each other; above SMALL_D features (the GEMM) bit-equal to
    the NumPy formula :func:`nearest`."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(5000, d)).astype(dtype)
    C = rng.normal(size=(37, d))
    params = MixtureParams.identity(C)
    labels = predict_labels(X, params)
    if d > _fused.SMALL_D:
        np.testing.assert_array_equal(labels, E.nearest(X, C))
    exact = ((X.astype(np.float64)[:, None, :] - C.astype(dtype)[None]) ** 2).sum(axis=2)
    order = np.sort(exact, axis=1)
    clear = (order[:, 1] - order[:, 0]) > 1e-3 * order[:, 0] * (dtype == np.float32) + 1e-9
    np.testing.assert_array_equal(labels[clear], exact.argmin(axis=1)[clear])
    assert clear.mean() > 0.95  # (float32, 64 or more features: 1-1.2 % within the margin)
    # the statistics of the fused E-step use those same labels
    got = estep(X, params, assignment="hard", moments="none")
    np.testing.assert_array_equal(got.nk, np.bincount(labels, minlength=37).astype(float))


def exact_scores(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``‖c‖² − 2 c·x`` in float64 for the centres as the kernels see them (X's dtype)."""
    Cd = C.astype(X.dtype).astype(np.float64)
    return (Cd * Cd).sum(axis=1)[None, :] - 2.0 * X.astype(np.float64) @ Cd.T


def small_search(X: np.ndarray, C: np.ndarray, second: bool = True, origin=None):
    """:func:`_fused.nearest_rows` on ``X − origin``: (labels, best, second or None)."""
    Cd = np.ascontiguousarray(C, dtype=X.dtype)
    n, d = X.shape
    labels, best = np.full(n, -1, np.int32), np.empty(n, X.dtype)
    runner_up = np.empty(n, X.dtype) if second else None
    c2 = (Cd * Cd).sum(axis=1)
    at = np.zeros(d, X.dtype) if origin is None else origin
    _fused.nearest_rows(X, at, -2.0 * Cd, c2, best, runner_up, labels, (0,) * d)
    return labels, best, runner_up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 5, _fused.SMALL_D])
def test_small_d_search_is_the_exact_argmin_and_runner_up(dtype, d) -> None:
    """The fused small-d search (rows in SIMD tiles, 1003 rows: a partial last tile)
    against float64: the label wherever the two closest centres are clear of rounding,
    ``best`` and ``second`` within rounding of the two smallest scores; a duplicated
    centre is its own runner-up and loses to its lower-indexed twin."""
    rng = np.random.default_rng(d)
    k = 23
    C = rng.normal(size=(k, d))
    C[7] = C[3]  # twins
    X = np.concatenate([rng.normal(size=(1000, d)), C[[3, 7, 0]]]).astype(dtype)
    labels, best, second = small_search(X, C)
    exact = exact_scores(X, C)
    order = np.sort(exact, axis=1)
    scale = np.abs(exact).max(axis=1) + (X.astype(np.float64) ** 2).sum(axis=1)
    eps = 8 * (d + 2) * np.finfo(dtype).eps * scale  # the kernels' rounding, generously
    clear = order[:, 1] - order[:, 0] > 2 * eps
    assert clear.mean() > 0.5  # (d = 1 in float32: many rows within that margin)
    np.testing.assert_array_equal(labels[clear], exact.argmin(axis=1)[clear])
    assert np.all(np.abs(best - order[:, 0]) <= eps)
    assert np.all(np.abs(second - order[:, 1]) <= eps)
    assert np.all(second >= best)
    twins = labels == 3
    assert twins[-3:-1].all() and not (labels == 7).any()
    np.testing.assert_array_equal(second[twins], best[twins])  # the twin is as close
    # without the runner-up: the same labels and best, bit for bit
    labels1, best1, _ = small_search(X, C, second=False)
    np.testing.assert_array_equal(labels1, labels)
    np.testing.assert_array_equal(best1, best)
    # one centre: no runner-up
    _, _, alone = small_search(X, C[:1])
    assert np.all(np.isinf(alone))


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_d_row_bits_do_not_depend_on_the_rows_beside_it(dtype) -> None:
    """What the bounds rely on: a row searched alone, gathered among others, in another
    order, or as a strided view gets the bits it gets within its block (a GEMM's bits
    depend on which kernel BLAS picks for the block's shape)."""
    rng = np.random.default_rng(5)
    d, k = 6, 40
    C = rng.normal(size=(k, d)) * 3
    X = (rng.normal(size=(203, d)) * 3 + 1000.0).astype(dtype)  # rounding-sized gaps
    C = C + 1000.0
    whole = small_search(X, C)
    for rows in (np.arange(203)[::-1], rng.permutation(203)[:37], np.array([5]), np.arange(17)):
        part = small_search(np.ascontiguousarray(X[rows]), C)
        for got, ref in zip(part, whole, strict=True):
            np.testing.assert_array_equal(got, ref[rows])
    for i in range(0, 203, 29):
        alone = small_search(X[i : i + 1], C)
        for got, ref in zip(alone, whole, strict=True):
            np.testing.assert_array_equal(got, ref[i : i + 1])
    wide = np.zeros((203, 2 * d), dtype)
    wide[:, ::2] = X
    strided = small_search(wide[:, ::2], C)
    for got, ref in zip(strided, whole, strict=True):
        np.testing.assert_array_equal(got, ref)
    # rows centred as they are read: the bits of the centred copy (centre_rows)
    origin = (rng.normal(size=d) * 50).astype(dtype)
    centred = np.empty_like(X)
    _fused.centre_rows(X, origin, centred)
    shifted = small_search(X, C - origin, origin=origin)
    for got, ref in zip(shifted, small_search(centred, C - origin), strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tile_plan_gives_the_same_bits(dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The register tile is chosen by the CPU (:func:`_fused.tile_plan`): each plan,
    compiled afresh here, gives every row the bits of the plan this machine uses, with
    and without the runner-up, for k not a multiple of the centres per step and a
    partial last tile."""
    rng = np.random.default_rng(11)
    k, d = 23, 7
    C = rng.normal(size=(k, d))
    C[9] = C[2]  # twins: the tie goes to the lower index in every plan
    X = np.concatenate([rng.normal(size=(1000, d)), C[[2, 9]]]).astype(dtype)
    Cd = C.astype(dtype)
    nC, c2, at = -2.0 * Cd, (Cd * Cd).sum(axis=1), np.zeros(d, dtype)
    reference = small_search(X, C), small_search(X, C, second=False)
    used: list[tuple[int, int, int]] = []
    for plan in [(16, 2, 6), (16, 2, 2), (8, 2, 2), (4, 1, 5)]:
        monkeypatch.setattr(
            _fused, "tile_plan", lambda itemsize, plan=plan: used.append(plan) or plan
        )
        search = numba.njit(nogil=True)(_fused.nearest_rows.py_func)
        for with_second, ref in zip((True, False), reference, strict=True):
            labels, best = np.full(len(X), -1, np.int32), np.empty(len(X), dtype)
            second = np.empty(len(X), dtype) if with_second else None
            search(X, at, nC, c2, best, second, labels, (0,) * d)
            np.testing.assert_array_equal(labels, ref[0])
            np.testing.assert_array_equal(best, ref[1])
            if with_second:
                np.testing.assert_array_equal(second, ref[2])
        assert used and used[-1] == plan  # compiled with this plan
    assert reference[0][0][-1] == 2


def test_the_search_is_fused_up_to_small_d_and_a_gemm_above() -> None:
    ws = E.Workspace()
    for d, fused in ((1, True), (_fused.SMALL_D, True), (_fused.SMALL_D + 1, False)):
        C = np.ones((3, d), np.float32)
        assert E._Search(ws, -2.0 * C, (C * C).sum(axis=1), C.dtype).row_exact is fused


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lowest_index(dtype, block_elements: None) -> None:
    # duplicated centres and points exactly halfway between two centres
    C = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 10.0]])
    X = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 2.0]] * 3, dtype=dtype)
    labels = predict_labels(X, MixtureParams.identity(C))
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 0] * 3)
    got = estep(X, MixtureParams.identity(C), assignment="hard", moments="none", n_farthest=3)
    np.testing.assert_array_equal(got.nk, [12.0, 3.0, 0.0, 0.0])
    # farthest candidates: distance 5 at rows 4, 9, 14 (ties by row, ascending)
    assert got.farthest is not None
    np.testing.assert_array_equal(got.farthest.rows, [4, 9, 14])
    np.testing.assert_array_equal(got.farthest.distances, [5.0, 5.0, 5.0])


def test_farthest_and_sums_do_not_depend_on_chunking() -> None:
    """Chunks merged in a tree give the farthest points of the whole (ties by row)."""
    rng = np.random.default_rng(11)
    X = rng.integers(-3, 4, size=(2000, 3)).astype(np.float64)  # many equal distances
    C = rng.normal(size=(6, 3))
    w = rng.uniform(0, 2, size=2000) * (rng.uniform(size=2000) > 0.2)
    params = MixtureParams.identity(C)
    whole = estep(X, params, assignment="hard", moments="none", sample_weight=w, n_farthest=50)
    parts = [
        estep(
            X[a:b],
            params,
            assignment="hard",
            moments="none",
            sample_weight=w[a:b],
            n_farthest=50,
            row_offset=a,
        )
        for a, b in [(0, 333), (333, 334), (334, 1500), (1500, 2000)]
    ]
    merged = (parts[0] + parts[1]) + (parts[2] + parts[3])
    assert whole.farthest is not None and merged.farthest is not None
    np.testing.assert_array_equal(whole.farthest.rows, merged.farthest.rows)
    np.testing.assert_array_equal(whole.farthest.points, X[whole.farthest.rows])
    np.testing.assert_array_equal(whole.farthest.weights, w[whole.farthest.rows])
    np.testing.assert_allclose(whole.nk, merged.nk, rtol=1e-13)
    np.testing.assert_allclose(whole.sx, merged.sx, rtol=1e-12, atol=1e-11)
    assert whole.objective == pytest.approx(merged.objective, rel=1e-13)


@pytest.mark.parametrize("moments", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_identity_pass_with_moments_and_shift(moments, dtype, block_elements: None) -> None:
    """The pass that starts a mixture from a k-means partition (moments around a shift)."""
    rng = np.random.default_rng(5)
    X = (rng.normal(size=(700, 3)) * [1, 2, 3] + 50).astype(dtype)
    C = X[:4].astype(np.float64) + 0.1
    shift = C + rng.normal(size=C.shape) * 0.01
    w = rng.uniform(0, 2, size=700)
    got = estep(
        X,
        MixtureParams.identity(C),
        assignment="hard",
        moments=moments,
        shift=shift,
        sample_weight=w,
    )
    labels = naive_labels(X, C)
    ref = naive_kmeans_stats(X, C, w, labels, shift, 0, 0)
    np.testing.assert_allclose(got.nk, ref["nk"], rtol=1e-12)
    np.testing.assert_allclose(got.sx, ref["sx"], rtol=1e-10, atol=1e-9)
    X64 = X.astype(np.float64)
    full = np.zeros((4, 3, 3))
    for i, j in enumerate(labels):
        diff = X64[i] - shift[j]
        full[j] += w[i] * np.outer(diff, diff)
    expected = {
        "full": full,
        "tied": full.sum(axis=0),
        "diag": np.diagonal(full, axis1=1, axis2=2),
        "spherical": np.diagonal(full, axis1=1, axis2=2).sum(axis=1),
    }[moments]
    assert got.sxx is not None
    np.testing.assert_allclose(got.sxx, expected, rtol=1e-8, atol=1e-6)


def test_non_contiguous_and_integer_input() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=(400, 8))
    X = base[::2, ::2]  # strided view
    C = rng.normal(size=(3, 4))
    w = np.linspace(0, 1, 400)[::2]
    got = estep(X, MixtureParams.identity(C), assignment="hard", moments="none", sample_weight=w)
    labels = naive_labels(np.ascontiguousarray(X), C)
    ref = naive_kmeans_stats(X, C, w, labels, np.zeros((3, 4)), 0, 0)
    check_stats(got, ref, w, X, 0, 0)
    Xi = rng.integers(-5, 5, size=(50, 2))
    Ci = np.array([[0.0, 0.0], [3.0, 3.0]])
    np.testing.assert_array_equal(
        predict_labels(Xi, MixtureParams.identity(Ci)), naive_labels(Xi.astype(float), Ci)
    )


def test_kernels_release_the_gil() -> None:
    # Dask's threaded scheduler runs one chunk per thread: the passes must not hold the GIL
    compiled = [
        f for f in vars(_fused).values() if isinstance(f, numba.core.registry.CPUDispatcher)
    ]
    assert {"accumulate_rows", "nearest_cols", "filter_bounds"} <= {f.__name__ for f in compiled}
    for f in compiled:
        assert f.targetoptions.get("nogil") is True, f.__name__


def test_uncacheable_location_falls_back_to_plain_jit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only install without a writable numba cache still compiles and runs."""
    real_njit = numba.njit

    def njit_without_cache(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit_without_cache)

    @_fused._jit
    def add_one(a):
        return a + 1

    assert add_one(1) == 2
    assert isinstance(add_one._cache, numba.core.caching.NullCache)


def test_softmax_rows_flush_negligible_terms_to_exact_zero() -> None:
    """Terms below exp(−690) of a row's largest are exactly 0 (never subnormal); the
    rest equal SciPy's softmax; NaN is kept."""
    from scipy.special import logsumexp, softmax

    L = np.array(
        [[0.0, -10.0, -700.0, -745.5, -1e5], [5.0, 5.0, -800.0, 3.0, -689.0]],
    )
    L[0, 4] = -np.inf  # a component of weight 0
    L[1, 2] = 5.0 - 689.9  # just above the cut: kept
    w = np.array([1.0, 2.0])
    R, norm, nk, total = L.copy(), np.empty(2), np.zeros(5), np.zeros(1)
    E._softmax_rows(R, w, norm, nk, total)
    ref = softmax(L, axis=1) * w[:, None]
    big = L - L.max(axis=1, keepdims=True) >= -690
    assert big.sum() == 6
    np.testing.assert_allclose(R[big], ref[big], rtol=1e-15)
    assert np.all(R[~big] == 0.0)
    assert not np.any((R != 0) & (np.abs(R) < np.finfo(float).tiny))
    np.testing.assert_allclose(norm, logsumexp(L, axis=1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(nk, R.sum(axis=0), rtol=1e-15)
    assert total[0] == pytest.approx(w @ norm, rel=1e-15)
    L[0, 1] = np.nan
    E._softmax_rows(L, w, norm, nk, total)
    assert np.isnan(L[0]).any() and np.isnan(norm[0])


def test_the_compiled_exp_is_within_two_ulp_of_numpys() -> None:
    """:func:`_fused.exp_shifted_rows`' exp (NumPy's is scalar glibc without AVX-512)
    over its whole domain [NEGLIGIBLE_LOG, 0]: within 2 ulp of ``np.exp`` (most rows the
    same bits), exactly 1 at the row's maximum, NaN kept, the clamp at NEGLIGIBLE_LOG."""
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [
            -rng.exponential(3.0, 200_000),
            rng.uniform(_fused.NEGLIGIBLE_LOG, 0.0, 200_000),
            -np.log(2.0) * np.arange(0.0, 996.0, 0.5),  # the reduction's boundaries
            [-1e-300, -5e-324, -0.0, _fused.NEGLIGIBLE_LOG, 3.0 * _fused.NEGLIGIBLE_LOG],
        ]
    )
    x = x[x >= 3.0 * _fused.NEGLIGIBLE_LOG]
    L = np.column_stack([np.full(x.size, 5.0), x + 5.0])  # each row's maximum first
    top = np.empty(x.size)
    _fused.exp_shifted_rows(L, top, None)
    np.testing.assert_array_equal(top, 5.0)
    np.testing.assert_array_equal(L[:, 0], 1.0)
    want = np.exp(np.maximum((x + 5.0) - 5.0, _fused.NEGLIGIBLE_LOG))
    ulp = np.abs(L[:, 1] - want) / np.spacing(want)
    assert ulp.max() <= 2.0
    assert (ulp == 0).mean() > 0.5
    nan = np.array([[0.0, np.nan, -1.0]])
    _fused.exp_shifted_rows(nan, np.empty(1), None)
    assert nan[0, 0] == 1.0 and np.isnan(nan[0, 1]) and nan[0, 2] == np.exp(-1.0)


def test_softmax_rows_give_numpys_argmax_of_the_rows_as_they_came() -> None:
    """The re-seeding candidates' labels: the first maximum, ties and −inf included."""
    rng = np.random.default_rng(4)
    L = rng.normal(size=(500, 7)) * 30
    L[::7, 3] = L[::7, 5] = L[::7].max(axis=1) + 1.0  # tied maxima: the first wins
    L[1] = -np.inf  # all −inf: 0, as NumPy
    L[2, :6] = -np.inf
    labels = np.full(500, -1, np.int64)
    with np.errstate(invalid="ignore"):
        expected = L.argmax(axis=1)
        E._softmax_rows(L.copy(), np.ones(500), np.empty(500), np.zeros(7), np.zeros(1), labels)
    np.testing.assert_array_equal(labels, expected)
    assert expected[2] == 6 and expected[7] == 3


def test_triangular_side():
    """Which side of the diagonal a square matrix has zeros on (the wide E-step's
    triangular products take ``trmm`` when one side is all zeros)."""
    from dkm.kernels._fused import triangular_side

    rng = np.random.default_rng(0)
    A = rng.normal(size=(7, 7))
    assert triangular_side(np.triu(A)) == 1
    assert triangular_side(np.tril(A)) == 2
    assert triangular_side(np.diag(np.diag(A))) == 3
    assert triangular_side(A) == 0
    B = np.triu(A)
    B[6, 0] = 1e-300  # one non-zero far below the diagonal
    assert triangular_side(B) == 0
    assert triangular_side(np.ones((1, 1))) == 3
