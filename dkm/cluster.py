"""A Dask client from a config: an embedded local cluster by default, or an address."""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Iterator

from distributed import Client, LocalCluster
from distributed.comm.core import CommClosedError
from distributed.security import Security
from distributed.utils import format_dashboard_link

from dkm.config import AddressClusterConfig, LocalClusterConfig


class ClusterError(RuntimeError):
    """The cluster could not be started or reached."""


def security(config: AddressClusterConfig) -> Security | None:
    """Dask's TLS settings for a scheduler address: from the config, else Dask's own config.

    None for an unencrypted address without ``cluster.security`` (Dask's defaults apply).
    """
    tls = config.security
    if tls is not None:
        return Security(
            tls_ca_file=tls.ca_file,
            tls_client_cert=tls.cert,
            tls_client_key=tls.key,
            require_encryption=True,
        )
    if config.address.startswith("tls://"):
        from_dask = Security()  # distributed.comm.tls.* from Dask's config files/environment
        client_tls = from_dask.get_tls_config_for_role("client")
        if not (client_tls["ca_file"] and client_tls["cert"]):  # what Dask needs for TLS
            raise ClusterError(
                f"the Dask scheduler at {config.address} uses TLS, but no certificates are "
                "configured: add cluster.security (ca_file, cert and key: PEM files) to the "
                "config, or set distributed.comm.tls.ca-file, distributed.comm.tls.client.cert "
                "and distributed.comm.tls.client.key in Dask's configuration."
            )
        return from_dask
    return None


def _reason(e: BaseException) -> str:
    """What went wrong in a connection attempt, from Dask's error and the one it wraps."""

    def text(err: BaseException) -> str:  # without Dask's "in <TCP local=… remote=…>: "
        return re.sub(r"^in <[^>]*>: ", "", str(err).strip())

    cause = e.__cause__
    if isinstance(cause, ssl.SSLError):
        return text(cause)  # the TLS error itself; Dask's wrapping adds nothing
    if cause is not None and text(e).startswith("Timed out"):
        return f"{text(e)}: {text(cause)}"
    return text(e) or type(e).__name__


def _connect_address(config: AddressClusterConfig) -> Client:
    address = config.address
    sec = security(config)
    source = "cluster.security" if config.security else "Dask's distributed.comm.tls settings"
    try:
        return Client(address, timeout="15s", security=sec)
    except (CommClosedError, ValueError) as e:
        # ValueError: tornado's "IOStream is not idle; cannot convert to SSL" when a
        # tls:// client meets a plain tcp scheduler (the address itself was validated)
        if sec is None:
            hint = (
                "If the scheduler was started with TLS (dask scheduler --tls-cert ...), use "
                "its tls:// address and give the certificates in cluster.security; "
                "otherwise check that the address is a Dask scheduler."
            )
        else:
            hint = (
                f"Check that the scheduler uses TLS, that the ca_file of {source} is the CA "
                "that signed the scheduler's certificate, and that the scheduler trusts the "
                "CA that signed the client cert."
            )
        raise ClusterError(
            f"the connection to the Dask scheduler at {address} failed in the handshake "
            f"({_reason(e)}). {hint}"
        ) from None
    except (ssl.SSLError, FileNotFoundError) as e:  # loading the files, before connecting
        raise ClusterError(
            f"cannot use the TLS certificates for {address} ({_reason(e)}). Check that the "
            f"ca_file, cert and key of {source} are PEM files and that the key belongs to "
            "the cert (or is in the cert file)."
        ) from None
    except (OSError, TimeoutError) as e:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} ({_reason(e)}). Check the "
            "address and that the scheduler is running (dask scheduler), or use "
            "cluster: {kind: local}."
        ) from None


class _LocalCluster(LocalCluster):
    """A LocalCluster whose dashboard link names the host the dashboard listens on.

    With ``processes=False`` the scheduler's address is ``inproc://<this machine's IP>/…``
    and distributed builds the link from that IP, although the dashboard listens on the
    host of ``dashboard_address`` (127.0.0.1 by default), so the link would not open.
    """

    dashboard_host = ""

    @property
    def dashboard_link(self) -> str:
        link: str = super().dashboard_link
        port = self.scheduler_info.get("services", {}).get("dashboard")
        if link and port and self.dashboard_host not in ("", "0.0.0.0", "::", "[::]"):
            return str(format_dashboard_link(self.dashboard_host, port))
        return link


@contextlib.contextmanager
def connect(config: LocalClusterConfig | AddressClusterConfig) -> Iterator[Client]:
    """A client for the run; an embedded cluster is shut down afterwards."""
    if isinstance(config, AddressClusterConfig):
        with _connect_address(config) as client:
            yield client
        return
    try:
        cluster = _LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            memory_limit=config.memory_limit,
            dashboard_address=config.dashboard_address,
            processes=config.processes,
        )
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot start the local Dask cluster: {e}") from None
    cluster.dashboard_host = config.dashboard_address.rpartition(":")[0]
    with cluster, Client(cluster) as client:
        yield client


def cluster_memory(client: Client) -> int:
    """Total memory limit of the workers in bytes (0 when unlimited or unknown)."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return int(sum(w.get("memory_limit") or 0 for w in workers))
