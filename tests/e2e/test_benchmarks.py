"""The benchmark harness's quick suite runs with every contender (so it cannot rot).

No timing is asserted: only that every contender ran, that the final objectives agree
(the harness exits 1 otherwise) and that the BLAS in use is reported. Spark MLlib needs a
Java runtime: where there is none the harness must say it left Spark out and why, unless
``CI=true`` or ``DKM_REQUIRE_SPARK=1`` (set by ``.ci/run`` once it installed Java), where it
must fail.
"""

from __future__ import annotations

import re
import shutil
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
def test_quick_suite_runs_every_contender_and_objectives_agree(bench_modules):
    _, _, spark = bench_modules
    result = run_python(["-m", "benchmarks", "--suite", "quick"], timeout=900)
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
    reason = spark.missing()
    if reason is None or spark.required():  # required and missing: the run failed above
        assert any(
            line.startswith(f"| KM-1 {''}") and "| Spark MLlib KMeans |" in line for line in table
        )
        (gmm,) = [line for line in table if "| Spark MLlib GaussianMixture |" in line]
        assert gmm.startswith("| GMM-1-full ") and "(Spark's EM)" in gmm
        for name, workload in (
            ("Spark ml KMeans block, own start", "KM-1"),
            ("Spark ml GaussianMixture, own start", "GMM-1-full"),
        ):
            (row,) = [line for line in table if f"| {name} |" in line]
            assert row.startswith(f"| {workload} ") and "| own start: not compared |" in row
        assert "spark blas  dev.ludovic.netlib.blas." in out
        assert "Spark MLlib left out" not in out
    else:
        assert f"Spark MLlib left out: {reason}" in out
        assert not any("| Spark MLlib" in line for line in table)
    assert "| scaling: 4x points" in out
    assert "| overhead: KM-1 16 chunks, dkm threads |" in out
    (cluster,) = [line for line in table if "overhead: KM-1 16 chunks, dkm LocalCluster" in line]
    assert "the cluster's round trip, one trivial task a worker:" in cluster
    # the chunks workload: its table, threaded and on a LocalCluster, and the cluster's costs
    for scheduler in ("threads", "LocalCluster 2x1"):
        for chunks in (2, 16):
            assert any(line.startswith(f"| {scheduler} | {chunks} |") for line in table)
    assert "| cost: LocalCluster 2x1 per byte gathered |" in out
    # the time-to-model workload: every contender with its own defaults, its targets
    ttm = [line for line in table if line.startswith("| TTM-")]
    for workload, contenders in (
        ("TTM-KM", ("dkm KMeans", "scikit-learn KMeans", "FAISS Kmeans", "dask-ml KMeans")),
        ("TTM-GMM", ("dkm GaussianMixture", "scikit-learn GaussianMixture")),
    ):
        for contender in contenders:
            assert any(
                line.startswith(f"| {workload} ") and f"| {contender} |" in line for line in ttm
            )
        assert any(
            line.startswith(f"| {workload} ")
            and "time-to-model" not in line
            and ("| met |" in line or "| MISSED |" in line)
            for line in ttm
        ), workload
    spark_ttm = [line for line in ttm if "| Spark ml " in line and "time-to-model" not in line]
    assert bool(spark_ttm) == (reason is None or spark.required())
    for line in spark_ttm:  # the labels: one pass over the cached rows
        assert " fit + 1 labels (" in line, line
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
    from benchmarks import cli, common, spark

    return cli, common, spark


def test_harness_inertia_matches_scikit_learn(bench_modules):
    """The one evaluator of every k-means contender's final centres, against sklearn."""
    from sklearn.cluster import KMeans

    _, common, _ = bench_modules
    X = common.make_blobs(5_000, 6, 7, np.float32, anisotropic=False)
    C0 = common.random_rows(X, 7)
    km = KMeans(7, init=C0, n_init=1, max_iter=3, tol=0.0).fit(X.astype(np.float64))
    got = common.inertia(X, km.cluster_centers_, block=999)  # several blocks
    np.testing.assert_allclose(got, -km.score(X.astype(np.float64)), rtol=1e-10)


