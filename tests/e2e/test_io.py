"""dkm.io: stores to Dask arrays and back (points, labels, models), and atomic outputs."""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import dask
import dask.array as da
import fsspec
import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import blobs
from dask.callbacks import Callback
from dask.delayed import Delayed

import dkm
from dkm import io
from dkm.io import AtomicOutput, InputError
from dkm.io import blobs as io_blobs
from dkm.io.sources import _NpySource

X = blobs(600, 3, 4, seed=3)


@pytest.fixture
def mem() -> Iterator[str]:
    """A fresh memory:// root, removed afterwards."""
    root = f"/dkm-test-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def make_group(path: Path, **arrays: np.ndarray) -> str:
    group = zarr.open_group(str(path), mode="w")
    for name, value in arrays.items():
        group.create_array(name, data=value, chunks=(128, *value.shape[1:]))
    return str(path)


class KeyRecorder(Callback):
    """Names of the tasks the local scheduler runs."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[object] = []

    def _pretask(self, key: object, dsk: object, state: object) -> None:
        self.keys.append(key)


def key_name(key: object) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


# --------------------------------------------------------------------------- zarr


def test_open_zarr_group_array(tmp_path):
    url = make_group(tmp_path / "g.zarr", points=X, w=np.arange(600.0))
    p = io.open_zarr(url, "points", weights="w")
    assert p.X.chunks == ((128, 128, 128, 128, 88), (3,))  # the store's chunks
    assert p.X.dtype == np.float64
    assert p.X.name.startswith("dkm-read-zarr-")
    np.testing.assert_array_equal(p.X.compute(), X)
    assert p.weights is not None
    assert p.weights.chunks == (p.X.chunks[0],)
    np.testing.assert_array_equal(p.weights.compute(), np.arange(600.0))
    assert p.description == (
        f"zarr {url} (array 'points'): 600 x 3 float64 in 5 chunks, weights 'w'"
    )
    assert len(p.fingerprint) == 64 and int(p.fingerprint, 16) >= 0


def test_open_zarr_chunk_rows_dtype_and_column_chunks(tmp_path):
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(600, 3), chunks=(100, 1))
    z[:] = X
    p = io.open_zarr(str(tmp_path / "a.zarr"), chunk_rows=250, dtype="float32")
    assert p.X.chunks == ((250, 250, 100), (3,))  # one column chunk whatever the store's
    assert p.X.dtype == np.float32
    np.testing.assert_array_equal(p.X.compute(), X.astype(np.float32))
    assert "float32 (stored as float64) in 3 chunks" in p.description


def test_open_zarr_sharded_reads_whole_shards(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("points", data=X, chunks=(50, 3), shards=(200, 3))
    p = io.open_zarr(str(tmp_path / "s.zarr"), "points")
    assert p.X.chunks == ((200, 200, 200), (3,))
    np.testing.assert_array_equal(p.X.compute(), X)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [(np.float32, np.float32), (np.float64, np.float64), (np.int16, np.float64)],
)
def test_open_zarr_keeps_floats_and_reads_ints_as_float64(tmp_path, stored, expected):
    url = make_group(tmp_path / "g.zarr", p=(X * 10).astype(stored))
    p = io.open_zarr(url, "p")
    assert p.X.dtype == expected
    np.testing.assert_array_equal(p.X.compute(), (X * 10).astype(stored).astype(expected))


def test_open_zarr_array_url_with_sibling_weights(tmp_path):
    url = make_group(tmp_path / "g.zarr", points=X, w=np.ones(600))
    p = io.open_zarr(f"{url}/points", weights="w")
    np.testing.assert_array_equal(p.X.compute(), X)
    assert p.weights is not None
    np.testing.assert_array_equal(p.weights.compute(), np.ones(600))
    # file:// URLs are local paths too
    q = io.open_zarr(f"file://{url}", "points")
    np.testing.assert_array_equal(q.X.compute(), X)


def test_open_zarr_fsspec_url(mem):
    group = zarr.open_group(f"{mem}/g.zarr", mode="w")
    group.create_array("points", data=X, chunks=(200, 3))
    p = io.open_zarr(f"{mem}/g.zarr", "points", storage_options={})
    assert p.X.chunks[0] == (200, 200, 200)
    np.testing.assert_array_equal(p.X.compute(), X)


def test_open_zarr_is_lazy(tmp_path):
    url = make_group(tmp_path / "g.zarr", points=X)
    recorder = KeyRecorder()
    with recorder:
        p = io.open_zarr(url, "points")
    # opening runs one small task (the fingerprint rows), never a chunk read
    assert recorder.keys and all(key_name(k).startswith("dkm-fingerprint-") for k in recorder.keys)
    # the graph holds the zarr array, not its data
    assert all(
        not (isinstance(v, np.ndarray) and v.size >= X.size) for v in dict(p.X.dask).values()
    )


def test_open_zarr_errors(tmp_path):
    url = make_group(
        tmp_path / "g.zarr",
        points=X,
        cube=np.zeros((4, 2, 2)),
        empty=np.zeros((0, 3)),
        w_short=np.ones(5),
        w_2d=np.ones((600, 2)),
    )
    zarr.open_group(url, mode="a").create_array("names", shape=(600, 3), dtype=str)
    missing = str(tmp_path / "nope.zarr")
    with pytest.raises(InputError, match=rf"no zarr array or group at {missing}"):
        io.open_zarr(missing)
    with pytest.raises(InputError, match=r"is a zarr group, not an array.*'cube'.*'points'"):
        io.open_zarr(url)
    with pytest.raises(InputError, match=r"has no points array 'pts'; it holds.*'points'"):
        io.open_zarr(url, "pts")
    with pytest.raises(InputError, match=r"array 'cube'\) has shape \(4, 2, 2\).*2-D"):
        io.open_zarr(url, "cube")
    with pytest.raises(InputError, match=r"array 'names'\) has dtype .*real numbers"):
        io.open_zarr(url, "names")
    with pytest.raises(InputError, match=r"array 'empty'\) has no rows"):
        io.open_zarr(url, "empty")
    with pytest.raises(InputError, match=r"weights 'w_short' has shape \(5,\).*\(600,\)"):
        io.open_zarr(url, "points", weights="w_short")
    with pytest.raises(InputError, match=r"weights 'w_2d' has shape \(600, 2\)"):
        io.open_zarr(url, "points", weights="w_2d")
    with pytest.raises(InputError, match=r"no weights array 'ww'"):
        io.open_zarr(url, "points", weights="ww")
    with pytest.raises(InputError, match=r"is a zarr array, so array='x'"):
        io.open_zarr(f"{url}/points", "x")
    with pytest.raises(InputError, match=r"dtype must be 'float32' or 'float64'"):
        io.open_zarr(url, "points", dtype="int8")
    with pytest.raises(InputError, match=r"chunk_rows must be an integer >= 1"):
        io.open_zarr(url, "points", chunk_rows=0)


# --------------------------------------------------------------------------- npy


def test_open_npy(tmp_path):
    np.save(tmp_path / "x.npy", X.astype(np.float32))
    np.save(tmp_path / "w.npy", np.arange(600, dtype=np.int64))
    p = io.open_npy(str(tmp_path / "x.npy"), weights=str(tmp_path / "w.npy"), chunk_rows=256)
    assert p.X.chunks == ((256, 256, 88), (3,))
    assert p.X.dtype == np.float32
    np.testing.assert_array_equal(p.X.compute(), X.astype(np.float32))
    assert p.weights is not None and p.weights.dtype == np.float64
    np.testing.assert_array_equal(p.weights.compute(), np.arange(600.0))
    # the graph holds the file's path, not a memory map of it
    assert not any(isinstance(v, np.ndarray) for v in dict(p.X.dask).values())
    default = io.open_npy(str(tmp_path / "x.npy"), dtype="float64")
    assert default.X.chunks == ((600,), (3,)) and default.X.dtype == np.float64


def test_open_npy_errors(tmp_path):
    missing = str(tmp_path / "missing.npy")
    with pytest.raises(InputError, match=rf"points file {missing} does not exist"):
        io.open_npy(missing)
    np.save(tmp_path / "x.npy", X)
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"cut.npy is not a readable .npy file.*truncated"):
        io.open_npy(str(tmp_path / "cut.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(InputError, match=r"junk.npy is not a readable .npy file"):
        io.open_npy(str(tmp_path / "junk.npy"))
    np.savez(tmp_path / "x.npz", x=X)
    with pytest.raises(InputError, match=r"x.npz is a .npz archive"):
        io.open_npy(str(tmp_path / "x.npz"))
    np.save(tmp_path / "flat.npy", X.ravel())
    with pytest.raises(InputError, match=r"npy .*flat.npy has shape \(1800,\)"):
        io.open_npy(str(tmp_path / "flat.npy"))
    np.save(tmp_path / "c.npy", X.astype(np.complex128))
    with pytest.raises(InputError, match=r"c.npy has dtype complex128"):
        io.open_npy(str(tmp_path / "c.npy"))
    np.save(tmp_path / "w.npy", np.ones(7))
    with pytest.raises(InputError, match=r"weights .*w.npy' has shape \(7,\)"):
        io.open_npy(str(tmp_path / "x.npy"), weights=str(tmp_path / "w.npy"))
    with pytest.raises(InputError, match=r"must be a local file"):
        io.open_npy("memory://x.npy")


# --------------------------------------------------------------------------- parquet


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "a": X[:, 0],
            "b": X[:, 1].astype(np.float32),
            "c": X[:, 2],
            "n": np.arange(600, dtype=np.int32),
            "w": np.linspace(0.5, 2.0, 600),
            "s": ["x"] * 600,
        }
    )


def test_open_parquet_row_groups_and_columns(tmp_path):
    frame().to_parquet(tmp_path / "x.parquet", row_group_size=250)
    url = str(tmp_path / "x.parquet")
    p = io.open_parquet(url, ["c", "a", "n"], weights="w")
    assert p.X.chunks == ((250, 250, 100), (3,))  # one chunk per row group
    assert p.X.dtype == np.float64
    expected = np.column_stack([X[:, 2], X[:, 0], np.arange(600.0)])
    np.testing.assert_array_equal(p.X.compute(), expected)
    assert p.weights is not None
    np.testing.assert_array_equal(p.weights.compute(), np.linspace(0.5, 2.0, 600))
    assert p.description.startswith(f"parquet {url} (columns c, a, n): 600 x 3 float64")
    q = io.open_parquet(url, ["b"], chunk_rows=160)
    assert q.X.dtype == np.float32  # all named columns float32
    assert q.X.chunks == ((160, 160, 160, 120), (1,))
    np.testing.assert_array_equal(q.X.compute()[:, 0], X[:, 1].astype(np.float32))
    # slices that cross row groups, with steps, single rows
    for index in (np.s_[240:260], np.s_[::7], np.s_[599], np.s_[10:500:3, 0]):
        np.testing.assert_array_equal(q.X[index].compute(), q.X.compute()[index])


def test_open_parquet_directory_and_nulls(tmp_path, mem):
    df = frame()
    (tmp_path / "d").mkdir()
    df.iloc[:200].to_parquet(tmp_path / "d" / "part-0.parquet")
    df.iloc[200:].to_parquet(tmp_path / "d" / "part-1.parquet", row_group_size=300)
    (tmp_path / "d" / "_SUCCESS").write_text("")
    p = io.open_parquet(str(tmp_path / "d"), ["a", "c"])
    assert p.X.chunks[0] == (200, 300, 100)
    np.testing.assert_array_equal(p.X.compute(), X[:, [0, 2]])
    nulls = pd.DataFrame({"a": pd.array([1, None, 3], dtype="Int64"), "b": [1.0, 2.0, None]})
    with fsspec.open(f"{mem}/n.parquet", "wb") as f:
        nulls.to_parquet(f)
    q = io.open_parquet(f"{mem}/n.parquet", ["a", "b"])
    np.testing.assert_array_equal(q.X.compute(), [[1, 1], [np.nan, 2], [3, np.nan]])


def test_open_parquet_errors(tmp_path, monkeypatch):
    frame().to_parquet(tmp_path / "x.parquet")
    url = str(tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"no column\(s\) 'zz'; available columns: 'a', 'b'"):
        io.open_parquet(url, ["a", "zz"])
    with pytest.raises(InputError, match=r"no column\(s\) 'ww'"):
        io.open_parquet(url, ["a"], weights="ww")
    with pytest.raises(InputError, match=r"column 's' of parquet .* has type (large_)?string"):
        io.open_parquet(url, ["a", "s"])
    with pytest.raises(InputError, match=r"no parquet file or directory at .*nope"):
        io.open_parquet(str(tmp_path / "nope"), ["a"])
    (tmp_path / "bad.parquet").write_bytes(b"nonsense")
    with pytest.raises(InputError, match=r"bad.parquet .*not a readable parquet file"):
        io.open_parquet(str(tmp_path / "bad.parquet"), ["a"])
    with pytest.raises(InputError, match=r"columns must be a non-empty list"):
        io.open_parquet(url, [])
    frame().iloc[:0].to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(InputError, match=r"has no rows"):
        io.open_parquet(str(tmp_path / "empty.parquet"), ["a"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        InputError, match=r"parquet input needs pyarrow: pip install 'dkm\[parquet\]'"
    ):
        io.open_parquet(url, ["a"])


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_content_sensitive(tmp_path):
    url = make_group(tmp_path / "g.zarr", points=X)
    first = io.open_zarr(url, "points")
    assert io.open_zarr(url, "points").fingerprint == first.fingerprint
    assert io.open_zarr(url, "points").X.name == first.X.name
    assert io.open_zarr(url, "points", chunk_rows=100).fingerprint != first.fingerprint
    assert io.open_zarr(url, "points", dtype="float32").fingerprint != first.fingerprint
    # same path, same shape and dtype, other content: another dataset
    for row in (0, 127, 599):
        changed = X.copy()
        changed[row, 1] += 1.0
        make_group(tmp_path / "g.zarr", points=changed)
        other = io.open_zarr(url, "points")
        assert other.fingerprint != first.fingerprint
        assert other.X.name != first.X.name
    make_group(tmp_path / "g.zarr", points=X)
    assert io.open_zarr(url, "points").fingerprint == first.fingerprint
    np.save(tmp_path / "x.npy", X)
    a = io.open_npy(str(tmp_path / "x.npy"))
    assert io.open_npy(str(tmp_path / "x.npy")).fingerprint == a.fingerprint
    assert a.fingerprint != first.fingerprint  # another source kind and location
    changed = X.copy()
    changed[-1, 0] = 7.0
    np.save(tmp_path / "x.npy", changed)
    assert io.open_npy(str(tmp_path / "x.npy")).fingerprint != a.fingerprint


def test_fingerprint_reads_only_a_few_rows(tmp_path):
    np.save(tmp_path / "x.npy", X)
    reads: list[object] = []
    original = _NpySource.__getitem__

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_NpySource, "__getitem__", spy)
        io.open_npy(str(tmp_path / "x.npy"), chunk_rows=100)
    assert reads == [slice(0, 1), slice(99, 100), slice(500, 501), slice(599, 600)]


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_chunk():
    p = io.synthetic(1000, 3, 4, seed=5, chunk_rows=300, spread=20.0)
    assert p.X.chunks == ((300, 300, 300, 100), (3,))
    assert p.weights is None
    a = p.X.compute(scheduler="threads")
    b = io.synthetic(1000, 3, 4, seed=5, chunk_rows=300, spread=20.0).X.compute(scheduler="sync")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p.X.blocks[2].compute(), a[600:900])  # a chunk alone
    assert (
        p.fingerprint == io.synthetic(1000, 3, 4, seed=5, chunk_rows=300, spread=20.0).fingerprint
    )
    other = io.synthetic(1000, 3, 4, seed=6, chunk_rows=300, spread=20.0)
    assert other.fingerprint != p.fingerprint
    assert not np.array_equal(other.X.compute(), a)
    assert io.synthetic(10, 2, 2).X.chunks == ((10,), (2,))
    assert io.synthetic(250_000, 2, 2).X.chunks[0] == (100_000, 100_000, 50_000)
    assert io.synthetic(10, 2, 2, dtype="float32").X.dtype == np.float32
    # k well separated blobs: every point is within a few noise units of its centre
    centres = np.random.default_rng(5).normal(scale=20.0, size=(4, 3))
    dist = np.linalg.norm(a[:, None, :] - centres[None], axis=2).min(axis=1)
    assert dist.max() < 7


def test_synthetic_errors():
    with pytest.raises(InputError, match=r"n must be an integer >= 1"):
        io.synthetic(0, 2, 2)
    with pytest.raises(InputError, match=r"spread must be a finite number"):
        io.synthetic(10, 2, 2, spread=float("nan"))
    with pytest.raises(InputError, match=r"dtype must be"):
        io.synthetic(10, 2, 2, dtype="int32")


def test_make_data_round_trip(tmp_path):
    url = str(tmp_path / "data.zarr")
    io.make_data(url, 1000, 3, 4, seed=2, chunk_rows=300, spread=15.0)
    p = io.open_zarr(url, "points")
    assert p.X.dtype == np.float32
    assert p.X.chunks == ((300, 300, 300, 100), (3,))
    ref = io.synthetic(1000, 3, 4, seed=2, chunk_rows=300, dtype="float32", spread=15.0)
    points = p.X.compute()
    np.testing.assert_array_equal(points, ref.X.compute())
    group = zarr.open_group(url, mode="r")
    labels = group["labels_true"]
    assert labels.dtype == np.int32 and labels.chunks == (300,) and labels.shape == (1000,)
    centres = np.random.default_rng(2).normal(scale=15.0, size=(4, 3))
    nearest = np.linalg.norm(points[:, None] - centres[None], axis=2).argmin(axis=1)
    assert (nearest == labels[:]).mean() > 0.99
    attrs = group.attrs.asdict()
    assert {k: attrs[k] for k in ("n", "d", "k", "seed", "spread")} == {
        "n": 1000,
        "d": 3,
        "k": 4,
        "seed": 2,
        "spread": 15.0,
    }
    assert attrs["dkm_version"] == dkm.__version__
    assert leftovers(tmp_path) == []


def test_make_data_replaces_and_fails_atomically(tmp_path, monkeypatch, mem):
    url = str(tmp_path / "data.zarr")
    io.make_data(url, 100, 2, 2, chunk_rows=30)
    before = io.open_zarr(url, "points").X.compute()
    calls = []

    def failing(points, labels, index, start, rows, params):
        calls.append(index)
        if index == 2:
            raise OSError("disk full")
        points[start : start + rows] = 0.0
        return rows

    monkeypatch.setattr(io_blobs, "_write_blobs_block", failing)
    with pytest.raises(OSError, match="disk full"):
        io.make_data(url, 100, 2, 2, seed=9, chunk_rows=30, overwrite=True)
    assert 2 in calls
    np.testing.assert_array_equal(io.open_zarr(url, "points").X.compute(), before)
    assert leftovers(tmp_path) == []
    with pytest.raises(OSError, match="disk full"):
        io.make_data(f"{mem}/data.zarr", 100, 2, 2, chunk_rows=30)
    assert fsspec.filesystem("memory").find(mem.removeprefix("memory://")) == []
    monkeypatch.undo()
    io.make_data(f"{mem}/data.zarr", 100, 2, 2, chunk_rows=30, array="x")
    q = io.open_zarr(f"{mem}/data.zarr", "x")
    np.testing.assert_array_equal(q.X.compute(), before)


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(
    ("chunks", "stored"),
    [((250, 250, 100), 250), ((100, 300, 200), 300), ((1, 299, 0, 200, 100), 299)],
)
def test_write_labels_chunks_and_task_names(tmp_path, chunks, stored):
    labels = da.from_array(np.arange(600, dtype=np.int64) % 7, chunks=(chunks,))
    recorder = KeyRecorder()
    with recorder, dask.config.set(scheduler="threads"):
        io.write_labels(labels, str(tmp_path / "out.zarr"))
    z = zarr.open_array(str(tmp_path / "out.zarr"), path="labels", mode="r")
    assert z.chunks == (stored,)
    assert z.dtype == np.int64
    np.testing.assert_array_equal(z[:], np.arange(600) % 7)
    writes = [key_name(k) for k in recorder.keys if key_name(k).startswith("dkm-write-labels-")]
    n_chunks = len(chunks) if stored == chunks[0] else -(-600 // stored)
    assert len([w for w in writes if "done" not in w]) == n_chunks
    if stored == chunks[0]:  # regular chunks: written as they are
        assert z.chunks[0] == labels.chunks[0][0]


def test_write_array_float_2d_deferred(tmp_path, mem):
    proba = da.from_array(
        np.random.default_rng(0).random((500, 4)), chunks=((200, 200, 100), (2, 2))
    )
    task = io.write_array(proba, f"{mem}/out.zarr", "responsibilities", compute=False)
    assert isinstance(task, Delayed)
    assert key_name(task.key).startswith("dkm-write-responsibilities-done-")
    (written,) = dask.compute(task)
    assert written == 500  # the client gets a count, never the data
    z = zarr.open_array(f"{mem}/out.zarr", path="responsibilities", mode="r")
    assert z.chunks == (200, 4)
    np.testing.assert_array_equal(z[:], proba.compute())
    # a second array in the same group; an existing one is replaced
    io.write_labels(da.zeros(500, dtype=np.int32, chunks=100), f"{mem}/out.zarr")
    io.write_labels(da.ones(500, dtype=np.int32, chunks=250), f"{mem}/out.zarr")
    group = zarr.open_group(f"{mem}/out.zarr", mode="r")
    assert sorted(group.array_keys()) == ["labels", "responsibilities"]
    assert group["labels"].chunks == (250,)
    np.testing.assert_array_equal(group["labels"][:], np.ones(500))


def test_write_labels_rejects_non_labels(tmp_path):
    with pytest.raises(InputError, match=r"must be a 1-D integer array"):
        io.write_labels(da.zeros(5, chunks=5), str(tmp_path / "o.zarr"))
    with pytest.raises(TypeError, match=r"expects a Dask array"):
        io.write_labels(np.zeros(5, dtype=int), str(tmp_path / "o.zarr"))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"expected 1-D or 2-D"):
        io.write_array(da.zeros((2, 2, 2)), str(tmp_path / "o.zarr"), "x")


# --------------------------------------------------------------------------- models


MODELS = {
    "kmeans": lambda: dkm.KMeans(4, random_state=0).fit(X),
    "kmeans-float32": lambda: dkm.KMeans(4, init=X[:4].copy(), n_init=1).fit(X.astype(np.float32)),
    **{
        f"gmm-{ct}": (
            lambda ct=ct: dkm.GaussianMixture(4, covariance_type=ct, random_state=0).fit(X)
        )
        for ct in ("full", "tied", "diag", "spherical", "identity")
    },
    "gmm-hard": lambda: dkm.GaussianMixture(4, assignment="hard", random_state=0).fit(X),
}


def assert_same_predictions(a, b, data):
    methods = ["predict", "transform"] if isinstance(a, dkm.KMeans) else ["predict"]
    if isinstance(a, dkm.GaussianMixture):
        methods += ["predict_proba", "score_samples"]
    for method in methods:
        expected, got = getattr(a, method)(data), getattr(b, method)(data)
        if isinstance(data, da.Array):
            expected, got = expected.compute(), got.compute()
        assert got.dtype == expected.dtype, method
        np.testing.assert_array_equal(got, expected, err_msg=method)
    assert a.score(data) == b.score(data)


@pytest.mark.parametrize("model", list(MODELS))
def test_model_round_trip_is_exact(tmp_path, model):
    estimator = MODELS[model]()
    url = str(tmp_path / "model")
    dkm.save_model(estimator, url, metadata={"data_fingerprint": "abc", "t": np.float64(1.5)})
    loaded = dkm.load_model(url)
    assert type(loaded) is type(estimator)
    assert loaded.n_features_in_ == estimator.n_features_in_
    fresh = np.random.default_rng(1).normal(scale=6.0, size=(300, 3))
    for data in (X, fresh, da.from_array(fresh, chunks=70), X.astype(np.float32)):
        assert_same_predictions(estimator, loaded, data)
    assert loaded.n_iter_ == estimator.n_iter_ and loaded.converged_ == estimator.converged_
    assert [h.objective for h in loaded.history_] == [h.objective for h in estimator.history_]
    assert [h.change for h in loaded.history_] == [h.change for h in estimator.history_]
    if isinstance(estimator, dkm.KMeans):
        assert loaded.inertia_ == estimator.inertia_
        np.testing.assert_array_equal(loaded.cluster_centers_, estimator.cluster_centers_)
        assert loaded.cluster_centers_.dtype == estimator.cluster_centers_.dtype
    else:
        assert loaded.lower_bound_ == estimator.lower_bound_
        assert loaded.lower_bounds_ == estimator.lower_bounds_
        for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(estimator, name))
    assert not hasattr(loaded, "labels_")
    assert leftovers(tmp_path) == []


def test_model_params_metadata_and_info(tmp_path):
    est = dkm.KMeans(3, init=X[:3].copy(), n_init=1, random_state=np.random.RandomState(0))
    est.fit(pd.DataFrame(X, columns=["x", "y", "z"]))
    meta = {"config": {"k": np.int64(3), "paths": ("a", "b")}, "bad": float("inf")}
    dkm.save_model(est, str(tmp_path / "m"), metadata=meta)
    info = io.read_model_metadata(str(tmp_path / "m"))
    assert info["kind"] == "KMeans" and info["dkm_version"] == dkm.__version__
    assert info["dkm_format"] == io.MODEL_FORMAT
    assert info["metadata"] == {"config": {"k": 3, "paths": ["a", "b"]}, "bad": "Infinity"}
    assert sorted(info["dropped_params"]) == ["init", "random_state"]
    assert info["params"]["n_clusters"] == 3
    # the same record as the checkpoint and the metrics keep (converged too, since issue 20)
    assert info["history_"][0].keys() == {
        "iteration",
        "objective",
        "change",
        "seconds",
        "converged",
    }
    json.dumps(info, allow_nan=False)  # strict JSON
    loaded = dkm.load_model(str(tmp_path / "m"))
    assert loaded.get_params()["init"] == "k-means++"  # dropped: back to the default
    assert list(loaded.feature_names_in_) == ["x", "y", "z"]
    df = pd.DataFrame(X[:50], columns=["x", "y", "z"])
    np.testing.assert_array_equal(loaded.predict(df), est.predict(df))
    with pytest.raises(TypeError, match=r"metadata\['when'\]: datetime64"):
        dkm.save_model(est, str(tmp_path / "m2"), metadata={"when": np.datetime64("2024-01-01")})
    assert not (tmp_path / "m2").exists() and leftovers(tmp_path) == []


def test_model_on_fsspec_url(mem):
    est = dkm.GaussianMixture(2, covariance_type="diag", random_state=0).fit(X)
    dkm.save_model(est, f"{mem}/models/g")
    with pytest.raises(io.OutputExistsError, match=r"models/g holds the output of an earlier"):
        dkm.save_model(est, f"{mem}/models/g", metadata={"second": True})
    dkm.save_model(est, f"{mem}/models/g", metadata={"second": True}, overwrite=True)
    loaded = dkm.load_model(f"{mem}/models/g")
    assert_same_predictions(est, loaded, X)
    assert io.read_model_metadata(f"{mem}/models/g")["metadata"] == {"second": True}
    names = fsspec.filesystem("memory").ls(mem.removeprefix("memory://") + "/models", detail=False)
    assert [n.rsplit("/", 1)[1] for n in names] == ["g"]


def test_output_folder_of_dkm_run_leads_to_its_model(tmp_path, mem):
    est = dkm.KMeans(2, random_state=0).fit(X)
    (tmp_path / "out").mkdir()
    for out in (str(tmp_path / "out"), f"{mem}/out"):
        dkm.save_model(est, f"{out}/model")
        assert io.find_model(out) == f"{out}/model"
        assert io.find_model(f"{out}/model") == f"{out}/model"
        message = f"{out} is an output folder of `dkm run`: its model is {out}/model"
        with pytest.raises(InputError, match=re.escape(message)):
            dkm.load_model(out)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"no dkm model at .*plain.*writes the model to model/"):
        io.find_model(str(tmp_path / "plain"))


def test_load_non_models(tmp_path):
    with pytest.raises(InputError, match=r"no dkm model at .*missing"):
        dkm.load_model(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"no dkm model at .*plain"):
        dkm.load_model(str(tmp_path / "plain"))
    url = make_group(tmp_path / "data.zarr", points=X)
    with pytest.raises(InputError, match=r"data.zarr is a zarr group but not a dkm model"):
        dkm.load_model(url)
    with pytest.raises(InputError, match=r"not a dkm model"):
        io.read_model_metadata(url)
    with pytest.raises(InputError, match=r"no dkm model at"):
        dkm.load_model(f"{url}/points")  # an array
    est = dkm.KMeans(2, random_state=0).fit(X)
    model = str(tmp_path / "model")
    dkm.save_model(est, model)
    group = zarr.open_group(model, mode="a")
    group.attrs["kind"] = "Pickle"
    with pytest.raises(InputError, match=r"unknown kind 'Pickle'"):
        dkm.load_model(model)
    group.attrs.update({"kind": "KMeans", "dkm_format": io.MODEL_FORMAT + 1})
    with pytest.raises(InputError, match=rf"format {io.MODEL_FORMAT + 1} .*reads format"):
        dkm.load_model(model)
    group.attrs["dkm_format"] = io.MODEL_FORMAT
    del group["cluster_centers_"]
    with pytest.raises(InputError, match=r"incomplete: the array 'cluster_centers_' is missing"):
        dkm.load_model(model)
    with pytest.raises(TypeError, match=r"expects a dkm KMeans or GaussianMixture"):
        dkm.save_model(object(), str(tmp_path / "x"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- outputs


def test_atomic_output_success_and_replace(tmp_path):
    target = tmp_path / "out"
    with AtomicOutput(str(target)) as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".out.tmp-")
        assert Path(tmp).is_dir() and not target.exists()
        (Path(tmp) / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    manifest = json.loads((target / io.OUTPUT_MARKER).read_text())
    assert manifest["command"] == "save" and manifest["entries"] == ["a.txt"]
    with pytest.raises(io.OutputExistsError, match="pass --overwrite"), AtomicOutput(str(target)):
        pass
    with AtomicOutput(str(target), overwrite=True) as tmp:
        (Path(tmp) / "b.txt").write_text("two")
        assert (target / "a.txt").exists()  # the old output stays until success
    assert sorted(os.listdir(target)) == [io.OUTPUT_MARKER, "b.txt"]
    assert leftovers(tmp_path) == []
    with AtomicOutput(str(target), overwrite=True):
        pass  # nothing written: the target stays
    assert sorted(os.listdir(target)) == [io.OUTPUT_MARKER, "b.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_output_failure_keeps_target(tmp_path):
    target = tmp_path / "out"
    with AtomicOutput(str(target)) as tmp:
        (Path(tmp) / "keep.txt").write_text("previous")
    with (
        pytest.raises(RuntimeError, match="boom"),
        AtomicOutput(str(target), overwrite=True) as tmp,
    ):
        (Path(tmp) / "half.txt").write_text("partial")
        raise RuntimeError("boom")
    assert sorted(os.listdir(target)) == [io.OUTPUT_MARKER, "keep.txt"]
    assert leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), AtomicOutput(str(tmp_path / "new")):
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_output_fsspec(mem):
    fs = fsspec.filesystem("memory")
    root = mem.removeprefix("memory://")
    with AtomicOutput(f"{mem}/out") as tmp:
        assert tmp.startswith(f"{mem}/.out.tmp-")
        fs.pipe_file(tmp.removeprefix("memory://") + "/a", b"1")
    with pytest.raises(ValueError, match="bad"), AtomicOutput(f"{mem}/out", overwrite=True) as tmp:
        fs.pipe_file(tmp.removeprefix("memory://") + "/b", b"2")
        raise ValueError("bad")
    assert fs.find(root) == [f"{root}/out/{io.OUTPUT_MARKER}", f"{root}/out/a"]
    with AtomicOutput(f"{mem}/out", overwrite=True) as tmp:
        fs.pipe_file(tmp.removeprefix("memory://") + "/c", b"3")
    assert fs.find(root) == [f"{root}/out/{io.OUTPUT_MARKER}", f"{root}/out/c"]


def test_check_writable(tmp_path, mem):
    io.check_writable(str(tmp_path / "new"))
    io.check_writable(f"{mem}/new")
    assert fsspec.filesystem("memory").find(mem.removeprefix("memory://")) == []  # probe gone
    missing = tmp_path / "no" / "such"
    with pytest.raises(InputError, match=rf"{missing}/out: the directory {missing} does not exist"):
        io.check_writable(str(missing / "out"))
    (tmp_path / "file").write_text("")
    ran = False
    with (
        pytest.raises(InputError, match=r"cannot create the directory .*file"),
        AtomicOutput(str(tmp_path / "file" / "sub" / "out")),
    ):
        ran = True  # never: the check comes before any work
    assert not ran
    with pytest.raises(InputError, match=r"is not a directory"):
        io.check_writable(str(tmp_path / "file" / "out"))
    # missing parents are created, as `dkm run` does for its output
    io.make_data(str(missing / "d.zarr"), 10, 2, 2)
    assert io.open_zarr(str(missing / "d.zarr"), "points").X.shape == (10, 2)


def test_check_writable_read_only_directory(tmp_path, monkeypatch):
    """A directory without write permission (simulated: tests run as root, which may
    write anywhere, so os.access is what the check consults)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    with pytest.raises(InputError, match=r"is not writable"):
        io.check_writable(str(locked / "out"))


