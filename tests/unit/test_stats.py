"""Tier 1: the mergeable summaries are monoids (property tests with hypothesis)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import chunk_estep
from hypothesis import given, settings
from hypothesis import strategies as st

from dkm.stats import DataSummary, FarthestPoints, SuffStats, WeightedSample, uniform_from_rows

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
