"""The benchmark harness's quick suite runs with every contender (so it cannot rot).

No timing is asserted: only that every contender ran, that the final objectives agree
(the harness exits 1 otherwise) and that the BLAS in use is reported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_python(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` from the repository root, output captured, exit status kept."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


CONTENDERS = (
    "dkm threads",
    "dkm LocalCluster",
    "scikit-learn KMeans lloyd",
    "scikit-learn GaussianMixture",
    "FAISS Kmeans",
    "dask-ml KMeans",
)


@pytest.mark.slow
def test_quick_suite_runs_every_contender_and_objectives_agree():
    result = run_python(["-m", "benchmarks", "--suite", "quick"], timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "final objectives agree everywhere" in out
    assert "MISMATCH" not in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    for workload in (
        *("KM-1", "KM-2", "GMM-1-full", "GMM-1-tied", "GMM-1-diag", "GMM-1-spherical"),
        *("KM-3", "KM-4", "GMM-2-full", "GMM-2-diag", "GMM-3-full", "WIDE"),
    ):
        assert any(line.startswith(f"| {workload} ") for line in table), workload
    for contender in CONTENDERS:
        assert any(f"| {contender} |" in line for line in table), contender
    assert "| scaling: 4x points" in out
    assert "| overhead: KM-1 16 chunks, dkm threads |" in out
    (cluster,) = [line for line in table if "overhead: KM-1 16 chunks, dkm LocalCluster" in line]
    assert "the cluster's round trip, one trivial task a worker:" in cluster
    # the chunks workload: its table, threaded and on a LocalCluster, and the cluster's costs
    for scheduler in ("threads", "LocalCluster 2x1"):
        for chunks in (2, 16):
            assert any(line.startswith(f"| {scheduler} | {chunks} |") for line in table)
    assert "| cost: LocalCluster 2x1 per byte gathered |" in out
    assert "openblas" in out.lower() or "mkl" in out.lower()
    # the harness reads the OpenBLAS variables but never sets them
    assert "env         OPENBLAS_CORETYPE=" in out


def test_bad_arguments_exit_2():
    result = run_python(["-m", "benchmarks", "--suite", "quick", "--workload", "km9"], timeout=120)
    assert result.returncode == 2
    assert "--workload" in result.stderr and "km9" in result.stderr


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import cli, common

    return cli, common


def test_harness_inertia_matches_scikit_learn(bench_modules):
    """The one evaluator of every k-means contender's final centres, against sklearn."""
    from sklearn.cluster import KMeans

    _, common = bench_modules
    X = common.make_blobs(5_000, 6, 7, np.float32, anisotropic=False)
    C0 = common.random_rows(X, 7)
    km = KMeans(7, init=C0, n_init=1, max_iter=3, tol=0.0).fit(X.astype(np.float64))
    got = common.inertia(X, km.cluster_centers_, block=999)  # several blocks
    np.testing.assert_allclose(got, -km.score(X.astype(np.float64)), rtol=1e-10)


def test_harness_inertia_bounds_its_distance_blocks_by_k(bench_modules, monkeypatch):
    """Blocks of at most INERTIA_BLOCK_ELEMENTS distances, however many centres: KM-3's
    k = 8,192 in 65,536-row blocks made temporaries of 4 GB each."""
    import tracemalloc

    _, common = bench_modules
    monkeypatch.setattr(common, "INERTIA_BLOCK_ELEMENTS", 1 << 16, raising=False)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2_000, 4)).astype(np.float32)
    C = rng.standard_normal((4_096, 4))
    expected = common.inertia(X, C, block=2_000)
    tracemalloc.start()
    try:
        got = common.inertia(X, C)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert peak < 8 << 20, peak  # one 2,000-row block: 65 MB a temporary


def test_km3_starts_from_the_first_rows_of_each_blob(bench_modules):
    """KM-3's centres: the first rows drawn from each blob, as many from each."""
    _, common = bench_modules
    X, labels = common.blobs(3_000, 4, 10, np.float32, anisotropic=False)
    np.testing.assert_array_equal(X, common.make_blobs(3_000, 4, 10, np.float32, anisotropic=False))
    rows = common.first_rows(labels, 10, 3)
    assert rows.shape == (30,) and np.all(np.diff(rows) > 0)
    for blob in range(10):
        np.testing.assert_array_equal(
            rows[labels[rows] == blob], np.flatnonzero(labels == blob)[:3]
        )
    with pytest.raises(ValueError, match="fewer than 400"):
        common.first_rows(labels, 10, 400)


