"""Per-chunk kernels: NumPy/SciPy only, one chunk in, a small summary out. Never Dask."""

from dkm.kernels.expectation import (
    distances,
    estep,
    inertia,
    log_gaussian,
    predict_labels,
    predict_proba,
    score_samples,
    weighted_log_prob,
)
from dkm.kernels.init import INIT_METHODS, kmeans_plusplus, random_points
from dkm.kernels.mstep import gaussian_mstep, kmeans_centres
from dkm.kernels.params import DegenerateComponentError, MixtureParams

__all__ = [
    "INIT_METHODS",
    "DegenerateComponentError",
    "MixtureParams",
    "distances",
    "estep",
    "gaussian_mstep",
    "inertia",
    "kmeans_centres",
    "kmeans_plusplus",
    "log_gaussian",
    "predict_labels",
    "predict_proba",
    "random_points",
    "score_samples",
    "weighted_log_prob",
]
