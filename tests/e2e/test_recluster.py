"""dkm recluster: incremental statistics, drift, guards and the registry end to end."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from sklearn.cluster import KMeans as SKKMeans
from sklearn.mixture import GaussianMixture as SKGaussianMixture

from dkm import io
from dkm.cli import main
from dkm.config import validate_config
from dkm.engine import ChunkedData
from dkm.estimators import GaussianMixture, KMeans
from dkm.models import load_model, save_model
from dkm.recluster import (
    EXIT_REFUSED,
    merge_statistics,
    recentred,
    recluster,
    statistics_pass,
)
from dkm.registry import MARKER, Registry

D, K = 3, 4
CENTRES = np.random.default_rng(123).normal(scale=10.0, size=(K, D))


def generation(seed: int, n: int = 4000, shift=None, weights=None):
    """Blobs around CENTRES (one of them moved by ``shift = (component, vector)``)."""
    centres = CENTRES.copy()
    if shift is not None:
        centres[shift[0]] += shift[1]
    rng = np.random.default_rng(seed)
    labels = rng.choice(K, size=n, p=weights)
    return centres[labels] + rng.standard_normal((n, D))


def _data(X, origin):
    return ChunkedData.from_dask(da.from_array(X, chunks=(700, -1))).with_origin(origin)


# --------------------------------------------------------------------------- statistics


def _sklearn_stats(model, X, shift):
    """nk, sx, sxx of X around ``shift`` with responsibilities from scikit-learn."""
    if isinstance(model, KMeans):
        sk = SKKMeans(K, init=model.cluster_centers_, n_init=1, max_iter=1)
        sk.cluster_centers_ = model.cluster_centers_
        sk._n_threads = 1
        resp = np.eye(K)[sk.predict(X)]
    else:
        ct = model.covariance_type
        sk = SKGaussianMixture(K, covariance_type=ct)
        sk.weights_, sk.means_ = model.weights_, model.means_
        sk.precisions_cholesky_ = model.precisions_cholesky_
        resp = sk.predict_proba(X)
    nk = resp.sum(axis=0)
    sx = resp.T @ X - nk[:, None] * shift
    diff = X[None, :, :] - shift[:, None, :]  # (k, n, d)
    full = np.einsum("kn,kni,knj->kij", resp.T, diff, diff)
    return nk, sx, full


def _close(actual, expected, rtol):
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("kind", ["kmeans", "full", "tied", "diag", "spherical"])
def test_batch_by_batch_statistics_equal_all_at_once(kind):
    """No decay: merging three batches' statistics (taken around different shifts, then
    re-centred) equals one pass over all of them under the same parameters, and both
    equal sums built from scikit-learn's responsibilities."""
    batches = [generation(s, n=1500, shift=(1, [4.0, 0, 0]) if s == 2 else None) for s in (1, 2, 3)]
    if kind == "kmeans":
        model = KMeans(K, random_state=0).fit(batches[0])
    else:
        model = GaussianMixture(K, covariance_type=kind, random_state=0).fit(batches[0])
    origin = model.mixture_.origin
    parts = [statistics_pass(_data(X, origin), [model.mixture_])[0] for X in batches]
    other_shift = model.mixture_.params.means + np.random.default_rng(1).normal(size=(K, D)) * 3
    merged = recentred(parts[0], other_shift)  # as if saved around other centres
    for part in parts[1:]:
        merged = merge_statistics(merged, part, 1.0)
    allX = np.vstack(batches)
    (once,) = statistics_pass(_data(allX, origin), [model.mixture_])
    np.testing.assert_array_equal(merged.shift, once.shift)
    m, o = merged.stats, once.stats
    for name in ("nk", "sx", "sxx"):
        if getattr(o, name) is not None:
            _close(getattr(m, name), getattr(o, name), 1e-10)
    _close(m.objective, o.objective, 1e-10)
    assert m.n == o.n == len(allX) and merged.updates == 2
    nk, sx, full = _sklearn_stats(model, allX, once.shift)
    _close(o.nk, nk, 1e-9)
    _close(o.sx, sx, 1e-9)
    expected_sxx = {
        "kmeans": None,
        "full": full,
        "tied": full.sum(axis=0),
        "diag": np.einsum("kii->ki", full),
        "spherical": np.einsum("kii->k", full),
    }[kind]
    if expected_sxx is not None:
        _close(o.sxx, expected_sxx, 1e-9)


