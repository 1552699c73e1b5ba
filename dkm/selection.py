"""Choosing the number of clusters: every candidate fitted in shared passes, ranked by BIC/AIC.

``sweep(estimator, X, [8, 16, 32, 64])`` fits one model per candidate number of
clusters (and ``n_init`` restarts of each) together, so every iteration reads each
chunk once for all of them, then scores them all:

* Gaussian mixtures: the log-likelihood of X under each fitted mixture, from one more
  shared pass; the BIC is scikit-learn's ``GaussianMixture.bic`` for the same
  parameters, ``-2 log L + p log n`` with p its parameter count per covariance type.
* k-means: the equal-variance spherical Gaussian model that k-means fits with hard
  assignments (mixing weights ``n_j / n``, one variance ``σ² = inertia / (n d)``), whose
  classification log-likelihood comes from the final statistics of the fit without
  another pass; ``p = k d + (k − 1) + 1``.

Lower is better for both criteria. With sample weights, ``n`` and ``log L`` are
weighted sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.base import clone

from dkm._typing import CRITERIA, Criterion, parse_criterion
from dkm.estimators import GaussianMixture, KMeans, log_likelihoods

__all__ = ["CRITERIA", "Candidate", "Criterion", "SweepResult", "check_candidates", "sweep"]


@dataclass(frozen=True)
class Candidate:
    """One candidate number of clusters, fitted and scored."""

    n_clusters: int
    log_likelihood: float
    n_parameters: int
    n: float
    bic: float
    aic: float
    objective: float
    n_iter: int
    converged: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class SweepResult:
    """The fitted candidates, in the order asked, and the one the criterion picks."""

    criterion: Criterion
    candidates: list[Candidate]
    models: list[Any]

    @property
    def best_index(self) -> int:
        values = [getattr(c, self.criterion) for c in self.candidates]
        return int(np.argmin(values))  # the first of equals: the smallest k if sorted

    @property
    def best_n_clusters(self) -> int:
        return self.candidates[self.best_index].n_clusters

    @property
    def best_model(self) -> Any:
        return self.models[self.best_index]

    def table(self) -> list[dict[str, Any]]:
        return [c.as_dict() for c in self.candidates]


def check_candidates(n_clusters: Iterable[Any]) -> list[int]:
    """Candidate numbers of clusters: positive integers, at least one, no repeats."""
    ks = list(n_clusters)
    if not ks:
        raise ValueError("n_clusters: give at least one candidate number of clusters")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"n_clusters: candidates must be positive integers, got {k!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"n_clusters: candidates repeat: {ks}")
    return [int(k) for k in ks]


def sweep(
    estimator: KMeans | GaussianMixture,
    X: Any,
    n_clusters: Iterable[int],
    *,
    criterion: Criterion = "bic",
    sample_weight: Any = None,
) -> SweepResult:
    """Fit ``estimator`` for every candidate in ``n_clusters`` in shared passes; score all.

    ``estimator`` is left unfitted: the fitted models are clones with ``n_clusters`` /
    ``n_components`` set, in ``SweepResult.models``.
    """
    parse_criterion(criterion)
    ks = check_candidates(n_clusters)
    if not isinstance(estimator, KMeans | GaussianMixture):  # the input check
        raise TypeError(f"sweep: expected a dkm KMeans or GaussianMixture, got {estimator!r}")
    models = clone(estimator).fit_candidates(X, ks, sample_weight)
    scores = log_likelihoods(models, X, sample_weight)
    objectives = [m.objective_ for m in models]
    candidates = []
    for k, model, (ll, n), objective in zip(ks, models, scores, objectives, strict=True):
        p = model._n_parameters()
        candidates.append(
            Candidate(
                n_clusters=k,
                log_likelihood=ll,
                n_parameters=p,
                n=n,
                bic=-2 * ll + p * math.log(n),
                aic=-2 * ll + 2 * p,
                objective=float(objective),
                n_iter=int(model.n_iter_),
                converged=bool(model.converged_),
            )
        )
    return SweepResult(criterion, candidates, models)
