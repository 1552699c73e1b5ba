"""The option types of dkm, named once: covariance types, assignments, moment kinds."""

from __future__ import annotations

from typing import Literal, get_args

CovarianceType = Literal["identity", "spherical", "diag", "tied", "full"]
Assignment = Literal["hard", "soft"]
#: Which second moments a pass accumulates; "none" for k-means (means only).
Moments = Literal["none", "spherical", "diag", "tied", "full"]
#: What the M-step does with an empty or non-positive-definite mixture component.
OnDegenerate = Literal["error", "reseed", "drop"]
#: How k-means searches rows: "lloyd" every row in every pass; "hamerly" keeps Hamerly's
#: bounds between passes once the centres settle (the same results, bit for bit); "auto"
#: keeps them where the compiled row pass searches (at most 64 features).
KMeansAlgorithm = Literal["auto", "lloyd", "hamerly"]

COVARIANCE_TYPES: tuple[str, ...] = get_args(CovarianceType)
ASSIGNMENTS: tuple[str, ...] = get_args(Assignment)
MOMENTS: tuple[str, ...] = get_args(Moments)
KMEANS_ALGORITHMS: tuple[str, ...] = get_args(KMeansAlgorithm)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming both."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def moments_for(covariance_type: str) -> Moments:
    """The second moments a covariance type needs (identity needs none)."""
    check_choice("covariance_type", covariance_type, COVARIANCE_TYPES)
    return "none" if covariance_type == "identity" else covariance_type  # type: ignore[return-value]