def test_saved_statistics_round_trip_and_old_models_are_refused(tmp_path):
    X = generation(1, n=800)
    gm = GaussianMixture(K, covariance_type="diag", random_state=0).fit(X)
    (stats,) = statistics_pass(_data(X, gm.mixture_.origin), [gm.mixture_])
    save_model(gm, str(tmp_path / "with"), statistics=stats)
    back = io.load_model_statistics(str(tmp_path / "with"))
    for name in ("nk", "sx", "sxx"):
        np.testing.assert_array_equal(getattr(back.stats, name), getattr(stats.stats, name))
    np.testing.assert_array_equal(back.shift, stats.shift)
    assert back.stats.objective == stats.stats.objective and back.stats.n == stats.stats.n
    np.testing.assert_array_equal(load_model(str(tmp_path / "with")).predict(X), gm.predict(X))
    save_model(gm, str(tmp_path / "without"))
    with pytest.raises(io.InputError, match=r"keeps no sufficient statistics.*without --update"):
        io.load_model_statistics(str(tmp_path / "without"))


# --------------------------------------------------------------------------- runs


def _config(tmp_path: Path, scheduler: str, data: str, **registry) -> dict:
    return {
        "data": {"kind": "npy", "path": str(tmp_path / data), "chunk_rows": 1000},
        "model": {"mode": "kmeans", "n_clusters": K, "seed": 0},
        "cluster": {"kind": "address", "address": scheduler},
        "output": {"path": str(tmp_path / "out"), "overwrite": True},
        "registry": {"location": str(tmp_path / "reg"), "name": "demo", **registry},
    }


@pytest.mark.parametrize("mode", ["kmeans", "gmm"])
def test_update_on_stationary_data_is_within_one_percent_of_a_full_refit(tmp_path, scheduler, mode):
    batches = [generation(seed, n=3000) for seed in (11, 12, 13)]
    for i, X in enumerate(batches):
        np.save(tmp_path / f"b{i}.npy", X)
    raw = _config(tmp_path, scheduler, "b0.npy")
    if mode == "gmm":
        raw["model"] = {"mode": "gmm", "n_clusters": K, "covariance_type": "diag", "seed": 0}
    first = recluster(validate_config(raw))
    assert first.mode == "first" and first.promoted
    for i in (1, 2):
        raw["data"]["path"] = str(tmp_path / f"b{i}.npy")
        result = recluster(validate_config(raw), update=True)
        assert result.mode == "update" and result.promoted and result.current == result.version
    registry = Registry(str(tmp_path / "reg"), "demo")
    url = registry.model_url(registry.current())
    updated = load_model(url)
    saved = io.load_model_statistics(url)
    assert saved.updates == 2 and saved.stats.n == pytest.approx(9000)  # no decay
    allX = np.vstack(batches)
    if mode == "kmeans":
        ref = SKKMeans(K, n_init=10, random_state=0).fit(allX)
        assert -updated.score(allX) <= 1.01 * ref.inertia_
    else:
        ref = SKGaussianMixture(K, covariance_type="diag", n_init=3, random_state=0).fit(allX)
        ll_ref, ll_upd = ref.score(allX), updated.score(allX)
        assert ll_upd >= ll_ref - 0.01 * abs(ll_ref)


