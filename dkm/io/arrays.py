"""Lazy Dask arrays written to zarr, chunk by chunk on the workers."""

from __future__ import annotations

import re
import uuid
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from numpy.typing import NDArray

from dkm.io._paths import InputError, _is_regular, _zarr_location


def _write_block(target: Any, block: NDArray[Any], start: int) -> int:
    rows = int(block.shape[0])
    target[start : start + rows] = block
    return rows


def _open_output_group(url: str, storage_options: dict[str, Any] | None) -> zarr.Group:
    store, options = _zarr_location(url, storage_options)
    try:
        return zarr.open_group(store, mode="a", storage_options=options)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"cannot open or create a zarr group at {url} ({e}): is it an array or another "
            "file? choose a different output location"
        ) from e


def write_array(
    arr: da.Array,
    url: str,
    array: str,
    *,
    storage_options: dict[str, Any] | None = None,
    compute: bool = True,
) -> Delayed | None:
    """Write a lazy 1-D or 2-D Dask array to the zarr array ``array`` of the group at ``url``.

    Every Dask chunk is written by a task on the workers (keys ``dkm-write-…``), into a
    zarr array whose chunks are the Dask row chunks (all columns in one chunk);
    irregular row chunks are first rechunked to regular ones of the largest size. The
    client never gathers the data. The group is created if missing, an existing
    ``array`` replaced.

    Parameters
    ----------
    compute : False to return the write as a Delayed (its value: rows written), to
        compute it together with other work.
    """
    if not isinstance(arr, da.Array):
        raise TypeError(f"write_array expects a Dask array, got {type(arr).__name__}")
    if arr.ndim not in (1, 2):
        raise InputError(
            f"cannot write array {array!r} to {url}: expected 1-D or 2-D, got shape {arr.shape}"
        )
    if arr.ndim == 2 and len(arr.chunks[1]) != 1:
        arr = arr.rechunk({1: -1})
    if not _is_regular(arr.chunks[0]):
        arr = arr.rechunk({0: max(arr.chunks[0])})
    row_chunk = max(1, arr.chunks[0][0])
    group = _open_output_group(url, storage_options)
    target = group.create_array(
        array, shape=arr.shape, chunks=(row_chunk, *arr.shape[1:]), dtype=arr.dtype, overwrite=True
    )
    label = re.sub(r"[^A-Za-z0-9_]+", "_", array)
    token = tokenize(arr.name, url, array, uuid.uuid4().hex)
    z = delayed(target, traverse=False, name=f"dkm-write-target-{label}-{token}")
    starts = np.cumsum((0, *arr.chunks[0][:-1])).tolist()
    blocks = arr.to_delayed().ravel().tolist()
    parts = [
        delayed(_write_block, pure=False)(
            z, block, start, dask_key_name=(f"dkm-write-{label}-{token}", i)
        )
        for i, (block, start) in enumerate(zip(blocks, starts, strict=True))
    ]
    done = delayed(sum, pure=False)(parts, dask_key_name=f"dkm-write-{label}-done-{token}")
    if not compute:
        return cast(Delayed, done)
    (written,) = dask.compute(done)
    if written != arr.shape[0]:
        raise RuntimeError(f"wrote {written} rows of {arr.shape[0]} to {url}/{array}")
    return None


def write_labels(
    labels: da.Array,
    url: str,
    array: str = "labels",
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write lazy integer labels (n,) to ``url``/``array``, chunk by chunk on the workers.

    See :func:`write_array`; labels keep their integer dtype.
    """
    if not isinstance(labels, da.Array):
        raise TypeError(f"write_labels expects a Dask array, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(
            f"labels for {url}/{array} must be a 1-D integer array, got shape {labels.shape} "
            f"and dtype {labels.dtype}"
        )
    write_array(labels, url, array, storage_options=storage_options)
