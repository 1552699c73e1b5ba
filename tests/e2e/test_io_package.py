"""dkm.io as a package: value objects as records, the layouts they are stored in (read
by files an earlier dkm wrote), and the registry of data sources."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr

import dkm
from dkm import io
from dkm.engine import ChunkedData, IterationInfo, ResumeState
from dkm.io.records import create_record, read_record
from dkm.kernels.params import MixtureParams
from dkm.recluster import statistics_pass
from dkm.stats import SuffStats

#: Written by dkm's main at ff4f028, before dkm/io/ was a package: a k-means, a
#: full GMM saved with its sufficient statistics, a checkpoint of that GMM, and what they
#: predicted and held then (expected.npz, expected.json).
BEFORE = Path(__file__).parents[1] / "data" / "saved_before_io_package"


def _expected() -> tuple[Any, dict[str, Any]]:
    return np.load(BEFORE / "expected.npz"), json.loads((BEFORE / "expected.json").read_text())


# --------------------------------------------------------------------------- old files


def test_kmeans_saved_before_the_package_predicts_the_same():
    arrays, scalars = _expected()
    X = arrays["X"]
    km = dkm.load_model(str(BEFORE / "kmeans"))
    assert isinstance(km, dkm.KMeans)
    np.testing.assert_array_equal(km.predict(X), arrays["kmeans_labels"])
    np.testing.assert_array_equal(km.transform(X), arrays["kmeans_transform"])
    np.testing.assert_array_equal(km.cluster_centers_, arrays["kmeans_centers"])
    assert km.inertia_ == scalars["kmeans_inertia"] and km.n_iter_ == scalars["kmeans_n_iter"]
    meta = io.read_model_metadata(str(BEFORE / "kmeans"))["metadata"]
    assert meta == {"note": "fixture", "nan": "NaN"}
    assert not io.has_model_statistics(str(BEFORE / "kmeans"))


def test_gmm_with_statistics_saved_before_the_package_reads_the_same():
    arrays, scalars = _expected()
    X = arrays["X"]
    url = str(BEFORE / "gmm_statistics")
    gm = dkm.load_model(url)
    assert isinstance(gm, dkm.GaussianMixture)
    np.testing.assert_array_equal(gm.predict(X), arrays["gmm_labels"])
    # the model is read bit for bit (below); the per-row outputs were recorded by the
    # kernels of then, and the soft E-step's log-densities they use since (issue 22) round
    # differently in the last places
    np.testing.assert_allclose(gm.predict_proba(X), arrays["gmm_proba"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(gm.score_samples(X), arrays["gmm_score_samples"], rtol=1e-13, atol=0)
    np.testing.assert_array_equal(gm.means_, arrays["gmm_means"])
    np.testing.assert_array_equal(gm.covariances_, arrays["gmm_covariances"])
    np.testing.assert_array_equal(gm.precisions_cholesky_, arrays["gmm_precisions_cholesky"])
    assert gm.lower_bound_ == scalars["gmm_lower_bound"]
    assert gm.lower_bounds_ == scalars["gmm_lower_bounds"]
    assert (gm.n_iter_, gm.converged_) == (scalars["gmm_n_iter"], scalars["gmm_converged"])
    assert [h.to_dict() for h in gm.history_] == scalars["gmm_history"]
    assert io.has_model_statistics(url)
    ms = io.load_model_statistics(url)
    s = ms.stats
    for name in ("nk", "sx", "sxx"):
        np.testing.assert_array_equal(getattr(s, name), arrays[f"stats_{name}"])
    np.testing.assert_array_equal(ms.shift, arrays["stats_shift"])
    assert (s.moments, s.objective, s.n, s.count, ms.updates) == (
        scalars["stats_moments"],
        scalars["stats_objective"],
        scalars["stats_n"],
        scalars["stats_count"],
        scalars["stats_updates"],
    )


def test_checkpoint_written_before_the_package_resumes_the_same():
    arrays, scalars = _expected()
    record, meta = io.load_checkpoint(str(BEFORE / "checkpoint"))
    state = ResumeState.from_dict(record)
    assert meta == {"data_fingerprint": "abc", "x": [1, 2]}
    assert (state.iteration, state.objective, state.converged) == (
        scalars["gmm_n_iter"],
        scalars["gmm_lower_bound"],
        scalars["gmm_converged"],
    )
    np.testing.assert_array_equal(state.origin, arrays["checkpoint_origin"])
    p = state.params
    assert p.covariance_type == "full"
    np.testing.assert_array_equal(p.means, arrays["checkpoint_means"])
    np.testing.assert_array_equal(p.weights, arrays["checkpoint_weights"])
    np.testing.assert_array_equal(p.precisions_cholesky, arrays["checkpoint_precisions_cholesky"])
    assert [h.to_dict() for h in state.history] == scalars["gmm_history"]


def test_the_estimators_are_the_kinds_a_model_may_hold():
    from dkm.models import _MODEL_KINDS

    assert tuple(_MODEL_KINDS) == io.MODEL_KINDS


def _layout(url: Path) -> dict[str, Any]:
    """Every node of a zarr group: its attribute names, and arrays' dtype and shape."""
    out: dict[str, Any] = {}
    for meta in sorted(url.rglob("zarr.json")):
        node = json.loads(meta.read_text())
        where = str(meta.parent.relative_to(url))
        out[where] = (
            node["node_type"],
            sorted(node.get("attributes", {})),
            node.get("data_type"),
            node.get("shape"),
        )
    return out


