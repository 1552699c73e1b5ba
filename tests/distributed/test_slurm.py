"""A real batch system: single-node SLURM on localhost, workers submitted by dask-jobqueue.

The test starts ``munged``, ``slurmctld`` and ``slurmd`` (Debian's ``munge``,
``slurmctld``, ``slurmd`` and ``slurm-client``; ``.ci/run`` installs them) with a
slurm.conf generated in a temporary directory, from the machine's CPUs and memory, on
free ports, and stops every daemon and cancels every job afterwards, also on failure.
Where the packages are not installed the tests are skipped with the reason; with
``DKM_REQUIRE_SLURM=1`` (set by ``.ci/run`` once it installed them) they fail instead.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DKM = [sys.executable, "-m", "dkm.cli"]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo")
PACKAGES = "munge slurmctld slurmd slurm-client"


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which is not on every user's PATH
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _missing() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


def _need_slurm() -> None:
    missing = _missing()
    if not missing:
        return
    reason = (
        f"SLURM is not installed here (no {', '.join(missing)}): install Debian's "
        f"{PACKAGES} (apt-get install {PACKAGES}; .ci/run does this as root or with sudo)"
    )
    if os.environ.get("DKM_REQUIRE_SLURM") == "1":
        pytest.fail(reason + ", but DKM_REQUIRE_SLURM=1 says they were installed")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine() -> tuple[int, int]:
    """CPUs this process may use, and memory in MiB that slurmd will find (with headroom)."""
    cpus = len(os.sched_getaffinity(0))
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
    return cpus, int(total_kib / 1024 * 0.9)


@dataclass
class Slurm:
    """A running single-node SLURM: the environment its clients need, and its logs."""

    directory: Path
    env: dict[str, str]
    cpus: int
    memory_mb: int
    procs: dict[str, subprocess.Popen[bytes]]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [_which(cmd[0]) or cmd[0], *cmd[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: {result.stderr}{self.logs()}")
        return result

    def jobs(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i %T %j").stdout.split("\n")[:-1]

    def logs(self) -> str:
        out = []
        for name in ("munged", "slurmctld", "slurmd"):
            log = self.directory / f"{name}.log"
            if log.exists():
                out.append(
                    f"\n--- {log.name} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-30:])
                )
        return "".join(out)


def _write_conf(d: Path, host: str, cpus: int, memory_mb: int) -> Path:
    user = getpass.getuser()
    socket_path = d / "munge.socket"
    conf = d / "slurm.conf"
    (d / "state").mkdir()
    (d / "spool").mkdir()
    (d / "plugstack.conf").write_text("")
    conf.write_text(
        f"""\
