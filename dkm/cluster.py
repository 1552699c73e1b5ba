"""A Dask client from a config: an embedded local cluster by default, or an address."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed import Client, LocalCluster

from dkm.config import AddressClusterConfig, LocalClusterConfig


class ClusterError(RuntimeError):
    """The cluster could not be started or reached."""


@contextlib.contextmanager
def connect(config: LocalClusterConfig | AddressClusterConfig) -> Iterator[Client]:
    """A client for the run; an embedded cluster is shut down afterwards."""
    if isinstance(config, AddressClusterConfig):
        try:
            client = Client(config.address, timeout="15s")
        except (OSError, TimeoutError) as e:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {config.address} ({e}). Check the "
                "address and that the scheduler is running (dask scheduler), or use "
                "cluster: {kind: local}."
            ) from None
        with client:
            yield client
        return
    try:
        cluster = LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            memory_limit=config.memory_limit,
            dashboard_address=config.dashboard_address,
            processes=config.processes,
        )
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot start the local Dask cluster: {e}") from None
    with cluster, Client(cluster) as client:
        yield client


def cluster_memory(client: Client) -> int:
    """Total memory limit of the workers in bytes (0 when unlimited or unknown)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return int(sum(w.get("memory_limit") or 0 for w in workers))
