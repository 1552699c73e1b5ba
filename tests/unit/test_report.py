"""The run report: images and HTML are written, the ellipse maths, edge cases, validation."""

from __future__ import annotations

import html
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import COV_TYPES, covariances_of, random_spd
from conftest import report_args as args
from matplotlib.image import imread
from matplotlib.patches import Ellipse

from dkm import covariance, report

IMAGES = ("convergence.png", "sizes.png", "projection.png")


def check_png(path: Path) -> None:
    img = imread(path)
    assert img.shape[:2] == (500, 700)  # 7 x 5 in at 100 dpi
    rgb = np.round(img[::3, ::3, :3] * 255).astype(np.uint32)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 20  # not blank, not a single colour


def check_report(out: Path, written: list[Path]) -> str:
    assert written == [out / name for name in (*IMAGES, "index.html")]
    for name in IMAGES:
        check_png(out / name)
    text = (out / "index.html").read_text(encoding="utf-8")
    for name in IMAGES:
        assert f'src="{name}"' in text
    return text


# ------------------------------------------------------------------------ end to end


def test_kmeans_report_and_escaping(tmp_path: Path) -> None:
    kw = args()
    kw["title"] = "kmeans <script>alert('x')</script> & co"
    kw["summary"] = {"data": "<b>bold</b>", "<key>": 1_234_567, "converged": False}
    text = check_report(tmp_path, report.write_report(tmp_path, **kw))
    assert "<script>" not in text
    assert html.escape(kw["title"]) in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "&lt;key&gt;" in text
    assert "1,234,567" in text and "<td>no</td>" in text
    assert text.count("<tr><td") == 6  # the history table
    assert "inf" in text  # first change


@pytest.mark.parametrize("ct", COV_TYPES)
def test_gmm_report(tmp_path: Path, ct: str) -> None:
    text = check_report(tmp_path, report.write_report(tmp_path, **args("gmm", ct, seed=1)))
    assert f"covariance type {ct}" in text and "σ" in text


def test_gmm_identity(tmp_path: Path) -> None:
    kw = args("gmm", "identity")
    check_report(tmp_path, report.write_report(tmp_path, **kw))
    # scikit-learn's (k,) ones give the same unit covariances as None
    given = report._validate(**{**kw, "covariances": np.ones(4)}).covariances
    np.testing.assert_array_equal(given, report._validate(**kw).covariances)


