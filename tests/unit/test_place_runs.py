"""Which worker runs which run of chunks (:func:`dkm.engine.data.place_runs`).

Each run of chunks is joined into one block where it runs, so each goes to one worker,
which should already hold most of it; the blocks it lacks are moved there once. The
placement must use every worker's threads fairly, and must keep a placement it made
when asked again (else blocks would move back and forth between passes).
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from dkm.engine.data import place_runs


@st.composite
def clusters(draw):
    """Chunks of random sizes in random runs, held by random workers (some by two)."""
    n_workers = draw(st.integers(1, 5))
    workers = [f"tcp://w{i}" for i in range(n_workers)]
    threads = {w: draw(st.integers(1, 4)) for w in workers}
    sizes = draw(st.lists(st.integers(1, 1000), min_size=1, max_size=40))
    cuts = draw(st.sets(st.integers(1, len(sizes) - 1))) if len(sizes) > 1 else set()
    bounds = [0, *sorted(cuts), len(sizes)]
    runs = [range(a, b) for a, b in itertools.pairwise(bounds)]
    holders = [set(draw(st.lists(st.sampled_from(workers), min_size=1, max_size=2))) for _ in sizes]
    return runs, holders, sizes, threads


def caps(runs, sizes, threads, slack=1.1):
    total, all_threads = sum(sizes), sum(threads.values())
    largest = max(sum(sizes[i] for i in run) for run in runs)
    return {
        w: max(slack * total * t / all_threads, total * t / all_threads + largest)
        for w, t in threads.items()
    }


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_each_run_goes_to_one_worker_within_its_share(cluster):
    runs, holders, sizes, threads = cluster
    placed = place_runs(runs, holders, sizes, threads)
    assert sorted(r for members in placed.values() for r in members) == list(range(len(runs)))
    assert set(placed) <= set(threads)
    cap = caps(runs, sizes, threads)
    for worker, members in placed.items():
        assert members == sorted(members)
        assert sum(sizes[i] for r in members for i in runs[r]) <= cap[worker]
    assert place_runs(runs, holders, sizes, threads) == placed  # deterministic


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_a_placement_it_made_is_kept(cluster):
    """Once the blocks are where it put them, asking again moves nothing."""
    runs, _, sizes, threads = cluster
    placed = place_runs(*cluster)
    where = {r: w for w, members in placed.items() for r in members}
    holders = [{where[r]} for r, run in enumerate(runs) for _ in run]
    assert place_runs(runs, holders, sizes, threads) == placed


def test_runs_stay_where_they_are_when_the_shares_allow():
    runs = [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    sizes = [10] * 8
    threads = {"a": 1, "b": 1}
    # a holds three runs whole, b one: within a's cap (fair 40 plus the largest run, 20)
    holders = [{"a"}] * 6 + [{"b"}] * 2
    assert place_runs(runs, holders, sizes, threads) == {"a": [0, 1, 2], "b": [3]}


def test_a_worker_holding_nothing_gets_its_share():
    runs = [range(i, i + 1) for i in range(8)]
    placed = place_runs(runs, [{"a"}] * 8, [10] * 8, {"a": 1, "b": 1})
    assert placed == {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7]}
    # threads count: a worker with three threads takes about three quarters
    placed = place_runs(runs, [{"b"}] * 8, [10] * 8, {"a": 3, "b": 1})
    assert len(placed["a"]) >= 5


def test_a_run_goes_to_the_worker_holding_most_of_it():
    runs = [range(0, 3), range(3, 6)]
    holders = [{"a"}, {"b"}, {"b"}, {"a"}, {"a"}, {"b"}]
    placed = place_runs(runs, holders, [10, 10, 10, 10, 10, 10], {"a": 1, "b": 1})
    assert placed == {"a": [1], "b": [0]}


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_no_thread_idles_while_another_worker_has_runs_to_spare(cluster):
    runs, holders, sizes, threads = cluster
    placed = place_runs(runs, holders, sizes, threads)
    if all(len(run) == 1 for run in runs) and len(set(sizes)) == 1:  # equal runs: caps allow it
        counts = {w: len(placed.get(w, [])) for w in threads}
        assert not (
            any(c < threads[w] for w, c in counts.items())
            and any(c > threads[w] for w, c in counts.items())
        )


def test_four_runs_on_three_single_threaded_workers_use_all_three():
    """Two workers holding two runs each (within their caps) and one holding nothing."""
    runs = [range(i, i + 1) for i in range(4)]
    placed = place_runs(runs, [{"a"}, {"a"}, {"b"}, {"b"}], [10] * 4, {"a": 1, "b": 1, "c": 1})
    assert sorted(len(m) for m in placed.values()) == [1, 1, 2]