def test_harness_inertia_bounds_its_distance_blocks_by_k(bench_modules, monkeypatch):
    """Blocks of at most INERTIA_BLOCK_ELEMENTS distances, however many centres: KM-3's
    k = 8,192 in 65,536-row blocks made temporaries of 4 GB each."""
    import tracemalloc

    _, common, _ = bench_modules
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
    _, common, _ = bench_modules
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
    cli, common, _ = bench_modules

    def run(
        contender: str, objective: float, workload: str = "KM-1 tiny", **kwargs: object
    ) -> object:
        return common.Run(
            workload, contender, 1.0, 5, (0.2,) * 5, objective, is_dkm="dkm" in contender, **kwargs
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
    # a run with its own reference (Spark's mixture: the EM it runs, in NumPy) is checked
    # against that, not against scikit-learn's run
    agreeing_gmm = gmm[1:]
    spark = "Spark MLlib GaussianMixture"
    own = run(spark, -3.0006, "GMM-1-full tiny", reference_objective=-3.0006000001)
    assert cli.print_results([*agreeing_gmm, own])
    assert "(Spark's EM)" in capsys.readouterr().out
    far = run(spark, -3.00001, "GMM-1-full tiny", reference_objective=-3.0006)
    assert not cli.print_results([*agreeing_gmm, far])  # matches scikit-learn's, not its own
    # a run from the library's own start is not compared at all
    own_start = run("Spark ml GaussianMixture, own start", -2.9, "GMM-1-full tiny", own_start=True)
    assert cli.print_results([*agreeing_gmm, own_start])
    assert "| own start: not compared |" in capsys.readouterr().out


def test_a_missing_contender_is_named_with_the_install_command(bench_modules, monkeypatch, capsys):
    import importlib.util

    cli, _, _ = bench_modules
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dask_ml" else real(name, *a)
    )
    assert cli.main(["--suite", "quick"]) == 2
    err = capsys.readouterr().err
    assert "dask-ml (or pass --no-dask-ml)" in err and '".[bench]"' in err


def _without_java(monkeypatch, tmp_path):
    """No ``java`` on PATH and no JAVA_HOME; nor CI's requirement unless a test sets it."""
    for var in ("JAVA_HOME", "CI", "DKM_REQUIRE_SPARK"):
        monkeypatch.delenv(var, raising=False)
    # joblib's loky counts physical cores with `cat` once per process and warns (an
    # error here) without it: keep it on the PATH that has no java
    cat = shutil.which("cat")
    if cat is not None and not (tmp_path / "cat").exists():
        (tmp_path / "cat").symlink_to(cat)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_a_missing_java_is_named_with_the_package(bench_modules, monkeypatch, tmp_path):
    _, _, spark = bench_modules
    _without_java(monkeypatch, tmp_path)
    reason = spark.missing()
    assert reason is not None and "no Java runtime (java on PATH not found)" in reason
    assert "apt-get install openjdk-17-jre-headless" in reason
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # a JAVA_HOME without bin/java
    assert "$JAVA_HOME/bin/java not found" in str(spark.missing())
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    assert spark.java() == str(java)


@pytest.mark.parametrize("var", ["CI", "DKM_REQUIRE_SPARK"])
def test_a_missing_spark_fails_where_it_is_required(
    bench_modules, monkeypatch, tmp_path, capsys, var
):
    cli, _, _ = bench_modules
    _without_java(monkeypatch, tmp_path)
    monkeypatch.setenv(var, "true" if var == "CI" else "1")
    assert cli.main(["--suite", "quick", "--workload", "km1"]) == 2
    err = capsys.readouterr().err
    assert "Spark MLlib cannot run: " in err and "openjdk-17-jre-headless" in err
    assert "--no-spark" in err
    # asked to leave Spark out, or no workload of it: nothing is required
    monkeypatch.setattr(cli, "Bench", _NoBench)
    for argv in (["--workload", "km1", "--no-spark"], ["--workload", "km2"]):
        with pytest.raises(_NoBench.Reached):
            cli.main(["--suite", "quick", *argv])


class _NoBench:
    """Stands in for the harness's Bench: the checks before the workloads have passed."""

    class Reached(Exception):
        pass

    def __init__(self, options: object) -> None:
        raise self.Reached(options)


