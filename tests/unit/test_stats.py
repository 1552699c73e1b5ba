"""Tier 1: the mergeable summaries are monoids (property tests with hypothesis)."""

from __future__ import annotations

import itertools
import math
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from conftest import chunk_estep
from hypothesis import given, settings
from hypothesis import strategies as st

from dkm.stats import (
    DataSummary,
    FarthestPoints,
    RowSample,
    SuffStats,
    WeightedSample,
    uniform_from_rows,
)

MOMENTS = ["none", "spherical", "diag", "tied", "full"]


def _close(a: SuffStats, b: SuffStats, rtol: float = 1e-10) -> None:
    assert a.moments == b.moments and a.count == b.count
    scale = max(1.0, float(np.abs(a.sx).max(initial=0)))
    np.testing.assert_allclose(a.nk, b.nk, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(a.sx, b.sx, rtol=rtol, atol=1e-12 * scale)
    if a.sxx is not None:
        assert b.sxx is not None
        np.testing.assert_allclose(a.sxx, b.sxx, rtol=rtol, atol=1e-9 * scale)
    np.testing.assert_allclose(a.objective, b.objective, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(a.n, b.n, rtol=rtol)
    if a.farthest is not None:
        assert b.farthest is not None
        np.testing.assert_array_equal(a.farthest.rows, b.farthest.rows)


@st.composite
def chunked_problem(draw: st.DrawFn):
    n = draw(st.integers(1, 60))
    d = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * draw(st.sampled_from([1.0, 100.0]))
    w = rng.uniform(0.0, 3.0, size=n)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    moments = draw(st.sampled_from(MOMENTS))
    assignment = draw(st.sampled_from(["hard", "soft"]))
    means = rng.normal(size=(k, d))
    return X, w, cuts, moments, assignment, means


def _stats(X, w, offset, moments, assignment, means):
    # the farthest rows are collected for k-means (identity, hard) only
    far = 3 if moments == "none" and assignment == "hard" else 0
    return chunk_estep(X, w, offset, moments, assignment, means, far)


@settings(max_examples=60, deadline=None)
@given(chunked_problem())
def test_stats_of_concatenation_equal_merge_of_parts(problem):
    X, w, cuts, moments, assignment, means = problem
    whole = _stats(X, w, 0, moments, assignment, means)
    bounds = [0, *cuts, len(X)]
    parts = [
        _stats(X[a:b], w[a:b], a, moments, assignment, means) for a, b in itertools.pairwise(bounds)
    ]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    _close(whole, merged)


@settings(max_examples=60, deadline=None)
@given(chunked_problem())
def test_merge_is_associative_and_commutative_with_zero(problem):
    X, w, _, moments, assignment, means = problem
    n = len(X)
    a, b, c = (
        _stats(X[s], w[s], s.start, moments, assignment, means)
        for s in (slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n))
    )
    _close(a.merge(b).merge(c), a.merge(b.merge(c)))
    _close(a.merge(b), b.merge(a))
    k, d = means.shape
    zero = SuffStats.zero(k, d, moments, a.farthest.capacity if a.farthest else 0)
    _close(zero.merge(a), a)


def test_merge_refuses_mismatched_kinds():
    with pytest.raises(ValueError, match="cannot merge"):
        SuffStats.zero(2, 3, "full").merge(SuffStats.zero(2, 3, "diag"))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 80), st.integers(1, 10), st.lists(st.integers(0, 80)))
