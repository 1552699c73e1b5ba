"""Exact, order-independent merging: dkm.exact's accumulators against exact rational sums,
and the statistics' totals bit for bit the same for any grouping and order of the chunks."""

from __future__ import annotations

import itertools
import math
import pickle
import warnings
from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from conftest import chunk_estep
from hypothesis import given, settings
from hypothesis import strategies as st

from dkm import stats
from dkm.exact import MAX_PARTS, ExactSum
from dkm.stats import (
    CandidateSample,
    DataSummary,
    FarthestPoints,
    SuffStats,
    WeightedSample,
    merge_all,
)

MOMENTS = ["none", "spherical", "diag", "tied", "full"]


def _bits(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float64)).view(np.uint64)


def _same_bits(a: Any, b: Any) -> bool:
    return np.array_equal(_bits(a), _bits(b))


def _exact_sum(chunks: list[np.ndarray]) -> list[Fraction]:
    flat = np.stack(chunks).reshape(len(chunks), -1)
    return [sum((Fraction(v) for v in flat[:, i]), Fraction(0)) for i in range(flat.shape[1])]


def _check_against_fractions(chunks: list[np.ndarray]) -> ExactSum:
    """The value held is within the bound of the exact sum; the float read is it rounded."""
    acc = ExactSum.sum_of([ExactSum.of(c) for c in chunks])
    stacked = ExactSum.of(np.stack(chunks)).total()  # the same sum in one pass
    assert np.array_equal(stacked.top, acc.top) and np.array_equal(stacked.bins, acc.bins)
    got = acc.to_float()
    held = acc.to_fractions()
    flat = np.stack(chunks).reshape(len(chunks), -1)
    for i, exact in enumerate(_exact_sum(chunks)):
        assert _same_bits(got[i], float(held[i])) or got[i] == held[i] == 0
        biggest = float(np.abs(flat[:, i]).max())
        if biggest:
            p = math.frexp(biggest)[1] - 1  # 2^p <= biggest < 2^(p + 1)
            assert abs(held[i] - exact) < len(chunks) * Fraction(2) ** (p - 80)
        else:
            assert held[i] == 0
    return acc


finite = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=12))
def test_exact_sum_is_the_rational_sum_within_its_bound(rows):
    _check_against_fractions([np.array(r) for r in rows])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(2**53), 2**53), st.integers(-1074, 960)), min_size=1, max_size=20
    ),
    st.integers(0, 26),
)
def test_exact_sum_is_exact_within_its_window(terms, spread):
    # deposits within 2^27 of each other in magnitude: every bit is kept
    top = max(e for _, e in terms)
    values = [math.ldexp(m, max(e, top - spread)) for m, e in terms]
    acc = ExactSum.sum_of([ExactSum.of(np.array([v])) for v in values])
    exact = sum((Fraction(v) for v in values), Fraction(0))
    assert acc.to_fractions()[0] == exact
    assert _same_bits(acc.to_float()[0], float(exact)) or float(exact) == 0.0


def test_exact_sum_adversarial_cases():
    rng = np.random.default_rng(0)
    # huge cancellation: float sums lose the small terms, the exact sum keeps them
    big = rng.normal(size=5) * 2.0**60
    chunks = [big, np.ones(5), -big, np.ones(5)]
    assert _same_bits(_check_against_fractions(chunks).to_float(), np.full(5, 2.0))
    # mixed magnitudes 1e-300 .. 1e300, both signs, subnormals, ±0, powers of two
    mixed = [rng.normal(size=8) * 10.0 ** rng.integers(-300, 300, size=8) for _ in range(30)] + [
        np.array([0.0, -0.0, 5e-324, -5e-324, 2.0**-1022, 2.0**1023, -1e308, 1.0])
    ]
    _check_against_fractions(mixed)
    # many deposits
    many = [rng.normal(size=4) * rng.choice([1e-3, 1.0, 1e3]) for _ in range(3000)]
    acc = _check_against_fractions(many)
    assert _same_bits(acc.to_float(), [float(e) for e in _exact_sum(many)])
    # ties to even: 2^53 + 1 rounds to 2^53, 2^53 + 3 to 2^53 + 4
    tie = ExactSum.of(np.array([2.0**53, 2.0**53 + 2])).merge(ExactSum.of(np.ones(2)))
    assert _same_bits(tie.to_float(), [2.0**53, 2.0**53 + 4])
    # sums below the smallest normal, and a sum past float64's range (IEEE: inf)
    sub = ExactSum.of(np.array([5e-324, 2.0**-1022])).merge(
        ExactSum.of(np.array([5e-324, -5e-324]))
    )
    assert _same_bits(sub.to_float(), [1e-323, 2.0**-1022 - 5e-324])
    with pytest.warns(RuntimeWarning, match="overflow"):
        assert (
            ExactSum.of(np.array([1e308])).merge(ExactSum.of(np.array([1e308]))).to_float()[0]
            == np.inf
        )


