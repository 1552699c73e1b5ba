"""The data sources dkm reads (zarr, .npy, parquet, synthetic), and the registry that
picks one by a config's ``kind`` or by a file's suffix."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr
from dask.array.core import normalize_chunks
from numpy.typing import NDArray

from dkm.io._paths import (
    InputError,
    _check_chunk_rows,
    _check_dtype,
    _listing,
    _local_path,
    _regular_chunks,
    _url_to_fs,
    _zarr_location,
)
from dkm.io.blobs import synthetic
from dkm.io.points import Points, _check_points_shape, _points_from_source

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


#: The files of a parquet directory that are read (and what `dkm predict` calls parquet).
_PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


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
        if p.endswith(_PARQUET_SUFFIXES) and not any(
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


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Source:
    """A kind of data dkm reads.

    ``open`` takes a config's data section (any object with its keys as attributes:
    ``kind``, ``chunk_rows``, ``dtype`` and the kind's own). ``suffixes`` are the file
    names that ``dkm predict --data`` reads as this kind; ``open_path(url, array,
    array_option)`` opens such a location, or is None if a location alone is not enough.
    """

    kind: str
    open: Callable[[Any], Points]
    suffixes: tuple[str, ...] = ()
    open_path: Callable[[str, str | None, str | None], Points] | None = None


SOURCES: dict[str, Source] = {
    "synthetic": Source(
        "synthetic",
        lambda d: synthetic(
            d.n,
            d.d,
            d.k,
            seed=d.seed,
            chunk_rows=d.chunk_rows,
            dtype=d.dtype or "float64",
            spread=d.spread,
        ),
    ),
    "zarr": Source(
        "zarr",
        lambda d: open_zarr(
            d.url,
            d.array,
            weights=d.weights,
            storage_options=d.storage_options,
            chunk_rows=d.chunk_rows,
            dtype=d.dtype,
        ),
        (".zarr",),
        lambda url, array, option: open_zarr(url, array, array_option=option),
    ),
    "npy": Source(
        "npy",
        lambda d: open_npy(d.path, weights=d.weights, chunk_rows=d.chunk_rows, dtype=d.dtype),
        (".npy",),
        lambda url, array, option: open_npy(url),
    ),
    "parquet": Source(
        "parquet",
        lambda d: open_parquet(
            d.url,
            d.columns,
            weights=d.weights,
            storage_options=d.storage_options,
            chunk_rows=d.chunk_rows,
            dtype=d.dtype,
        ),
        _PARQUET_SUFFIXES,
    ),
}
#: What a location read by its suffix is when no source claims the suffix: zarr stores
#: are directories (or URL prefixes), often without one.
DEFAULT_PATH_KIND = "zarr"


def source(kind: str) -> Source:
    """The source of a config's ``kind``; InputError listing the known kinds if unknown."""
    try:
        return SOURCES[kind]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown data kind {kind!r}: dkm reads {', '.join(SOURCES)}; set data.kind to one "
            "of them"
        ) from None


def open_source(data: Any) -> Points:
    """The points a config's data section names, as a lazy Dask array (nothing is read)."""
    return source(data.kind).open(data)


def _suffix(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[1].lower()


def _path_kinds() -> str:
    kinds = [
        f"{' '.join(s.suffixes)} ({s.kind})" for s in SOURCES.values() if s.open_path and s.suffixes
    ]
    return ", ".join(kinds) + f"; any other location is read as {DEFAULT_PATH_KIND}"


def open_path(url: str, array: str | None = None, *, array_option: str | None = None) -> Points:
    """Points from a location alone, chosen by its suffix (see :data:`SOURCES`); a
    location without a known suffix is read as zarr. ``array`` and ``array_option`` as
    for :func:`open_zarr` (only zarr takes them)."""
    suffix = _suffix(url)
    chosen = next((s for s in SOURCES.values() if suffix and suffix in s.suffixes), None)
    if chosen is not None:
        if chosen.open_path is None:
            raise InputError(
                f"{url} is {chosen.kind} data, which this command cannot read from a location "
                f"alone; it reads {_path_kinds()}: convert the data"
            )
        return chosen.open_path(url, array, array_option)
    fallback = SOURCES[DEFAULT_PATH_KIND].open_path
    assert fallback is not None
    try:
        return fallback(url, array, array_option)
    except InputError as e:
        if not suffix:
            raise
        raise InputError(
            f"{e} (no data source claims the suffix {suffix!r}: dkm reads {_path_kinds()})"
        ) from e.__cause__