def test_models_and_checkpoints_keep_their_layout(tmp_path):
    """The same models and checkpoint saved now have the nodes, attributes, dtypes and
    shapes of those written before the package."""
    arrays, _ = _expected()
    X = arrays["X"]
    km = dkm.KMeans(3, n_init=1, random_state=1).fit(X)
    dkm.save_model(km, str(tmp_path / "kmeans"), metadata={"note": "fixture"})
    gm = dkm.GaussianMixture(3, covariance_type="full", random_state=1).fit(X)
    data = ChunkedData.from_dask(da.from_array(X, chunks=(40, 2)))
    (stats,) = statistics_pass(data, [gm.mixture_])
    dkm.save_model(gm, str(tmp_path / "gmm_statistics"), statistics=stats)
    m = gm.mixture_
    state = ResumeState(
        gm.n_iter_, m.centred(), m.origin, gm.objective_, gm.converged_, tuple(gm.history_)
    )
    io.save_checkpoint(str(tmp_path / "checkpoint"), state.to_dict(), metadata={"x": [1]})
    for name in ("kmeans", "gmm_statistics", "checkpoint"):
        assert _layout(tmp_path / name) == _layout(BEFORE / name), name


# --------------------------------------------------------------------------- records


def _same(a: Any, b: Any) -> None:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert np.asarray(a).dtype == np.asarray(b).dtype
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == b