def test_nested_outputs_and_small_files(tmp_path, mem):
    est = dkm.KMeans(2, random_state=0).fit(X)
    for base in (str(tmp_path / "run"), f"{mem}/run"):
        with AtomicOutput(base) as tmp:
            io.write_labels(da.from_array(est.labels_, chunks=200), f"{tmp}/labels.zarr")
            dkm.save_model(est, f"{tmp}/model")
            io.text_writer(tmp)("summary.json", '{"ok": true}')
            with io.local_dir(f"{tmp}/report") as local:
                Path(local, "index.html").write_text("<html></html>")
                Path(local, "img").mkdir()
                Path(local, "img", "a.svg").write_text("<svg/>")
        loaded = dkm.load_model(f"{base}/model")
        assert_same_predictions(est, loaded, X)
        labels = zarr.open_array(f"{base}/labels.zarr", path="labels", mode="r")
        np.testing.assert_array_equal(labels[:], est.labels_)
        with fsspec.open(f"{base}/summary.json", "r") as f:
            assert json.load(f) == {"ok": True}
        with fsspec.open(f"{base}/report/img/a.svg", "r") as f:
            assert f.read() == "<svg/>"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- distributed


@pytest.mark.distributed
def test_reads_and_writes_on_worker_processes(tmp_path, dask_processes):
    """Sources and write targets travel to other processes; the data does not."""
    from distributed import Client, get_task_stream

    np.save(tmp_path / "x.npy", X)
    frame().to_parquet(tmp_path / "x.parquet", row_group_size=200)
    with Client(dask_processes) as client:
        io.make_data(str(tmp_path / "d.zarr"), 1000, 3, 4, chunk_rows=250)
        z = io.open_zarr(str(tmp_path / "d.zarr"), "points")
        ref = io.synthetic(1000, 3, 4, chunk_rows=250, dtype="float32")
        np.testing.assert_array_equal(z.X.compute(), ref.X.compute())
        n = io.open_npy(str(tmp_path / "x.npy"), chunk_rows=100)
        np.testing.assert_array_equal(n.X.compute(), X)
        p = io.open_parquet(str(tmp_path / "x.parquet"), ["a", "c"])
        np.testing.assert_array_equal(p.X.compute(), X[:, [0, 2]])
        labels = (z.X[:, 0] > 0).astype(np.int64)
        with get_task_stream(client) as stream:
            io.write_labels(labels, str(tmp_path / "out.zarr"))
    ran = [key_name(t["key"]) for t in stream.data]
    assert sum(k.startswith("dkm-write-labels-") and "done" not in k for k in ran) == 4
    out = zarr.open_array(str(tmp_path / "out.zarr"), path="labels", mode="r")
    assert out.chunks == (250,)
    np.testing.assert_array_equal(out[:], (ref.X.compute()[:, 0] > 0).astype(np.int64))


