"""Records as zarr groups: NumPy arrays become arrays, nested dicts subgroups, everything
else JSON attributes (see :func:`dkm.codec.to_json`).

A record is what a value object's ``to_dict`` gives (``MixtureParams``, ``SuffStats``,
``ResumeState``); an array that is absent (None) is left out of the dict, not stored.
Reading gives the same dict back, attributes as JSON (non-finite floats as strings) and
arrays as NumPy arrays; only plain numeric arrays are ever decoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from dkm.codec import to_json
from dkm.io._paths import InputError, _zarr_location


def _parts(
    record: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], dict[str, NDArray[Any]], dict[str, Mapping[str, Any]]]:
    attributes: dict[str, Any] = {}
    arrays: dict[str, NDArray[Any]] = {}
    groups: dict[str, Mapping[str, Any]] = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            arrays[key] = np.ascontiguousarray(value)
        elif isinstance(value, Mapping):
            groups[key] = value
        else:
            attributes[key] = to_json(value, f"{where}[{key!r}]")
    return attributes, arrays, groups


def _fill(
    group: zarr.Group,
    arrays: dict[str, NDArray[Any]],
    groups: dict[str, Mapping[str, Any]],
    where: str,
) -> None:
    for name, value in arrays.items():
        group.create_array(name, data=value)
    for name, sub in groups.items():
        write_record(group, name, sub, f"{where}/{name}")


def write_record(parent: zarr.Group, name: str, record: Mapping[str, Any], where: str) -> None:
    """``record`` as the subgroup ``name`` of ``parent``; ``where`` names it in errors."""
    attributes, arrays, groups = _parts(record, where)
    _fill(parent.create_group(name, attributes=attributes), arrays, groups, where)


def create_record(
    url: str,
    record: Mapping[str, Any],
    *,
    attributes: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """``record`` as a new zarr group at ``url``, with the JSON ``attributes`` (which may
    hold mappings: they are attributes, not subgroups) before the record's own."""
    own, arrays, groups = _parts(record, url)
    store, options = _zarr_location(url, storage_options)
    group = zarr.create_group(
        store, attributes={**(attributes or {}), **own}, storage_options=options
    )
    _fill(group, arrays, groups, url)


def read_array(group: zarr.Group, name: str, url: str, what: str = "dkm model") -> NDArray[Any]:
    """The numeric array ``name`` of ``group``; InputError if it is missing or not numeric."""
    try:
        node = group[name]
    except KeyError:
        raise InputError(f"{what} {url} is incomplete: the array {name!r} is missing") from None
    if not isinstance(node, zarr.Array) or np.dtype(node.dtype).kind not in "biuf":
        # Only plain numeric arrays: never decode object codecs (e.g. pickle) from a file.
        raise InputError(f"{what} {url}: {name!r} is not a numeric array")
    return np.asarray(node[...])


def read_record(group: zarr.Group, url: str, what: str = "dkm model") -> dict[str, Any]:
    """The record :func:`write_record` stored in ``group`` (``url`` and ``what`` name it
    in errors)."""
    record: dict[str, Any] = dict(group.attrs)
    with warnings.catch_warnings():
        # the manifest of an atomic output is a file zarr does not know, and says so
        warnings.filterwarnings("ignore", "Object at .* is not recognized", UserWarning)
        members = sorted(group.members())
    for name, node in members:
        if isinstance(node, zarr.Group):
            record[name] = read_record(node, url, what)
        else:
            record[name] = read_array(group, name, url, what)
    return record
