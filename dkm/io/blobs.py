"""Synthetic data: Gaussian blobs made chunk by chunk, lazily or written to zarr."""

from __future__ import annotations

import math
import numbers
import uuid
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.delayed import delayed
from numpy.typing import NDArray

from dkm.io._paths import (
    InputError,
    _check_dtype,
    _check_int,
    _plural,
    _regular_chunks,
    _version,
    _zarr_location,
)
from dkm.io.outputs import OVERWRITE_HINT, AtomicOutput
from dkm.io.points import Points, _fingerprint

#: Version of the synthetic generator; part of synthetic fingerprints.
_GENERATOR_VERSION = 1
_SYNTHETIC_CHUNK_ROWS = 100_000


def _blobs(
    seed: int, index: int, rows: int, d: int, k: int, spread: float
) -> tuple[NDArray[np.float64], NDArray[np.int32]]:
    """Block ``index`` of the blobs: points (float64) and their true component.

    Centres come from ``default_rng(seed)``; block ``index`` draws from the child
    stream ``SeedSequence(seed, spawn_key=(index,))``, independent of the centres'
    stream and of every other block, so any block can be made alone, anywhere.
    """
    centres = np.random.default_rng(seed).normal(scale=spread, size=(k, d))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    labels = rng.integers(k, size=rows).astype(np.int32)
    return centres[labels] + rng.standard_normal((rows, d)), labels


def _synthetic_block(
    *,
    block_id: tuple[int, ...],
    n: int,
    chunk_rows: int,
    d: int,
    k: int,
    seed: int,
    spread: float,
    out_dtype: str,
) -> NDArray[Any]:
    index = block_id[0]
    rows = min(chunk_rows, n - index * chunk_rows)
    return _blobs(seed, index, rows, d, k, spread)[0].astype(out_dtype)


def _check_synthetic(
    n: int, d: int, k: int, seed: int, chunk_rows: int, dtype: str, spread: float
) -> None:
    _check_int("n", n, 1)
    _check_int("d", d, 1)
    _check_int("k", k, 1)
    _check_int("seed", seed, 0)
    _check_int("chunk_rows", chunk_rows, 1)
    _check_dtype(dtype)
    if (
        isinstance(spread, bool)
        or not isinstance(spread, numbers.Real)
        or not 0 <= float(spread) < math.inf
    ):
        raise InputError(f"spread must be a finite number >= 0, got {spread!r}")


def synthetic(
    n: int,
    d: int,
    k: int,
    *,
    seed: int = 0,
    chunk_rows: int | None = None,
    dtype: str = "float64",
    spread: float = 10.0,
) -> Points:
    """Gaussian blobs made chunk by chunk on the workers: k centres ~ N(0, spread²), unit noise.

    Deterministic given ``(seed, chunk_rows)``, whatever the scheduler; the values
    equal those :func:`make_data` writes with the same arguments.
    """
    rows = _SYNTHETIC_CHUNK_ROWS if chunk_rows is None else chunk_rows
    _check_synthetic(n, d, k, seed, rows, dtype, spread)
    identity = {
        "kind": "synthetic",
        "generator": _GENERATOR_VERSION,
        "n": n,
        "d": d,
        "k": k,
        "seed": seed,
        "chunk_rows": rows,
        "dtype": dtype,
        "spread": float(spread),
    }
    fingerprint = _fingerprint(identity, [])
    chunks = _regular_chunks(n, rows)
    X = da.map_blocks(
        _synthetic_block,
        chunks=(chunks, (d,)),
        dtype=np.dtype(dtype),
        meta=np.empty((0, 0), np.dtype(dtype)),
        name=f"dkm-synthetic-{fingerprint[:32]}",
        n=n,
        chunk_rows=rows,
        d=d,
        k=k,
        seed=seed,
        spread=float(spread),
        out_dtype=dtype,
    )
    description = (
        f"synthetic blobs (k={k}, seed={seed}, spread={spread:g}): {n:,} x {d:,} {dtype} "
        f"in {_plural(len(chunks), 'chunk')}"
    )
    return Points(X, None, fingerprint, description)


def _write_blobs_block(
    points: Any,
    labels: Any,
    index: int,
    start: int,
    rows: int,
    params: dict[str, Any],
) -> int:
    X, y = _blobs(params["seed"], index, rows, params["d"], params["k"], params["spread"])
    points[start : start + rows] = X.astype(params["dtype"])
    labels[start : start + rows] = y
    return rows


def make_data(
    url: str,
    n: int,
    d: int,
    k: int,
    *,
    seed: int = 0,
    chunk_rows: int = 100_000,
    dtype: str = "float32",
    spread: float = 10.0,
    array: str = "points",
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write synthetic blobs to a zarr group: ``array`` (n, d) and ``labels_true`` (n,) int32.

    Each chunk is generated and written by one task, in parallel on the workers, into
    a temporary sibling that replaces ``url`` only when every chunk is written.
    The group's attributes record n, d, k, seed, spread, chunk_rows, dtype and the dkm
    version. ``open_zarr(url, array)`` then gives ``synthetic(n, d, k, seed=seed,
    chunk_rows=chunk_rows, dtype=dtype, spread=spread)``'s values. Missing parent
    directories are created; an earlier ``make_data`` output is replaced only with
    ``overwrite``, anything else at ``url`` never (:func:`claim_output`).
    """
    _check_synthetic(n, d, k, seed, chunk_rows, dtype, spread)
    if array == "labels_true" or not array or array.startswith("/"):
        raise InputError(f"make_data: array must be a name other than 'labels_true', got {array!r}")
    params = {"n": n, "d": d, "k": k, "seed": seed, "spread": float(spread), "dtype": dtype}
    attributes = {
        **params,
        "chunk_rows": chunk_rows,
        "points": array,
        "labels": "labels_true",
        "generator": _GENERATOR_VERSION,
        "dkm_version": _version(),
    }
    chunks = _regular_chunks(n, chunk_rows)
    with AtomicOutput(
        url,
        storage_options=storage_options,
        command="make-data",
        overwrite=overwrite,
        hint=OVERWRITE_HINT,
    ) as tmp:
        store, options = _zarr_location(tmp, storage_options)
        group = zarr.create_group(store, attributes=attributes, storage_options=options)
        points = group.create_array(array, shape=(n, d), chunks=(chunk_rows, d), dtype=dtype)
        labels = group.create_array("labels_true", shape=(n,), chunks=(chunk_rows,), dtype="int32")
        token = uuid.uuid4().hex
        zp = delayed(points, traverse=False, name=f"dkm-write-target-{token}-points")
        zl = delayed(labels, traverse=False, name=f"dkm-write-target-{token}-labels")
        starts = np.cumsum((0, *chunks[:-1])).tolist()
        parts = [
            delayed(_write_blobs_block, pure=False)(
                zp, zl, i, start, rows, params, dask_key_name=(f"dkm-write-data-{token}", i)
            )
            for i, (start, rows) in enumerate(zip(starts, chunks, strict=True))
        ]
        done = delayed(sum, pure=False)(parts, dask_key_name=f"dkm-write-data-done-{token}")
        (written,) = dask.compute(done)
        if written != n:
            raise RuntimeError(f"make_data wrote {written} rows of {n} to {url}")
