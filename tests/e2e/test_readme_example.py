"""The README's "Using the estimators" example runs as written (on fewer points)."""

from __future__ import annotations

import re
from pathlib import Path

import dask.array as da
import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def example() -> str:
    text = README.read_text()
    section = text[text.index("## Using the estimators") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's estimator example"
    return match.group(1)


def test_the_readme_example_runs_on_fewer_points():
    code = example()
    assert "10_000_000" in code and "500_000" in code
    small = code.replace("10_000_000", "60_000").replace("500_000", "10_000")
    namespace: dict = {}
    exec(compile(small, str(README), "exec"), namespace)
    km, gm, X = namespace["km"], namespace["gm"], namespace["X"]
    assert X.shape == (60_000, 16) and X.numblocks[0] == 6
    assert km.cluster_centers_.shape == (64, 16) and km.converged_
    labels = namespace["labels"]
    assert isinstance(labels, da.Array) and labels.compute().max() < 64
    assert gm.means_.shape == (8, 16) and gm.converged_
    proba = gm.predict_proba(X)
    assert isinstance(proba, da.Array)
    np.testing.assert_allclose(proba[:100].compute().sum(axis=1), 1.0, rtol=1e-12)
    bic, score = gm.bic(X), gm.score(X)
    assert np.isfinite(bic) and np.isfinite(score)
