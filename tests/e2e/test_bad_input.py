"""Bad input, table-driven, through the estimators and through `dkm run` (exit 2).

Every case must give a clear error naming the problem, no traceback from the command,
and no output left behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import yaml

import dkm

RNG = np.random.default_rng(0)
GOOD = RNG.normal(size=(200, 3))


def with_value(row: int, col: int, value: float, dtype=np.float64) -> np.ndarray:
    X = GOOD.astype(dtype)
    X[row, col] = value
    return X


# name, X, weights, model section, message (a regex fragment both paths must show)
CASES = [
    (
        "nan",
        with_value(57, 1, np.nan),
        None,
        {},
        r"NaN or infinity: 1 row\(s\), the first at row 57",
    ),
    ("inf", with_value(3, 0, np.inf), None, {}, r"NaN or infinity: 1 row\(s\), the first at row 3"),
    ("float32-overflow", with_value(9, 2, 1e20, np.float32), None, {}, r"overflow"),
    (
        "fewer-points-than-clusters",
        GOOD[:3],
        None,
        {"n_clusters": 5},
        r"n_samples=3 .*should be >= n_clusters=5",
    ),
    (
        "negative-weight",
        GOOD,
        np.where(np.arange(200) == 11, -1.0, 1.0),
        {},
        r"negative or non-finite value\(s\), the first at row 11",
    ),
    (
        "nan-weight",
        GOOD,
        np.where(np.arange(200) == 12, np.nan, 1.0),
        {},
        r"negative or non-finite value\(s\), the first at row 12",
    ),
    ("zero-weights", GOOD, np.zeros(200), {}, r"sample_weight sums to zero"),
    (
        "gmm-zero-variance",
        np.ones((50, 2)),
        None,
        {"mode": "gmm", "n_clusters": 2, "reg_covar": 0.0},
        r"component\(s\) .*reg_covar",
    ),
    (
        "gmm-duplicates",
        np.repeat(GOOD[:5], 20, axis=0),
        None,
        {"mode": "gmm", "n_clusters": 8, "covariance_type": "diag", "reg_covar": 0.0},
        r"component\(s\) .*(reg_covar|lower)",
    ),
]


def estimator_for(model: dict) -> dkm.KMeans | dkm.GaussianMixture:
    k = model.get("n_clusters", 3)
    if model.get("mode") == "gmm":
        return dkm.GaussianMixture(
            k,
            covariance_type=model.get("covariance_type", "full"),
            reg_covar=model.get("reg_covar", 1e-6),
            random_state=0,
        )
    return dkm.KMeans(k, random_state=0)


@pytest.mark.parametrize("name, X, w, model, message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("container", ["numpy", "dask"])
def test_estimators_reject(name, X, w, model, message, container):
    data = X if container == "numpy" else da.from_array(X, chunks=(64, -1))
    with pytest.raises(ValueError, match=message):
        estimator_for(model).fit(data, sample_weight=w)


@pytest.mark.parametrize("name, X, w, model, message", CASES, ids=[c[0] for c in CASES])
def test_command_rejects(tmp_path, name, X, w, model, message):
    np.save(tmp_path / "x.npy", X)
    data = {"kind": "npy", "path": "x.npy", "chunk_rows": 64}
    if w is not None:
        np.save(tmp_path / "w.npy", w)
        data["weights"] = "w.npy"
    config = {
        "data": data,
        "model": {"n_clusters": 3, "seed": 0, **model},
        "cluster": {
            "kind": "local",
            "n_workers": 1,
            "processes": False,
            "dashboard_address": "127.0.0.1:0",
        },
        "output": {"path": "out"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "dkm.cli", "run", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, "a failed run left files behind"


@pytest.mark.parametrize(
    "X, message",
    [
        (np.zeros(10), "2D"),
        (np.zeros((4, 3, 2)), "3"),
        (np.array([["a", "b"], ["c", "d"]]), "."),
        (np.zeros((5, 2), dtype=complex), "omplex"),
        (np.zeros((0, 2)), "0 sample"),
    ],
    ids=["1-D", "3-D", "strings", "complex", "empty"],
)
def test_wrong_shapes_and_dtypes(X, message):
    with pytest.raises(ValueError, match=message):
        dkm.KMeans(2).fit(X)
    if X.dtype.kind in "fc" and X.ndim != 2:
        with pytest.raises(ValueError, match=r"2D|dimension"):
            dkm.KMeans(2).fit(da.from_array(X))


def test_dask_complex_and_string_arrays_are_refused():
    with pytest.raises(ValueError, match="complex128 is not supported"):
        dkm.KMeans(2).fit(da.zeros((10, 2), dtype=complex))
    with pytest.raises(ValueError, match="is not supported"):
        dkm.KMeans(2).fit(da.from_array(np.array([["a", "b"]] * 5)))


def test_chunks_with_zero_rows_are_fine():
    X = np.vstack([GOOD, GOOD + 10])
    Xd = da.from_array(X, chunks=((0, 150, 0, 250, 0), (3,)))
    a = dkm.KMeans(2, random_state=0).fit(Xd)
    b = dkm.KMeans(2, random_state=0).fit(X)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-10)


def test_feature_count_must_match_at_predict(tmp_path: Path):
    km = dkm.KMeans(2, random_state=0).fit(GOOD)
    with pytest.raises(ValueError, match="3 features"):
        km.predict(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="expecting 3 features"):
        km.predict(da.zeros((4, 5)))
    dkm.save_model(km, str(tmp_path / "model"))
    np.save(tmp_path / "other.npy", np.zeros((10, 5)))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dkm.cli",
            "predict",
            "--model",
            "model",
            "--data",
            "other.npy",
            "--out",
            "pred.zarr",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "5 features" in result.stderr, result.stderr
    assert not (tmp_path / "pred.zarr").exists()


@pytest.mark.parametrize("container", ["numpy", "dask"])
def test_nan_policy_drop_counts_drops_and_labels_minus_one(container):
    X = np.vstack([GOOD, GOOD + 8])
    bad_rows = [5, 77, 390]
    Xbad = X.copy()
    Xbad[bad_rows, [0, 2, 1]] = [np.nan, np.inf, -np.inf]
    clean = np.delete(X, bad_rows, axis=0)
    data = Xbad if container == "numpy" else da.from_array(Xbad, chunks=(97, -1))
    km = dkm.KMeans(2, random_state=0, nan_policy="drop").fit(data)
    ref = dkm.KMeans(2, random_state=0).fit(clean)
    assert km.n_dropped_ == 3
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-10)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)
    labels = np.asarray(km.labels_) if container == "numpy" else km.labels_.compute()
    assert list(np.flatnonzero(labels == -1)) == bad_rows
    np.testing.assert_array_equal(np.delete(labels, bad_rows), ref.labels_)
    gm = dkm.GaussianMixture(2, random_state=0, nan_policy="drop").fit(data)
    gref = dkm.GaussianMixture(2, random_state=0).fit(clean)
    np.testing.assert_allclose(gm.means_, gref.means_, rtol=1e-8)
    assert gm.score(data) == pytest.approx(gref.score(clean), rel=1e-10)
    proba = np.asarray(gm.predict_proba(data))
    assert np.isnan(proba[bad_rows]).all() and np.isfinite(np.delete(proba, bad_rows, 0)).all()
    with pytest.raises(ValueError, match="nan_policy"):
        dkm.KMeans(2, nan_policy="ignore").fit(X)


def test_command_with_nan_policy_drop(tmp_path):
    import json

    import zarr

    Xbad = np.vstack([GOOD, GOOD + 8])
    Xbad[[3, 250], 1] = np.nan
    np.save(tmp_path / "x.npy", Xbad)
    config = {
        "data": {"kind": "npy", "path": "x.npy", "chunk_rows": 64, "nan_policy": "drop"},
        "model": {"n_clusters": 2, "seed": 0},
        "cluster": {
            "kind": "local",
            "n_workers": 1,
            "processes": False,
            "dashboard_address": "127.0.0.1:0",
        },
        "output": {"path": "out"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "dkm.cli", "run", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dropped_rows"] == 2 and sum(summary["cluster_sizes"]) == 398
    labels = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["labels"][:]
    assert list(np.flatnonzero(labels == -1)) == [3, 250]


# Points to predict on: NaN in row 123 (chunk 1 of 100 rows), infinity in row 456 (chunk 4).
BAD_ROWS = [123, 456]
FIT = np.vstack([GOOD, GOOD + 8])
TO_PREDICT = np.vstack([FIT, FIT, GOOD[:100]])
TO_PREDICT_BAD = TO_PREDICT.copy()
TO_PREDICT_BAD[123, 1], TO_PREDICT_BAD[456, 0] = np.nan, np.inf
PER_POINT = [
    ("KMeans", "predict"),
    ("KMeans", "transform"),
    ("GaussianMixture", "predict"),
    ("GaussianMixture", "predict_proba"),
    ("GaussianMixture", "score_samples"),
]


@pytest.mark.parametrize("kind, method", PER_POINT, ids=[f"{k}.{m}" for k, m in PER_POINT])
@pytest.mark.parametrize("container", ["numpy", "dask"])
def test_per_point_methods_raise_on_nonfinite_rows(kind, method, container):
    est = getattr(dkm, kind)(2, random_state=0).fit(FIT)
    if container == "numpy":
        with pytest.raises(dkm.NonFiniteInputError) as info:
            getattr(est, method)(TO_PREDICT_BAD)
        assert str(info.value).startswith(
            "Input X contains NaN or infinity: 2 row(s), the first at row 123 (then row 456). "
        )
        assert "nan_policy='drop'" in str(info.value)
        return
    result = getattr(est, method)(da.from_array(TO_PREDICT_BAD, chunks=(100, -1)))  # lazy
    assert np.isfinite(result.blocks[0].compute()).all()
    for chunk, row in [(1, 123), (4, 456)]:
        message = rf"1 row\(s\) in chunk {chunk}, the first at row {row}\. .*nan_policy='drop'"
        with pytest.raises(dkm.NonFiniteInputError, match=message):
            result.blocks[chunk].compute()
    with pytest.raises(ValueError, match="NaN or infinity"):
        result.compute()


@pytest.mark.parametrize("kind, method", PER_POINT, ids=[f"{k}.{m}" for k, m in PER_POINT])
@pytest.mark.parametrize("container", ["numpy", "dask"])
def test_per_point_methods_drop_nonfinite_rows(kind, method, container):
    est = getattr(dkm, kind)(2, random_state=0, nan_policy="drop").fit(FIT)
    data = (
        TO_PREDICT_BAD if container == "numpy" else da.from_array(TO_PREDICT_BAD, chunks=(100, -1))
    )
    got = np.asarray(getattr(est, method)(data))
    clean = np.asarray(getattr(est, method)(TO_PREDICT))
    empty = -1 if method == "predict" else np.nan
    np.testing.assert_array_equal(got[BAD_ROWS], np.full_like(clean[BAD_ROWS], empty))
    np.testing.assert_array_equal(np.delete(got, BAD_ROWS, 0), np.delete(clean, BAD_ROWS, 0))


@pytest.mark.parametrize("kind", ["KMeans", "GaussianMixture"])
@pytest.mark.parametrize("container", ["numpy", "dask"])
def test_score_follows_nan_policy(kind, container):
    """score: the kept rows' objective under drop (a dropped row is no point of the last
    centre's), an error naming the row under raise."""

    def wrap(a):
        return a if container == "numpy" else da.from_array(a, chunks=(100, -1))

    dropping = getattr(dkm, kind)(2, random_state=0, nan_policy="drop").fit(FIT)
    kept = np.delete(TO_PREDICT, BAD_ROWS, 0)
    expected = dropping.score(kept)
    assert dropping.score(wrap(TO_PREDICT_BAD)) == pytest.approx(expected, rel=1e-12)
    raising = getattr(dkm, kind)(2, random_state=0).fit(FIT)
    with pytest.raises(ValueError, match="NaN or infinity"):
        raising.score(wrap(TO_PREDICT_BAD))


