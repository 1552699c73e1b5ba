"""Per-row outputs of a fitted model (labels, probabilities, densities, distances): lazy
over a Dask array, chunk by chunk, or at once on an in-memory array.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from numpy.typing import NDArray

from dkm.engine.data import (
    LABEL_REMEDY,
    NAMED_ROWS,
    ChunkedData,
    NonFiniteInputError,
    nonfinite_rows,
)
from dkm.engine.passes import one_blas_thread
from dkm.kernels import expectation as K
from dkm.kernels.params import MixtureParams

F64 = NDArray[np.float64]


def _map_chunks(
    fn: Callable[..., NDArray[Any]],
    data: ChunkedData,
    params: MixtureParams,
    *,
    name: str,
    out_dtype: Any,
    n_columns: int | None = None,
) -> da.Array:
    """Apply a per-row kernel lazily; the result keeps the input's row chunks.

    Rows with NaN/inf follow ``data.nan_policy`` (see :func:`_apply_kernel`): under
    "raise", computing a chunk that holds one raises :class:`NonFiniteInputError`.
    """
    centred_params = params.translated(-data.origin)
    token = tokenize(
        data.X.name, params.means, params.precisions_cholesky, params.weights, data.nan_policy
    )
    kwargs: dict[str, Any] = {"dtype": out_dtype, "name": f"{name}-{token}"}
    if n_columns is None:
        kwargs["drop_axis"] = 1
    else:
        kwargs["chunks"] = (data.X.chunks[0], (n_columns,))
    return da.map_blocks(
        _apply_kernel,
        data.X,
        fn,
        centred_params,
        data.origin,
        data.nan_policy,
        shared_blas=True,
        **kwargs,
    )


def _apply_kernel(
    X: NDArray[Any],
    fn: Callable[..., NDArray[Any]],
    params: MixtureParams,
    origin: F64,
    nan_policy: str = "raise",
    block_info: Any = None,
    shared_blas: bool = False,
) -> NDArray[Any]:
    """``fn`` on one chunk. Rows with NaN/inf: under "drop" label -1 (NaN for floats);
    under "raise" a :class:`NonFiniteInputError` naming them by global row index and the
    chunk (from Dask's ``block_info``; an in-memory array is one chunk, from row 0).

    ``shared_blas`` (a Dask task): on one BLAS thread while chunk tasks run in this
    process (:func:`dkm.engine.passes.one_blas_thread`). The threaded scheduler runs one
    task per core, and each GEMM's own BLAS threads on top oversubscribed the cores: a
    mixture's labels of 2,000,000 × 16 rows took longer than its fit."""
    with one_blas_thread() if shared_blas else nullcontext():
        bad = nonfinite_rows(X)
        if bad is not None:
            if nan_policy != "drop":
                offset, chunk = 0, None
                if isinstance(block_info, dict) and 0 in block_info:
                    offset = int(block_info[0]["array-location"][0][0])
                    chunk = int(block_info[0]["chunk-location"][0])
                rows = tuple(int(r) + offset for r in np.flatnonzero(bad)[:NAMED_ROWS])
                raise NonFiniteInputError(
                    int(np.count_nonzero(bad)), rows, chunk, in_chunk=True, remedy=LABEL_REMEDY
                )
            X = np.where(bad[:, None], origin.astype(X.dtype), X)
        out = fn(K.centred(X, origin, params.covariance_type), params)
    if bad is not None:  # dropped rows: label -1, no probabilities, distances or density
        out[bad] = -1 if out.dtype.kind == "i" else np.nan
    return out


def lazy_labels(data: ChunkedData, params: MixtureParams) -> da.Array:
    return _map_chunks(K.predict_labels, data, params, name="dkm-predict", out_dtype=np.int64)


def lazy_proba(data: ChunkedData, params: MixtureParams) -> da.Array:
    return _map_chunks(
        K.predict_proba,
        data,
        params,
        name="dkm-proba",
        out_dtype=np.float64,
        n_columns=params.n_components,
    )


def lazy_score_samples(data: ChunkedData, params: MixtureParams) -> da.Array:
    return _map_chunks(K.score_samples, data, params, name="dkm-score", out_dtype=np.float64)


def lazy_distances(data: ChunkedData, params: MixtureParams) -> da.Array:
    dtype = K.compute_dtype(np.dtype(data.X.dtype), "identity")
    return _map_chunks(
        K.distances,
        data,
        params,
        name="dkm-transform",
        out_dtype=dtype,
        n_columns=params.n_components,
    )


def apply_in_memory(
    fn: Callable[..., NDArray[Any]],
    X: NDArray[Any],
    params: MixtureParams,
    origin: F64,
    nan_policy: str = "raise",
) -> NDArray[Any]:
    """The same kernel on an in-memory array (no Dask), for NumPy inputs."""
    return _apply_kernel(X, fn, params.translated(-origin), origin, nan_policy)
