"""What `dkm run` and `dkm recluster` print: the dashboard link first, warnings once in the
job's own words (hidden by --quiet, a record in the JSON log), refusals once, and
`dkm models list` with a column per fact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import blobs

from dkm.cli import main
from dkm.recluster import EXIT_REFUSED


@pytest.fixture
def config(tmp_path, scheduler) -> Path:
    np.save(tmp_path / "points.npy", blobs(n=900, d=3, k=3))
    raw = {
        "data": {"kind": "npy", "path": str(tmp_path / "points.npy"), "chunk_rows": 300},
        "model": {"mode": "gmm", "n_clusters": 3, "seed": 0, "max_iter": 1},
        "cluster": {"kind": "address", "address": scheduler},
        "output": {"path": str(tmp_path / "out")},
        "registry": {"location": str(tmp_path / "reg"), "name": "r"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code in (0, EXIT_REFUSED), result.output
    return result


@pytest.mark.parametrize("command", ["run", "recluster"])
def test_dashboard_link_is_the_first_line(config, command):
    result = invoke(command, str(config))
    first = result.stderr.splitlines()[0]
    assert "dashboard http://" in first, result.stderr
    assert first.split(" ", 1)[1].startswith("dashboard http://")


def test_warnings_are_job_lines_once_and_quiet_hides_them(config, tmp_path):
    result = invoke("run", str(config))
    lines = [line for line in result.stderr.splitlines() if "warning" in line.split(": ")[0]]
    assert len(lines) == 1, result.stderr
    assert "warning: Best of 1 EM run(s) with 3 components did not converge" in lines[0]
    assert "(ConvergenceWarning)" in lines[0]
    assert ".py:" not in result.stderr  # no file:line and code line of Python's warning
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["warnings"]) == 1 and "did not converge" in summary["warnings"][0]

    quiet = invoke("run", str(config), "--overwrite", "-q")
    assert quiet.stderr == "" and quiet.stdout == ""

    logged = invoke("run", str(config), "--overwrite", "--log-format", "json")
    records = [json.loads(line) for line in logged.stderr.splitlines()]
    warnings = [r for r in records if r["event"] == "warning"]
    assert len(warnings) == 1 and "did not converge" in warnings[0]["message"]
    assert records[0]["event"] == "start" and "dashboard" in records[0]


def test_refusal_is_told_once_and_models_list_has_a_column_per_fact(config, tmp_path):
    invoke("recluster", str(config), "--set", "model.mode=kmeans", "--set", "model.max_iter=50")
    # other data, and a guard no change passes: the second model is refused
    np.save(tmp_path / "other.npy", blobs(n=900, d=3, k=3, seed=5))
    refuse = (
        "--overwrite",
        "--set",
        "model.mode=kmeans",
        "--set",
        f"data.path={tmp_path / 'other.npy'}",
        "--set",
        "registry.guards.max_weight_loss=0.0",
    )
    result = invoke("recluster", str(config), *refuse)
    assert result.exit_code == EXIT_REFUSED, result.output
    assert result.output.count("kept as a candidate") == 1, result.output
    quiet = invoke("recluster", str(config), "-q", *refuse)
    assert quiet.exit_code == EXIT_REFUSED and quiet.output.count("kept as a candidate") == 1
    listing = invoke("models", "list", str(config)).stdout.splitlines()
    header = ["version", "created", "decision", "fit", "model", "objective", "data"]
    assert listing[0].split() == header
    v1 = listing[1].split()  # still current: the later models were refused
    assert v1[:2] == ["*", "v1"] and v1[3:6] == ["promoted", "first", "fit"], listing
    assert "first  first" not in "\n".join(listing)
    assert all("kmeans k=3" in line for line in listing[1:]), listing
    assert "refused" in listing[2] and "refit" in listing[2] and len(listing) == 4
