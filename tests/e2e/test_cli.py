"""The ``dkm`` command end to end, as a subprocess, on zarr stores in a temp dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import _free_port

import dkm
from dkm import io

DKM = [sys.executable, "-m", "dkm.cli"]


def dkm_cmd(*args: str, cwd: Path, check: bool = True, timeout: float = 300):
    result = subprocess.run(
        [*DKM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"dkm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def write_config(path: Path, **sections) -> Path:
    base = {
        "data": {"kind": "zarr", "url": "data.zarr", "array": "points"},
        "model": {"mode": "kmeans", "n_clusters": 4, "seed": 0},
        "cluster": {
            "kind": "local",
            "n_workers": 2,
            "processes": False,
            "dashboard_address": "127.0.0.1:0",
        },
        "output": {"path": "out"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("cli")
    dkm_cmd(
        "make-data",
        "--n",
        "20000",
        "--d",
        "3",
        "--k",
        "4",
        "--seed",
        "1",
        "--chunk-rows",
        "5000",
        "--out",
        "data.zarr",
        cwd=wd,
    )
    return wd


def test_make_data_writes_a_chunked_store(workdir):
    points = io.open_zarr(str(workdir / "data.zarr"), "points")
    assert points.X.shape == (20000, 3) and points.X.chunks[0] == (5000,) * 4
    assert points.X.dtype == np.float32


def test_run_predict_info_validate(workdir):
    write_config(workdir / "km.yaml")
    out = dkm_cmd("validate", "km.yaml", cwd=workdir)
    assert "ok" in out.stdout
    run = dkm_cmd("run", "km.yaml", cwd=workdir)
    assert "dashboard" in run.stderr and "iteration" in run.stderr
    # the dashboard link is the first line; distributed's own INFO lines are not shown
    assert run.stderr.splitlines()[0].split(" ", 1)[1].startswith("dashboard http://")
    assert "INFO" not in run.stderr, run.stderr[:2000]
    outdir = workdir / "out"
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["n_samples"] == 20000 and summary["mode"] == "kmeans"
    metrics = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == summary["n_iter"] and metrics[0]["iteration"] == 1
    for name in ("convergence.png", "sizes.png", "projection.png", "index.html"):
        assert (outdir / "report" / name).stat().st_size > 0
    # the model reloads into a working estimator equal to the fitted one
    model = dkm.load_model(str(outdir / "model"))
    assert isinstance(model, dkm.KMeans)
    X = io.open_zarr(str(workdir / "data.zarr"), "points").X.compute()
    import zarr

    labels_array = zarr.open_group(str(outdir / "labels.zarr"), mode="r")["labels"]
    assert labels_array.chunks == (5000,)  # the input's row chunks
    stored = labels_array[:]
    ref = dkm.KMeans(4, random_state=0).fit(X)
    np.testing.assert_allclose(model.cluster_centers_, ref.cluster_centers_, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stored), model.predict(X))
    assert summary["objective"] == pytest.approx(ref.inertia_, rel=1e-6)
    # predict and info; the output folder stands for its model
    import zarr

    for model_dir, out in [("out/model", "pred.zarr"), ("out", "pred-from-folder.zarr")]:
        args = ["--model", model_dir, "--data", "data.zarr", "--array", "points", "--out", out]
        dkm_cmd("predict", *args, cwd=workdir)
        pred = zarr.open_group(str(workdir / out), mode="r")["labels"][:]
        np.testing.assert_array_equal(pred, model.predict(X))
    info = dkm_cmd("info", "out/model", cwd=workdir).stdout
    assert "KMeans" in info and summary["data_fingerprint"] in info and "km.yaml" in info
    assert dkm_cmd("info", "out", cwd=workdir).stdout == info


def test_predict_hints_name_its_options(tmp_path):
    """dkm predict has no config: its errors name its options, not config keys."""
    io.make_data(str(tmp_path / "data.zarr"), 100, 2, 2, chunk_rows=50)
    km = dkm.KMeans(2, random_state=0).fit(io.open_zarr(str(tmp_path / "data.zarr"), "points").X)
    dkm.save_model(km, str(tmp_path / "model"))
    args = ["predict", "--model", "model", "--data", "data.zarr", "--out", "pred.zarr"]
    no_array = dkm_cmd(*args, cwd=tmp_path, check=False)
    assert no_array.returncode == 2, no_array.stderr
    assert "(--array NAME); it holds the arrays 'labels_true', 'points'" in no_array.stderr
    scheduler = f"tcp://127.0.0.1:{_free_port()}"
    unreachable = dkm_cmd(
        *args, "--array", "points", "--scheduler", scheduler, cwd=tmp_path, check=False
    )
    assert unreachable.returncode == 2, unreachable.stderr
    assert f"cannot reach the Dask scheduler at {scheduler}" in unreachable.stderr
    assert "Check the address given to --scheduler" in unreachable.stderr
    assert "leave out --scheduler to run in-process" in unreachable.stderr
    assert "cluster:" not in unreachable.stderr and "Traceback" not in unreachable.stderr
    assert not (tmp_path / "pred.zarr").exists()


def test_gmm_run_with_overrides_and_json_logs(workdir):
    write_config(
        workdir / "gm.yaml",
        model={"mode": "gmm", "covariance_type": "diag"},
        output={"path": "out-gmm", "responsibilities": True},
    )
    run = dkm_cmd(
        "run", "gm.yaml", "--set", "model.n_clusters=3", "--log-format", "json", cwd=workdir
    )
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert {"start", "iteration", "done"} <= {e["event"] for e in events}
    summary = json.loads((workdir / "out-gmm" / "summary.json").read_text())
    assert summary["n_clusters"] == 3 and summary["covariance_type"] == "diag"
    model = dkm.load_model(str(workdir / "out-gmm" / "model"))
    assert isinstance(model, dkm.GaussianMixture) and model.means_.shape == (3, 3)
    import zarr

    resp = zarr.open_group(str(workdir / "out-gmm" / "responsibilities.zarr"), mode="r")
    assert resp["responsibilities"].shape == (20000, 3)


BAD = [
    ({"model": {"covariance_type": "ful", "mode": "gmm"}}, "model.covariance_type"),
    ({"modle": {}}, "modle: unknown key"),
    ({"model": {"n_clusters": "x"}}, "model.n_clusters"),
    ({"data": {"url": "missing.zarr"}}, "missing.zarr"),
    ({"data": {"array": "nope"}}, "nope"),
    ({"model": {"n_clusters": 50000}}, "n_clusters=50000"),
    ({"output": {"path": "data.zarr/zarr.json/out"}}, "is not a directory"),
]


@pytest.mark.parametrize("sections, message", BAD, ids=[m for _, m in BAD])
def test_bad_config_or_input_exits_2_and_writes_nothing(workdir, tmp_path, sections, message):
    shutil.copytree(workdir / "data.zarr", tmp_path / "data.zarr")
    write_config(tmp_path / "bad.yaml", **sections)
    result = dkm_cmd("run", "bad.yaml", cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "data.zarr"]


@pytest.mark.parametrize("name", ["distributed.batched", "distributed.core"])
def test_closed_comm_notes_at_teardown_carry_no_traceback(name, capsys):
    """A run that stops while distributed still talks logs "comm closed" at INFO with
    the CommClosedError traceback (seen in CI after a bad-input run, intermittently):
    the note stays, the traceback goes; real problems keep theirs."""
    import logging

    from distributed.comm.core import CommClosedError

    from dkm.cluster import connect
    from dkm.config import LocalClusterConfig

    log = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stderr)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with connect(LocalClusterConfig(n_workers=1, processes=False)):
            pass  # installs the filter, as every run does

        def note(level: int, exc: BaseException, message: str) -> str:
            try:
                raise exc
            except BaseException:
                log.log(level, message, exc_info=True)
            return capsys.readouterr().err

        closed = note(logging.INFO, CommClosedError("in: closed"), "Batched Comm Closed")
        assert "Batched Comm Closed" in closed and "Traceback" not in closed
        warned = note(logging.WARNING, CommClosedError("in: closed"), "lost the scheduler")
        assert "lost the scheduler" in warned and "CommClosedError" in warned
        other = note(logging.INFO, ValueError("bad frame"), "Failed to deserialize")
        assert "Traceback" in other and "ValueError: bad frame" in other
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def test_unwritable_output_exits_2(workdir, tmp_path):
    shutil.copytree(workdir / "data.zarr", tmp_path / "data.zarr")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a file as parent
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("a file, not a directory")
        write_config(tmp_path / "c.yaml", output={"path": "locked/out"})
        result = dkm_cmd("run", "c.yaml", cwd=tmp_path, check=False)
        assert result.returncode == 2 and "locked" in result.stderr, result.stderr
    finally:
        if locked.is_dir():
            locked.chmod(0o700)


def test_malformed_yaml_exits_2(tmp_path):
    (tmp_path / "c.yaml").write_text("data: [unclosed\n")
    result = dkm_cmd("run", "c.yaml", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "not valid YAML at line" in result.stderr


def test_python_m_dkm_is_a_small_demo_beside_scikit_learn(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dkm"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "50,000 points x 4 around 6 centres" in out
    inertias = re.findall(r"inertia (\S+?)[,;]", out)
    likelihoods = re.findall(r"mean log-likelihood (\S+?)[,;]", out)
    assert len(inertias) == 2 and inertias[0] == inertias[1], out
    assert len(likelihoods) == 2 and likelihoods[0] == likelihoods[1], out
    differences = [float(x) for x in re.findall(r"differ by at most (\S+)", out)]
    assert len(differences) == 2 and max(differences) < 1e-9, out
    assert not any(tmp_path.iterdir())  # writes nothing


def test_a_bad_set_option_is_named_not_the_file(tmp_path):
    write_config(tmp_path / "base.yaml")
    result = dkm_cmd(
        "validate", "base.yaml", "--set", "model.nclusters=3", cwd=tmp_path, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "dkm: error: invalid --set for base.yaml:\n"
        "  --set model.nclusters=3: model has no key 'nclusters' (did you mean 'n_clusters'?)\n"
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_leaves_previous_output_intact(workdir, tmp_path, sig):
    shutil.copytree(workdir / "data.zarr", tmp_path / "data.zarr")
    write_config(tmp_path / "c.yaml")
    dkm_cmd("run", "c.yaml", cwd=tmp_path)
    before = (tmp_path / "out" / "summary.json").read_text()
    # a second, slow run (large synthetic data, many iterations), killed mid-fit
    write_config(
        tmp_path / "slow.yaml",
        data={
            "kind": "synthetic",
            "n": 2_000_000,
            "d": 8,
            "k": 50,
            "url": None,
            "array": None,
            "chunk_rows": 100_000,
        },
        model={"n_clusters": 50, "tol": 0.0, "max_iter": 1000},
    )
    raw = yaml.safe_load((tmp_path / "slow.yaml").read_text())
    raw["data"] = {k: v for k, v in raw["data"].items() if v is not None}
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [*DKM, "run", "slow.yaml"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "iteration" in line or time.monotonic() > deadline:
            break
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert (tmp_path / "out" / "summary.json").read_text() == before
    assert not (tmp_path / "out" / "model").is_symlink()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    if sig == signal.SIGINT:
        assert leftovers == []  # an interrupt cleans its temporary directory up


@pytest.mark.distributed
def test_run_on_real_scheduler_and_status(workdir, tmp_path, dask_processes):
    shutil.copytree(workdir / "data.zarr", tmp_path / "data.zarr")
    write_config(tmp_path / "c.yaml", cluster={"kind": "address", "address": dask_processes})
    raw = yaml.safe_load((tmp_path / "c.yaml").read_text())
    raw["cluster"] = {"kind": "address", "address": dask_processes}
    raw["data"]["url"] = str(tmp_path / "data.zarr")  # workers run elsewhere: absolute paths
    raw["output"]["path"] = str(tmp_path / "out")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    dkm_cmd("run", "c.yaml", cwd=tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = dkm_cmd("status", "--scheduler", dask_processes, cwd=tmp_path).stdout
    assert summary["job"] in status and "done" in status


def _slow_config(path: Path, **model) -> Path:
    raw = {
        "data": {
            "kind": "synthetic",
            "n": 120_000,
            "d": 8,
            "k": 40,
            "spread": 2.0,
            "chunk_rows": 20_000,
        },
        "model": {
            "mode": "kmeans",
            "n_clusters": 40,
            "tol": 0.0,
            "max_iter": 25,
            "seed": 3,
            **model,
        },
        "cluster": {
            "kind": "local",
            "n_workers": 2,
            "processes": False,
            "dashboard_address": "127.0.0.1:0",
        },
        "output": {"path": "out"},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mode", ["kmeans", "gmm", "kmeans-sampled"])
def test_killed_job_resumes_from_its_checkpoint(tmp_path, mode):
    """Also with the sampled schedule: the sample's iterations (printed "iteration N on a
    sample of M rows") are not checkpointed; the resumed run continues those on all the
    data and keeps the sample's in its history."""
    model: dict = {"mode": "gmm", "covariance_type": "diag", "n_clusters": 8}
    if mode != "gmm":
        model = {"schedule": "sampled"} if mode == "kmeans-sampled" else {}
    _slow_config(tmp_path / "c.yaml", **model)
    # the reference: an uninterrupted run elsewhere
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    shutil.copy(tmp_path / "c.yaml", ref_dir / "c.yaml")
    dkm_cmd("run", "c.yaml", cwd=ref_dir)
    reference = dkm.load_model(str(ref_dir / "out" / "model"))
    # the same job, SIGKILLed after its 5th iteration
    proc = subprocess.Popen(
        [*DKM, "run", "c.yaml"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "iteration 5:" in line:
            break
    proc.kill()
    proc.wait(timeout=60)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.checkpoint").is_dir()
    # a changed config or different data is refused
    changed = dkm_cmd(
        "run", "c.yaml", "--resume", "--set", "model.max_iter=30", cwd=tmp_path, check=False
    )
    assert changed.returncode == 2 and "model.max_iter changed" in changed.stderr
    other = dkm_cmd("run", "c.yaml", "--resume", "--set", "data.seed=9", cwd=tmp_path, check=False)
    assert other.returncode == 2 and "different" in other.stderr
    resumed = dkm_cmd("run", "c.yaml", "--resume", cwd=tmp_path)
    after = int(re.findall(r"resuming after iteration (\d+)", resumed.stderr)[0])
    assert after >= 5  # iteration 5 was printed, so it was checkpointed
    done = [int(m) for m in re.findall(r"iteration (\d+):", resumed.stderr)]
    assert done == list(range(after + 1, reference.n_iter_ + 1))
    model = dkm.load_model(str(tmp_path / "out" / "model"))
    assert model.n_iter_ == reference.n_iter_
    if mode != "gmm":
        np.testing.assert_allclose(model.cluster_centers_, reference.cluster_centers_, rtol=1e-12)
        assert model.inertia_ == pytest.approx(reference.inertia_, rel=1e-12)
    else:
        np.testing.assert_allclose(model.means_, reference.means_, rtol=1e-12)
        np.testing.assert_allclose(model.covariances_, reference.covariances_, rtol=1e-12)
    metrics = [json.loads(m) for m in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    on_all = [m["iteration"] for m in metrics if "sample" not in m]
    assert on_all == list(range(1, model.n_iter_ + 1))
    on_sample = [m["iteration"] for m in metrics if "sample" in m]
    if mode == "kmeans-sampled":
        assert on_sample == list(range(1, len(on_sample) + 1)) and on_sample
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["sampled_iterations"] == len(on_sample)
        assert [h.to_dict() | {"seconds": 0} for h in model.history_] == [
            h.to_dict() | {"seconds": 0} for h in reference.history_
        ]
    else:
        assert not on_sample
    assert not (tmp_path / "out.checkpoint").exists()  # removed once the output is in place


def test_warm_start_from_a_saved_model(workdir):
    write_config(workdir / "warm.yaml", output={"path": "out-cold"})
    dkm_cmd("run", "warm.yaml", cwd=workdir)
    dkm_cmd(
        "run",
        "warm.yaml",
        "--set",
        "model.init={model: out-cold/model}",
        "--set",
        "output.path=out-warm",
        cwd=workdir,
    )
    cold = json.loads((workdir / "out-cold" / "summary.json").read_text())
    warm = json.loads((workdir / "out-warm" / "summary.json").read_text())
    assert warm["n_iter"] <= 2 and warm["converged"]
    assert warm["objective"] == pytest.approx(cold["objective"], rel=1e-9)


def test_an_internal_error_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """A ValueError of dkm's own (a bug) is exit 1 with the --debug hint, not exit 2."""
    from click.testing import CliRunner

    from dkm import cli

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(cli, "load_config", broken)
    result = CliRunner().invoke(cli.main, ["validate", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1, result.output
    assert "dkm: failed: ValueError: operands could not be broadcast" in result.output
    assert "--debug" in result.output and "dkm: error:" not in result.output
    debug = CliRunner().invoke(cli.main, ["--debug", "validate", str(tmp_path / "c.yaml")])
    assert debug.exit_code == 1 and "Traceback" in debug.output


def test_every_error_the_user_can_fix_is_a_user_error():
    """The classes dkm raises for bad config, input, location or data all map to exit 2."""
    import dkm.cluster
    import dkm.config
    import dkm.engine
    import dkm.errors
    import dkm.kernels.params
    import dkm.registry

    for cls in [
        dkm.config.ConfigError,
        io.InputError,
        io.OutputExistsError,
        dkm.cluster.ClusterError,
        dkm.registry.RegistryError,
        dkm.kernels.params.DegenerateComponentError,
        dkm.engine.NonFiniteInputError,
        dkm.errors.InvalidDataError,
    ]:
        assert issubclass(cls, dkm.errors.UserError), cls


def test_quiet_run_prints_nothing(workdir):
    """-q: nothing at all on stdout or stderr, distributed's INFO lines included."""
    write_config(workdir / "quiet.yaml", output={"path": "out-quiet"})
    run = dkm_cmd("run", "quiet.yaml", "-q", cwd=workdir)
    assert run.stdout == "" and run.stderr == "", run.stderr[:2000]
    assert (workdir / "out-quiet" / "summary.json").exists()
