"""Per-iteration benchmarks of dkm against scikit-learn, FAISS, dask-ml (issue 5) and
Spark MLlib (issue 22).

Run from the repository root, leaving OpenBLAS to detect the CPU itself::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks --suite full

Every contender of a workload gets the same data and the same initial parameters,
runs a fixed number of iterations (``tol=0``) in the same process, one after the
other; the harness prints the median milliseconds per iteration, the ratio of each
contender to dkm, every final objective (exit status 1 when they disagree) and the
BLAS libraries in use. See ``benchmarks/README.md``.
"""