def test_exact_sum_propagates_non_finite_values():
    a = ExactSum.of(np.array([np.inf, np.nan, 1.0, np.inf, -np.inf]))
    b = ExactSum.of(np.array([1.0, 1.0, np.inf, -np.inf, -np.inf]))
    got = a.merge(b).to_float()
    np.testing.assert_array_equal(got, [np.inf, np.nan, np.inf, np.nan, -np.inf])
    assert _same_bits(a.merge(b).to_float(), b.merge(a).to_float())


def test_exact_sum_headroom_and_its_limit():
    # MAX_PARTS deposits of the same values: the int64 bins and the carries on reading
    # stay in range (the bins of n equal deposits are n times one deposit's)
    x = np.array([-(2.0**120 - 2.0**68), 2.0**120 - 2.0**68, -1.0, 3.0 * 2.0**-1000])
    one = ExactSum.of(x)
    full = ExactSum(one.top, one.bins * MAX_PARTS, MAX_PARTS)
    want = [float(Fraction(v) * MAX_PARTS) for v in x]
    assert _same_bits(full.to_float(), want)
    assert full.to_fractions() == [Fraction(v) * MAX_PARTS for v in x]
    with pytest.raises(OverflowError, match=r"at most .* deposits"):
        full.merge(one)


# --- the statistics: any grouping and order of the same chunks, the same bits ---------


def _random_tree(parts: list[Any], data: st.DataObject) -> Any:
    """Merge ``parts`` in a random order along a random binary tree."""
    order = data.draw(st.permutations(range(len(parts))))
    nodes = [parts[i] for i in order]
    while len(nodes) > 1:
        i = data.draw(st.integers(0, len(nodes) - 2))
        a, b = nodes[i], nodes[i + 1]
        if data.draw(st.booleans()):
            a, b = b, a
        nodes[i : i + 2] = [a.merge(b)]
    return nodes[0]


def _chunk_bounds(n: int, data: st.DataObject) -> list[int]:
    cuts = data.draw(st.lists(st.integers(0, n), min_size=1, max_size=7))
    return [0, *sorted(cuts), n]


def _suffstats_bits(s: SuffStats) -> list[Any]:
    out = [_bits(s.nk), _bits(s.sx), _bits(s.objective), _bits(s.n), s.count, s.searched]
    out.append(None if s.sxx is None else _bits(s.sxx))
    if s.farthest is not None:
        f = s.farthest
        out += [_bits(f.distances), f.rows, _bits(f.points), _bits(f.weights), f.labels]
    return out