def test_update_decays_the_old_statistics_by_the_half_life(tmp_path, scheduler):
    np.save(tmp_path / "a.npy", generation(1, n=2000))
    np.save(tmp_path / "b.npy", generation(2, n=1000))
    raw = _config(tmp_path, scheduler, "a.npy", half_life=2.0)
    recluster(validate_config(raw))
    raw["data"]["path"] = str(tmp_path / "b.npy")
    recluster(validate_config(raw), update=True)
    registry = Registry(str(tmp_path / "reg"), "demo")
    saved = io.load_model_statistics(registry.model_url(registry.current()))
    assert saved.stats.n == pytest.approx(2000 * 0.5**0.5 + 1000, rel=1e-12)


def test_update_of_a_model_without_statistics_is_a_clear_error(tmp_path, scheduler):
    X = generation(1, n=1000)
    np.save(tmp_path / "a.npy", X)
    registry = Registry(str(tmp_path / "reg"), "demo")
    km = KMeans(K, random_state=0).fit(X)
    registry.add_version(lambda url: save_model(km, f"{url}/model"), {"decision": "first"})
    registry.promote(1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, scheduler, "a.npy")))
    result = CliRunner().invoke(main, ["recluster", str(cfg), "--update"])
    assert result.exit_code == 2, result.output
    assert "keeps no sufficient statistics" in result.output
    assert [v.number for v in registry.versions()] == [1] and registry.current() == 1


def _moved_component(model, true_component: int) -> int:
    return int(np.argmin(np.linalg.norm(model.cluster_centers_ - CENTRES[true_component], axis=1)))


