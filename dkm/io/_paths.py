"""What every part of dkm.io shares: locations (local paths and fsspec URLs), the input
error, and small checks of arguments."""

from __future__ import annotations

import numbers
import os
from typing import Any

import numpy as np

from dkm.errors import UserError

_FLOAT_DTYPES = ("float32", "float64")
_MAX_LISTED = 20


class InputError(UserError, ValueError):
    """Bad input data or location.

    The message names the file/URL, array or column, and says what to do.
    """


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