def _assert_identical(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x is None or isinstance(x, int):
            assert x == y
        else:
            assert np.array_equal(x, y)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31),
    st.sampled_from(MOMENTS),
    st.sampled_from(["hard", "soft"]),
    st.sampled_from([1.0, 1e-3, 1e4]),
    st.data(),
)
def test_suffstats_totals_do_not_depend_on_grouping(seed, moments, assignment, scale, data):
    rng = np.random.default_rng(seed)
    n, d, k = 120, 3, 4
    X = rng.normal(size=(n, d)) * scale * rng.choice([1.0, 1e3], size=(n, 1))
    w = rng.uniform(0.0, 3.0, size=n)
    means = rng.normal(size=(k, d)) * scale
    far = 3 if moments == "none" and assignment == "hard" else 0
    bounds = _chunk_bounds(n, data)
    parts = [
        chunk_estep(X[a:b], w[a:b], a, moments, assignment, means, far)
        for a, b in itertools.pairwise(bounds)
    ]
    reference = _suffstats_bits(merge_all(parts))
    _assert_identical(_suffstats_bits(_random_tree(parts, data)), reference)
    _assert_identical(_suffstats_bits(_random_tree(parts, data)), reference)
    # the total also equals the float64 sum closely
    floats = parts[0]
    for p in parts[1:]:
        floats = floats.plus(p)
    total = merge_all(parts)
    np.testing.assert_allclose(total.nk, floats.nk, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(total.sx, floats.sx, rtol=1e-12, atol=1e-12 * scale * 1e3)
    np.testing.assert_allclose(total.n, floats.n, rtol=1e-14)


def test_merged_total_with_zero_keeps_the_chunk_bits_and_round_trips():
    rng = np.random.default_rng(3)
    X, w, means = rng.normal(size=(50, 3)), rng.uniform(size=50), rng.normal(size=(4, 3))
    for moments in MOMENTS:
        a = chunk_estep(X, w, 0, moments, "soft", means, 0)
        zero = SuffStats.zero(4, 3, moments)
        _assert_identical(_suffstats_bits(zero.merge(a)), _suffstats_bits(a))
        total = a.merge(zero).merge(a)
        again = pickle.loads(pickle.dumps(total))
        _assert_identical(_suffstats_bits(again), _suffstats_bits(total))
        # a total rebuilt from its floats merges as those floats
        rebuilt = replace(total, count=total.count)
        assert rebuilt.n_components == 4 and rebuilt.n_features == 3
        _assert_identical(_suffstats_bits(rebuilt.merge(zero)), _suffstats_bits(total))


def test_merge_is_closer_to_the_exact_sum_than_float_sums():
    # one feature's sums in four chunks: a large value, its negation, and small ones
    values = [np.array([[2.0**55]]), np.array([[1.0]]), np.array([[-(2.0**55)]]), np.array([[1.0]])]
    parts = [SuffStats("none", np.ones(1), v, None, float(v[0, 0]), 1.0, 1) for v in values]
    floats = parts[0]
    for p in parts[1:]:
        floats = floats.plus(p)
    assert floats.sx[0, 0] == 1.0 and floats.objective == 1.0  # 2^55 + 1 lost the 1
    total = merge_all(parts)
    assert total.sx[0, 0] == 2.0 and total.objective == 2.0


def _summary_bits(s: DataSummary) -> list[Any]:
    out = [_bits(s.mean), _bits(s.m2), _bits(s.weight), s.count, s.n_positive, s.n_nonfinite]
    out += [s.first_nonfinite_row, _bits(s.max_abs), s.sample.rows, _bits(s.sample.keys)]
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([0.0, 1e6, -3e4]), st.data())
def test_data_summary_does_not_depend_on_grouping(seed, offset, data):
    rng = np.random.default_rng(seed)
    n = 200
    X = rng.normal(size=(n, 3)) * rng.choice([1e-3, 1.0, 10.0], size=3) + offset
    w = rng.uniform(0, 2, size=n)
    bounds = _chunk_bounds(n, data)
    parts = [
        DataSummary.from_chunk(X[a:b], w[a:b], a, 20, seed) for a, b in itertools.pairwise(bounds)
    ]
    reference = _summary_bits(merge_all(parts))
    _assert_identical(_summary_bits(_random_tree(parts, data)), reference)
    total = _random_tree(parts, data)
    _assert_identical(_summary_bits(total), reference)
    # the mean is Σ n_c m_c / n rounded once; the variance near the exact one
    a = np.array([Fraction(0)] * 3, dtype=object)
    for p in parts:
        a += p.count * np.array([Fraction(m) for m in p.mean])
    assert _same_bits(total.mean, [float(v / n) for v in a])
    exact = [[Fraction(v) for v in X[:, j]] for j in range(X.shape[1])]
    exact_mean = [sum(col) / n for col in exact]
    exact_var = [
        sum((v - m) ** 2 for v in col) / n for col, m in zip(exact, exact_mean, strict=True)
    ]
    want = np.array([float(v) for v in exact_var])
    # relative error ≲ 2ε·max|x|/σ: the chunk means' roundings against the spread
    bound = 1e-12 + 4 * 2.0**-52 * np.abs(X).max(axis=0) / np.sqrt(want)
    assert np.all(np.abs(total.variance - want) <= bound * want)
    assert _same_bits(total.weight, float(sum(Fraction(p.weight) for p in parts)))


def test_data_summary_of_one_chunk_merged_with_empty_ones_keeps_its_bits():
    rng = np.random.default_rng(5)
    X, w = rng.normal(size=(40, 2)) + 1e5, rng.uniform(size=40)
    one = DataSummary.from_chunk(X, w, 0, 8, 1)
    empty = DataSummary.from_chunk(X[:0], w[:0], 40, 8, 1)
    _assert_identical(_summary_bits(merge_all([empty, one, empty])), _summary_bits(one))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 12), st.data())