def test_nonfinite_error_survives_pickling():
    """Workers send task errors to the client pickled."""
    import pickle

    err = dkm.NonFiniteInputError(7, (40, 41, 45, 46, 50), 3, True, "skip them")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is dkm.NonFiniteInputError and str(again) == str(err)
    assert str(err) == (
        "Input X contains NaN or infinity: 7 row(s) in chunk 3, the first at row 40 "
        "(then rows 41, 45, 46, 50, …). Remove or impute them, or skip them."
    )


def predict_cmd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dkm.cli", "predict", "--model", "model"]
    return subprocess.run(
        [*command, "--data", "bad.npy", "--out", "pred.zarr", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("fitted_with", ["raise", "drop"])
def test_command_predict_follows_the_nan_policy(tmp_path, fitted_with):
    import zarr

    km = dkm.KMeans(2, random_state=0, nan_policy=fitted_with).fit(FIT)
    dkm.save_model(km, str(tmp_path / "model"))
    np.save(tmp_path / "bad.npy", TO_PREDICT_BAD)
    refused = predict_cmd(tmp_path, *(["--nan-policy", "raise"] if fitted_with == "drop" else []))
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert re.search(
        r"2 row\(s\) in chunk 0, the first at row 123 \(then row 456\)\. .*--nan-policy drop",
        refused.stderr,
    ), refused.stderr
    assert not (tmp_path / "pred.zarr").exists()
    dropped = predict_cmd(tmp_path, *(["--nan-policy", "drop"] if fitted_with == "raise" else []))
    assert dropped.returncode == 0, dropped.stderr
    labels = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")["labels"][:]
    assert list(np.flatnonzero(labels == -1)) == BAD_ROWS
    np.testing.assert_array_equal(
        np.delete(labels, BAD_ROWS), np.delete(km.predict(TO_PREDICT), BAD_ROWS)
    )
