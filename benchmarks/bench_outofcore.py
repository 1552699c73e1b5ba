"""Out of core: ``dkm run`` on a store larger than its workers' memory (issue 5).

The job clusters a zarr store (by default 64,000,000 × 32 float32, 8 GB, made with
``dkm make-data``) on a ``LocalCluster`` whose workers together may hold ``--memory``
(3 GB): the points are not persisted (``runtime.persist: never``), so every iteration
streams every chunk from disk. While the job runs, this script samples the resident
memory (RSS) of the job's whole process tree (the job, its scheduler and its worker
processes) and the size of the workers' spill directories every 0.1 s. It reports:

- whether the job completed (exit status 0, ``summary.json`` written),
- the peak of the summed RSS of all processes (target: under 4 GB),
- the largest size the spill directories reached, and whether a worker logged that it
  spilled or paused (target: nothing spilled),
- the median seconds per iteration (the job's own history), next to the seconds to
  merely read and decompress the store once on the same kind of cluster (the floor of
  an iteration on streamed data).

Run from the repository root (OpenBLAS left to detect the CPU itself)::

    dkm make-data --n 64000000 --d 32 --k 64 --out data/ooc.zarr --chunk-rows 500000
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_outofcore.py \
        --store data/ooc.zarr
    ... --quick   # makes a 400k-row store in a temporary directory and runs on it

Exit status 0 if every target was met, 1 if one was missed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

GB = 1e9
#: the ``dkm`` command of this interpreter (``python -m dkm`` is the demo)
DKM = [sys.executable, "-c", "import sys; from dkm.cli import main; sys.exit(main())"]
SPILL_MARKERS = ("spill", "Paused worker", "Memory use is high", "Worker is at")


def tree_rss(root: psutil.Process) -> int:
    """Summed RSS of ``root`` and all its descendants (processes that vanish count 0)."""
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).stat().st_size
    return total


class Sampler(threading.Thread):
    """Samples the process tree's RSS and the spill directories until stopped."""

    def __init__(self, pid: int, scratch: Path, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.scratch = scratch
        self.every = every
        self.peak_rss = 0
        self.peak_spill = 0
        self.peak_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_rss = max(self.peak_rss, tree_rss(self.proc))
            try:
                n = 1 + len(self.proc.children(recursive=True))
            except psutil.NoSuchProcess:
                n = 0
            self.peak_processes = max(self.peak_processes, n)
            spill = sum(dir_bytes(p) for p in self.scratch.glob("**/storage"))
            self.peak_spill = max(self.peak_spill, spill)
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def read_floor(store: str, array: str, n_workers: int, memory_limit: str) -> float:
    """Seconds to read and decompress every chunk once on the same kind of cluster."""
    import dask.array as da
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            memory_limit=memory_limit,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        X = da.from_zarr(store, component=array)
        # one number per chunk: every byte is read and decompressed, nothing is kept
        touched = X.map_blocks(lambda b: b[:1, :1], chunks=(1, 1), dtype=X.dtype)
        client.compute(touched.sum()).result()  # warm the workers (imports)
        start = time.perf_counter()
        client.compute(touched.sum()).result()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args, parser = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dkm-ooc-"))
    try:
        return run(args, parser, tmp)
    finally:
        if args.quick:  # a full run keeps its config, log and output for inspection
            shutil.rmtree(tmp, ignore_errors=True)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="zarr store made by `dkm make-data`")
    parser.add_argument("--array", default="points")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory", type=float, default=3.0, help="GB for all workers")
    parser.add_argument("--rss-target", type=float, default=4.0, help="GB, summed peak RSS")
    parser.add_argument("--labels", action="store_true", help="also write labels.zarr")
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args(argv), parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, tmp: Path) -> int:
    if args.quick:
        args.store = str(tmp / "points.zarr")
        make = ["make-data", "--n", "400000", "--d", "32", "--k", str(args.k)]
        subprocess.run([*DKM, *make, "--out", args.store, "--chunk-rows", "50000"], check=True)
    if not args.store or not Path(args.store).exists():
        parser.error("--store: give a zarr store made by `dkm make-data` (or --quick)")
    memory_limit = f"{int(args.memory * GB / args.workers)}B"
    out = tmp / "out"
    config: dict[str, Any] = {
        "data": {"kind": "zarr", "url": str(Path(args.store).resolve()), "array": args.array},
        "model": {
            "mode": "kmeans",
            "n_clusters": args.k,
            "max_iter": args.iters,
            "tol": 0.0,
            "init": "random",  # slower to converge than k-means++: every iteration runs
            "seed": 0,
        },
        "cluster": {
            "kind": "local",
            "n_workers": args.workers,
            "threads_per_worker": 1,
            "memory_limit": memory_limit,
            "dashboard_address": ":0",
        },
        "output": {"path": str(out), "labels": args.labels, "report": False},
        "runtime": {"persist": "never", "checkpoint_every": 0},
    }
    config_path = tmp / "ooc.yaml"
    config_path.write_text(yaml.safe_dump(config))
    scratch = tmp / "scratch"
    env = {**os.environ, "DASK_TEMPORARY_DIRECTORY": str(scratch)}
    log_path = tmp / "job.log"
    print(f"store {args.store}; workers {args.workers} x {memory_limit}; config {config_path}")

    start = time.perf_counter()
    with log_path.open("w") as log:
        job = subprocess.Popen(
            [*DKM, "run", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        sampler = Sampler(job.pid, scratch)
        sampler.start()
        rc = job.wait()
        sampler.stop()
    wall = time.perf_counter() - start
    log_text = log_path.read_text()
    spill_lines = [ln for ln in log_text.splitlines() if any(m in ln for m in SPILL_MARKERS)]
    summary_path = out / "summary.json"
    completed = rc == 0 and summary_path.exists()
    print(f"job exit {rc}, {wall:.0f} s wall; log {log_path}")
    if not completed:
        print(log_text[-4000:])
        return 1
    summary = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iters = [r["seconds"] for r in records if r.get("event") == "iteration"]
    floor = read_floor(args.store, args.array, args.workers, memory_limit)
    # the first iteration also compiles the kernels in every worker
    per_iter = statistics.median(iters[1:] or iters)
    print(
        f"points {summary['n_samples']:,} x {summary['n_features']}, k={args.k}, "
        f"persisted={summary['persisted']}, {summary['n_iter']} iterations"
    )
    print(f"per-iteration seconds: {', '.join(f'{s:.1f}' for s in iters)}")
    print(f"median iteration (after the first) {per_iter:.1f} s")
    print(f"read + decompress the store once: {floor:.1f} s (the floor)")
    print(f"iteration / read floor: {per_iter / floor:.2f}")
    rss_ok = sampler.peak_rss < args.rss_target * GB
    spill_ok = sampler.peak_spill == 0 and not spill_lines
    print(
        f"peak summed RSS of {sampler.peak_processes} processes: "
        f"{sampler.peak_rss / GB:.2f} GB (target < {args.rss_target} GB: "
        f"{'met' if rss_ok else 'MISSED'})"
    )
    print(
        f"spilled: {sampler.peak_spill} bytes in spill directories, "
        f"{len(spill_lines)} spill/pause log lines ({'none' if spill_ok else 'SPILLED'})"
    )
    for line in spill_lines[:5]:
        print(f"  {line}")
    return 0 if rss_ok and spill_ok else 1


if __name__ == "__main__":
    sys.exit(main())
