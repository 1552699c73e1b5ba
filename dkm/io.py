"""Stores to Dask arrays and back (points, labels, models); no algorithm."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

import dask
import dask.array as da
import numpy as np
import zarr
from dask.array.core import normalize_chunks
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from numpy.typing import NDArray
from sklearn.utils.validation import check_is_fitted

from dkm import covariance
from dkm.codec import float_to_json
from dkm.engine import IterationInfo, ResumeState
from dkm.errors import UserError
from dkm.estimators import GaussianMixture, KMeans
from dkm.kernels.params import MixtureParams
from dkm.stats import SuffStats

__all__ = [
    "AtomicOutput",
    "ExistingOutput",
    "InputError",
    "ModelStatistics",
    "OutputExistsError",
    "Points",
    "check_writable",
    "claim_output",
    "find_model",
    "inspect_output",
    "load_model",
    "load_model_statistics",
    "local_dir",
    "make_data",
    "open_npy",
    "open_parquet",
    "open_zarr",
    "read_model_metadata",
    "save_model",
    "synthetic",
    "text_writer",
    "write_array",
    "write_labels",
]

#: Layout version of saved models; ``load_model`` refuses formats it does not know.
MODEL_FORMAT = 1
_MODEL_KINDS: dict[str, type[KMeans] | type[GaussianMixture]] = {
    "KMeans": KMeans,
    "GaussianMixture": GaussianMixture,
}
_FLOAT_DTYPES = ("float32", "float64")
#: Version of the synthetic generator; part of synthetic fingerprints.
_GENERATOR_VERSION = 1
_SYNTHETIC_CHUNK_ROWS = 100_000
_MAX_LISTED = 20
#: Where `dkm run` (and `dkm recluster`) write the model inside the output folder.
OUTPUT_MODEL = "model"


class InputError(UserError, ValueError):
    """Bad input data or location.

    The message names the file/URL, array or column, and says what to do.
    """


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


# --------------------------------------------------------------------------- helpers


def _version() -> str:
    from dkm._version import __version__

    return __version__


def _local_path(url: str) -> str | None:
    """The filesystem path of a local location (a plain path, ``file://``), else None."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    if "://" in url or "::" in url:
        return None
    return url


def _zarr_location(url: str, storage_options: dict[str, Any] | None) -> tuple[str, Any]:
    """What zarr should open: an absolute path (local store) or the URL and its options."""
    local = _local_path(url)
    if local is not None:
        return os.path.abspath(local), None
    return url, storage_options


def _url_to_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec.core  # type: ignore[import-untyped]

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, str(path)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_chunk_rows(chunk_rows: int | None) -> int | None:
    return None if chunk_rows is None else _check_int("chunk_rows", chunk_rows, 1)


def _check_dtype(dtype: str | None) -> np.dtype[Any] | None:
    if dtype is None:
        return None
    if dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"dtype must be 'float32' or 'float64' (or None to keep a float store's type), "
            f"got {dtype!r}"
        )
    return np.dtype(dtype)


def _regular_chunks(n: int, rows: int) -> tuple[int, ...]:
    full, rest = divmod(n, rows)
    return (rows,) * full + ((rest,) if rest else ())


def _is_regular(chunks: tuple[int, ...]) -> bool:
    """Zarr-compatible row chunks: all equal but the last, which may be smaller."""
    return all(c == chunks[0] for c in chunks[:-1]) and chunks[-1] <= chunks[0]


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def _listing(names: list[str]) -> str:
    if not names:
        return "nothing"
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


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


# --------------------------------------------------------------------------- zarr


def _open_zarr_node(url: str, storage_options: dict[str, Any] | None) -> Any:
    store, options = _zarr_location(url, storage_options)
    try:
        return zarr.open(store=store, mode="r", storage_options=options)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"no zarr array or group at {url} ({e}): check the path or URL "
            "(and storage_options for remote stores)"
        ) from e


def _array_names(group: zarr.Group) -> list[str]:
    return sorted(
        path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)
    )


def _group_member(group: zarr.Group, name: str, url: str, role: str) -> zarr.Array:
    try:
        node = group[name]
    except KeyError:
        raise InputError(
            f"zarr group {url} has no {role} array {name!r}; it holds the arrays "
            f"{_listing(_array_names(group))}: name one of them"
        ) from None
    if not isinstance(node, zarr.Array):
        raise InputError(
            f"{url}/{name} is a zarr group, not an array; arrays in it: "
            f"{_listing(_array_names(node))}"
        )
    return node


def _sibling(url: str, name: str) -> str:
    local = _local_path(url)
    if local is not None:
        return os.path.join(os.path.dirname(os.path.abspath(local.rstrip("/"))), name)
    return url.rstrip("/").rsplit("/", 1)[0] + "/" + name


def open_zarr(
    url: str,
    array: str | None = None,
    *,
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    chunk_rows: int | None = None,
    dtype: str | None = None,
    array_option: str | None = None,
) -> Points:
    """Points from a zarr array, read lazily by the workers.

    Parameters
    ----------
    url : local path or fsspec URL of a zarr array, or of a group with ``array``.
    array : path of the points array inside the group at ``url``.
    weights : path of a 1-D weights array, in the same group as the points (for an
        array ``url``: next to it, in its parent group).
    storage_options : fsspec options for remote URLs (ignored for local paths).
    chunk_rows : rows per Dask chunk; default: the store's row chunks (its shards if
        sharded), so that every task reads whole stored chunks.
    dtype : "float32" or "float64"; None keeps float32/float64 and reads other real
        types as float64.
    array_option : the command-line option that gives ``array`` (e.g. "--array"), for
        the errors to name instead of ``array=...``.

    Returns
    -------
    Points with X (n, d), one column chunk.
    """
    rows_override = _check_chunk_rows(chunk_rows)
    target = _check_dtype(dtype)
    node = _open_zarr_node(url, storage_options)
    given = "array=" if array_option is None else f"{array_option} "
    if isinstance(node, zarr.Group):
        if array is None:
            raise InputError(
                f"{url} is a zarr group, not an array: name the array to cluster "
                f"({given}{'...' if array_option is None else 'NAME'}); it holds the arrays "
                f"{_listing(_array_names(node))}"
            )
        x = _group_member(node, array, url, "points")
        w = None if weights is None else _group_member(node, weights, url, "weights")
        location = f"{url.rstrip('/')}/{array}"
        what = f"zarr {url} (array {array!r})"
    else:
        if array is not None:
            raise InputError(
                f"{url} is a zarr array, so {given}{array!r} (a name inside a group) does "
                "not apply: drop it, or point the URL at the group"
            )
        x = node
        w = None
        if weights is not None:
            weights_url = _sibling(url, weights)
            w = _open_zarr_node(weights_url, storage_options)
            if not isinstance(w, zarr.Array):
                raise InputError(f"weights {weights_url} is a zarr group, not an array")
        location = url
        what = f"zarr {url}"
    _check_points_shape(tuple(x.shape), np.dtype(x.dtype), what)
    stored_rows = (x.shards or x.chunks)[0]
    return _points_from_source(
        kind="zarr",
        location=_zarr_location(location, None)[0],
        what=what,
        x=x,
        w=w,
        weights_name=weights,
        default_rows=_regular_chunks(int(x.shape[0]), int(stored_rows)),
        chunk_rows=rows_override,
        dtype=target,
    )


