"""Mixture parameters (the per-type arithmetic is :mod:`dkm.covariance`'s)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dkm._typing import CovarianceType, parse_covariance_type
from dkm.covariance import TYPES, Covariance, DegenerateComponentError

__all__ = ["DegenerateComponentError", "DegenerateComponentWarning", "MixtureParams"]

F64 = NDArray[np.float64]


class DegenerateComponentWarning(UserWarning):
    """A collapsed component was dropped or re-seeded (``on_degenerate``)."""


@dataclass(frozen=True, eq=False)
class MixtureParams:
    """Parameters of a Gaussian mixture (k-means is the ``identity`` member).

    Attributes
    ----------
    covariance_type : one of identity, spherical, diag, tied, full.
    weights : (k,) mixing weights (equal and fixed for identity).
    means : (k, d).
    precisions_cholesky : ``P`` with precision ``P Pᵀ``: full (k, d, d), tied (d, d),
        diag (k, d), spherical (k,); None for identity (unit covariance).
    """

    covariance_type: CovarianceType
    weights: F64
    means: F64
    precisions_cholesky: F64 | None

    def __post_init__(self) -> None:
        parse_covariance_type(self.covariance_type)

    @property
    def kind(self) -> Covariance:
        """What the covariance type means for the arithmetic (:mod:`dkm.covariance`)."""
        return TYPES[self.covariance_type]

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """``covariance_type`` and the arrays (``precisions_cholesky`` left out when None):
        the ``mixture`` group of a saved model, the parameters of a checkpoint."""
        record: dict[str, Any] = {
            "covariance_type": self.covariance_type,
            "weights": self.weights,
            "means": self.means,
        }
        if self.precisions_cholesky is not None:
            record["precisions_cholesky"] = self.precisions_cholesky
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> MixtureParams:
        """The parameters :meth:`to_dict` gave (arrays as stored); ValueError naming what
        is missing or wrong."""
        try:
            kind = TYPES[parse_covariance_type(record["covariance_type"])]
            weights, means = np.asarray(record["weights"]), np.asarray(record["means"])
        except KeyError as e:
            raise ValueError(f"mixture parameters without {e}") from None
        prec = record.get("precisions_cholesky")
        if kind.unit:
            prec = None
        elif prec is None:
            raise ValueError(f"{kind.name} mixture parameters without 'precisions_cholesky'")
        return cls(kind.name, weights, means, None if prec is None else np.asarray(prec))

    def translated(self, offset: F64) -> MixtureParams:
        """The same mixture moved by ``offset`` (precisions are translation invariant)."""
        return replace(self, means=self.means + offset)

    @classmethod
    def identity(cls, means: F64) -> MixtureParams:
        k = means.shape[0]
        return cls("identity", np.full(k, 1.0 / k), np.asarray(means, np.float64), None)