def test_reports_can_be_written_from_threads(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        out = tmp_path / str(i)
        out.mkdir()
        try:
            check_report(out, report.write_report(out, **args("gmm", "full", seed=i)))
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_module_does_not_use_pyplot() -> None:
    assert "pyplot" not in Path(report.__file__).read_text(encoding="utf-8")


def test_long_history_is_elided() -> None:
    text = report._html(report._validate(**args(iters=60)), list(IMAGES))
    assert "40 iterations not shown" in text
    assert ">1</td>" in text and ">60</td>" in text and ">30</td>" not in text


# ---------------------------------------------------------------------------- maths


@pytest.mark.parametrize("ct", [*COV_TYPES, "identity"])
def test_full_covariances(ct: str) -> None:
    rng = np.random.default_rng(2)
    k, d = 3, 4
    cov = covariances_of(ct, rng, k, d)
    # what the report draws: the (k, d, d) covariances (identity as scikit-learn's ones)
    full = covariance.of(ct).as_full(np.ones(k) if cov is None else cov, k, d)
    assert full.shape == (k, d, d)
    assert cov is not None or ct == "identity"
    expected = {
        "full": lambda: cov,
        "tied": lambda: np.stack([cov] * k),
        "diag": lambda: np.stack([np.diag(c) for c in cov]),
        "spherical": lambda: np.stack([c * np.eye(d) for c in cov]),
        "identity": lambda: np.stack([np.eye(d)] * k),
    }[ct]()
    np.testing.assert_array_equal(full, expected)


def test_pca_matches_sklearn() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 5)) @ random_spd(rng, 5)
    p = report._pca(x)
    ref = PCA(2).fit(x)
    np.testing.assert_allclose(p.components.T @ p.components, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(np.abs(p.components.T), np.abs(ref.components_), atol=1e-8)
    np.testing.assert_allclose(p.explained, ref.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(p.project(x), (x - x.mean(0)) @ p.components)


@pytest.mark.parametrize(
    "x", [np.ones((7, 3)), np.ones((1, 3)), np.arange(8.0).reshape(4, 2) * [1, 0]]
)
def test_pca_of_degenerate_sample_has_an_orthonormal_plane(x: np.ndarray) -> None:
    p = report._pca(x)
    assert p.components.shape == (x.shape[1], 2)
    np.testing.assert_allclose(p.components.T @ p.components, np.eye(2), atol=1e-12)
    assert np.all(np.isfinite(p.project(x)))


def test_projected_covariance_is_vt_sigma_v() -> None:
    rng = np.random.default_rng(4)
    k, d = 3, 5
    cov = np.stack([random_spd(rng, d) for _ in range(k)])
    v = report._pca(rng.normal(size=(50, d))).components
    got = report._project_covariances(cov, v)
    assert got.shape == (k, 2, 2)
    for j in range(k):
        by_hand = np.zeros((2, 2))
        for r in range(2):
            for c in range(2):
                for a in range(d):
                    for b in range(d):
                        by_hand[r, c] += v[a, r] * cov[j, a, b] * v[b, c]
        np.testing.assert_allclose(got[j], by_hand, rtol=1e-12)


@pytest.mark.parametrize(
    ("cov2", "width", "height", "angle"),
    [
        (np.diag([4.0, 1.0]), 4.0, 2.0, 0.0),
        (np.diag([1.0, 9.0]), 6.0, 2.0, 90.0),
        (np.array([[2.5, 1.5], [1.5, 2.5]]), 4.0, 2.0, 45.0),  # eigenvalues 4, 1 along ±45°
    ],
)
def test_ellipse_axes(cov2: np.ndarray, width: float, height: float, angle: float) -> None:
    w, h, a = report._ellipse_axes(cov2)
    assert (w, h) == pytest.approx((width, height))
    assert a % 180 == pytest.approx(angle % 180, abs=1e-9)


def test_two_sigma_ellipse_holds_its_share_of_a_gaussian() -> None:
    # A Gaussian projects to N(Vᵀμ, VᵀΣV): P(Mahalanobis² <= 4) = 1 - exp(-2) in 2-D.
    rng = np.random.default_rng(5)
    d = 6
    sigma, mu = random_spd(rng, d), rng.normal(size=d)
    x = rng.multivariate_normal(mu, sigma, size=20_000)
    p = report._pca(x)
    s2 = report._project_covariances(sigma[None], p.components)[0]
    z = p.project(x) - p.project(mu[None])[0]
    maha = np.einsum("ni,ij,nj->n", z, np.linalg.inv(s2), z)
    assert np.mean(maha <= 4.0) == pytest.approx(1 - math.exp(-2), abs=0.01)


def ellipses(kw: dict[str, Any]) -> tuple[list[Ellipse], np.ndarray, np.ndarray]:
    inputs = report._validate(**kw)
    fig = report._projection_figure(inputs)
    patches = [p for p in fig.axes[0].patches if isinstance(p, Ellipse)]
    p = report._pca(inputs.sample)
    assert inputs.covariances is not None
    return (
        patches,
        p.project(inputs.means),
        report._project_covariances(inputs.covariances, p.components),
    )


@pytest.mark.parametrize("ct", COV_TYPES)
def test_ellipses_sit_on_the_projected_means(ct: str) -> None:
    patches, mu2, cov2 = ellipses(args("gmm", ct, k=3, d=4, seed=6))
    assert len(patches) == 2 * 3  # 1 and 2 sigma per component
    for j in range(3):
        w, h, _ = report._ellipse_axes(cov2[j])
        for n_sigma, e in zip((1, 2), patches[2 * j : 2 * j + 2], strict=True):
            np.testing.assert_allclose(e.center, mu2[j], atol=1e-12)
            assert (e.width, e.height) == pytest.approx((n_sigma * w, n_sigma * h))


def test_kmeans_has_no_ellipses() -> None:
    fig = report._projection_figure(report._validate(**args()))
    assert not [p for p in fig.axes[0].patches if isinstance(p, Ellipse)]


# ----------------------------------------------------------------------- edge cases


def edge_cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    cases["k=1"] = args(k=1)
    cases["no iterations"] = args(iters=0)
    empty = args("gmm", "diag")
    empty["cluster_sizes"][2] = 0.0
    empty["weights"][2] = 0.0
    empty["sample_labels"][empty["sample_labels"] == 2] = 0
    cases["empty cluster"] = empty
    constant = args("gmm", "spherical")
    constant["sample"] = np.full_like(constant["sample"], 3.0)
    cases["constant sample"] = constant
    # no sample and a single mean: the plane comes from one point
    none = args("gmm", "tied", k=1)
    none["sample"], none["sample_labels"] = np.empty((0, 3)), np.empty(0, dtype=np.int64)
    cases["m=0, k=1"] = none
    one_d = args("gmm", "full", d=1)
    one_d["sample"] = one_d["sample"].astype(np.float32)
    cases["d=1, float32"] = one_d
    cases["k=64"] = args(k=64, m=2000, iters=1)
    return cases


@pytest.mark.parametrize("name", list(edge_cases()))
def test_edge_cases_still_draw(tmp_path: Path, name: str) -> None:
    text = check_report(tmp_path, report.write_report(tmp_path, **edge_cases()[name]))
    assert ("No iterations were run." in text) == (name == "no iterations")


# ---------------------------------------------------------------------- validation


def bad(**changes: Any) -> dict[str, Any]:
    kw = args("gmm", "full")
    kw.update(changes)
    return kw


BAD = {
    "mode": (bad(mode="dbscan"), "mode"),
    "covariance type": (bad(covariance_type="blocky"), "covariance_type"),
    "kmeans with full": ({**args(), "covariance_type": "full"}, "covariance_type"),
    "kmeans with covariances": ({**args(), "covariances": np.ones(4)}, "covariances"),
    "means 1-D": (bad(means=np.zeros(3)), "means"),
    "no means": (bad(means=np.zeros((0, 3))), "means"),
    "sample d": (bad(sample=np.zeros((300, 2))), "sample"),
    "sample NaN": (bad(sample=np.full((300, 3), np.nan)), "NaN"),
    "labels length": (bad(sample_labels=np.zeros(299, dtype=int)), "sample_labels"),
    "labels range": (bad(sample_labels=np.full(300, 4)), r"\[0, 4\)"),
    "labels float": (bad(sample_labels=np.zeros(300)), "integers"),
    "weights shape": (bad(weights=np.ones(3) / 3), "weights"),
    "sizes negative": (bad(cluster_sizes=-np.ones(4)), "non-negative"),
    "covariances shape": (bad(covariances=np.ones((4, 3))), r"covariances.*\(4, 3, 3\)"),
    "diag as full": ({**bad(covariance_type="diag")}, r"covariances.*\(4, 3\)"),
    "covariances missing": (bad(covariances=None), "required"),
    "history key": (bad(history=[{"iteration": 1, "objective": 1.0}]), "missing key"),
    "history value": (
        bad(history=[{"iteration": 1, "objective": "x", "change": 0, "seconds": 0}]),
        "objective",
    ),
    "history type": (bad(history={"iteration": 1}), "history"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(tmp_path: Path, name: str) -> None:
    kw, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        report.write_report(tmp_path, **kw)
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_out_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an existing directory"):
        report.write_report(tmp_path / "nope", **args())


def test_report_of_a_sweep_plots_the_criteria(tmp_path: Path) -> None:
    selection = [
        {
            "n_clusters": k,
            "bic": 1000.0 - 50 * min(k, 4) + 5 * k,
            "aic": 990.0 - 50 * min(k, 4) + 2 * k,
            "log_likelihood": -400.0 + k,
            "n_parameters": 3 * k,
            "n_iter": 7,
            "converged": True,
        }
        for k in (2, 3, 4, 5, 6)
    ]
    kw = args("kmeans", "identity")
    written = report.write_report(tmp_path, **kw, selection=selection, criterion="bic")
    assert written[-2:] == [tmp_path / "criterion.png", tmp_path / "index.html"]
    check_png(tmp_path / "criterion.png")
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Choosing k" in text and 'src="criterion.png"' in text
    assert text.count('<tr class="chosen">') == 1  # the fitted k's row
    for bad, message in [({"criterion": "hqc"}, "criterion"), ({"selection": []}, "at least one")]:
        with pytest.raises(ValueError, match=message):
            report.write_report(tmp_path, **kw, **{"selection": selection, **bad})


# ------------------------------------------------------------------ what figures show


def drawn(fig: Any) -> Any:
    fig.canvas.draw()
    return fig


def tick_texts(axis: Any) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def test_convergence_of_a_mixture_has_no_offset_label() -> None:
    # a mean log-likelihood that moves in its 8th digit: a linear axis needs an offset
    # label ("1e−8−7.4671769") that nobody can read
    obj = -7.4671769 - 3e-8 * 0.5 ** np.arange(10)
    hist = [
        {"iteration": i + 1, "objective": float(o), "change": 0.0, "seconds": 0.1}
        for i, o in enumerate(obj)
    ]
    kw = {**args("gmm", "full"), "history": hist, "objective": float(obj[-1])}
    top = drawn(report._convergence_figure(report._validate(**kw))).axes[0]
    assert top.get_yscale() == "log"
    assert top.yaxis.get_offset_text().get_text() == ""
    assert "mean log-likelihood" in top.get_ylabel()
    assert top.get_title(loc="right") == f"final mean log-likelihood: {obj[-1]:.8g}"
    # the improvements of iterations 1..9; the 10th's needs an 11th lower bound
    x, y = top.lines[0].get_data()
    np.testing.assert_array_equal(x, np.arange(1, 10))
    np.testing.assert_allclose(y, np.diff(obj), rtol=1e-6)
    assert [t.get_text() for t in top.texts] == [
        "iteration 10: its rise is not known (one more E-step would tell)"
    ]


def test_convergence_shows_the_fitted_models_final_inertia() -> None:
    kw = args(iters=5)
    last = kw["history"][-1]["objective"]
    kw["objective"] = last - 0.125  # the final centres' inertia, one step past the history
    fig = drawn(report._convergence_figure(report._validate(**kw)))
    top = fig.axes[0]
    assert top.get_title(loc="right") == f"final inertia: {last - 0.125:.8g}"
    assert f"{last:.8g}" not in top.get_title(loc="right")
    x, y = top.lines[0].get_data()
    np.testing.assert_array_equal(x, np.arange(1, 6))
    assert y[-1] == pytest.approx(0.125)  # the last iteration's fall, to the final inertia
    assert "inertia" in top.get_ylabel() and "inertia" in fig.get_suptitle()


def test_convergence_marks_iterations_that_did_not_improve() -> None:
    kw = args(iters=4)
    objs = [100.0, 50.0, 60.0, 60.0]  # iteration 2 made it worse, 3 and 4 changed nothing
    for row, o in zip(kw["history"], objs, strict=True):
        row["objective"] = o
    kw["objective"] = 60.0
    top = drawn(report._convergence_figure(report._validate(**kw))).axes[0]
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert labels == ["improved by", "got worse by", "no change"]
    worse = top.lines[2].get_data()
    np.testing.assert_array_equal(worse[0], [2])
    np.testing.assert_array_equal(worse[1], [10.0])
    np.testing.assert_array_equal(top.lines[3].get_data()[0], [3, 4])


def test_objective_must_be_a_number(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="objective: expected a number"):
        report.write_report(tmp_path, **{**args(), "objective": "12.5"})


def test_sizes_title_writes_a_million_in_full() -> None:
    kw = args(k=3)
    kw["cluster_sizes"] = np.array([1_000_000.0, 600_000.0, 400_000.0])
    kw["weights"] = kw["cluster_sizes"] / 2e6
    ax = drawn(report._sizes_figure(report._validate(**kw))).axes[0]
    assert "(2,000,000 in all)" in ax.get_title()
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert "1,000,000" in tick_texts(ax.yaxis)


@pytest.mark.parametrize(
    ("total", "text"), [(2e6, "2,000,000"), (1234.5, "1,234.5"), (12.25, "12.25"), (0, "0")]
)
def test_amount(total: float, text: str) -> None:
    assert report._amount(total) == text


def test_criteria_do_not_hide_each_other() -> None:
    # BIC − AIC = p (ln n − 2) is small next to the fall of either over k
    ks = range(2, 9)
    sel = [
        {
            "n_clusters": k,
            "bic": 2.2368e7 - 5e4 * min(k, 4) + 900 * k,
            "aic": 2.2368e7 - 5e4 * min(k, 4) + 300 * k - 600,
            "log_likelihood": -1.1e7,
            "n_parameters": 9 * k,
            "n_iter": 5,
            "converged": True,
        }
        for k in ks
    ]
    fig = drawn(report._criterion_figure(sel, "bic", 4))
    curves = {}
    for ax in fig.axes:
        assert ax.yaxis.get_offset_text().get_text() == ""
        ticks = tick_texts(ax.yaxis)
        assert len(set(ticks)) == len(ticks) and all(t.startswith("22,") for t in ticks)
        name = ax.get_ylabel().split("\n")[0]
        line = ax.lines[0]
        xy = ax.transData.transform(np.column_stack(line.get_data()))
        curves[name] = xy
        # the curve fills most of its panel's height: its shape can be read
        frame = ax.get_window_extent()
        assert np.ptp(xy[:, 1]) > 0.5 * frame.height
    assert set(curves) == {"BIC", "AIC"}
    # no point of one curve is drawn near the other's point at the same k
    gap = np.hypot(*(curves["BIC"] - curves["AIC"]).T)
    assert gap.min() > 20.0
    assert fig.axes[0].get_ylabel().startswith("BIC")  # the criterion that chose k on top
    assert [t.get_text() for t in fig.axes[0].texts] == ["k = 4"]
    assert fig.get_suptitle() == "Choosing k by BIC: BIC and AIC of each candidate"


def test_soft_kmeans_report_names_its_objective_the_log_likelihood(tmp_path: Path) -> None:
    import dask.array as da

    from dkm import job
    from dkm.config import JobConfig
    from dkm.estimators import KMeans

    config = JobConfig.model_validate(
        {
            "data": {"kind": "synthetic"},
            "model": {"mode": "kmeans", "n_clusters": 3, "assignment": "soft", "seed": 0},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    kw = args(k=3, m=600)
    x = kw["sample"]
    est = job.build_estimator(config.model, 8, None)
    assert not isinstance(est, KMeans)  # a mixture: its objective is a likelihood
    est.fit(da.from_array(x, chunks=200))
    sizes = np.bincount(est.predict(x), minlength=3).astype(float)
    summary = {"n_samples": 600, "n_features": 3, "objective": float(est.lower_bound_)}
    job._write_report(str(tmp_path), config, est, None, summary, x, sizes)
    text = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "improved the mean log-likelihood" in text
    assert "inertia" not in text


@pytest.mark.parametrize(
    ("locs", "texts"),
    [
        ([0.0, 2.5, 5.0], ["0.0", "2.5", "5.0"]),
        ([22_365_000.0, 22_370_000.0], ["22,365,000", "22,370,000"]),
        ([-7.5, -7.0], ["-7.5", "-7.0"]),
        ([3.0], ["3"]),
    ],
)
def test_tick_labels_in_full(locs: list[float], texts: list[str]) -> None:
    fmt = report._InFull()
    fmt.set_locs(locs)
    assert [fmt(v) for v in locs] == texts


def test_the_summary_lists_cluster_sizes_and_the_page_shows_the_config(tmp_path: Path) -> None:
    kw = args(k=3)
    kw["cluster_sizes"] = np.array([100.0, 2500.0, 30.0])
    text = check_report(tmp_path, report.write_report(tmp_path, config={"model": {"k": 3}}, **kw))
    assert "<tr><th>cluster sizes</th><td>100, 2,500, 30</td></tr>" in text
    assert "<h2>Config</h2>\n<pre>model:\n  k: 3\n</pre>" in text
    many = args(k=40)
    text = check_report(tmp_path, report.write_report(tmp_path, **many))
    assert "40 clusters: smallest" in text and "<h2>Config</h2>" not in text
    # everything it shows is in the page or beside it: nothing from the network
    assert "http" not in text.replace("http-equiv", "") and "//" not in text