def test_three_generations_with_drift_failure_refusal_and_rollback(tmp_path, scheduler):
    runner = CliRunner()
    np.save(tmp_path / "g1.npy", generation(1))
    np.save(tmp_path / "g2.npy", generation(2, shift=(2, [7.0, 0.0, 0.0])))
    shrunk = generation(3, shift=(2, [7.0, 0.0, 0.0]), weights=[0.32, 0.32, 0.32, 0.04])
    np.save(tmp_path / "g3.npy", shrunk)
    bad = generation(4)
    bad[1234, 1] = np.nan
    np.save(tmp_path / "corrupt.npy", bad)
    cfg = tmp_path / "recluster.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, scheduler, "g1.npy", keep=5)))
    registry = Registry(str(tmp_path / "reg"), "demo")

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(main, ["recluster", str(cfg), "--quiet", *args])
        return result.exit_code, result.output

    def state():
        return registry.current(), [v.number for v in registry.versions()]

    assert run()[0] == 0  # no current yet: a first fit
    assert state() == (1, [1])
    v1 = load_model(registry.model_url(1))
    code, _ = run("--set", f"data.path={tmp_path / 'g2.npy'}")  # one component moved
    assert code == 0 and state() == (2, [1, 2])
    drift = json.loads((Path(registry.version_url(2)) / "drift.json").read_text())
    moved = _moved_component(v1, 2)
    assert drift["moved"] == [moved] and drift["largest_shift"] == moved
    (component,) = [c for c in drift["components"] if c["old"] == moved]
    assert component["centre_shift"] == pytest.approx(7.0, abs=0.3)
    assert (Path(registry.version_url(2)) / "drift.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "drift.json").read_text())["moved"] == [moved]
    # failing runs: corrupt data, missing data: nothing added, current untouched
    code, output = run("--set", f"data.path={tmp_path / 'corrupt.npy'}")
    assert code == 2 and "row 1234" in output
    code, output = run("--set", f"data.path={tmp_path / 'nowhere.npy'}")
    assert code == 2 and "nowhere.npy" in output
    assert state() == (2, [1, 2])
    # a component lost most of its weight: refused, kept as a candidate
    code, output = run("--set", f"data.path={tmp_path / 'g3.npy'}")
    assert code == EXIT_REFUSED and "lost" in output and "max_weight_loss" in output
    assert state() == (2, [1, 2, 3])
    assert registry.get(3).info["decision"] == "refused"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["decision"] == "refused" and summary["version"] == 3
    # models list / show / rollback / promote
    listing = runner.invoke(main, ["models", "list", str(cfg)])
    assert listing.exit_code == 0 and "* v2" in listing.output and "refused" in listing.output
    shown = runner.invoke(main, ["models", "show", str(cfg), "v3"])
    assert shown.exit_code == 0 and json.loads(shown.output)["decision"] == "refused"
    rolled = runner.invoke(main, ["models", "rollback", str(cfg)])
    assert rolled.exit_code == 0 and state()[0] == 1
    np.testing.assert_array_equal(
        load_model(registry.model_url(registry.current())).cluster_centers_,
        v1.cluster_centers_,
    )
    assert runner.invoke(main, ["models", "promote", str(cfg), "v3"]).exit_code == 0
    assert state()[0] == 3
    missing = runner.invoke(main, ["models", "promote", str(cfg), "v9"])
    assert missing.exit_code == 2 and "no version v9" in missing.output


def test_keep_prunes_old_versions(tmp_path, scheduler):
    np.save(tmp_path / "g.npy", generation(5, n=1500))
    raw = _config(tmp_path, scheduler, "g.npy", keep=2)
    for _ in range(3):
        recluster(validate_config(raw))
    registry = Registry(str(tmp_path / "reg"), "demo")
    assert [v.number for v in registry.versions()] == [2, 3] and registry.current() == 3


@pytest.mark.parametrize(
    "kmeans, old, new, refused",
    [
        (True, 100.0, 104.0, False),
        (True, 100.0, 106.0, True),
        (False, -2.0, -2.09, False),
        (False, -2.0, -2.11, True),
    ],
)
def test_objective_guard_direction(kmeans, old, new, refused):
    """k-means inertia must not grow, a mixture's log-likelihood must not fall, by > 5 %."""
    from dkm.config import GuardsConfig
    from dkm.recluster import check_guards, worsening

    drift = {
        "objective_name": "inertia" if kmeans else "mean log-likelihood",
        "objective_old": old,
        "objective_new": new,
        "objective_worsening": worsening(old, new, kmeans),
        "components": [],
        "unmatched_old": [],
    }
    reasons = check_guards(drift, GuardsConfig(max_objective_increase=0.05), 4)
    assert bool(reasons) == refused
    assert not check_guards(drift, GuardsConfig(max_objective_increase=None), 4)


def test_shipped_recluster_config_validates():
    from dkm.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "recluster.yaml")
    assert cfg.registry is not None and cfg.registry.guards.max_weight_loss is not None


def test_a_crash_while_writing_adds_no_version(tmp_path, scheduler, monkeypatch):
    np.save(tmp_path / "a.npy", generation(1, n=1500))
    np.save(tmp_path / "b.npy", generation(2, n=1500))
    raw = _config(tmp_path, scheduler, "a.npy")
    recluster(validate_config(raw))
    previous = (tmp_path / "out" / "summary.json").read_bytes()
    calls = []

    def crash_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the version is written; its copy in output.path fails
            raise OSError("disk full")
        from matplotlib.figure import Figure

        Figure().savefig(args[0])

    monkeypatch.setattr("dkm.recluster.write_drift_png", crash_on_second_call)
    raw["data"]["path"] = str(tmp_path / "b.npy")
    with pytest.raises(OSError, match="disk full"):
        recluster(validate_config(raw))
    registry = Registry(str(tmp_path / "reg"), "demo")
    assert [v.number for v in registry.versions()] == [1] and registry.current() == 1
    assert sorted(p.name for p in Path(registry.root).iterdir()) == [MARKER, "current", "v1"]
    assert (tmp_path / "out" / "summary.json").read_bytes() == previous


