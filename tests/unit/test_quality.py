"""The lint and type checks configured in pyproject.toml, run as part of the suite."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    """Kernels, statistics, the covariance types and the option names are NumPy/SciPy
    only (DESIGN.md's layering)."""
    below = ("stats.py", "covariance.py", "_typing.py")
    for path in [*(ROOT / "dkm" / "kernels").glob("*.py"), *(ROOT / "dkm" / n for n in below)]:
        text = path.read_text()
        assert "import dask" not in text and "from dask" not in text, path


def test_import_contracts_are_kept():
    """DESIGN.md's layers, as the import-linter contracts in pyproject.toml."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    assert exe is not None, "import-linter is not installed: pip install -e '.[test]'"
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _names_in(node: ast.AST, names: set[str]) -> set[str]:
    """The string constants among ``names`` in ``node`` or, for a tuple, list or set, in
    its elements."""
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}


def test_covariance_types_are_asked_not_compared():
    """Per-type behaviour lives in dkm/covariance.py: no other module compares a value
    with a covariance type's or moments' name, or keys a dict by them."""
    from dkm._typing import COVARIANCE_TYPES, MOMENTS

    names = set(COVARIANCE_TYPES) | set(MOMENTS)
    found = []
    for path in sorted((ROOT / "dkm").rglob("*.py")):
        if path.name in ("covariance.py", "_typing.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                hits = set().union(*(_names_in(n, names) for n in [node.left, *node.comparators]))
            elif isinstance(node, ast.Dict):
                hits = set().union(*(_names_in(k, names) for k in node.keys if k is not None))
                hits = hits if len(hits) > 1 else set()
            else:
                continue
            if hits:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(hits)}")
    assert not found, "ask dkm.covariance instead:\n" + "\n".join(found)


#: The estimators' private state; other modules use ``mixture_``, ``from_model``,
#: ``objective_`` and ``fit_candidates`` (see dkm/estimators.py).
ESTIMATOR_PRIVATE = {"_params", "_origin", "_fit_candidates", "_model_params", "_set_params"}
ESTIMATOR_PRIVATE |= {"_set_mixture", "_set_common", "_mixture", "_final", "_adopt"}


def private_reaches(source: str) -> list[int]:
    """Lines of ``source`` reading or writing an attribute in ``ESTIMATOR_PRIVATE`` of
    something other than ``self`` (a class's own attribute of the same name is its own)."""
    return sorted(
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr in ESTIMATOR_PRIVATE
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    )


def test_fitted_state_is_reached_only_through_the_estimators_door():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("dkm", "tests", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name not in ("estimators.py", "test_quality.py")
        for line in private_reaches(path.read_text())
    ]
    assert not found, "use mixture_ / from_model / fit_candidates:\n" + "\n".join(found)


def test_private_reaches_are_found():
    source = "est._origin = o\nx = m._params.means\nm.mixture_.params\nself._origin(o)\n"
    assert private_reaches(source) == [1, 2]