def test_samples_and_candidates_do_not_depend_on_grouping(seed, m, data):
    rng = np.random.default_rng(seed)
    n = 150
    X = rng.normal(size=(n, 2))
    w = rng.uniform(0, 2, size=n)
    w[rng.uniform(size=n) < 0.2] = 0.0
    dist = rng.integers(0, 4, size=n).astype(float) * rng.choice([1e-8, 1.0, 1e8])  # ties
    labels = rng.integers(3, size=n)
    bounds = _chunk_bounds(n, data)
    pairs = list(itertools.pairwise(bounds))

    far = [
        FarthestPoints.from_chunk(m, dist[a:b], X[a:b], w[a:b], labels[a:b], a) for a, b in pairs
    ]
    ws = [WeightedSample.from_chunk(m, X[a:b], w[a:b], a, seed) for a, b in pairs]
    cand = [
        CandidateSample.from_chunk(m, X[a:b], w[a:b], dist[a:b], 2.0, a, seed) for a, b in pairs
    ]

    def far_bits(f: FarthestPoints) -> list[Any]:
        return [_bits(f.distances), f.rows, _bits(f.points), _bits(f.weights), f.labels]

    def ws_bits(s: WeightedSample) -> list[Any]:
        return [_bits(s.keys), s.rows, _bits(s.points), _bits(s.weights)]

    def cand_bits(c: CandidateSample) -> list[Any]:
        return [_bits(c.keys), c.rows, _bits(c.points), _bits(c.weights), _bits(c.cost), c.count]

    for parts, bits in ((far, far_bits), (ws, ws_bits), (cand, cand_bits)):
        reference = bits(merge_all(parts))
        _assert_identical(bits(_random_tree(parts, data)), reference)
        _assert_identical(bits(_random_tree(parts, data)), reference)
    total = _random_tree(cand, data)
    exact_cost = sum((Fraction(float(c.cost)) for c in cand), Fraction(0))
    assert total.cost == float(exact_cost)


def test_merge_all_deposits_in_batches_with_the_same_bits(monkeypatch):
    rng = np.random.default_rng(11)
    X, w, means = rng.normal(size=(90, 3)) * 1e3, rng.uniform(size=90), rng.normal(size=(4, 3))
    parts = [
        chunk_estep(X[a : a + 10], w[a : a + 10], a, "full", "soft", means, 0)
        for a in range(0, 90, 10)
    ]
    whole = _suffstats_bits(merge_all(parts))
    monkeypatch.setattr(stats, "_BATCH_SUMS", 1)  # one chunk per batch
    _assert_identical(_suffstats_bits(merge_all(parts)), whole)
    pairwise = parts[0]
    for p in parts[1:]:
        pairwise = pairwise.merge(p)
    _assert_identical(_suffstats_bits(pairwise), whole)


def _compiled_and_numpy(fn):
    """``fn()`` with the compiled loops and with the NumPy code alone."""
    from dkm import exact

    results = []
    for compiled in (True, False):
        exact.COMPILED = compiled
        try:
            results.append(fn())
        finally:
            exact.COMPILED = True
    return results


def _sums_of(chunks: list[np.ndarray]) -> tuple[list[Any], ...]:
    parts = [ExactSum.of(c) for c in chunks] + [ExactSum.total_of(np.stack(chunks))]
    total = ExactSum.sum_of(parts)
    return [p.top for p in parts], [p.bins for p in parts], total.top, total.bins, total.to_float()


def _assert_same_sums(a, b):
    for x, y in zip(a[0] + a[1] + [a[2], a[3]], b[0] + b[1] + [b[2], b[3]], strict=True):
        assert np.array_equal(x, y)
    assert _same_bits(a[4], b[4])


