"""Checkpoints of a running fit: a record (``ResumeState.to_dict()``) stored as a small
zarr group, written atomically, and read back for the caller to decode."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import zarr

from dkm.codec import to_json
from dkm.io._paths import InputError, _url_to_fs, _version, _zarr_location
from dkm.io.outputs import AtomicOutput
from dkm.io.records import create_record, read_record

CHECKPOINT_FORMAT = 1
#: The attributes the checkpoint adds around the caller's record.
_OWN = ("dkm_checkpoint", "dkm_version", "metadata")


def save_checkpoint(
    url: str,
    record: Mapping[str, Any],
    *,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write the state of a running fit atomically (a small zarr group; no pickle).

    ``record`` (e.g. ``ResumeState.to_dict()``: the parameters' arrays ``origin``,
    ``weights``, ``means`` and ``precisions_cholesky`` unless identity; the iteration,
    objective, convergence flag and history as attributes) is stored as it is (see
    :mod:`dkm.io.records`), with the attributes ``dkm_checkpoint``, ``dkm_version`` and
    the caller's ``metadata``.
    """
    attributes = {
        "dkm_checkpoint": CHECKPOINT_FORMAT,
        "dkm_version": _version(),
        "metadata": to_json(metadata or {}, "metadata"),
    }
    # the running fit's own earlier checkpoint is replaced; anything else is refused
    with AtomicOutput(
        url, storage_options=storage_options, command="checkpoint", overwrite=True
    ) as tmp:
        create_record(tmp, record, attributes=attributes, storage_options=storage_options)


def checkpoint_exists(url: str, *, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = _url_to_fs(url, storage_options)
    return bool(fs.exists(path))


def unreadable_checkpoint(url: str, error: BaseException) -> InputError:
    """The error for a checkpoint that cannot be read or decoded (``error`` says why)."""
    return InputError(
        f"{url} is not a readable dkm checkpoint ({type(error).__name__}: {error}); remove it "
        "and run without --resume"
    )


def load_checkpoint(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record and metadata :func:`save_checkpoint` wrote; InputError if it is not
    one (decoding the record is the caller's: raise :func:`unreadable_checkpoint`)."""
    store, options = _zarr_location(url, storage_options)
    try:
        group = zarr.open_group(store, mode="r", storage_options=options)
        if group.attrs.get("dkm_checkpoint") != CHECKPOINT_FORMAT:
            raise KeyError("dkm_checkpoint")
        record = read_record(group, url)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise unreadable_checkpoint(url, e) from None
    metadata = record.get("metadata")
    return {k: v for k, v in record.items() if k not in _OWN}, dict(metadata or {})