# --------------------------------------------------------------------------- npy


class _NpySource:
    """A .npy file as a sliceable array: each read memory-maps the file, copies the slice.

    Pickles as its path and layout, so tasks on other processes open the file
    themselves instead of receiving its data. The header is parsed once, by
    :meth:`open`: a read maps the data at its known offset. (``np.load`` in every read
    parsed it again with ``ast.literal_eval``, which is not safe for threads on CPython
    3.11.7, the version here: concurrent chunk reads failed, rarely, with "SystemError:
    AST constructor recursion depth mismatch".)
    """

    def __init__(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        offset: int | None = None,
        order: Literal["C", "F"] = "C",
    ) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.offset = offset  # of the data in the file; None: no data to map
        self.order = order

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> NDArray[Any]:
        if self.offset is None:
            return np.array(np.load(self.path, mmap_mode="r", allow_pickle=False)[key])
        data = np.memmap(
            self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order=self.order
        )
        return np.array(data[key])

    @classmethod
    def open(cls, path: str, role: str) -> _NpySource:
        local = _local_path(path)
        if local is None:
            raise InputError(
                f"{role} {path}: .npy input must be a local file (it is memory-mapped); "
                "copy it to local disk or convert it to zarr"
            )
        full = os.path.abspath(local)
        if not os.path.isfile(full):
            raise InputError(f"{role} file {path} does not exist: check the path")
        try:
            loaded = np.load(full, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(
                f"{role} file {path} is not a readable .npy file ({e}); it may be truncated "
                "or corrupt: write it again with numpy.save"
            ) from e
        if not isinstance(loaded, np.ndarray):
            close = getattr(loaded, "close", None)
            if close is not None:
                close()
            raise InputError(
                f"{role} file {path} is a .npz archive, not a .npy file: save the array "
                "with numpy.save"
            )
        shape, dtype = tuple(int(s) for s in loaded.shape), np.dtype(loaded.dtype)
        offset = getattr(loaded, "offset", None) if loaded.size else None
        fortran = loaded.flags.f_contiguous and not loaded.flags.c_contiguous
        order: Literal["C", "F"] = "F" if fortran else "C"
        del loaded
        return cls(full, shape, dtype, offset, order)


def open_npy(
    path: str,
    *,
    weights: str | None = None,
    chunk_rows: int | None = None,
    dtype: str | None = None,
) -> Points:
    """Points from a local .npy file, memory-mapped and read lazily by the workers.

    Parameters
    ----------
    path : the .npy file (2-D).
    weights : another .npy file with one weight per row (1-D).
    chunk_rows : rows per Dask chunk; default: Dask's "auto" (``array.chunk-size``).
    dtype : as for :func:`open_zarr`.
    """
    rows_override = _check_chunk_rows(chunk_rows)
    target = _check_dtype(dtype)
    x = _NpySource.open(path, "points")
    what = f"npy {path}"
    _check_points_shape(x.shape, x.dtype, what)
    w = None if weights is None else _NpySource.open(weights, "weights")
    out = target if target is not None else np.dtype(np.float64)
    default_rows = tuple(int(c) for c in normalize_chunks(("auto", -1), x.shape, dtype=out)[0])
    return _points_from_source(
        kind="npy",
        location=f"{x.path} ({os.path.getsize(x.path)} bytes)",
        what=what,
        x=x,
        w=w,
        weights_name=None if w is None else weights,
        default_rows=default_rows,
        chunk_rows=rows_override,
        dtype=target,
    )


# --------------------------------------------------------------------------- parquet


class _ParquetSource:
    """Numeric columns of parquet files as a sliceable array.

    A slice reads only the row groups it overlaps, and only the named columns; values
    are cast to ``dtype`` (nulls become NaN).
    """

    def __init__(
        self,
        fs: Any,
        files: tuple[str, ...],
        groups: tuple[tuple[int, int], ...],
        group_rows: tuple[int, ...],
        columns: tuple[str, ...],
        dtype: np.dtype[Any],
        ndim: int,
    ) -> None:
        self.fs = fs
        self.files = files
        self.groups = groups  # (file index, row group index) per non-empty row group
        self.starts = np.concatenate([[0], np.cumsum(group_rows, dtype=np.int64)])
        self.columns = columns
        self.dtype = dtype
        n = int(self.starts[-1])
        self.shape: tuple[int, ...] = (n, len(columns)) if ndim == 2 else (n,)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> NDArray[Any]:
        key = key if isinstance(key, tuple) else (key,)
        rows, rest = key[0], key[1:]
        n = self.shape[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._read(start, stop)[(slice(None), *rest)]
            index = np.arange(start, stop, step)
        else:
            index = np.arange(n)[rows]
        if index.size == 0:
            return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        lo, hi = int(index.min()), int(index.max()) + 1
        return self._read(lo, hi)[(index - lo, *rest)]

    def _read(self, lo: int, hi: int) -> NDArray[Any]:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        if hi <= lo:
            return np.empty((0, *self.shape[1:]), self.dtype)
        arrow_type = pa.float32() if self.dtype == np.float32 else pa.float64()
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        end = int(np.searchsorted(self.starts, hi, side="left"))
        parts = []
        for g in range(first, end):
            file_index, row_group = self.groups[g]
            with self.fs.open(self.files[file_index], "rb") as f:
                table = pq.ParquetFile(f).read_row_group(row_group, columns=list(self.columns))
            cols = [
                np.asarray(table.column(c).cast(arrow_type, safe=False).to_numpy(), self.dtype)
                for c in self.columns
            ]
            parts.append(np.column_stack(cols) if self.ndim == 2 else cols[0])
        block = np.concatenate(parts)
        offset = int(self.starts[first])
        return block[lo - offset : hi - offset]


def _parquet_files(fs: Any, path: str, url: str) -> list[str]:
    if not fs.exists(path):
        raise InputError(f"no parquet file or directory at {url}: check the path or URL")
    if not fs.isdir(path):
        return [path]
    files = []
    for p in sorted(fs.find(path)):
        relative = p[len(path) :].strip("/").split("/")
        if p.endswith((".parquet", ".parq", ".pq")) and not any(
            part.startswith(("_", ".")) for part in relative
        ):
            files.append(p)
    if not files:
        raise InputError(f"parquet directory {url} holds no .parquet files")
    return files


def open_parquet(
    url: str,
    columns: list[str],
    *,
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    chunk_rows: int | None = None,
    dtype: str | None = None,
) -> Points:
    """Points from numeric columns of a parquet file or directory of files (needs pyarrow).

    Parameters
    ----------
    url : a parquet file, or a directory whose ``*.parquet`` files (recursively, sorted
        by path, skipping names starting with ``_`` or ``.``) are read in order.
    columns : the feature columns, in order.
    weights : a column holding one weight per row.
    chunk_rows : rows per Dask chunk; default: one chunk per row group. With
        ``chunk_rows`` a row group straddling two chunks is read by both tasks.
    dtype : as for :func:`open_zarr`; columns are float32 only if all are float32.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("parquet input needs pyarrow: pip install 'dkm[parquet]'") from None
    rows_override = _check_chunk_rows(chunk_rows)
    target = _check_dtype(dtype)
    if isinstance(columns, str) or not columns or not all(isinstance(c, str) for c in columns):
        raise InputError(
            f"parquet {url}: columns must be a non-empty list of names, got {columns!r}"
        )
    wanted = [*columns, *([] if weights is None else [weights])]
    fs, path = _url_to_fs(url, storage_options)
    files = _parquet_files(fs, path, url)
    groups: list[tuple[int, int]] = []
    group_rows: list[int] = []
    all_float32 = True
    for i, file in enumerate(files):
        try:
            with fs.open(file, "rb") as f:
                pf = pq.ParquetFile(f)
                schema, meta = pf.schema_arrow, pf.metadata
        except (OSError, ValueError, pa.ArrowException) as e:
            raise InputError(f"{file} in {url} is not a readable parquet file ({e})") from e
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise InputError(
                f"parquet {url} has no column(s) {_listing(missing)}; available columns: "
                f"{_listing(list(schema.names))}"
            )
        for c in wanted:
            t = schema.field(c).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                raise InputError(
                    f"column {c!r} of parquet {url} has type {t}: features and weights must "
                    "be numbers; convert the column or choose others"
                )
            if c in columns and t != pa.float32():
                all_float32 = False
        for g in range(meta.num_row_groups):
            rows = int(meta.row_group(g).num_rows)
            if rows:
                groups.append((i, g))
                group_rows.append(rows)
    source_dtype = np.dtype(np.float32 if all_float32 else np.float64)
    x = _ParquetSource(
        fs, tuple(files), tuple(groups), tuple(group_rows), tuple(columns), source_dtype, 2
    )
    what = f"parquet {url} (columns {', '.join(columns)})"
    if not group_rows:
        raise InputError(f"{what} has no rows: there is nothing to cluster")
    w = None
    if weights is not None:
        w = _ParquetSource(
            fs, tuple(files), tuple(groups), tuple(group_rows), (weights,), np.dtype(np.float64), 1
        )
    return _points_from_source(
        kind="parquet",
        location=" ".join([_zarr_location(url, None)[0], *files, *columns]),
        what=what,
        x=x,
        w=w,
        weights_name=weights,
        default_rows=tuple(group_rows),
        chunk_rows=rows_override,
        dtype=target,
    )


# --------------------------------------------------------------------------- synthetic


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


# --------------------------------------------------------------------------- writing


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


# --------------------------------------------------------------------------- models


def _to_json(value: Any, where: str) -> Any:
    """A JSON-safe copy: NumPy scalars and arrays to Python, non-finite floats to strings."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float_to_json(float(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist(), where)
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored as JSON")


def _json_param(value: Any) -> tuple[bool, Any]:
    """(True, JSON value) for scalar parameters; (False, None) for arrays, callables, …"""
    if value is None or isinstance(value, bool | str | np.bool_):
        return True, None if value is None else (value if isinstance(value, str) else bool(value))
    if isinstance(value, numbers.Integral):
        return True, int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return True, float(value)
    return False, None


def _model_arrays(estimator: KMeans | GaussianMixture) -> dict[str, NDArray[Any]]:
    arrays: dict[str, NDArray[Any]] = {"origin": estimator.mixture_.origin}
    for name in estimator.fitted_arrays:
        arrays[name] = getattr(estimator, name)
    return {name: np.ascontiguousarray(a) for name, a in arrays.items()}


def _model_attributes(
    estimator: KMeans | GaussianMixture, kind: str, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in sorted(estimator.get_params(deep=False).items()):
        ok, encoded = _json_param(value)
        if ok:
            params[key] = encoded
        else:
            dropped.append(key)
    history = [info.to_dict() for info in estimator.history_]
    names = getattr(estimator, "feature_names_in_", None)
    attrs: dict[str, Any] = {
        "dkm_format": MODEL_FORMAT,
        "kind": kind,
        "dkm_version": _version(),
        "params": params,
        "dropped_params": dropped,
        "n_features_in_": int(estimator.n_features_in_),
        "feature_names_in_": None if names is None else [str(n) for n in names],
        "covariance_type": estimator.mixture_.covariance_type,
        "n_components": estimator.mixture_.n_components,
        "n_iter_": int(estimator.n_iter_),
        "converged_": bool(estimator.converged_),
        "history_": history,
        "metadata": _to_json(metadata or {}, "metadata"),
    }
    objective = float_to_json(float(estimator.objective_))
    if estimator.mixture_.kmeans:
        attrs["inertia_"] = objective
    else:
        attrs["lower_bound_"] = objective
        bounds = cast(GaussianMixture, estimator).lower_bounds_
        attrs["lower_bounds_"] = [float_to_json(float(v)) for v in bounds]
    return attrs


@dataclass(frozen=True, eq=False)
class ModelStatistics:
    """A model's total sufficient statistics, kept with it for incremental updates.

    ``stats`` holds moments taken around ``shift`` (k, d), in the data's coordinates:
    ``sx = Σ w r_ik (x_i − shift_k)`` and ``sxx`` likewise (see :class:`SuffStats`).
    ``updates`` counts the incremental updates merged into them since the last full fit.
    """

    stats: SuffStats
    shift: NDArray[np.float64]
    updates: int = 0


#: Layout version of the optional ``statistics`` subgroup of a saved model.
STATISTICS_FORMAT = 1


def _save_statistics(group: zarr.Group, statistics: ModelStatistics) -> None:
    s = statistics.stats
    if statistics.shift.shape != s.sx.shape:
        raise ValueError(
            f"statistics shift has shape {statistics.shift.shape}, expected {s.sx.shape}"
        )
    sub = group.create_group(
        "statistics",
        attributes={
            "format": STATISTICS_FORMAT,
            "moments": s.moments,
            "objective": float_to_json(float(s.objective)),
            "n": float_to_json(float(s.n)),
            "count": int(s.count),
            "updates": int(statistics.updates),
        },
    )
    sub.create_array("nk", data=np.ascontiguousarray(s.nk, np.float64))
    sub.create_array("sx", data=np.ascontiguousarray(s.sx, np.float64))
    sub.create_array("shift", data=np.ascontiguousarray(statistics.shift, np.float64))
    if s.sxx is not None:
        sub.create_array("sxx", data=np.ascontiguousarray(s.sxx, np.float64))


def save_model(
    estimator: KMeans | GaussianMixture,
    url: str,
    *,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    statistics: ModelStatistics | None = None,
    overwrite: bool = False,
) -> None:
    """Save a fitted estimator as a self-describing zarr group (no pickle).

    Arrays: ``origin`` and the fitted arrays (KMeans ``cluster_centers_``; GaussianMixture
    ``weights_``, ``means_``, ``covariances_``, ``precisions_``, ``precisions_cholesky_``)
    at the top, the parameters the kernels use in the subgroup ``mixture`` (``weights``,
    ``means``, ``precisions_cholesky`` unless identity). JSON attributes: ``dkm_format``,
    ``kind``, ``dkm_version``, ``params`` (``get_params()`` without array-, callable- or
    object-valued parameters, whose names are in ``dropped_params``), the fitted scalars,
    ``history_`` (iteration, objective, change, seconds) and the caller's ``metadata``.
    Non-finite floats are stored as the strings "NaN", "Infinity", "-Infinity".
    ``labels_`` is per-point data and is not saved. ``statistics`` (optional): the
    model's total sufficient statistics, in the subgroup ``statistics`` (arrays ``nk``,
    ``sx``, ``sxx`` unless k-means, ``shift``; attributes ``format``, ``moments``,
    ``objective``, ``n``, ``count``, ``updates``); readers that do not know it ignore it.
    Written to a temporary sibling and moved into place (see :class:`AtomicOutput`); an
    earlier dkm output at ``url`` is replaced only with ``overwrite``, anything else never.
    """
    kind = next((k for k, cls in _MODEL_KINDS.items() if isinstance(estimator, cls)), None)
    if kind is None:
        raise TypeError(
            f"save_model expects a dkm KMeans or GaussianMixture, got {type(estimator).__name__}"
        )
    check_is_fitted(estimator)
    attributes = _model_attributes(estimator, kind, metadata)
    arrays = _model_arrays(estimator)
    params = estimator.mixture_.params
    with AtomicOutput(
        url,
        storage_options=storage_options,
        command="save_model",
        overwrite=overwrite,
        hint=OVERWRITE_HINT,
    ) as tmp:
        store, options = _zarr_location(tmp, storage_options)
        group = zarr.create_group(store, attributes=attributes, storage_options=options)
        for name, value in arrays.items():
            group.create_array(name, data=value)
        mixture = group.create_group(
            "mixture", attributes={"covariance_type": params.covariance_type}
        )
        mixture.create_array("weights", data=np.ascontiguousarray(params.weights))
        mixture.create_array("means", data=np.ascontiguousarray(params.means))
        if params.precisions_cholesky is not None:
            mixture.create_array(
                "precisions_cholesky", data=np.ascontiguousarray(params.precisions_cholesky)
            )
        if statistics is not None:
            _save_statistics(group, statistics)


def _is_model(url: str, storage_options: dict[str, Any] | None) -> bool:
    store, options = _zarr_location(url, storage_options)
    try:
        attrs = zarr.open_group(store, mode="r", storage_options=options).attrs
    except (OSError, ValueError, KeyError):
        return False
    return "dkm_format" in attrs and "kind" in attrs


def _open_model(
    url: str, storage_options: dict[str, Any] | None
) -> tuple[zarr.Group, dict[str, Any]]:
    store, options = _zarr_location(url, storage_options)
    try:
        group = zarr.open_group(store, mode="r", storage_options=options)
    except (OSError, ValueError, KeyError) as e:
        inner = _join(url, OUTPUT_MODEL)
        where = (
            f"{url} is an output folder of `dkm run`: its model is {inner}"
            if _is_model(inner, storage_options)
            else f"check the path or URL (`dkm run` writes the model to {OUTPUT_MODEL}/ "
            "in its output.path)"
        )
        raise InputError(f"no dkm model at {url} ({e}): {where}") from e
    attrs = dict(group.attrs)
    if "dkm_format" not in attrs or "kind" not in attrs:
        raise InputError(
            f"{url} is a zarr group but not a dkm model (no 'dkm_format'/'kind' attributes): "
            "point at a directory written by save_model or `dkm run`"
        )
    fmt, kind = attrs["dkm_format"], attrs["kind"]
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1 or fmt > MODEL_FORMAT:
        raise InputError(
            f"{url} is a dkm model of format {fmt!r} (written by dkm {attrs.get('dkm_version')}); "
            f"this dkm {_version()} reads format {MODEL_FORMAT}: use a matching dkm version"
        )
    if kind not in _MODEL_KINDS:
        raise InputError(
            f"{url} holds a model of unknown kind {kind!r}; expected one of "
            f"{', '.join(_MODEL_KINDS)}"
        )
    if group.metadata.zarr_format != 3:
        raise InputError(f"{url}: dkm models are zarr v3 groups; this one is not")
    return group, attrs


def _read_model_array(group: zarr.Group, name: str, url: str) -> NDArray[Any]:
    try:
        node = group[name]
    except KeyError:
        raise InputError(f"dkm model {url} is incomplete: the array {name!r} is missing") from None
    if not isinstance(node, zarr.Array) or np.dtype(node.dtype).kind not in "biuf":
        # Only plain numeric arrays: never decode object codecs (e.g. pickle) from a file.
        raise InputError(f"dkm model {url}: {name!r} is not a numeric array")
    return np.asarray(node[...])


def _history(records: Any, name: str, url: str) -> list[IterationInfo]:
    try:
        return [IterationInfo.from_dict(record) for record in records]
    except (TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{url}: attribute {name} is not readable ({e})") from None


def _float(value: Any, name: str, url: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"dkm model {url}: attribute {name} = {value!r} is not a number") from None


def find_model(url: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """``url`` if it is a saved model, else the model in it, if ``url`` is an output
    folder of ``dkm run`` (its ``model/``); InputError if neither."""
    inner = _join(url, OUTPUT_MODEL)
    if not _is_model(url, storage_options) and _is_model(inner, storage_options):
        return inner
    _open_model(url, storage_options)  # the error naming what is wrong with url
    return url


def load_model(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> KMeans | GaussianMixture:
    """A fitted estimator from :func:`save_model`'s zarr group; reads only JSON and arrays.

    ``predict``, ``predict_proba``, ``score_samples``, ``transform`` and ``score`` give
    the same results as the saved estimator's. ``labels_`` is not restored;
    ``history_`` entries have ``params=None`` (the per-iteration parameters are not
    saved); dropped parameters (see :func:`save_model`) keep their defaults.
    """
    group, attrs = _open_model(url, storage_options)
    cls = _MODEL_KINDS[attrs["kind"]]
    params = attrs.get("params")
    if not isinstance(params, dict):
        raise InputError(f"dkm model {url}: the 'params' attribute is missing or not a mapping")
    unknown = sorted(set(params) - set(cls().get_params(deep=False)))
    if unknown:
        raise InputError(
            f"dkm model {url} has parameters {_listing(unknown)} unknown to {cls.__name__} "
            f"in dkm {_version()} (written by dkm {attrs.get('dkm_version')}): use that version"
        )
    try:
        mixture = group["mixture"]
    except KeyError:
        mixture = None
    if not isinstance(mixture, zarr.Group):
        raise InputError(f"dkm model {url} is incomplete: the group 'mixture' is missing")
    try:
        kind = covariance.of(mixture.attrs.get("covariance_type"))
    except ValueError as e:
        raise InputError(f"dkm model {url}: {e}") from e
    prec_chol = None if kind.unit else _read_model_array(mixture, "precisions_cholesky", url)
    try:
        model = MixtureParams(
            kind.name,
            _read_model_array(mixture, "weights", url),
            _read_model_array(mixture, "means", url),
            prec_chol,
        )
    except ValueError as e:
        raise InputError(f"dkm model {url}: {e}") from e
    origin = _read_model_array(group, "origin", url)
    # the fitted arrays follow from the parameters, in the dtype they were saved in;
    # only a mixture's covariances (as the M-step estimated them) are read as saved
    fitted = {name: _read_model_array(group, name, url) for name in cls.fitted_arrays}
    if attrs["kind"] == "KMeans":
        objective = _float(attrs["inertia_"], "inertia_", url)
        objectives = None
    else:
        objective = _float(attrs["lower_bound_"], "lower_bound_", url)
        objectives = [_float(v, "lower_bounds_", url) for v in attrs.get("lower_bounds_", [])]
    return cls.from_model(
        model,
        origin,
        params=params,
        objective=objective,
        n_iter=int(attrs["n_iter_"]),
        converged=bool(attrs["converged_"]),
        history=_history(attrs.get("history_", []), "history_", url),
        objectives=objectives,
        covariances=fitted.get("covariances_"),
        dtype=fitted[cls.fitted_arrays[0]].dtype,
        feature_names_in=attrs.get("feature_names_in_"),
    )


def has_model_statistics(url: str, *, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a saved model keeps its sufficient statistics (see :func:`save_model`)."""
    group, _ = _open_model(url, storage_options)
    try:
        return isinstance(group["statistics"], zarr.Group)
    except KeyError:
        return False


def load_model_statistics(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> ModelStatistics:
    """The total sufficient statistics saved with a model; InputError if it has none."""
    group, attrs = _open_model(url, storage_options)
    try:
        sub = group["statistics"]
    except KeyError:
        sub = None
    if not isinstance(sub, zarr.Group):
        raise InputError(
            f"the dkm model at {url} keeps no sufficient statistics (it was written by "
            f"`dkm run` or by dkm {attrs.get('dkm_version')} before they were saved), so it "
            "cannot be updated incrementally: run `dkm recluster` once without --update "
            "(a full fit saves them)"
        )
    meta: dict[str, Any] = dict(sub.attrs)
    if meta.get("format") != STATISTICS_FORMAT:
        raise InputError(
            f"dkm model {url}: its statistics are of format {meta.get('format')!r}; this dkm "
            f"{_version()} reads format {STATISTICS_FORMAT}"
        )
    moments = meta.get("moments")
    nk = _read_model_array(sub, "nk", url).astype(np.float64)
    sx = _read_model_array(sub, "sx", url).astype(np.float64)
    shift = _read_model_array(sub, "shift", url).astype(np.float64)
    try:
        has_sxx = not covariance.of_moments(moments).unit
    except ValueError as e:
        raise InputError(f"dkm model {url}: its statistics are not valid ({e})") from None
    sxx = _read_model_array(sub, "sxx", url).astype(np.float64) if has_sxx else None
    try:
        stats = SuffStats(
            cast(Any, moments),
            nk,
            sx,
            sxx,
            _float(meta.get("objective"), "statistics objective", url),
            _float(meta.get("n"), "statistics n", url),
            int(meta.get("count", 0)),
        )
        if sx.ndim != 2 or nk.shape != sx.shape[:1] or shift.shape != sx.shape:
            raise ValueError(f"nk {nk.shape}, sx {sx.shape} and shift {shift.shape} disagree")
        zero = SuffStats.zero(sx.shape[0], sx.shape[1], stats.moments)
        if (sxx is None) != (zero.sxx is None) or (
            sxx is not None and zero.sxx is not None and sxx.shape != zero.sxx.shape
        ):
            raise ValueError(f"sxx has the wrong shape for {moments} moments")
    except (ValueError, TypeError, IndexError) as e:
        raise InputError(f"dkm model {url}: its statistics are not valid ({e})") from None
    return ModelStatistics(stats, shift, int(meta.get("updates", 0)))


def read_model_metadata(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON attributes of a saved model (kind, versions, params, scalars, history,
    the caller's ``metadata``), without reading any array."""
    return _open_model(url, storage_options)[1]


# --------------------------------------------------------------------------- outputs


def _split(url: str) -> tuple[str, str]:
    """(parent, name) of a local path (made absolute) or a URL."""
    local = _local_path(url)
    if local is not None:
        path = os.path.abspath(local)
        return os.path.dirname(path), os.path.basename(path)
    stripped = url.rstrip("/")
    scheme, sep, rest = stripped.partition("://")
    if "/" not in rest:
        return scheme + sep, rest
    parent, name = rest.rsplit("/", 1)
    return scheme + sep + parent, name


def _join(parent: str, name: str) -> str:
    return parent + name if parent.endswith("://") else parent.rstrip("/") + "/" + name


CHECKPOINT_FORMAT = 1


def save_checkpoint(
    url: str,
    state: ResumeState,
    *,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write the state of a running fit atomically (a small zarr group; no pickle).

    Arrays: ``origin`` and the parameters (``weights``, ``means``, and
    ``precisions_cholesky`` unless identity), relative to the origin. Attributes: the
    iteration, objective, convergence flag, the history so far and ``metadata``.
    """
    p = state.params
    attributes = {
        "dkm_checkpoint": CHECKPOINT_FORMAT,
        "dkm_version": _version(),
        "covariance_type": p.covariance_type,
        "iteration": state.iteration,
        "objective": float_to_json(state.objective),
        "converged": state.converged,
        "history": [info.to_dict() for info in state.history],
        "metadata": _to_json(metadata or {}, "metadata"),
    }
    # the running fit's own earlier checkpoint is replaced; anything else is refused
    with AtomicOutput(
        url, storage_options=storage_options, command="checkpoint", overwrite=True
    ) as tmp:
        store, options = _zarr_location(tmp, storage_options)
        group = zarr.create_group(store, attributes=attributes, storage_options=options)
        group.create_array("origin", data=np.ascontiguousarray(state.origin))
        group.create_array("weights", data=np.ascontiguousarray(p.weights))
        group.create_array("means", data=np.ascontiguousarray(p.means))
        if p.precisions_cholesky is not None:
            group.create_array(
                "precisions_cholesky", data=np.ascontiguousarray(p.precisions_cholesky)
            )


def checkpoint_exists(url: str, *, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = _url_to_fs(url, storage_options)
    return bool(fs.exists(path))


def load_checkpoint(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> tuple[ResumeState, dict[str, Any]]:
    """The state and metadata :func:`save_checkpoint` wrote; InputError if it is not one."""
    store, options = _zarr_location(url, storage_options)
    try:
        group = zarr.open_group(store, mode="r", storage_options=options)
        attrs: dict[str, Any] = dict(group.attrs)
        if attrs.get("dkm_checkpoint") != CHECKPOINT_FORMAT:
            raise KeyError("dkm_checkpoint")
        ct = attrs["covariance_type"]

        def array(name: str) -> NDArray[Any]:
            return _read_model_array(group, name, url)

        prec = array("precisions_cholesky") if "precisions_cholesky" in group else None
        params = MixtureParams(ct, array("weights"), array("means"), prec)
        history = tuple(IterationInfo.from_dict(h) for h in attrs["history"])
        state = ResumeState(
            int(attrs["iteration"]),
            params,
            np.asarray(array("origin"), np.float64),
            _float(attrs["objective"], "objective", url),
            bool(attrs["converged"]),
            history,
        )
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(
            f"{url} is not a readable dkm checkpoint ({type(e).__name__}: {e}); remove it "
            "and run without --resume"
        ) from None
    return state, dict(attrs.get("metadata") or {})


def remove(url: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Delete an output dkm wrote at ``url`` (e.g. a finished run's checkpoint).

    Anything else there (see :func:`inspect_output`) is left alone.
    """
    if inspect_output(url, storage_options=storage_options).state != "dkm":
        return
    local = _local_path(url)
    if local is not None:
        _remove_local(os.path.abspath(local))
        return
    fs, path = _url_to_fs(url, storage_options)
    fs.rm(path, recursive=True)


class OutputExistsError(InputError):
    """Something is at an output path that this command may not replace."""


#: The manifest dkm writes at the top of every output it moves into place: what wrote it
#: and which top-level entries it wrote. Only a location holding it (or an output of an
#: earlier dkm, recognised by its own layout) may ever be replaced.
OUTPUT_MARKER = ".dkm-output.json"
OUTPUT_MARKER_FORMAT = 1
#: How a user asks to replace an earlier dkm output, for messages.
OVERWRITE_HINT = "pass --overwrite (overwrite=True in Python)"

#: What ``dkm run`` / ``dkm recluster`` wrote into an output folder before the marker.
_LEGACY_RUN_ENTRIES = frozenset(
    {
        "summary.json",
        "metrics.jsonl",
        "model",
        "labels.zarr",
        "responsibilities.zarr",
        "report",
        "drift.json",
        "drift.png",
    }
)

OutputState = Literal["missing", "empty", "dkm", "file", "symlink", "read-only", "foreign"]


@dataclass(frozen=True)
class ExistingOutput:
    """What is at an output location, as :func:`inspect_output` sees it.

    ``state``: ``missing``; ``empty`` (an empty directory); ``dkm`` (an earlier output of
    dkm, which ``what`` names); or something dkm must not replace: ``file``, ``symlink``,
    ``read-only`` (a directory without write permission), ``foreign`` (a directory or
    zarr store dkm did not write, or a dkm output to which other entries were added).
    ``what`` says it in words, for messages.
    """

    state: OutputState
    what: str


def _zarr_attributes(text: str | None) -> dict[str, Any] | None:
    """The attributes of a zarr v3 group's ``zarr.json``, or None if it is not one."""
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes") or {}
    return attrs if isinstance(attrs, dict) else None


def _classify_dkm(
    entries: list[str], read: Callable[[str], str | None], is_dir: Callable[[str], bool]
) -> ExistingOutput:
    """Classify a non-empty directory from its top-level ``entries``.

    ``read(name)`` gives a top-level file's text (None if missing or unreadable),
    ``is_dir(name)`` whether an entry is a directory.
    """
    listed = _listing(sorted(entries))
    names = set(entries)
    if OUTPUT_MARKER in names:
        try:
            manifest = json.loads(read(OUTPUT_MARKER) or "")
            written = set(manifest["entries"]) | {OUTPUT_MARKER}
            command = str(manifest.get("command", "dkm"))
        except (ValueError, KeyError, TypeError):
            return ExistingOutput(
                "foreign", f"a directory with an unreadable {OUTPUT_MARKER} ({listed})"
            )
        added = sorted(names - written)
        if added:
            return ExistingOutput(
                "foreign",
                f"the output of `dkm {command}` with entries dkm did not write: {_listing(added)}",
            )
        return ExistingOutput("dkm", f"the output of an earlier `dkm {command}`")
    attrs = _zarr_attributes(read("zarr.json")) if "zarr.json" in names else None
    if attrs is not None:
        if "dkm_checkpoint" in attrs:
            what = "a dkm checkpoint"
        elif "dkm_format" in attrs:
            what = "a dkm model"
        elif "generator" in attrs and "dkm_version" in attrs:
            what = "a data set written by `dkm make-data`"
        else:
            return ExistingOutput("foreign", f"a zarr group dkm did not write ({listed})")
        members = {"zarr.json", *(attrs.get("points", "points"), "labels_true")}
        if "generator" not in attrs:  # models and checkpoints: arrays and subgroups only
            members = {e for e in names if e == "zarr.json" or is_dir(e)}
        added = sorted(names - members)
        if added:
            return ExistingOutput(
                "foreign", f"{what} with entries dkm did not write: {_listing(added)}"
            )
        return ExistingOutput("dkm", what)
    if "summary.json" in names and names <= _LEGACY_RUN_ENTRIES:
        try:
            summary = json.loads(read("summary.json") or "")
        except ValueError:
            summary = None
        if isinstance(summary, dict) and "dkm_version" in summary and "job" in summary:
            return ExistingOutput("dkm", "the output of an earlier `dkm run` or `dkm recluster`")
    return ExistingOutput("foreign", f"a directory dkm did not write ({listed})")


def inspect_output(url: str, *, storage_options: dict[str, Any] | None = None) -> ExistingOutput:
    """What is at the output location ``url`` (see :class:`ExistingOutput`)."""
    local = _local_path(url)
    if local is not None:
        path = os.path.abspath(local)
        if os.path.islink(path):
            return ExistingOutput("symlink", f"a symbolic link to {os.readlink(path)}")
        if not os.path.lexists(path):
            return ExistingOutput("missing", "nothing")
        if not os.path.isdir(path):
            return ExistingOutput("file", f"a file of {os.path.getsize(path):,} bytes")
        if not os.stat(path).st_mode & 0o222:
            return ExistingOutput("read-only", "a read-only directory")
        entries = os.listdir(path)
        if not entries:
            return ExistingOutput("empty", "an empty directory")

        def read_local(name: str) -> str | None:
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    return f.read(1 << 20)
            except (OSError, UnicodeDecodeError):
                return None

        return _classify_dkm(
            entries, read_local, lambda name: os.path.isdir(os.path.join(path, name))
        )
    fs, root = _url_to_fs(url, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        return ExistingOutput("missing", "nothing")
    if fs.isfile(root):
        return ExistingOutput("file", "an object")
    listing = fs.ls(root, detail=True)
    kinds = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p.get("type") for p in listing}
    kinds.pop("", None)
    if not kinds:
        return ExistingOutput("empty", "an empty directory")

    def read_remote(name: str) -> str | None:
        try:
            return bytes(fs.cat_file(f"{root}/{name}")).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    return _classify_dkm(list(kinds), read_remote, lambda name: kinds.get(name) == "directory")


def claim_output(
    url: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    hint: str = OVERWRITE_HINT,
) -> ExistingOutput:
    """Raise :class:`OutputExistsError` unless dkm may write ``url``; check it can.

    dkm writes where nothing is, over an empty directory, and over its own earlier output
    if ``overwrite`` (``hint`` says how the user asks for that). Anything else (a file, a
    symbolic link, a read-only or foreign directory, a zarr store with arrays dkm did not
    write) is refused whatever ``overwrite`` says. Then :func:`check_writable` creates
    missing parent directories and writes a probe where the output will go.
    """
    existing = _refuse_unless_allowed(url, overwrite, storage_options, hint)
    check_writable(url, storage_options=storage_options, create_parents=True)
    return existing


def _refuse_unless_allowed(
    url: str, overwrite: bool, storage_options: dict[str, Any] | None, hint: str
) -> ExistingOutput:
    """What is at ``url``, if dkm may write there; else :class:`OutputExistsError`."""
    existing = inspect_output(url, storage_options=storage_options)
    if existing.state == "dkm" and not overwrite:
        raise OutputExistsError(
            f"{url} holds {existing.what}; {hint} to replace it, or choose another path"
        )
    if existing.state not in ("missing", "empty", "dkm"):
        advice = {
            "symlink": "dkm does not write through or over links: give the real path",
            "read-only": "dkm does not replace it: make it writable or choose another path",
        }.get(existing.state, "dkm never replaces what it did not write: choose another path")
        raise OutputExistsError(f"cannot write {url}: it is {existing.what}; {advice}")
    return existing


def check_writable(
    url: str, *, storage_options: dict[str, Any] | None = None, create_parents: bool = False
) -> None:
    """Raise InputError unless ``url`` could be created or replaced.

    A probe is written where ``url`` and its siblings (temporary outputs, checkpoints) go,
    and removed. Local paths: the parent directory must exist (``create_parents``: it is
    created, like ``mkdir -p``) and be writable, and a directory with no write permission
    at all is refused even for root. Other URLs: a tiny probe object is written next to the
    target and removed (object stores have no directories to check).
    """
    parent, name = _split(url)
    if not name:
        raise InputError(f"cannot write {url!r}: it names no file or directory")
    if _local_path(url) is not None:
        if create_parents and not os.path.lexists(parent):
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise InputError(
                    f"cannot write {url}: cannot create the directory {parent} "
                    f"({e.strerror or e}); create it first or choose another path"
                ) from None
        if not os.path.isdir(parent):
            what = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise InputError(f"cannot write {url}: the directory {parent} {what}; create it first")
        if not os.stat(parent).st_mode & 0o222 or not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {url}: the directory {parent} is not writable")
        probe = os.path.join(parent, f".dkm-write-check-{uuid.uuid4().hex}")
        try:
            os.mkdir(probe)
            with open(os.path.join(probe, "probe"), "wb") as f:
                f.write(b"dkm")
        except OSError as e:
            raise InputError(
                f"cannot write {url}: creating a file in {parent} failed ({e.strerror or e}); "
                "choose a directory on a writable file system"
            ) from None
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        return
    probe = _join(parent, f".dkm-write-check-{uuid.uuid4().hex}")
    try:
        fs, path = _url_to_fs(probe, storage_options)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as e:  # each fsspec backend raises its own errors
        raise InputError(
            f"cannot write {url} ({type(e).__name__}: {e}): check the URL and credentials"
        ) from e


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class AtomicOutput:
    """Write to a temporary sibling of ``url``; move it into place only on success.

    ``with AtomicOutput(url, command=…) as tmp:`` claims ``url`` (:func:`claim_output`:
    nothing there, an empty directory, or with ``overwrite`` an earlier dkm output;
    anything else is :class:`OutputExistsError`, and untouched), then yields ``tmp`` =
    ``<parent>/.<name>.tmp-<uuid>`` to write into: a directory (created empty for local
    paths; a prefix on object stores), so that outputs can be nested in it. On success
    the manifest :data:`OUTPUT_MARKER` (the command and the top-level entries written) is
    added to ``tmp``, the claim checked again, an existing target renamed aside
    (``.<name>.old-<uuid>``), ``tmp`` renamed to the target and the old one deleted; if
    nothing was written (``tmp`` missing or empty) the target is left alone. On an
    exception ``tmp`` is deleted, the target untouched, and the exception propagates.
    Local renames are atomic; on object stores (fsspec ``mv``: copy, then delete) the
    move is not, but a failed write still never touches the target.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        command: str = "save",
        overwrite: bool = False,
        hint: str = OVERWRITE_HINT,
    ) -> None:
        self.url = url
        self.storage_options = storage_options
        self.command, self.overwrite, self.hint = command, overwrite, hint
        parent, name = _split(url)
        token = uuid.uuid4().hex
        self._local = _local_path(url) is not None
        self.target = _join(parent, name)
        self.temporary = _join(parent, f".{name}.tmp-{token}")
        self._old = _join(parent, f".{name}.old-{token}")

    def _recheck(self) -> None:
        """Before the rename: refuse what is there now if dkm may not replace it (the
        location was probed on entry)."""
        _refuse_unless_allowed(self.url, self.overwrite, self.storage_options, self.hint)

    def __enter__(self) -> str:
        claim_output(
            self.url, overwrite=self.overwrite, storage_options=self.storage_options, hint=self.hint
        )
        if self._local:
            os.mkdir(self.temporary)
        return self.temporary

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc_type is None:
            try:
                self._commit()
            except BaseException:
                self._discard()
                raise
        else:
            self._discard()
        return False

    def _manifest(self, entries: list[str]) -> bytes:
        from datetime import UTC, datetime

        manifest = {
            "dkm_output": OUTPUT_MARKER_FORMAT,
            "command": self.command,
            "dkm_version": _version(),
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "entries": sorted(e for e in entries if e != OUTPUT_MARKER),
        }
        return (json.dumps(manifest, indent=2) + "\n").encode("utf-8")

    def _commit(self) -> None:
        if self._local:
            if not os.path.lexists(self.temporary):
                return
            entries = os.listdir(self.temporary) if os.path.isdir(self.temporary) else None
            if entries == []:
                os.rmdir(self.temporary)
                return
            if entries is not None:
                with open(os.path.join(self.temporary, OUTPUT_MARKER), "wb") as f:
                    f.write(self._manifest(entries))
            self._recheck()  # what is there may have changed while the output was written
            if os.path.lexists(self.target):
                os.replace(self.target, self._old)
                try:
                    os.replace(self.temporary, self.target)
                except BaseException:
                    os.replace(self._old, self.target)
                    raise
                _remove_local(self._old)
            else:
                os.replace(self.temporary, self.target)
            return
        fs, tmp = _url_to_fs(self.temporary, self.storage_options)
        target = _url_to_fs(self.target, self.storage_options)[1]
        old = _url_to_fs(self._old, self.storage_options)[1]
        if not fs.exists(tmp):
            return
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(tmp, detail=False)]
        fs.pipe_file(f"{tmp.rstrip('/')}/{OUTPUT_MARKER}", self._manifest(entries))
        self._recheck()
        if fs.exists(target):
            fs.mv(target, old, recursive=True)
            try:
                fs.mv(tmp, target, recursive=True)
            except BaseException:
                fs.mv(old, target, recursive=True)
                raise
            fs.rm(old, recursive=True)
        else:
            fs.mv(tmp, target, recursive=True)

    def _discard(self) -> None:
        try:
            if self._local:
                _remove_local(self.temporary)
            else:
                fs, tmp = _url_to_fs(self.temporary, self.storage_options)
                if fs.exists(tmp):
                    fs.rm(tmp, recursive=True)
        except OSError as e:  # never hide the error that made us discard
            warnings.warn(
                f"could not remove the temporary output {self.temporary}: {e}",
                RuntimeWarning,
                stacklevel=3,
            )


# --------------------------------------------------------------------------- small files


def text_writer(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> Callable[[str, str], None]:
    """A function ``write(name, text)`` that writes UTF-8 text to ``<url>/<name>``.

    ``url`` is a directory: a local path (created if missing) or an fsspec URL.
    """
    local = _local_path(url)
    if local is not None:
        root = os.path.abspath(local)

        def write_local(name: str, text: str) -> None:
            path = os.path.join(root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)

        return write_local
    fs, root = _url_to_fs(url, storage_options)

    def write_remote(name: str, text: str) -> None:
        fs.pipe_file(f"{root.rstrip('/')}/{name}", text.encode("utf-8"))

    return write_remote


@contextmanager
def local_dir(url: str, *, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local directory for tools that only write local files, copied to ``url`` on success.

    For a local ``url`` it is ``url`` itself (created if missing). For other URLs it is a
    temporary directory whose files are uploaded under ``url`` when the block succeeds,
    and which is deleted either way.
    """
    local = _local_path(url)
    if local is not None:
        path = os.path.abspath(local)
        os.makedirs(path, exist_ok=True)
        yield path
        return
    fs, root = _url_to_fs(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="dkm-") as staging:
        yield staging
        for folder, _, files in os.walk(staging):
            for name in files:
                source = os.path.join(folder, name)
                relative = os.path.relpath(source, staging).replace(os.sep, "/")
                fs.put_file(source, f"{root.rstrip('/')}/{relative}")
