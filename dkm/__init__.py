"""dkm: k-means and Gaussian mixtures as one EM over Dask arrays."""

from dkm._version import __version__
from dkm.engine import NonFiniteInputError
from dkm.estimators import GaussianMixture, KMeans
from dkm.kernels.params import DegenerateComponentError, MixtureParams
from dkm.models import load_model, save_model
from dkm.selection import SweepResult, sweep

__all__ = [
    "DegenerateComponentError",
    "GaussianMixture",
    "KMeans",
    "MixtureParams",
    "NonFiniteInputError",
    "SweepResult",
    "__version__",
    "load_model",
    "save_model",
    "sweep",
]
