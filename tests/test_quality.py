"""The lint and type checks configured in pyproject.toml, run as part of the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "dkm", "tests", "benchmarks"],
        ["ruff", "format", "--check", "dkm", "tests", "benchmarks"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(command):
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernels_do_not_import_dask():
    """Kernels and statistics are NumPy/SciPy only (DESIGN.md's layering)."""
    for path in [*(ROOT / "dkm" / "kernels").glob("*.py"), ROOT / "dkm" / "stats.py"]:
        text = path.read_text()
        assert "import dask" not in text and "from dask" not in text, path


def test_import_contracts_are_kept():
    """DESIGN.md's layers, as the import-linter contracts in pyproject.toml."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    assert exe is not None, "import-linter is not installed: pip install -e '.[test]'"
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