def test_history_has_one_codec_and_old_models_still_load(tmp_path):
    """IterationInfo.to_dict/from_dict is the one serialiser of a fit's history: the model
    keeps `converged` now (it dropped it), and a model whose history lacks it still loads."""
    from dkm.engine import IterationInfo

    est = dkm.GaussianMixture(2, random_state=0).fit(X)
    url = str(tmp_path / "m")
    dkm.save_model(est, url)
    back = dkm.load_model(url)
    assert [h.to_dict() for h in back.history_] == [h.to_dict() for h in est.history_]
    info = IterationInfo(1, float("nan"), float("inf"), 0.5, None, True)
    assert info.to_dict()["change"] == "Infinity" and info.to_dict("null")["change"] is None
    again = IterationInfo.from_dict(info.to_dict())
    assert again.change == float("inf") and again.converged
    group = zarr.open_group(url, mode="a")
    group.attrs["history_"] = [
        {k: v for k, v in h.items() if k != "converged"} for h in group.attrs["history_"]
    ]  # as dkm wrote it before issue 20
    objectives = [h.objective for h in dkm.load_model(url).history_]
    assert objectives == [h.objective for h in est.history_]
    group.attrs["history_"] = [{"iteration": 1, "objective": "lots"}]
    with pytest.raises(InputError, match=r"attribute history_ is not readable"):
        dkm.load_model(url)


