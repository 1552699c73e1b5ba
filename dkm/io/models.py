"""A saved model's zarr layout: JSON attributes, the fitted arrays, the ``mixture``
subgroup (the parameters) and the optional ``statistics`` subgroup (what incremental
updates start from). Building an estimator from it is :mod:`dkm.models`' job."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray

from dkm import covariance
from dkm.codec import to_json
from dkm.io._paths import InputError, _join, _version, _zarr_location
from dkm.io.outputs import OUTPUT_MODEL, OVERWRITE_HINT, AtomicOutput
from dkm.io.records import create_record, read_array, read_record
from dkm.stats import SuffStats

#: Layout version of saved models; ``load_model`` refuses formats it does not know.
MODEL_FORMAT = 1
#: The estimators a model may hold (its ``kind`` attribute).
MODEL_KINDS = ("KMeans", "GaussianMixture")
#: Layout version of the optional ``statistics`` subgroup of a saved model.
STATISTICS_FORMAT = 1


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

    def to_dict(self) -> dict[str, Any]:
        """The ``statistics`` subgroup: ``format``, the sums (:meth:`SuffStats.to_dict`,
        as float64), ``shift`` and ``updates``."""
        s = self.stats
        if self.shift.shape != s.sx.shape:
            raise ValueError(
                f"statistics shift has shape {self.shift.shape}, expected {s.sx.shape}"
            )
        sums = {
            key: np.asarray(value, np.float64) if isinstance(value, np.ndarray) else value
            for key, value in s.to_dict().items()
        }
        return {
            "format": STATISTICS_FORMAT,
            **sums,
            "shift": np.asarray(self.shift, np.float64),
            "updates": int(self.updates),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ModelStatistics:
        """The statistics :meth:`to_dict` gave; ValueError naming what is wrong."""
        stats = SuffStats.from_dict(record)
        try:
            shift = np.asarray(record["shift"], np.float64)
        except KeyError:
            raise ValueError("statistics without 'shift'") from None
        if shift.shape != stats.sx.shape:
            raise ValueError(f"sx {stats.sx.shape} and shift {shift.shape} disagree")
        return cls(stats, shift, int(record.get("updates", 0)))


def write_model(
    url: str,
    *,
    kind: str,
    attributes: Mapping[str, Any],
    arrays: Mapping[str, NDArray[Any]],
    mixture: Mapping[str, Any],
    statistics: ModelStatistics | None = None,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a model as a self-describing zarr group (no pickle), atomically.

    Attributes: ``dkm_format``, ``kind``, ``dkm_version``, the estimator's
    ``attributes`` (JSON) and the caller's ``metadata``. Arrays: ``arrays`` at the top,
    ``mixture`` (:meth:`MixtureParams.to_dict`) and ``statistics``
    (:meth:`ModelStatistics.to_dict`) as subgroups. Written to a temporary sibling and
    moved into place (see :class:`AtomicOutput`); an earlier dkm output at ``url`` is
    replaced only with ``overwrite``, anything else never.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    top = {
        "dkm_format": MODEL_FORMAT,
        "kind": kind,
        "dkm_version": _version(),
        **attributes,
        "metadata": to_json(metadata or {}, "metadata"),
    }
    record: dict[str, Any] = {**arrays, "mixture": mixture}
    if statistics is not None:
        record["statistics"] = statistics.to_dict()
    with AtomicOutput(
        url,
        storage_options=storage_options,
        command="save_model",
        overwrite=overwrite,
        hint=OVERWRITE_HINT,
    ) as tmp:
        create_record(tmp, record, attributes=top, storage_options=storage_options)


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
    if kind not in MODEL_KINDS:
        raise InputError(
            f"{url} holds a model of unknown kind {kind!r}; expected one of "
            f"{', '.join(MODEL_KINDS)}"
        )
    if group.metadata.zarr_format != 3:
        raise InputError(f"{url}: dkm models are zarr v3 groups; this one is not")
    return group, attrs


@dataclass(frozen=True, eq=False)
class StoredModel:
    """A saved model as stored: its attributes, and its arrays read on demand."""

    url: str
    attributes: dict[str, Any]
    group: zarr.Group

    def array(self, name: str) -> NDArray[Any]:
        """The top-level array ``name``; InputError if it is missing or not numeric."""
        return read_array(self.group, name, self.url)

    def mixture(self) -> dict[str, Any]:
        """The ``mixture`` subgroup's record (:meth:`MixtureParams.from_dict` reads it);
        InputError if it is missing or incomplete."""
        try:
            sub = self.group["mixture"]
        except KeyError:
            sub = None
        if not isinstance(sub, zarr.Group):
            raise InputError(f"dkm model {self.url} is incomplete: the group 'mixture' is missing")
        try:
            kind = covariance.of(sub.attrs.get("covariance_type"))
        except ValueError as e:
            raise InputError(f"dkm model {self.url}: {e}") from e
        needed = ["weights", "means", *([] if kind.unit else ["precisions_cholesky"])]
        record: dict[str, Any] = {"covariance_type": kind.name}
        for name in needed:
            record[name] = read_array(sub, name, self.url)
        return record


def open_model(url: str, *, storage_options: dict[str, Any] | None = None) -> StoredModel:
    """The model saved at ``url``; InputError naming what is wrong if it is not one."""
    group, attrs = _open_model(url, storage_options)
    return StoredModel(url, attrs, group)


def find_model(url: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """``url`` if it is a saved model, else the model in it, if ``url`` is an output
    folder of ``dkm run`` (its ``model/``); InputError if neither."""
    inner = _join(url, OUTPUT_MODEL)
    if not _is_model(url, storage_options) and _is_model(inner, storage_options):
        return inner
    _open_model(url, storage_options)  # the error naming what is wrong with url
    return url


def has_model_statistics(url: str, *, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a saved model keeps its sufficient statistics (see :func:`write_model`)."""
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
    fmt = sub.attrs.get("format")
    if fmt != STATISTICS_FORMAT:
        raise InputError(
            f"dkm model {url}: its statistics are of format {fmt!r}; this dkm "
            f"{_version()} reads format {STATISTICS_FORMAT}"
        )
    record = read_record(sub, url)
    try:
        return ModelStatistics.from_dict(record)
    except (ValueError, TypeError, IndexError) as e:
        raise InputError(f"dkm model {url}: its statistics are not valid ({e})") from None


def read_model_metadata(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON attributes of a saved model (kind, versions, params, scalars, history,
    the caller's ``metadata``), without reading any array."""
    return _open_model(url, storage_options)[1]