def test_without_java_spark_is_left_out_and_said_so(bench_modules, monkeypatch, tmp_path, capsys):
    """Outside CI the run goes on without Spark and says why, at the top and the end."""
    cli, _, _ = bench_modules
    _without_java(monkeypatch, tmp_path)
    argv = ["--suite", "quick", "--workload", "gmm1", "--covariance", "full"]
    assert cli.main([*argv, "--no-local-cluster"]) == 0
    out = capsys.readouterr().out
    assert out.count("Spark MLlib left out: no Java runtime (java on PATH not found)") == 2
    assert "spark=False" in out and "| Spark MLlib" not in out
    assert "| GMM-1-full " in out


def test_spark_iterations_are_the_jobs_of_the_call_site_run_once_an_iteration(bench_modules):
    _, _, spark = bench_modules
    Job = spark.Job
    jobs = [
        Job("first at GaussianMixture.scala:172", 1.0),
        *(Job("treeAggregate at GaussianMixture.scala:204", t) for t in (0.5, 0.2, 0.3)),
        Job("collect at X.scala:1", 9.0),
    ]
    assert spark.iteration_seconds(jobs, 3) == (0.5, 0.2, 0.3)
    # another call site run as often: the longer-running one
    assert spark.iteration_seconds([*jobs, *[Job("count at Y", 0.01)] * 3], 3) == (0.5, 0.2, 0.3)
    assert spark.iteration_seconds(jobs, 4) == ()
    assert spark.iteration_seconds([], 0) == ()