ClusterName=dkmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def single_node_slurm(d: Path) -> Iterator[Slurm]:
    """munged, slurmctld and slurmd on localhost; all stopped (and jobs cancelled) on exit."""
    _need_slurm()
    d.chmod(0o700)  # munged refuses directories that others may write to
    host = socket.gethostname().split(".")[0]
    cpus, memory_mb = _machine()
    conf = _write_conf(d, host, cpus, memory_mb)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {
        **os.environ,
        "SLURM_CONF": str(conf),
        "DKM": str(Path(sys.executable).with_name("dkm")),  # jobs/slurm/dkm.sbatch's dkm
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    slurm = Slurm(d, env, cpus, memory_mb, procs)

    def start(name: str, *args: str) -> None:
        log = (d / f"{name}.out").open("wb")
        procs[name] = subprocess.Popen(
            [_which(name) or name, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in pytest's process group: no stray terminal signals
        )
        log.close()

    def wait_for(what: str, ok: object, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():  # type: ignore[operator]
                return
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                out = "".join((d / f"{n}.out").read_text() for n in dead)
                raise AssertionError(
                    f"{', '.join(dead)} exited while waiting for {what}:\n{out}{slurm.logs()}"
                )
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}{slurm.logs()}")

    try:
        start(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={d / 'munge.socket'}",
            f"--pid-file={d / 'munged.pid'}",
            f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        )
        wait_for("munged's socket", (d / "munge.socket").exists)
        start("slurmctld", "-D", "-c", "-f", str(conf))
        wait_for("slurmctld", lambda: slurm.run("sinfo", "-h", check=False).returncode == 0)
        start("slurmd", "-D", "-N", host, "-f", str(conf))

        def node_idle() -> bool:
            out = slurm.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout
            return out.strip() == "idle"

        wait_for("the node to be idle", node_idle)
        yield slurm
    finally:
        if "slurmctld" in procs and procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                slurm.run("scancel", "--full", f"--user={getpass.getuser()}", check=False)
                deadline = time.monotonic() + 30
                while slurm.jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in procs:
                _stop(procs[name])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    with single_node_slurm(tmp_path_factory.mktemp("slurm")) as s:
        yield s


def _config(path: Path, **cluster: object) -> Path:
    raw = {
        "data": {"kind": "synthetic", "n": 20000, "d": 4, "k": 3, "seed": 3, "chunk_rows": 5000},
        "model": {"mode": "kmeans", "n_clusters": 3, "seed": 0},
        "cluster": {
            "kind": "slurm",
            "jobs": 2,
            "cores": 1,
            "processes": 1,
            "memory": "1GiB",
            "walltime": "00:10:00",
            "log_directory": "logs",
            "dashboard_address": "127.0.0.1:0",
            "wait_timeout": 90,
            **cluster,
        },
        "output": {"path": "out"},
        "runtime": {"checkpoint_every": 0},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _dkm(
    slurm: Slurm, cwd: Path, *args: str, timeout: float = 150
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DKM, *args],
        cwd=cwd,
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_dkm_run_on_slurm_workers(slurm: Slurm, tmp_path: Path) -> None:
    """dkm run with cluster: slurm submits its workers through sbatch and ends like a local run."""
    _config(tmp_path / "slurm.yaml")
    result = _dkm(slurm, tmp_path, "run", "slurm.yaml")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}{slurm.logs()}"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["converged"] and summary["n_samples"] == 20000
    assert (tmp_path / "out" / "labels.zarr").exists()

    # the workers were SLURM jobs: one batch log pair per job, from a dask worker
    worker_logs = sorted((tmp_path / "logs").glob("*.err"))
    assert len(worker_logs) == 2, sorted(p.name for p in (tmp_path / "logs").iterdir())
    for log in worker_logs:
        assert "Registered to" in log.read_text(), log.read_text()
    # and dkm cancelled them when it was done
    deadline = time.monotonic() + 30
    while slurm.jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm.jobs() == []

    # the same model as on an embedded cluster
    local = _dkm(
        slurm,
        tmp_path,
        "run",
        "slurm.yaml",
        "--set",
        "cluster={kind: local, n_workers: 1, processes: false, dashboard_address: '127.0.0.1:0'}",
        "--set",
        "output.path=local",
    )
    assert local.returncode == 0, local.stderr
    expected = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert summary["objective"] == pytest.approx(expected["objective"], rel=1e-10)
    assert summary["n_iter"] == expected["n_iter"]


def test_rejected_submission_exits_2_with_the_reason(slurm: Slurm, tmp_path: Path) -> None:
    _config(tmp_path / "bad.yaml", queue="nosuchpartition", jobs=1)
    result = _dkm(slurm, tmp_path, "run", "bad.yaml", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "cannot submit the slurm worker jobs" in result.stderr
    assert "invalid partition" in result.stderr.lower()
    assert "#SBATCH -p nosuchpartition" in result.stderr  # the job script is shown
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_shipped_sbatch_script_runs(slurm: Slurm, tmp_path: Path) -> None:
    """jobs/slurm/dkm.sbatch, submitted as it is: a driver job whose workers are more jobs."""
    out = tmp_path / "out"
    result = slurm.run(
        "sbatch",
        "--wait",
        f"--output={tmp_path / 'driver.out'}",
        f"--chdir={ROOT}",
        str(ROOT / "jobs" / "slurm" / "dkm.sbatch"),
        # the shipped default config, shrunk to the test node and kept out of the checkout
        "configs/kmeans.yaml",
        "--set",
        "cluster.cores=1",
        "--set",
        "cluster.processes=1",
        "--set",
        "cluster.memory=1GiB",
        "--set",
        f"cluster.log_directory={tmp_path / 'logs'}",
        "--set",
        "cluster.dashboard_address=127.0.0.1:0",
        "--set",
        "data.n=20000",
        "--set",
        "model.n_clusters=4",
        "--set",
        f"output.path={out}",
        check=False,
        timeout=150,
    )
    driver = (tmp_path / "driver.out").read_text() if (tmp_path / "driver.out").exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{driver}{slurm.logs()}"
    assert json.loads((out / "summary.json").read_text())["n_samples"] == 20000
    assert len(list((tmp_path / "logs").glob("*.err"))) == 1  # its worker was a job too
