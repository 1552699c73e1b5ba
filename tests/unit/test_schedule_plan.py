"""The sampled schedule's plan and its sample of rows (:mod:`dkm.engine.schedule`,
:class:`dkm.stats.RowSample`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dkm._typing import parse_schedule
from dkm.engine.schedule import MAX_SAMPLE_BYTES, Schedule
from dkm.stats import DataSummary, RowSample


def test_auto_samples_only_data_much_larger_than_the_sample():
    # k=64, d=16: the largest sample is 4,096 rows per component, 262,144 rows
    assert Schedule.plan("auto", 2_000_000, 64, 16) is None
    plan = Schedule.plan("auto", 10_000_000, 64, 16)
    assert plan is not None
    assert plan.sizes == (16_384, 65_536, 262_144)
    assert plan.rate == pytest.approx(262_144 / 10_000_000)
    assert Schedule.plan("full", 10_000_000, 64, 16) is None


def test_wide_rows_cap_the_sample_by_bytes():
    plan = Schedule.plan("sampled", 10_000_000, 64, 784)
    assert plan is not None
    assert plan.sizes[-1] * 784 * 8 <= MAX_SAMPLE_BYTES
    assert list(plan.sizes) == sorted(plan.sizes)


def test_sampled_on_small_data_uses_at_most_half_of_it():
    plan = Schedule.plan("sampled", 10_000, 4, 2)
    assert plan is not None and plan.sizes == (1024, 4096, 5000) and plan.rate == 0.5


def test_a_bad_schedule_is_named():
    with pytest.raises(ValueError, match="schedule: expected one of auto, sampled, full"):
        parse_schedule("fast")


def test_the_row_sample_is_the_same_whatever_the_chunking_and_nested():
    rng = np.random.default_rng(0)
    X, w = rng.normal(size=(10_000, 3)), rng.uniform(0, 2, 10_000)
    w[::5] = 0.0

    def drawn(bounds, rate=0.3):
        parts = [
            RowSample.from_chunk(rate, X[a:b], w[a:b], a, seed=7)
            for a, b in itertools.pairwise(bounds)
        ]
        total = parts[0]
        for p in parts[1:]:
            total = total.merge(p)
        return total.nested()

    a, b = drawn([0, 10_000]), drawn([0, 1234, 5000, 5001, 10_000])
    for name in ("keys", "rows", "points", "weights"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.size == pytest.approx(0.3 * 8_000, rel=0.1)
    assert (w[a.rows] > 0).all()  # rows of zero weight are never drawn
    small = drawn([0, 5000, 10_000], rate=0.1)
    first = a.first(small.size)
    np.testing.assert_array_equal(first.rows, np.sort(small.rows))  # the smaller rate's rows
    np.testing.assert_array_equal(first.points, X[first.rows])


def test_the_summary_draws_the_row_sample_beside_its_own():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1_000, 2))
    X[3] = np.nan
    w = np.ones(1_000)
    plain = DataSummary.from_chunk(X, w, 0, 10, seed=1, drop_nonfinite=True)
    assert plain.rows_sample is None
    s = DataSummary.from_chunk(X, w, 0, 10, seed=1, drop_nonfinite=True, rows_rate=0.5)
    assert s.rows_sample is not None and 3 not in s.rows_sample.rows
    assert np.isfinite(s.rows_sample.points).all()
    np.testing.assert_array_equal(s.sample.rows, plain.sample.rows)  # the other is unchanged
    other = DataSummary.from_chunk(X, w, 1_000, 10, 1, True, 0.5)
    merged = s.merge(other)
    assert merged.rows_sample is not None and other.rows_sample is not None
    assert merged.rows_sample.size == s.rows_sample.size + other.rows_sample.size
