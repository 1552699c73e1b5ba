"""Saving and loading fitted estimators: what of an estimator a model keeps, and how it
is built again (the zarr layout is :mod:`dkm.io.models`')."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from sklearn.utils.validation import check_is_fitted

from dkm import io
from dkm._version import __version__
from dkm.codec import float_to_json, json_param
from dkm.engine import IterationInfo
from dkm.estimators import GaussianMixture, KMeans
from dkm.io._paths import _listing
from dkm.kernels.params import MixtureParams

__all__ = ["load_model", "save_model"]

_MODEL_KINDS: dict[str, type[KMeans] | type[GaussianMixture]] = {
    "KMeans": KMeans,
    "GaussianMixture": GaussianMixture,
}


def _model_arrays(estimator: KMeans | GaussianMixture) -> dict[str, NDArray[Any]]:
    arrays: dict[str, NDArray[Any]] = {"origin": estimator.mixture_.origin}
    for name in estimator.fitted_arrays:
        arrays[name] = getattr(estimator, name)
    return {name: np.ascontiguousarray(a) for name, a in arrays.items()}


def _model_attributes(estimator: KMeans | GaussianMixture) -> dict[str, Any]:
    params: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in sorted(estimator.get_params(deep=False).items()):
        ok, encoded = json_param(value)
        if ok:
            params[key] = encoded
        else:
            dropped.append(key)
    names = getattr(estimator, "feature_names_in_", None)
    attrs: dict[str, Any] = {
        "params": params,
        "dropped_params": dropped,
        "n_features_in_": int(estimator.n_features_in_),
        "feature_names_in_": None if names is None else [str(n) for n in names],
        "covariance_type": estimator.mixture_.covariance_type,
        "n_components": estimator.mixture_.n_components,
        "n_iter_": int(estimator.n_iter_),
        "converged_": bool(estimator.converged_),
        "history_": [info.to_dict() for info in estimator.history_],
    }
    objective = float_to_json(float(estimator.objective_))
    if estimator.mixture_.kmeans:
        attrs["inertia_"] = objective
    else:
        attrs["lower_bound_"] = objective
        bounds = cast(GaussianMixture, estimator).lower_bounds_
        attrs["lower_bounds_"] = [float_to_json(float(v)) for v in bounds]
    return attrs


def save_model(
    estimator: KMeans | GaussianMixture,
    url: str,
    *,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    statistics: io.ModelStatistics | None = None,
    overwrite: bool = False,
) -> None:
    """Save a fitted estimator as a self-describing zarr group (no pickle).

    Arrays: ``origin`` and the fitted arrays (KMeans ``cluster_centers_``; GaussianMixture
    ``weights_``, ``means_``, ``covariances_``, ``precisions_``, ``precisions_cholesky_``)
    at the top, the parameters the kernels use in the subgroup ``mixture`` (``weights``,
    ``means``, ``precisions_cholesky`` unless identity). JSON attributes: ``dkm_format``,
    ``kind``, ``dkm_version``, ``params`` (``get_params()`` without array-, callable- or
    object-valued parameters, whose names are in ``dropped_params``), the fitted scalars,
    ``history_`` (iteration, objective, change, seconds, converged) and the caller's
    ``metadata``. Non-finite floats are stored as the strings "NaN", "Infinity",
    "-Infinity". ``labels_`` is per-point data and is not saved. ``statistics``
    (optional): the model's total sufficient statistics, in the subgroup ``statistics``
    (arrays ``nk``, ``sx``, ``sxx`` unless k-means, ``shift``; attributes ``format``,
    ``moments``, ``objective``, ``n``, ``count``, ``updates``); readers that do not know
    it ignore it. Written to a temporary sibling and moved into place (see
    :class:`dkm.io.AtomicOutput`); an earlier dkm output at ``url`` is replaced only with
    ``overwrite``, anything else never.
    """
    kind = next((k for k, cls in _MODEL_KINDS.items() if isinstance(estimator, cls)), None)
    if kind is None:
        raise TypeError(
            f"save_model expects a dkm KMeans or GaussianMixture, got {type(estimator).__name__}"
        )
    check_is_fitted(estimator)
    io.write_model(
        url,
        kind=kind,
        attributes=_model_attributes(estimator),
        arrays=_model_arrays(estimator),
        mixture=estimator.mixture_.params.to_dict(),
        statistics=statistics,
        metadata=metadata,
        storage_options=storage_options,
        overwrite=overwrite,
    )


def _history(records: Any, name: str, url: str) -> list[IterationInfo]:
    try:
        return [IterationInfo.from_dict(record) for record in records]
    except (TypeError, ValueError, AttributeError) as e:
        raise io.InputError(f"{url}: attribute {name} is not readable ({e})") from None


def _float(value: Any, name: str, url: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise io.InputError(
            f"dkm model {url}: attribute {name} = {value!r} is not a number"
        ) from None


def load_model(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> KMeans | GaussianMixture:
    """A fitted estimator from :func:`save_model`'s zarr group; reads only JSON and arrays.

    ``predict``, ``predict_proba``, ``score_samples``, ``transform`` and ``score`` give
    the same results as the saved estimator's. ``labels_`` is not restored;
    ``history_`` entries have ``params=None`` (the per-iteration parameters are not
    saved); dropped parameters (see :func:`save_model`) keep their defaults.
    """
    stored = io.open_model(url, storage_options=storage_options)
    attrs = stored.attributes
    cls = _MODEL_KINDS[attrs["kind"]]
    params = attrs.get("params")
    if not isinstance(params, dict):
        raise io.InputError(f"dkm model {url}: the 'params' attribute is missing or not a mapping")
    unknown = sorted(set(params) - set(cls().get_params(deep=False)))
    if unknown:
        raise io.InputError(
            f"dkm model {url} has parameters {_listing(unknown)} unknown to {cls.__name__} "
            f"in dkm {__version__} (written by dkm {attrs.get('dkm_version')}): use that version"
        )
    record = stored.mixture()
    try:
        model = MixtureParams.from_dict(record)
    except ValueError as e:
        raise io.InputError(f"dkm model {url}: {e}") from e
    origin = stored.array("origin")
    # the fitted arrays follow from the parameters, in the dtype they were saved in;
    # only a mixture's covariances (as the M-step estimated them) are read as saved
    fitted = {name: stored.array(name) for name in cls.fitted_arrays}
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
