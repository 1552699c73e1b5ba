"""The sampled schedule (issue 22): the first iterations on growing samples of the data,
the last ones on all of it, ending at a fixed point of the full data.

No timing is asserted here (``benchmarks/`` measures it): these tests check that the
sampled phase is reproducible for a ``random_state`` whatever the chunking, that the
model after it is a fixed point of full-data EM/Lloyd, that ``history_`` says which
iterations ran on a sample, that resume and restarts keep working, and that with the
schedule off the fit is scikit-learn's.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from conftest import blobs
from sklearn.cluster import KMeans as SKKMeans

import dkm
from dkm.engine import IterationInfo, ResumeState
from dkm.engine.schedule import Schedule

N = 40_000
X = blobs(N, 3, 4, seed=21)
# a sample of 16,384 rows at most (4,096 per component): samples of 1,024, 4,096, ~16,384
PLAN = Schedule.plan("sampled", N, 4, 3)


def chunked(rows: int) -> da.Array:
    return da.from_array(X, chunks=(rows, -1))


def kmeans(**kw) -> dkm.KMeans:
    return dkm.KMeans(4, random_state=3, schedule="sampled", **kw)


def gmm(**kw) -> dkm.GaussianMixture:
    return dkm.GaussianMixture(4, random_state=3, schedule="sampled", **kw)


def sampled(history) -> list[IterationInfo]:
    return [h for h in history if h.sample is not None]


def on_all(history) -> list[IterationInfo]:
    return [h for h in history if h.sample is None]


def records(history) -> list[dict]:
    return [h.to_dict() | {"seconds": 0} for h in history]


def test_the_plan():
    assert PLAN is not None and PLAN.sizes == (1024, 4096, 16384)
    assert PLAN.rate == pytest.approx(16384 / N)


@pytest.mark.parametrize("make", [kmeans, gmm], ids=["kmeans", "gmm"])
def test_the_sampled_phase_is_reproducible_whatever_the_chunking(make):
    a = make().fit(chunked(5_000))
    b = make().fit(chunked(3_000))
    assert len(sampled(a.history_)) > 0
    assert records(a.history_) == records(b.history_)
    np.testing.assert_array_equal(a.means_ if hasattr(a, "means_") else a.cluster_centers_,
                                  b.means_ if hasattr(b, "means_") else b.cluster_centers_,
                                  strict=True)  # fmt: skip
    # another random_state draws another sample
    c = type(a)(**{**a.get_params(), "random_state": 4}).fit(chunked(5_000))
    assert records(sampled(c.history_)) != records(sampled(a.history_))


def test_history_says_which_iterations_ran_on_a_sample():
    km = kmeans().fit(chunked(5_000))
    history = km.history_
    first, rest = sampled(history), on_all(history)
    assert history == first + rest  # the sample's iterations first
    sizes = [h.sample for h in first]
    assert sizes == sorted(sizes) and sizes[0] == 1024 and set(sizes) <= {1024, 4096, sizes[-1]}
    assert abs(sizes[-1] - 16384) < 5 * np.sqrt(16384)  # all the rows drawn at the rate
    assert [h.iteration for h in first] == list(range(1, len(first) + 1))
    assert [h.iteration for h in rest] == list(range(1, km.n_iter_ + 1))
    assert km.converged_ and rest[-1].converged
    # what a saved model keeps of the history keeps the marks
    assert [IterationInfo.from_dict(h.to_dict()).sample for h in history] == [
        h.sample for h in history
    ]
    gm = gmm().fit(chunked(5_000))
    assert len(sampled(gm.history_)) > 0
    assert len(gm.lower_bounds_) == gm.n_iter_ == len(on_all(gm.history_))


def test_the_model_is_a_fixed_point_of_the_full_data():
    km = kmeans().fit(chunked(5_000))
    tol_abs = 1e-4 * float(np.mean(X.var(axis=0)))
    again = dkm.KMeans(4, init=km.cluster_centers_, n_init=1, max_iter=1, schedule="full")
    again.fit(chunked(5_000))
    assert again.history_[0].change <= tol_abs  # one more Lloyd step moves nothing beyond tol
    gm = gmm().fit(chunked(5_000))
    assert gm.converged_
    more = dkm.GaussianMixture(4, init_params=gm, max_iter=1, schedule="full")
    with pytest.warns(Warning):  # one iteration: not converged by the rule's count
        more.fit(chunked(5_000))
    assert abs(more.lower_bounds_[0] - gm.lower_bound_) < gm.tol


def test_auto_samples_large_data_only_and_full_is_scikit_learns():
    big = blobs(70_000, 2, 2, seed=5)
    assert Schedule.plan("auto", len(big), 2, 2) is not None
    auto = dkm.KMeans(2, random_state=0).fit(da.from_array(big, chunks=(10_000, -1)))
    assert sampled(auto.history_)
    small = dkm.KMeans(4, random_state=0).fit(chunked(5_000))
    assert not sampled(small.history_)
    init = big[:2].copy()
    full = dkm.KMeans(2, init=init, n_init=1, schedule="full").fit(big)
    sk = SKKMeans(2, init=init, n_init=1, algorithm="lloyd").fit(big)
    assert not sampled(full.history_) and full.n_iter_ == sk.n_iter_
    np.testing.assert_allclose(full.cluster_centers_, sk.cluster_centers_, rtol=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # tol=0
@pytest.mark.parametrize("make", [kmeans, gmm], ids=["kmeans", "gmm"])
def test_resume_after_the_sample_gives_the_uninterrupted_model(make):
    seen: list[IterationInfo] = []
    full = make(callback=seen.append, tol=0, max_iter=6).fit(chunked(5_000))
    n_sampled = len(sampled(full.history_))
    assert n_sampled > 0 and full.n_iter_ >= 2
    done = min(3, full.n_iter_ - 1)  # iterations on all the data before the stop
    state = ResumeState.after(seen[n_sampled + done - 1], tuple(seen[: n_sampled + done]))
    assert state.iteration == done
    again: list[IterationInfo] = []
    resumed = make(callback=again.append, tol=0, max_iter=6).fit(chunked(5_000), resume=state)
    assert [i.iteration for i in again] == list(range(done + 1, full.n_iter_ + 1))
    assert not sampled(again)
    assert records(resumed.history_) == records(full.history_)
    for name in ("cluster_centers_", "means_", "covariances_"):
        if hasattr(full, name):
            np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name))


def test_restarts_run_the_sample_together():
    one = kmeans(n_init=1).fit(chunked(5_000))
    three = kmeans(n_init=3).fit(chunked(5_000))
    assert sampled(three.history_)
    assert three.inertia_ <= one.inertia_  # the first restart starts where the single fit does
    gm = gmm(n_init=2).fit(chunked(5_000))
    assert sampled(gm.history_) and gm.converged_


def test_weights_and_dropped_rows_stay_out_of_the_sample():
    Xn = X.copy()
    Xn[::7] = np.nan
    w = np.ones(N)
    w[1::7] = 0.0
    dropped = kmeans(nan_policy="drop").fit(da.from_array(Xn, chunks=(5_000, -1)), sample_weight=w)
    assert np.isfinite(dropped.cluster_centers_).all() and sampled(dropped.history_)
    assert dropped.n_dropped_ == len(range(0, N, 7))


# --- trials: several starts on the first sample, the best goes on ------------------

TRIAL_X = blobs(60_000, 2, 16, seed=4)  # k-means++ lands in different optima by seed


def trial_data() -> da.Array:
    return da.from_array(TRIAL_X, chunks=(10_000, -1))


@pytest.fixture
def choices(monkeypatch) -> list[tuple[list[float], list[int]]]:
    """Each choice the schedule makes among trials: the objectives and the kept starts."""
    from dkm.engine import schedule

    seen: list[tuple[list[float], list[int]]] = []
    real = schedule._best_of_groups

    def spy(objectives, trials, kmeans):
        keep = real(objectives, trials, kmeans)
        seen.append((list(objectives), keep))
        return keep

    monkeypatch.setattr(schedule, "_best_of_groups", spy)
    return seen


def test_trials_go_on_from_the_best_start_on_the_first_sample(choices):
    rng = np.random.default_rng(1)
    starts = [TRIAL_X[rng.choice(len(TRIAL_X), 16, replace=False)] for _ in range(4)]
    given = iter(starts)
    seen: list[IterationInfo] = []
    km = dkm.KMeans(
        16,
        init=lambda sample, k, rng: next(given),
        random_state=1,
        schedule="sampled",
        sample_trials=4,
        callback=seen.append,
    ).fit(trial_data())
    ((objectives, keep),) = choices
    assert len(objectives) == 4 and len(set(objectives)) == 4
    (best,) = keep
    assert objectives[best] == min(objectives) and best != 0  # a choice was made
    # the fit is the one from that start alone (an array is tried once: no choice)
    alone = dkm.KMeans(16, init=starts[best], random_state=1, schedule="sampled")
    alone.fit(trial_data())
    assert len(choices) == 1
    assert records(km.history_) == records(alone.history_)
    np.testing.assert_array_equal(km.cluster_centers_, alone.cluster_centers_, strict=True)
    # the callback saw the kept start's iterations only, as history_ has them
    assert records(seen) == records(km.history_)


def test_trials_find_better_optima_than_one_start():
    one = [
        dkm.KMeans(16, random_state=s, schedule="sampled", sample_trials=1).fit(trial_data())
        for s in range(6)
    ]
    eight = [
        dkm.KMeans(16, random_state=s, schedule="sampled", sample_trials=8).fit(trial_data())
        for s in range(6)
    ]
    pairs = list(zip(eight, one, strict=True))
    assert sum(e.inertia_ < o.inertia_ * (1 - 1e-3) for e, o in pairs) >= 3
    assert all(e.inertia_ <= o.inertia_ * 1.005 for e, o in pairs)
    again = dkm.KMeans(16, random_state=2, schedule="sampled", sample_trials=8)
    np.testing.assert_array_equal(again.fit(trial_data()).cluster_centers_,
                                  eight[2].cluster_centers_, strict=True)  # fmt: skip


def test_trials_per_restart_and_for_mixtures(choices):
    km = dkm.KMeans(16, n_init=2, random_state=0, schedule="sampled", sample_trials=3)
    km.fit(trial_data())
    ((objectives, keep),) = choices
    assert len(objectives) == 6 and len(keep) == 2
    assert keep[0] in range(3) and keep[1] in range(3, 6)
    assert objectives[keep[0]] == min(objectives[:3]) and objectives[keep[1]] == min(objectives[3:])
    choices.clear()
    gm = dkm.GaussianMixture(
        8, covariance_type="diag", random_state=0, schedule="sampled", sample_trials=4
    ).fit(trial_data())
    ((bounds, (best,)),) = choices
    assert len(bounds) == 4 and bounds[best] == max(bounds)  # the highest lower bound
    assert gm.converged_ and sampled(gm.history_)
    assert {h.run for h in gm.history_} == {0}


def test_what_is_tried_once(choices):
    data = trial_data()
    dkm.KMeans(16, init=TRIAL_X[:16], schedule="sampled", sample_trials=4).fit(data)
    dkm.GaussianMixture(4, means_init=TRIAL_X[:4], schedule="sampled", sample_trials=4).fit(data)
    dkm.KMeans(16, random_state=0, schedule="full", sample_trials=4).fit(data)
    # "auto": as many as cost about one pass; k-means|| reads all the data for each
    dkm.KMeans(16, random_state=0, schedule="sampled").fit(data)
    assert choices == []
    with pytest.raises(ValueError, match="sample_trials must be an integer >= 1"):
        dkm.KMeans(16, schedule="sampled", sample_trials=0).fit(data)


def test_auto_trials_cost_about_one_pass():
    from dkm.engine.schedule import MAX_AUTO_TRIALS, auto_trials

    ttm = Schedule.plan("auto", 8_000_000, 64, 32)
    assert ttm is not None and auto_trials(ttm, 8_000_000, 64, 10_000) == MAX_AUTO_TRIALS
    edge = Schedule.plan("auto", 2_100_000, 64, 16)
    assert edge is not None and auto_trials(edge, 2_100_000, 64, 10_000) == 5
    assert auto_trials(PLAN, N, 4, 10_000) == 1


def test_a_trial_that_collapses_leaves_the_fit_as_without_trials(monkeypatch):
    """A start collapsing on the small first sample (on_degenerate="error") does not fail
    the fit: it goes on from each run's first start alone, as with one trial."""
    from dkm.covariance import DegenerateComponentError
    from dkm.engine import schedule

    real = schedule.fit_em_many
    collapsed: list[int] = []

    def one_trial_collapses(data, params, *args, **kwargs):
        if len(params) == 4:  # the trials' sample: one of them collapses
            collapsed.append(len(params))
            raise DegenerateComponentError([1], "no points (a test's)")
        return real(data, params, *args, **kwargs)

    seen: list[IterationInfo] = []
    with monkeypatch.context() as m:
        m.setattr(schedule, "fit_em_many", one_trial_collapses)
        tried = dkm.GaussianMixture(
            8, covariance_type="diag", random_state=0, schedule="sampled", sample_trials=4,
            callback=seen.append,
        ).fit(trial_data())  # fmt: skip
    assert collapsed == [4]
    one = dkm.GaussianMixture(
        8, covariance_type="diag", random_state=0, schedule="sampled", sample_trials=1
    ).fit(trial_data())
    assert records(tried.history_) == records(one.history_)
    assert records(seen) == records(tried.history_)  # nothing of the failed trials
    np.testing.assert_array_equal(tried.means_, one.means_, strict=True)


def test_auto_trials_share_one_pass_among_the_runs():
    from dkm.engine.schedule import auto_trials

    ttm = Schedule.plan("auto", 8_000_000, 64, 32)
    assert ttm is not None
    assert auto_trials(ttm, 8_000_000, 64, 10_000, runs=2) == 10  # 20 for the fit
    assert auto_trials(ttm, 8_000_000, 64, 10_000, runs=10) == 2  # init="random": 10 runs