def _stored(tmp_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` after a trip through a zarr group."""
    url = str(tmp_path / f"r{len(list(tmp_path.iterdir()))}")
    create_record(url, record)
    return read_record(zarr.open_group(url, mode="r"), url)


@pytest.mark.parametrize("ct", ["identity", "spherical", "diag", "tied", "full"])
def test_mixture_params_round_trip(tmp_path, ct):
    rng = np.random.default_rng(0)
    k, d = 3, 2
    prec = {
        "identity": None,
        "spherical": rng.uniform(1, 2, k),
        "diag": rng.uniform(1, 2, (k, d)),
        "tied": np.tril(rng.uniform(1, 2, (d, d))),
        "full": np.tril(rng.uniform(1, 2, (k, d, d))),
    }[ct]
    p = MixtureParams(ct, np.full(k, 1 / k), rng.normal(size=(k, d)), prec)
    record = p.to_dict()
    assert ("precisions_cholesky" in record) == (prec is not None)
    for back in (
        MixtureParams.from_dict(record),
        MixtureParams.from_dict(_stored(tmp_path, record)),
    ):
        assert back.covariance_type == ct
        for name in ("weights", "means", "precisions_cholesky"):
            _same(getattr(back, name), getattr(p, name))


def test_mixture_params_from_dict_errors():
    with pytest.raises(ValueError, match="without 'means'"):
        MixtureParams.from_dict({"covariance_type": "full", "weights": np.ones(2)})
    with pytest.raises(ValueError, match="full mixture parameters without 'precisions_chol"):
        MixtureParams.from_dict(
            {"covariance_type": "full", "weights": np.ones(2), "means": np.zeros((2, 1))}
        )
    with pytest.raises(ValueError, match="covariance_type"):
        MixtureParams.from_dict({"covariance_type": "round", "weights": 1, "means": 1})


@pytest.mark.parametrize("moments", ["none", "spherical", "diag", "tied", "full"])
def test_suff_stats_round_trip_with_non_finite_numbers(tmp_path, moments):
    zero = SuffStats.zero(3, 2, moments)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    s = SuffStats(
        zero.moments,
        rng.uniform(size=3),
        rng.normal(size=(3, 2)),
        None if zero.sxx is None else rng.normal(size=zero.sxx.shape),
        -math.inf,
        math.nan,
        17,
    )
    record = s.to_dict()
    assert ("sxx" in record) == (moments != "none")
    json.dumps({k: v for k, v in record.items() if not isinstance(v, np.ndarray)})
    for back in (SuffStats.from_dict(record), SuffStats.from_dict(_stored(tmp_path, record))):
        for name in ("moments", "nk", "sx", "sxx", "objective", "n", "count"):
            _same(getattr(back, name), getattr(s, name))
        assert back.farthest is None and back.searched is None


def test_suff_stats_from_dict_errors():
    record = SuffStats.zero(2, 3, "diag").to_dict()
    with pytest.raises(ValueError, match="sxx has the wrong shape for diag"):
        SuffStats.from_dict({**record, "sxx": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="sxx has the wrong shape"):
        SuffStats.from_dict({k: v for k, v in record.items() if k != "sxx"})
    with pytest.raises(ValueError, match=r"nk \(3,\) and sx \(2, 3\) disagree"):
        SuffStats.from_dict({**record, "nk": np.zeros(3)})
    with pytest.raises(ValueError, match="without 'objective'"):
        SuffStats.from_dict({k: v for k, v in record.items() if k != "objective"})


def test_model_statistics_round_trip(tmp_path):
    s = SuffStats.zero(2, 3, "full")
    ms = io.ModelStatistics(s, np.ones((2, 3)), 4)
    record = ms.to_dict()
    assert record["format"] == io.STATISTICS_FORMAT
    back = io.ModelStatistics.from_dict(_stored(tmp_path, record))
    _same(back.shift, ms.shift)
    _same(back.stats.sxx, s.sxx)
    assert back.updates == 4
    with pytest.raises(ValueError, match="shift has shape"):
        io.ModelStatistics(s, np.ones((2, 2))).to_dict()
    with pytest.raises(ValueError, match="disagree"):
        io.ModelStatistics.from_dict({**record, "shift": np.ones(3)})


@pytest.mark.parametrize("ct", ["identity", "full"])
def test_resume_state_round_trip_with_non_finite_numbers(tmp_path, ct):
    p = (
        MixtureParams.identity(np.arange(4.0).reshape(2, 2))
        if ct == "identity"
        else MixtureParams(ct, np.array([0.25, 0.75]), np.zeros((2, 2)), np.ones((2, 2, 2)))
    )
    history = (
        IterationInfo(1, -math.inf, math.inf, 0.5, None, False),
        IterationInfo(2, math.nan, math.nan, 0.25, None, True),
    )
    state = ResumeState(2, p, np.array([1.0, -2.0]), math.nan, True, history)
    record = state.to_dict()
    assert {"weights", "means", "origin", "iteration", "history"} <= set(record)
    for back in (ResumeState.from_dict(record), ResumeState.from_dict(_stored(tmp_path, record))):
        assert (back.iteration, back.converged) == (2, True) and math.isnan(back.objective)
        _same(back.origin, state.origin)
        _same(back.params.means, p.means)
        _same(back.params.precisions_cholesky, p.precisions_cholesky)
        assert [h.to_dict() for h in back.history] == [h.to_dict() for h in history]
    with pytest.raises(ValueError, match="without 'origin'"):
        ResumeState.from_dict({k: v for k, v in record.items() if k != "origin"})


def test_records_keep_nested_groups_and_refuse_what_json_cannot_hold(tmp_path):
    record = {"a": np.arange(3), "sub": {"b": np.ones((2, 2)), "x": None}, "y": [1.5, "s"]}
    back = _stored(tmp_path, record)
    assert set(back) == {"a", "sub", "y"} and back["y"] == [1.5, "s"]
    assert back["sub"]["x"] is None
    _same(back["sub"]["b"], np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"\['z'\]: object cannot be stored as JSON"):
        create_record(str(tmp_path / "bad"), {"z": object()})


# --------------------------------------------------------------------------- sources


def _config(kind: str, tmp_path: Path) -> SimpleNamespace:
    """A data section of ``kind`` over one small dataset, written where it needs."""
    X = np.arange(24, dtype=np.float64).reshape(12, 2)
    common = {"kind": kind, "chunk_rows": 5, "dtype": None, "weights": None}
    if kind == "synthetic":
        return SimpleNamespace(**common, n=12, d=2, k=3, seed=0, spread=5.0)
    if kind == "zarr":
        zarr.save_array(str(tmp_path / "x.zarr"), X)
        return SimpleNamespace(
            **common, url=str(tmp_path / "x.zarr"), array=None, storage_options={}
        )
    if kind == "npy":
        np.save(tmp_path / "x.npy", X)
        return SimpleNamespace(**common, path=str(tmp_path / "x.npy"))
    pd.DataFrame(X, columns=["a", "b"]).to_parquet(tmp_path / "x.parquet")
    return SimpleNamespace(
        **common, url=str(tmp_path / "x.parquet"), columns=["a", "b"], storage_options={}
    )


@pytest.mark.parametrize("kind", list(io.SOURCES))
def test_every_source_opens_from_a_config_and_by_its_suffixes(tmp_path, kind):
    src = io.source(kind)
    assert src.kind == kind
    config = _config(kind, tmp_path)
    points = io.open_source(config)
    assert points.X.shape == (12, 2) and points.X.chunks[0] == (5, 5, 2)
    assert points.description.startswith(kind if kind != "synthetic" else "synthetic blobs")
    location = getattr(config, "url", getattr(config, "path", None))
    if location is None:
        return  # synthetic data has no location
    assert any(location.endswith(suffix) for suffix in src.suffixes)
    if src.open_path is None:
        with pytest.raises(io.InputError, match=rf"is {kind} data.*it reads .*\.npy \(npy\)"):
            io.open_path(location)
    else:
        np.testing.assert_array_equal(
            io.open_path(location).X.compute(), points.X.compute(), strict=True
        )


def test_unknown_kind_and_suffix_name_the_known_ones(tmp_path):
    with pytest.raises(io.InputError, match=r"unknown data kind 'csv': dkm reads synthetic, zarr"):
        io.open_source(SimpleNamespace(kind="csv"))
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(
        io.InputError,
        match=r"no zarr array or group at .*x\.csv.*no data source claims the suffix '\.csv': "
        r"dkm reads \.zarr \(zarr\), \.npy \(npy\); any other location is read as zarr",
    ):
        io.open_path(str(tmp_path / "x.csv"))
    with pytest.raises(io.InputError, match=r"at \S*nothing \(.*\): check the path or URL \(an"):
        io.open_path(str(tmp_path / "nothing"))
    # a zarr store without a known suffix is read as zarr, as before the registry
    zarr.save_array(str(tmp_path / "points.v2"), np.ones((4, 2)))
    assert io.open_path(str(tmp_path / "points.v2")).X.shape == (4, 2)


def test_a_checkpoint_that_does_not_decode_is_reported_as_unreadable(tmp_path):
    """The job decodes the checkpoint's record (io never sees a ResumeState); a record
    that is not a state gets the same error as a group that is not a checkpoint."""
    from dkm.config import validate_config
    from dkm.job import _resume_state, checkpoint_url
    from dkm.monitor import Progress

    config = validate_config(
        {
            "data": {"kind": "synthetic", "n": 50, "d": 2, "k": 2},
            "model": {"mode": "kmeans", "n_clusters": 2},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    points = io.open_source(config.data)
    p = MixtureParams.identity(np.zeros((2, 2)))
    state = ResumeState(1, p, np.zeros(2), 1.0, False)
    record = {k: v for k, v in state.to_dict().items() if k != "history"}
    url = checkpoint_url(config)
    io.save_checkpoint(url, record, metadata={})
    progress = Progress("job", quiet=True)
    with pytest.raises(
        io.InputError,
        match=r"checkpoint is not a readable dkm checkpoint \(ValueError: a resume state "
        r"without 'history'\); remove it and run without --resume",
    ):
        _resume_state(config, points, progress)
    zarr.open_group(url, mode="a").attrs["dkm_checkpoint"] = 99
    with pytest.raises(io.InputError, match=r"not a readable dkm checkpoint \(KeyError"):
        _resume_state(config, points, progress)
