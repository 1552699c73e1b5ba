"""Stores to Dask arrays and back (points, labels, models, checkpoints); no algorithm.

One job per module: :mod:`~dkm.io.sources` (zarr, .npy, parquet and the registry of
data sources), :mod:`~dkm.io.blobs` (synthetic data), :mod:`~dkm.io.arrays` (writing lazy arrays),
:mod:`~dkm.io.models` (a saved model's layout), :mod:`~dkm.io.checkpoints`,
:mod:`~dkm.io.records` (dicts as zarr groups) and :mod:`~dkm.io.outputs` (what dkm may
replace, atomic output). Nothing here knows the estimators or the engine: building an
estimator from a saved model is :mod:`dkm.models`'.
"""

from dkm.io._paths import InputError
from dkm.io.arrays import write_array, write_labels
from dkm.io.blobs import make_data, synthetic
from dkm.io.checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
    unreadable_checkpoint,
)
from dkm.io.models import (
    MODEL_FORMAT,
    MODEL_KINDS,
    STATISTICS_FORMAT,
    ModelStatistics,
    StoredModel,
    find_model,
    has_model_statistics,
    load_model_statistics,
    open_model,
    read_model_metadata,
    write_model,
)
from dkm.io.outputs import (
    OUTPUT_MARKER,
    OUTPUT_MODEL,
    OVERWRITE_HINT,
    AtomicOutput,
    ExistingOutput,
    OutputExistsError,
    check_writable,
    claim_output,
    inspect_output,
    local_dir,
    remove,
    text_writer,
)
from dkm.io.points import Points
from dkm.io.sources import (
    SOURCES,
    Source,
    open_npy,
    open_parquet,
    open_path,
    open_source,
    open_zarr,
    source,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "MODEL_KINDS",
    "OUTPUT_MARKER",
    "OUTPUT_MODEL",
    "OVERWRITE_HINT",
    "SOURCES",
    "STATISTICS_FORMAT",
    "AtomicOutput",
    "ExistingOutput",
    "InputError",
    "ModelStatistics",
    "OutputExistsError",
    "Points",
    "Source",
    "StoredModel",
    "check_writable",
    "checkpoint_exists",
    "claim_output",
    "find_model",
    "has_model_statistics",
    "inspect_output",
    "load_checkpoint",
    "load_model_statistics",
    "local_dir",
    "make_data",
    "open_model",
    "open_npy",
    "open_parquet",
    "open_path",
    "open_source",
    "open_zarr",
    "read_model_metadata",
    "remove",
    "save_checkpoint",
    "source",
    "synthetic",
    "text_writer",
    "unreadable_checkpoint",
    "write_array",
    "write_labels",
    "write_model",
]