any_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(any_finite, min_size=4, max_size=4), min_size=1, max_size=8))
def test_compiled_exact_sums_are_the_numpy_code_bit_for_bit(rows):
    """Deposits, totals, merges and reads of finite values (every magnitude, subnormals,
    ±0, sums past float64's range): the compiled loops give the NumPy code's bits."""
    chunks = [np.array(r) for r in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sum past the range: inf
        compiled, numpy_code = _compiled_and_numpy(lambda: _sums_of(chunks))
    _assert_same_sums(compiled, numpy_code)


def test_compiled_exact_sums_on_adversarial_arrays():
    """Arrays mixing magnitudes 1e-310 .. 1.7e308 of both signs, zeros and powers of two,
    deposited apart and stacked, merged and read: the NumPy code's bits."""
    rng = np.random.default_rng(23)

    def sample(shape):
        x = rng.normal(size=shape) * 10.0 ** rng.integers(-300, 300, size=shape)
        x[rng.random(shape) < 0.1] = 0.0
        x[rng.random(shape) < 0.05] = -0.0
        tiny = rng.random(shape) < 0.03
        x[tiny] = rng.normal(size=tiny.sum()) * 1e-310
        picks = [1.7e308, -1.7e308, 2.0**1023, 1.0, -1.0, 0.5, 2.0**-1074, 2.0**53 + 2]
        special = rng.random(shape) < 0.03
        x[special] = rng.choice(picks, size=special.sum())
        return x

    for _ in range(10):
        shape = (int(rng.integers(1, 4)), 500)
        chunks = [sample(shape) for _ in range(int(rng.integers(1, 6)))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            compiled, numpy_code = _compiled_and_numpy(lambda c=chunks: _sums_of(c))
        _assert_same_sums(compiled, numpy_code)


@pytest.mark.parametrize("d", [5, 40])
@pytest.mark.parametrize("assignment", ["soft", "hard"])
@pytest.mark.parametrize("moments", ["full", "tied"])
def test_symmetric_moments_keep_one_triangle(moments, assignment, d):
    """Full and tied second moments leave the E-step exactly symmetric (a moment shift
    or a product ``Aᵀ B`` can leave the two triangles a last bit apart before), their
    exact sums hold one triangle (k·d(d+1)/2 sums for full moments), a chunk merged with
    zero keeps its bits, and totals are symmetric whatever the grouping."""
    from dkm import covariance
    from dkm.kernels import MixtureParams, estep

    rng = np.random.default_rng(d)
    k = 3
    cov = np.stack([np.eye(d) * (1 + j) for j in range(k)])
    params = MixtureParams(
        "full", np.full(k, 1 / k), rng.normal(size=(k, d)), covariance.FULL.precision_cholesky(cov)
    )
    shift = params.means + 1e3  # a far shift: the moment shift's subtractions round
    chunks = [rng.normal(size=(60, d)) * 3 for _ in range(4)]
    parts = [estep(X, params, assignment=assignment, moments=moments, shift=shift) for X in chunks]
    for p in parts:
        assert _same_bits(p.sxx, np.swapaxes(p.sxx, -1, -2))
    pair = d * (d + 1) // 2 * (k if moments == "full" else 1)
    assert parts[0]._flat().size == k + k * d + pair + 2
    zero = SuffStats.zero(k, d, moments)
    assert _same_bits(SuffStats.merge_many([parts[0], zero]).sxx, parts[0].sxx)
    total = merge_all(parts)
    again = SuffStats.merge_many([parts[2], SuffStats.merge_many([parts[3], parts[0]]), parts[1]])
    assert _same_bits(total.sxx, again.sxx)
    assert _same_bits(total.sxx, np.swapaxes(total.sxx, -1, -2))


def test_statistics_read_from_a_record_merge_as_their_lower_triangle():
    """Full moments written by an earlier dkm (a last bit from symmetric) are read bit
    for bit; merged, the total keeps their lower triangle and is symmetric."""
    rng = np.random.default_rng(5)
    k, d = 2, 4
    A = rng.normal(size=(k, d, d))
    sxx = A @ A.transpose(0, 2, 1)
    sxx[0, 0, 1] = np.nextafter(sxx[0, 1, 0], np.inf)  # the upper triangle a bit off
    record = {
        "moments": "full",
        "nk": np.ones(k),
        "sx": rng.normal(size=(k, d)),
        "sxx": sxx,
        "objective": 1.0,
        "n": 2.0,
        "count": 2,
    }
    got = SuffStats.from_dict(record)
    assert _same_bits(got.sxx, sxx)
    merged = SuffStats.merge_many([got, SuffStats.zero(k, d, "full")])
    assert _same_bits(merged.sxx, np.swapaxes(merged.sxx, -1, -2))
    assert _same_bits(np.tril(merged.sxx), np.tril(sxx))


@pytest.mark.parametrize("compiled", [True, False])
def test_a_read_past_the_range_follows_errstate(compiled, monkeypatch):
    """A sum past float64's range reads as inf: a RuntimeWarning, nothing under
    ``errstate(over="ignore")``, a FloatingPointError under ``over="raise"``, with the
    compiled loops as with NumPy's code."""
    from dkm import exact

    monkeypatch.setattr(exact, "COMPILED", compiled)
    total = ExactSum.of(np.array([1e308, 1.0])).merge(ExactSum.of(np.array([1e308, 1.0])))
    with pytest.warns(RuntimeWarning, match="overflow"):
        assert total.to_float()[0] == np.inf
    with np.errstate(over="ignore"):
        assert _same_bits(total.to_float(), [np.inf, 2.0])
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        total.to_float()