#: Models saved by dkm before the estimators had ``mixture_`` (issue 20): the
#: k-means and the full GMM below, fitted on ``_fixture_data`` from ``X[[0, 50, 100]]``.
SAVED_MODELS = Path(__file__).parents[1] / "data" / "saved_models"


def _fixture_data() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.concatenate([rng.normal(c, 1.0, size=(40, 3)) for c in (-4, 0, 4)])


@pytest.mark.parametrize("kind", ["kmeans", "gmm"])
def test_models_saved_by_an_earlier_dkm_load_and_predict_the_same(kind):
    X = _fixture_data()
    init = X[[0, 50, 100]]
    if kind == "kmeans":
        fresh: dkm.KMeans | dkm.GaussianMixture = dkm.KMeans(
            3, init=init, n_init=1, random_state=0
        ).fit(X)
    else:
        fresh = dkm.GaussianMixture(3, covariance_type="full", means_init=init, random_state=0)
        fresh.fit(X)
    loaded = dkm.load_model(str(SAVED_MODELS / kind))
    assert type(loaded) is type(fresh)
    np.testing.assert_array_equal(loaded.predict(X), fresh.predict(X))
    assert loaded.n_iter_ == fresh.n_iter_ and loaded.converged_ == fresh.converged_
    if kind == "kmeans":
        np.testing.assert_array_equal(loaded.transform(X), fresh.transform(X))
        assert loaded.inertia_ == fresh.inertia_
    else:
        # the saved parameters load bit for bit (``precisions_`` is derived from the
        # Cholesky factors on loading, as scikit-learn's ``P @ P.T`` now, not the earlier
        # einsum: to rounding); the fresh fit equals them to rounding (later dkm keeps
        # full moments exactly symmetric: the covariances' upper triangle is the lower
        # one, a last bit from what the earlier one computed)
        stored = zarr.open_group(str(SAVED_MODELS / kind), mode="r")
        for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
            if name == "precisions_":
                np.testing.assert_allclose(getattr(loaded, name), stored[name][...], rtol=1e-14)
            else:
                np.testing.assert_array_equal(getattr(loaded, name), stored[name][...])
            np.testing.assert_allclose(getattr(loaded, name), getattr(fresh, name), rtol=1e-12)
        np.testing.assert_allclose(loaded.predict_proba(X), fresh.predict_proba(X), atol=1e-12)
        np.testing.assert_allclose(loaded.score_samples(X), fresh.score_samples(X), rtol=1e-12)
        np.testing.assert_allclose(loaded.lower_bounds_, fresh.lower_bounds_, rtol=1e-12)