def test_a_disagreeing_objective_fails_the_run(bench_modules, capsys):
    cli, common = bench_modules

    def run(contender: str, objective: float, workload: str = "KM-1 tiny") -> object:
        return common.Run(
            workload, contender, 1.0, 5, (0.2,) * 5, objective, is_dkm="dkm" in contender
        )

    agreeing = [run("dkm threads", 100.0), run("scikit-learn KMeans lloyd", 100.00001)]
    assert cli.print_results(agreeing)
    assert not cli.print_results([*agreeing, run("FAISS Kmeans", 100.1)])
    gmm = [
        run("dkm threads", -3.0, "GMM-1-full tiny"),
        run("scikit-learn GaussianMixture", -3.00001, "GMM-1-full tiny"),
    ]
    assert not cli.print_results(gmm)  # 1e-5 > the 1e-6 GMM tolerance
    assert "MISMATCH" in capsys.readouterr().out


def test_a_missing_contender_is_named_with_the_install_command(bench_modules, monkeypatch, capsys):
    import importlib.util

    cli, _ = bench_modules
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dask_ml" else real(name, *a)
    )
    assert cli.main(["--suite", "quick"]) == 2
    err = capsys.readouterr().err
    assert "dask-ml (or pass --no-dask-ml)" in err and '".[bench]"' in err


@pytest.mark.slow
def test_out_of_core_run_completes_and_reports_memory_and_spill():
    """``bench_outofcore.py --quick``: a real `dkm run` on a streamed store, its process
    tree sampled. Only that it completes and reports is asserted, not a figure."""
    result = run_python(["benchmarks/bench_outofcore.py", "--quick", "--iters", "2"], timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "persisted=False" in out  # streamed from the store, not held in memory
    assert "read + decompress the store once" in out
    assert "peak summed RSS of" in out and "(target < 4.0 GB: met)" in out
    assert "spilled: 0 bytes" in out


def test_out_of_core_without_a_store_exits_2():
    result = run_python(
        ["benchmarks/bench_outofcore.py", "--store", "/nonexistent.zarr"], timeout=60
    )
    assert result.returncode == 2
    assert "--store" in result.stderr


def test_fashion_mnist_is_read_from_its_idx_files(bench_modules, tmp_path, monkeypatch):
    """The wide workload's data: the idx files' images in order (training, then test),
    flattened to float32 rows; without the files, the synthetic stand-in, named so."""
    import gzip

    from benchmarks import bench_wide

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for n in (5, 3)]
    for name, data in zip(bench_wide.FASHION_MNIST_FILES, images, strict=True):
        header = b"".join(v.to_bytes(4, "big") for v in (0x0803, *data.shape))
        (tmp_path / name).write_bytes(gzip.compress(header + data.tobytes()))
    monkeypatch.setenv("DKM_FASHION_MNIST", str(tmp_path))
    X, source = bench_wide.fashion_mnist(7)
    assert source == "Fashion-MNIST" and X.dtype == np.float32
    np.testing.assert_array_equal(X, np.concatenate(images).reshape(8, 784)[:7])

    monkeypatch.setenv("DKM_FASHION_MNIST", str(tmp_path / "absent"))
    X, source = bench_wide.fashion_mnist(50)
    assert source == "synthetic" and X.shape == (50, 784) and X.dtype == np.float32
    assert X.min() >= 0.0 and X.max() <= 255.0


def test_a_file_that_is_not_idx_images_is_named(bench_modules, tmp_path):
    import gzip

    from benchmarks import bench_wide

    bad = tmp_path / "labels.gz"
    bad.write_bytes(gzip.compress((0x0801).to_bytes(4, "big") + bytes(8)))
    with pytest.raises(ValueError, match=r"labels\.gz is not an idx3 image file"):
        bench_wide._idx_images(bad)
