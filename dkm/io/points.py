"""Points: a lazy Dask array over a sliceable source, with what identifies the data."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.delayed import delayed
from numpy.typing import NDArray

from dkm.io._paths import _FLOAT_DTYPES, InputError, _plural, _regular_chunks


@dataclass(frozen=True, eq=False)
class Points:
    """Points to cluster, as a lazy Dask array, with what identifies and describes them.

    Attributes
    ----------
    X : (n, d) Dask array, float32 or float64, chunked by rows only (one column chunk).
    weights : (n,) float64 Dask array on the same row chunks, or None.
    fingerprint : hex sha256 of the source's kind, location, shape, dtype, chunking and
        the content of a few rows; a different dataset at the same path gets another one.
    description : one line for humans.
    """

    X: da.Array
    weights: da.Array | None
    fingerprint: str
    description: str


def _check_points_shape(shape: tuple[int, ...], dtype: np.dtype[Any], what: str) -> None:
    if len(shape) != 2:
        raise InputError(
            f"{what} has shape {shape}: points must be a 2-D array (one row per point, one "
            "column per feature); reshape it or name another array"
        )
    if dtype.kind not in "biuf":
        raise InputError(
            f"{what} has dtype {dtype}: points must be real numbers (float or integer); "
            "convert the data"
        )
    if shape[0] < 1:
        raise InputError(f"{what} has no rows (shape {shape}): there is nothing to cluster")
    if shape[1] < 1:
        raise InputError(f"{what} has no columns (shape {shape}): points need features")


def _check_weights_shape(shape: tuple[int, ...], dtype: np.dtype[Any], n: int, what: str) -> None:
    if len(shape) != 1 or shape[0] != n:
        raise InputError(
            f"weights {what} has shape {shape}: expected one weight per point, shape ({n},)"
        )
    if dtype.kind not in "biuf":
        raise InputError(f"weights {what} has dtype {dtype}: weights must be real numbers")


def _edge_rows(row_chunks: tuple[int, ...]) -> tuple[int, ...]:
    """First and last rows of the first and last chunk."""
    n = sum(row_chunks)
    first, last = row_chunks[0], row_chunks[-1]
    return tuple(sorted({0, max(0, first - 1), max(0, n - last), n - 1}))


def _read_rows(source: Any, rows: tuple[int, ...]) -> NDArray[Any]:
    """Rows of a sliceable source, reading as little as the source allows."""
    if isinstance(source, zarr.Array):
        selection = (np.asarray(rows),) + (slice(None),) * (source.ndim - 1)
        return np.asarray(source.get_orthogonal_selection(selection))
    return np.concatenate([np.asarray(source[r : r + 1]) for r in rows])


def _fingerprint(identity: dict[str, Any], samples: list[NDArray[Any]]) -> str:
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for sample in samples:
        a = np.ascontiguousarray(sample)
        h.update(f"|{a.dtype.str}{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _points_from_source(
    *,
    kind: str,
    location: str,
    what: str,
    x: Any,
    w: Any | None,
    weights_name: str | None,
    default_rows: tuple[int, ...],
    chunk_rows: int | None,
    dtype: np.dtype[Any] | None,
) -> Points:
    """Points over sliceable sources (``shape``, ``dtype``, ``__getitem__``), validated.

    The fingerprint needs a few rows: they are read by one small task, on the workers
    if a distributed client is active, like the data itself.
    """
    shape = tuple(int(s) for s in x.shape)
    source_dtype = np.dtype(x.dtype)
    _check_points_shape(shape, source_dtype, what)
    n, d = shape
    if w is not None:
        _check_weights_shape(
            tuple(int(s) for s in w.shape), np.dtype(w.dtype), n, repr(weights_name)
        )
    if dtype is None:
        target = source_dtype if source_dtype.name in _FLOAT_DTYPES else np.dtype(np.float64)
    else:
        target = dtype
    rows = default_rows if chunk_rows is None else _regular_chunks(n, chunk_rows)
    edge = _edge_rows(rows)
    token = uuid.uuid4().hex
    reads = [
        delayed(_read_rows, pure=False)(
            delayed(src, traverse=False, name=f"dkm-fingerprint-source-{token}-{i}"),
            edge,
            dask_key_name=f"dkm-fingerprint-{token}-{i}",
        )
        for i, src in enumerate([x] if w is None else [x, w])
    ]
    samples = list(dask.compute(*reads))
    identity = {
        "kind": kind,
        "location": location,
        "shape": list(shape),
        "source_dtype": source_dtype.str,
        "dtype": target.str,
        "chunks": list(rows),
        "weights": weights_name,
        "rows": list(edge),
    }
    fingerprint = _fingerprint(identity, samples)
    X = da.from_array(
        x,
        chunks=(rows, (d,)),
        name=f"dkm-read-{kind}-{fingerprint[:32]}",
        fancy=False,
        meta=np.empty((0, 0), source_dtype),
    )
    if X.dtype != target:
        X = X.astype(target)
    weights = None
    if w is not None:
        weights = da.from_array(
            w,
            chunks=(rows,),
            name=f"dkm-read-{kind}-weights-{fingerprint[:32]}",
            fancy=False,
            meta=np.empty((0,), np.dtype(w.dtype)),
        ).astype(np.float64)
    stored = "" if target == source_dtype else f" (stored as {source_dtype})"
    weighted = "" if weights_name is None else f", weights {weights_name!r}"
    description = (
        f"{what}: {n:,} x {d:,} {target}{stored} in {_plural(len(rows), 'chunk')}{weighted}"
    )
    return Points(X, weights, fingerprint, description)