def test_recluster_needs_a_registry_and_one_k(tmp_path, scheduler):
    from dkm.config import ConfigError

    raw = _config(tmp_path, scheduler, "a.npy")
    del raw["registry"]
    with pytest.raises(ConfigError, match="no registry section"):
        recluster(validate_config(raw))
    raw = _config(tmp_path, scheduler, "a.npy")
    raw["model"]["n_clusters"] = [3, 4]
    with pytest.raises(ConfigError, match="must be one number"):
        recluster(validate_config(raw))


@pytest.mark.parametrize("k", [3, 12, 40, 150])
def test_drift_figure_labels_and_legend_do_not_overlap(k):
    from dkm.recluster import drift_figure

    order = np.random.default_rng(k).permutation(k)  # old → new labels of every width
    comps = [
        {
            "old": i,
            "new": int(order[i]),
            "centre_shift_sd": 0.1 * i,
            "weight_old": 1 / k,
            "weight_new": 1 / k,
            "moved": False,
        }
        for i in range(k)
    ]
    drift = {
        "components": comps,
        "drift_threshold_sd": 1.0,
        "moved": [],
        "label_churn": 0.0,
        "objective_name": "inertia",
        "objective_old": 1.0,
        "objective_new": 1.0,
    }
    fig = drift_figure(drift, "blobs: current v1 → new model (refit)")
    fig.canvas.draw()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(boxes))
        assert all(t.get_fontsize() >= 6 for t in labels)
        shown = {t.get_text() for t in labels}
        if k <= 40:  # every pair is named while it fits
            assert shown == {f"{c['old']}→{c['new']}" for c in comps}
        else:
            assert len(shown) >= 10
    weights = fig.axes[1]
    legend = weights.get_legend().get_window_extent()
    assert not any(legend.overlaps(bar.get_window_extent()) for bar in weights.patches)
    if k == 3:  # few labels stay upright
        assert all(t.get_rotation() == 0 for t in fig.axes[0].get_xticklabels())


def test_drift_title_tells_close_objectives_apart():
    """Two inertias that agree in six digits read alike at 6 significant digits."""
    from dkm.recluster import drift_figure

    drift = {
        "components": [],
        "drift_threshold_sd": 1.0,
        "moved": [],
        "label_churn": 0.0,
        "objective_name": "inertia",
        "objective_old": 1199880.4213,
        "objective_new": 1199879.9107,
    }
    title = drift_figure(drift, "blobs").get_suptitle()
    assert "old 1,199,880.42, new 1,199,879.91 (-4.26e-05%)" in title


def test_the_recipe_in_the_shipped_config_does_what_its_comments_say(
    tmp_path, scheduler, monkeypatch
):
    """configs/recluster.yaml's commands, on less data and the test's scheduler, in a
    folder without data/ (make-data creates it, as a fresh clone needs)."""
    shipped = Path(__file__).resolve().parents[2] / "configs" / "recluster.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "recluster.yaml").write_text(shipped.read_text())
    monkeypatch.chdir(tmp_path)
    recipe = [
        line.lstrip("# ").partition("#")
        for line in shipped.read_text().splitlines()
        if line.startswith("#   dkm ")
    ]
    assert [cmd.split()[:2] for cmd, _, _ in recipe] == [
        ["dkm", "make-data"],
        ["dkm", "recluster"],
        ["dkm", "recluster"],
        ["dkm", "models"],
    ]
    registry = Registry("registry", "blobs")
    for cmd, _, comment in recipe:
        args = cmd.split()[1:]
        if args[0] == "make-data":
            args[args.index("--n") + 1] = "20000"
        if args[0] == "recluster":
            args += ["--quiet", "--set", f"cluster={{kind: address, address: {scheduler}}}"]
        result = CliRunner().invoke(main, args)
        claimed = re.search(r"exit (\d+)", comment)
        assert result.exit_code == (int(claimed.group(1)) if claimed else 0), (cmd, result.output)
        version = re.search(r"\bv(\d+)\b.* is current", comment)
        if version:
            assert registry.current() == int(version.group(1)), cmd
    assert "* v2" in result.output  # models list
