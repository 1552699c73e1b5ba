"""The benchmark harness's smallest workload runs (so it cannot rot); no timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_objectives_agree():
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_iteration.py",
            "--quick",
            "--workload",
            "all",
            "--covariance",
            "full,tied,diag,spherical",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # the harness exits non-zero when any objective disagrees with scikit-learn's
    assert result.returncode == 0, result.stdout + result.stderr
    assert "objectives agree with scikit-learn" in result.stdout
    assert "openblas" in result.stdout.lower() or "mkl" in result.stdout.lower()