def test_farthest_points_is_top_m_of_union(seed, n, m, cuts):
    rng = np.random.default_rng(seed)
    dist = rng.integers(0, 5, size=n).astype(float)  # many ties: the row index breaks them
    X = rng.normal(size=(n, 2))
    w = rng.uniform(0, 1, size=n)
    w[rng.uniform(size=n) < 0.2] = 0.0
    labels = rng.integers(3, size=n)
    whole = FarthestPoints.from_chunk(m, dist, X, w, labels, 0)
    bounds = [0, *sorted(c for c in cuts if c <= n), n]
    merged = FarthestPoints.empty(m, 2)
    for a, b in itertools.pairwise(bounds):
        merged = merged.merge(
            FarthestPoints.from_chunk(m, dist[a:b], X[a:b], w[a:b], labels[a:b], a)
        )
    np.testing.assert_array_equal(whole.rows, merged.rows)
    # naive reference: positive weight, sort by (-distance, row)
    rows = [i for i in sorted(range(n), key=lambda i: (-dist[i], i)) if w[i] > 0][:m]
    np.testing.assert_array_equal(whole.rows, rows)
    np.testing.assert_array_equal(whole.points, X[rows])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31), st.integers(1, 200), st.integers(1, 50), st.lists(st.integers(0, 200))
)
def test_weighted_sample_and_summary_do_not_depend_on_chunking(seed, n, m, cuts):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) * 10 + 1e6
    w = rng.uniform(0, 2, size=n)
    whole = DataSummary.from_chunk(X, w, 0, m, seed)
    bounds = [0, *sorted(c for c in cuts if c <= n), n]
    parts = [
        DataSummary.from_chunk(X[a:b], w[a:b], a, m, seed) for a, b in itertools.pairwise(bounds)
    ]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    np.testing.assert_array_equal(whole.sample.rows, merged.sample.rows)
    np.testing.assert_allclose(merged.mean, X.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.variance, X.var(axis=0), rtol=1e-9)
    assert merged.count == n and merged.n_positive == np.count_nonzero(w > 0)


