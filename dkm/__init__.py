"""dkm: k-means and Gaussian mixtures as one EM over Dask arrays."""

from dkm.engine import NonFiniteInputError
from dkm.estimators import GaussianMixture, KMeans
from dkm.io import load_model, save_model
from dkm.kernels.params import DegenerateComponentError, MixtureParams
from dkm.selection import SweepResult, sweep

__version__ = "0.1.0"
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