@pytest.mark.parametrize("kind", ["kmeans", "tied", "identity"])
def test_from_model_rebuilds_the_fitted_estimator(kind):
    """``from_model`` with a fit's ``mixture_`` and scalars gives the fit's attributes and
    predictions, in the fit's dtype."""
    X = _fixture_data().astype(np.float32)
    if kind == "kmeans":
        est: dkm.KMeans | dkm.GaussianMixture = dkm.KMeans(3, random_state=0).fit(X)
    else:
        est = dkm.GaussianMixture(3, covariance_type=kind, random_state=0).fit(X)
    m = est.mixture_
    assert m.kmeans == (kind == "kmeans") and m.n_components == 3 and m.n_features == 3
    assert m.assignment == ("hard" if kind == "kmeans" else "soft")
    assert m.objective_name == ("inertia" if kind == "kmeans" else "mean log-likelihood")
    back = type(est).from_model(
        m.params,
        m.origin,
        params=est.get_params(),
        objective=est.objective_,
        n_iter=est.n_iter_,
        converged=est.converged_,
        history=est.history_,
        covariances=getattr(est, "covariances_", None),
        dtype=X.dtype,
    )
    assert back.objective_ == est.objective_ and back.n_features_in_ == 3
    for name in est.fitted_arrays:
        got, want = getattr(back, name), getattr(est, name)
        assert got.dtype == want.dtype == np.float32, name
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    np.testing.assert_array_equal(back.mixture_.centred().means, m.params.means - m.origin)