def test_spark_fit_timing_reads_the_long_fits_jobs_and_differences_the_two(
    bench_modules, monkeypatch
):
    """Iterations from the n-iteration fit's own jobs; the cross-check
    (t(n) − t(1)) / (n_iter(n) − n_iter(1)); nan where the long fit stopped as early.
    The fits advance a clock of the test's own (no sleeping, no wall-clock figures)."""
    import contextlib
    import math
    import types

    _, _, spark = bench_modules
    runs: list[int] = []
    now = [0.0]
    monkeypatch.setattr(spark, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    class FakeSpark:
        @contextlib.contextmanager
        def job_group(self):
            jobs: list = []
            yield jobs
            jobs.extend(spark.Job("iteration", 0.001 * i) for i in range(runs[-1]))
            jobs.append(spark.Job("setup", 1.0))

    def fit(max_iter: int) -> tuple[int, str]:
        runs.append(max_iter)
        now[0] += 0.05 + 0.02 * max_iter
        return max_iter, f"model {max_iter}"

    timing = spark._timed(FakeSpark(), fit, 4)
    assert runs == [1, 4] and timing.result == "model 4" and timing.n_iter == 4
    assert timing.iter_seconds == (0.0, 0.001, 0.002, 0.003)
    assert timing.seconds == pytest.approx(0.13, abs=0.04)
    assert timing.differenced == pytest.approx(0.02, abs=0.01)

    def stops_at_once(max_iter: int) -> tuple[int, None]:
        runs.append(1)
        return 1, None

    assert math.isnan(spark._timed(FakeSpark(), stops_at_once, 4).differenced)


def test_spark_em_reference_is_scikit_learn_without_reg_covar_where_densities_exceed_eps(
    bench_modules,
):
    """The reference of Spark's mixture: scikit-learn's EM with reg_covar=0 while every row
    has a weighted density above ε; a row far from every component gets ε-dominated,
    nearly uniform responsibilities instead of joining the nearest component."""
    import sklearn.mixture

    from benchmarks.workloads import gmm_init

    _, common, spark = bench_modules
    X = common.make_blobs(3_000, 3, 3, np.float64, anisotropic=True)
    init = gmm_init(X, 3, "full")

    def sklearn_score(X: np.ndarray) -> float:
        gm = sklearn.mixture.GaussianMixture(
            3, covariance_type="full", tol=0.0, max_iter=4, reg_covar=0.0, **init
        )
        with common.quiet():
            return float(gm.fit(X).score(X))

    assert spark.spark_em_score(X, init, 4) == pytest.approx(sklearn_score(X), abs=1e-10)
    far = np.vstack([X, np.full((5, 3), 1e3)])
    assert abs(spark.spark_em_score(far, init, 4) - sklearn_score(far)) > 1e-2


@pytest.mark.slow
def test_spark_mixture_runs_its_em_from_the_same_start_every_fit(bench_modules):
    """Spark's mixture, refitted from one start (the warm-up, then 1 and 5 iterations),
    lands where its EM does after 5 iterations from that start: its fit updates the
    initial model in place, so each fit needs a new one. Without Java (outside CI) the
    harness's reason is checked instead."""
    from benchmarks.workloads import gmm_init

    _, common, spark = bench_modules
    reason = spark.missing()
    if reason is not None and not spark.required():
        assert "no Java runtime" in reason or "pyspark is not installed" in reason
        return
    X = common.make_blobs(20_000, 4, 4, np.float64, anisotropic=True)
    init = gmm_init(X, 4, "full")
    session = spark.Spark()
    try:
        rows = session.rows(X, 2)
        run = spark.gmm(session, rows, "GMM tiny", X, init, 5)
    finally:
        session.close()
    assert run.n_iter == 5 and len(run.iter_seconds) == 5
    assert run.reference_objective == pytest.approx(spark.spark_em_score(X, init, 5), abs=0)
    assert abs(run.objective - run.reference_objective) < 1e-9


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


def test_ttm_counts_dkm_passes_as_its_schedule_makes_them(bench_modules):
    """Rows read through the counting array / n: the summary pass, the iterations on all
    the data, k-means' final pass and the labels pass, none for the sample's iterations
    (the sample is drawn in the summary pass)."""
    from benchmarks import bench_ttm

    _, common, _ = bench_modules
    X = common.make_blobs(70_000, 3, 2, np.float32, anisotropic=False)  # 8 x 4096 k rows
    row = bench_ttm.dkm_kmeans("TTM-KM tiny", X, 2)
    iterations, sampled = (int(v) for v in re.findall(r"\d+", row.n_iter))
    assert sampled > 0  # the default schedule sampled
    assert row.passes == 1 + iterations + 1 + 1
    assert f"= {int(row.passes)})" in row.passes_detail
    gmm = bench_ttm.dkm_gmm("TTM-GMM tiny", X.astype(np.float64), 2)
    iterations, sampled = (int(v) for v in re.findall(r"\d+", gmm.n_iter))
    assert sampled > 0 and gmm.passes == 1 + iterations + 1
    assert "init" not in gmm.passes_detail  # the init ran on the first sample


def test_ttm_targets_compare_dkm_with_the_fastest_contender_near_the_best(bench_modules):
    from benchmarks.bench_ttm import TtmRow, targets

    def row(contender: str, seconds: float, objective: float, passes: float = 4) -> TtmRow:
        workload = "TTM-GMM tiny" if "Mixture" in contender else "TTM-KM tiny"
        return TtmRow(
            workload,
            contender,
            0.0,
            seconds,
            0.0,
            passes,
            "",
            objective,
            "1",
            "",
            "dkm" in contender,
        )

    fast_but_poor = row("FAISS Kmeans", 0.5, 110.0)  # outside 0.5 % of the best
    sklearn = row("scikit-learn KMeans", 3.0, 100.2)
    (line,) = targets([row("dkm KMeans", 1.0, 100.0), sklearn, fast_but_poor])
    assert "(scikit-learn KMeans)" in line and "| 0.333;" in line and line.endswith("| met |")
    for dkm_row in (row("dkm KMeans", 1.6, 100.0), row("dkm KMeans", 1.0, 100.0, passes=6)):
        (line,) = targets([dkm_row, sklearn, fast_but_poor])
        assert line.endswith("| MISSED |")
    (line,) = targets([row("dkm KMeans", 1.0, 100.6), sklearn, row("FAISS Kmeans", 9.0, 100.0)])
    assert line.endswith("| MISSED |")  # dkm's own inertia 0.6 % off the best
    mixture = row("scikit-learn GaussianMixture", 5.0, -1.0)
    (line,) = targets([row("dkm GaussianMixture", 1.0, -1.0005), mixture])
    assert "| 0.200;" in line and line.endswith("| met |")
    (line,) = targets([row("dkm GaussianMixture", 1.0, -1.002), mixture])
    assert line.endswith("| MISSED |")