def test_weighted_sample_follows_weights():
    n = 20000
    rows = np.arange(n)
    w = np.where(rows < n // 2, 3.0, 1.0)  # first half three times as likely
    X = rows[:, None].astype(float)
    s = WeightedSample.from_chunk(2000, X, w, 0, seed=7)
    share = np.mean(s.rows < n // 2)
    assert 0.7 < share < 0.8  # ≈ 0.75 (without replacement, slightly less)
    assert len(np.unique(s.rows)) == 2000


def test_uniform_from_rows_is_uniform_and_seeded():
    u = uniform_from_rows(np.arange(100000), 1)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert not np.array_equal(u[:10], uniform_from_rows(np.arange(10), 2))
    np.testing.assert_array_equal(u[5:10], uniform_from_rows(np.arange(5, 10), 1))


def test_summary_reports_first_bad_row():
    X = np.ones((10, 2))
    X[7, 1] = np.nan
    s = DataSummary.from_chunk(X, np.ones(10), 100, 5, 0)
    assert s.n_nonfinite == 1 and s.first_nonfinite_row == 107


def _laid_out(X: np.ndarray, layout: str) -> np.ndarray:
    if layout == "strided":  # every other column of a wider array: neither C nor F
        wide = np.zeros((X.shape[0], 2 * X.shape[1]), X.dtype)
        wide[:, ::2] = X
        return wide[:, ::2]
    return np.asarray(X, order=layout)


def _bits(a: object) -> bytes:
    return np.asarray(a, np.float64).tobytes()


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 3), (2, 1), (997, 5), (4099, 33)])
def test_summary_moments_are_numpys_float64_ones(shape, dtype, layout, monkeypatch):
    monkeypatch.setattr("dkm.stats._BLOCK_BYTES", 8 * 3 * shape[0])  # 3 columns a block
    rng = np.random.default_rng(shape[0])
    scales = rng.choice([1e-3, 1.0, 1e3], size=shape[1])
    offsets = rng.choice([0.0, 1e4, -3e6], size=shape[1])
    X = _laid_out((rng.normal(size=shape) * scales + offsets).astype(dtype), layout)
    s = DataSummary.from_chunk(X, np.ones(shape[0]), 0, 10, 1)
    # the bits of the float64 copy's (scikit-learn centres the data by this mean and
    # takes its tolerance from np.var, both in float64)
    X64 = np.asarray(X, np.float64)
    mean = X64.mean(axis=0)
    assert _bits(s.mean) == _bits(mean)
    assert _bits(s.m2) == _bits(((X64 - mean) ** 2).sum(axis=0))
    assert _bits(s.variance) == _bits(np.var(X64, axis=0))
    assert s.max_abs == np.abs(X64).max()
    assert (s.count, s.n_nonfinite, s.first_nonfinite_row) == (shape[0], 0, -1)
    # and near correctly rounded sums (math.fsum); plain running sums err by up to
    # (n − 1)ε Σ|x|, and the mean's error shifts m2 by n·δ² (the squares are summed
    # about the summary's own mean here)
    exact = np.array([math.fsum(col) / shape[0] for col in X64.T])
    assert np.all(np.abs(s.mean - exact) <= 1e-13 * np.abs(X64).mean(axis=0))
    m2 = np.array([math.fsum((col - m) ** 2) for col, m in zip(X64.T, s.mean, strict=True)])
    np.testing.assert_allclose(s.m2, m2, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "bad",
    [
        [(-1, 2, np.nan)],  # the last row
        [(0, 0, np.nan)],  # the first
        [(5, 1, np.inf), (9, 1, -np.inf)],  # inf and -inf in one column
        [(7, 0, -np.inf), (7, 3, np.nan), (30, 3, np.inf)],
    ],
)
def test_summary_finds_every_nonfinite_row(bad, dtype, layout, monkeypatch):
    monkeypatch.setattr("dkm.stats._BLOCK_BYTES", 8 * 3 * 41)  # 3 columns a block
    rng = np.random.default_rng(3)
    X = rng.normal(size=(41, 4)).astype(dtype)
    for i, j, v in bad:
        X[i, j] = v
    X = _laid_out(X, layout)
    w = rng.uniform(0.5, 2, size=41)
    finite = np.isfinite(X).all(axis=1)
    s = DataSummary.from_chunk(X, w, 100, 10, 1)
    assert s.n_nonfinite == np.count_nonzero(~finite)
    assert s.first_nonfinite_row == 100 + np.flatnonzero(~finite)[0]
    assert s.sample.rows.size == 0
    dropped = DataSummary.from_chunk(X, w, 100, 10, 1, drop_nonfinite=True, rows_rate=0.5)
    kept = DataSummary.from_chunk(X[finite], w[finite], 0, 10, 1)
    assert (dropped.count, dropped.n_nonfinite) == (kept.count, s.n_nonfinite)
    assert _bits(dropped.mean) == _bits(kept.mean) and _bits(dropped.m2) == _bits(kept.m2)
    assert dropped.max_abs == kept.max_abs
    # the samples of the rows with zero weight and zeros in place of the dropped ones
    w0, X0 = np.where(finite, w, 0.0), np.where(finite[:, None], X, 0.0)
    ref = WeightedSample.from_chunk(10, X0, w0, 100, 1)
    assert dropped.rows_sample is not None
    ref_rows = RowSample.from_chunk(0.5, X0, w0, 100, 1 ^ 0x5DEECE66D)
    for got, want in ((dropped.sample, ref), (dropped.rows_sample, ref_rows)):
        for name in ("keys", "rows", "points", "weights"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("layout", ["C", "F"])
def test_summary_of_finite_values_whose_sums_overflow_float64(layout):
    X = np.array([[1.5e308, 1.0], [1.7e308, 2.0], [1.6e308, 4.0], [-1e308, 8.0]], order=layout)
    s = DataSummary.from_chunk(X, np.ones(4), 0, 10, 1)
    assert (s.n_nonfinite, s.first_nonfinite_row) == (0, -1)
    assert s.max_abs == 1.7e308
    want = [float(sum(Fraction(v) for v in col) / 4) for col in X.T]
    np.testing.assert_allclose(s.mean, want, rtol=1e-15)
    assert s.m2[0] == np.inf  # Σ (x − mean)² is beyond float64: its rounding
    assert s.m2[1] == float(sum((Fraction(v) - Fraction(15, 4)) ** 2 for v in X[:, 1]))


@pytest.mark.parametrize("layout", ["C", "F"])
def test_summary_makes_no_float64_copy_of_the_chunk(layout):
    X = np.asarray(np.random.default_rng(0).normal(size=(50_000, 64)), np.float32, order=layout)
    w = np.ones(len(X))
    DataSummary.from_chunk(X, w, 0, 1000, 1, rows_rate=0.05)  # compiled before measuring
    tracemalloc.start()
    try:
        DataSummary.from_chunk(X, w, 0, 1000, 1, rows_rate=0.05)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.nbytes / 2  # a float64 copy is 2 X.nbytes; the row-sized arrays less
