"""A Dask client from a config: an embedded local cluster by default, an address, batch
jobs submitted by dask-jobqueue (SLURM, PBS, SGE, LSF), or a Kubernetes DaskCluster."""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.comm.core import CommClosedError
from distributed.core import Status
from distributed.security import Security
from distributed.utils import format_dashboard_link

from dkm.config import (
    AddressClusterConfig,
    JobQueueClusterConfig,
    KubernetesClusterConfig,
    LocalClusterConfig,
)
from dkm.errors import UserError

logger = logging.getLogger(__name__)

#: The image built from deploy/Dockerfile; the default of cluster.image for kubernetes.
IMAGE_NAME = "dkm"


class ClusterError(UserError, RuntimeError):
    """The cluster could not be started or reached."""


_DASK_TLS_KEYS = (
    "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and "
    "distributed.comm.tls.client.key in Dask's configuration"
)


@dataclass(frozen=True)
class Hints:
    """What the errors of a scheduler address tell the user to change.

    The defaults name the config's keys (an address from ``cluster.address``);
    :meth:`command_line` names the option an address on the command line came from.
    """

    #: the address, as the user gave it
    address: str = "the address"
    #: how to use TLS certificates instead (completes "... use its tls:// address and")
    certificates: str = "give the certificates in cluster.security"
    #: how to configure missing certificates (completes "no certificates are configured: ")
    configure: str = (
        "add cluster.security (ca_file, cert and key: PEM files) to the config, or set "
        + _DASK_TLS_KEYS
    )
    #: what to do instead of using a scheduler, if anything (completes "..., or ")
    instead: str | None = "use cluster: {kind: local}"

    @classmethod
    def command_line(cls, option: str, instead: str | None = None) -> Hints:
        """Hints for an address given by the command-line ``option`` (e.g. --scheduler)."""
        return cls(
            address=f"the address given to {option}",
            certificates=f"set {_DASK_TLS_KEYS}",
            configure=f"set {_DASK_TLS_KEYS}",
            instead=instead,
        )


def security(config: AddressClusterConfig, hints: Hints | None = None) -> Security | None:
    """Dask's TLS settings for a scheduler address: from the config, else Dask's own config.

    None for an unencrypted address without ``cluster.security`` (Dask's defaults apply).
    """
    hints = hints or Hints()
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
                f"configured: {hints.configure}."
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


def _connect_address(config: AddressClusterConfig, hints: Hints) -> Client:
    address = config.address
    sec = security(config, hints)
    source = "cluster.security" if config.security else "Dask's distributed.comm.tls settings"
    try:
        return Client(address, timeout="15s", security=sec)
    except (CommClosedError, ValueError) as e:
        # ValueError: tornado's "IOStream is not idle; cannot convert to SSL" when a
        # tls:// client meets a plain tcp scheduler (the address itself was validated)
        if sec is None:
            hint = (
                "If the scheduler was started with TLS (dask scheduler --tls-cert ...), use "
                f"its tls:// address and {hints.certificates}; otherwise check that "
                f"{hints.address} is a Dask scheduler."
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
        instead = "" if hints.instead is None else f", or {hints.instead}"
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} ({_reason(e)}). Check "
            f"{hints.address} and that the scheduler is running (dask scheduler){instead}."
        ) from None


class _ClosedCommTracebacks(logging.Filter):
    """Keeps distributed's INFO notes that a connection closed, without their tracebacks.

    When a run stops (finished or failed), distributed's background senders and
    connection handlers may log at INFO, with the ``CommClosedError`` traceback, that
    the other end went away first. That is the expected end of a connection, not an
    error, but a traceback on stderr reads like one, next to the run's own error
    message. WARNING and above, and any other exception, keep their tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if record.levelno < logging.WARNING and isinstance(exc, CommClosedError):
            record.exc_info = None
            record.exc_text = None
        return True


#: The loggers of distributed that note a closed connection at INFO with exc_info.
_CLOSED_COMM_LOGGERS = ("distributed.batched", "distributed.core")


def quiet_closed_comm_tracebacks() -> None:
    """Drop the tracebacks of distributed's INFO notes that a connection closed (idempotent)."""
    for name in _CLOSED_COMM_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _ClosedCommTracebacks) for f in log.filters):
            log.addFilter(_ClosedCommTracebacks())


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


#: The preload that puts dkm's page on a scheduler's dashboard (:mod:`dkm.dashboard`).
DASHBOARD_PRELOAD = "dkm.dashboard"


def scheduler_preloads() -> dict[str, Any]:
    """Scheduler keyword arguments that add :data:`DASHBOARD_PRELOAD` to the preloads of
    Dask's configuration (``distributed.scheduler.preload``), which they would replace."""
    preload = dask.config.get("distributed.scheduler.preload") or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = dask.config.get("distributed.scheduler.preload-argv") or []
    if DASHBOARD_PRELOAD in preload:
        return {"preload": preload, "preload_argv": argv}
    if argv and isinstance(argv[0], str):  # one argv for every preload: spell it out
        argv = [argv] * len(preload)
    return {
        "preload": [*preload, DASHBOARD_PRELOAD],
        "preload_argv": [*argv, []] if argv else [],
    }


def default_image() -> str:
    """``dkm:VERSION``: the image deploy/Dockerfile builds for this version of dkm."""
    from dkm._version import __version__

    return f"{IMAGE_NAME}:{__version__}"


def _import_extra(module: str, extra: str, kind: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0].replace("_", "-")
        raise ClusterError(
            f"cluster.kind {kind} needs {package}, which is not installed ({e}). Install "
            f"dkm with that extra: python -m pip install 'dkm[{extra}]' (from a checkout: "
            f'python -m pip install -e ".[{extra}]").'
        ) from None


def jobqueue_kwargs(config: JobQueueClusterConfig) -> dict[str, Any]:
    """Keyword arguments of dask-jobqueue's cluster class; unset keys are left to Dask's config."""
    keys = (
        "cores",
        "memory",
        "processes",
        "queue",
        "walltime",
        "job_extra_directives",
        "job_script_prologue",
        "interface",
        "python",
        "local_directory",
        "log_directory",
    )
    kwargs: dict[str, Any] = {k: getattr(config, k) for k in keys if getattr(config, k) is not None}
    if config.account is not None:  # SLURM and PBS say account, SGE and LSF project
        kwargs["account" if config.kind in ("slurm", "pbs") else "project"] = config.account
    # dask-jobqueue takes scheduler_options instead of its configuration's, not on top
    options = dict(dask.config.get(f"jobqueue.{config.kind}.scheduler-options", None) or {})
    if config.dashboard_address is not None:
        options["dashboard_address"] = config.dashboard_address
    kwargs["scheduler_options"] = {**options, **scheduler_preloads()}
    return kwargs


_JOBQUEUE_CLASSES = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
}


def make_jobqueue_cluster(config: JobQueueClusterConfig) -> Any:
    """dask-jobqueue's cluster for ``config.kind`` (nothing submitted yet)."""
    jobqueue = _import_extra("dask_jobqueue", "slurm", config.kind)
    cls = getattr(jobqueue, _JOBQUEUE_CLASSES[config.kind])
    try:
        return cls(**jobqueue_kwargs(config))
    except ValueError as e:
        what = str(e).splitlines()[0]
        raise ClusterError(
            f"cannot describe the {config.kind} worker jobs: {what} Set cluster.cores and "
            f"cluster.memory (per job, e.g. cores: 4, memory: 16GiB) in the config, or "
            f"jobqueue.{config.kind}.cores and .memory in Dask's configuration (see "
            "deploy/slurm/jobqueue.yaml)."
        ) from None


def _wait_for_workers(client: Client, n: int, timeout: float, where: str, hint: str) -> None:
    """Wait for ``n`` workers; carry on with fewer after ``timeout``, fail with none."""
    try:
        client.wait_for_workers(n, timeout=timeout)
        return
    except TimeoutError:
        pass
    have = len(client.scheduler_info(n_workers=-1)["workers"])
    if have == 0:
        raise ClusterError(
            f"no Dask worker started within cluster.wait_timeout={timeout:g} s on {where}. "
            f"{hint} Raise cluster.wait_timeout if the jobs are only waiting in the queue."
        )
    logger.warning("only %d of %d Dask workers started on %s; carrying on", have, n, where)


def _submit_error(e: BaseException) -> str:
    """dask-jobqueue's report of a failed submit command, down to the command and its stderr."""
    text = str(e).strip()
    m = re.search(r"Command:\n(\S+).*?stderr:\n(.*)", text, re.DOTALL)
    if m is None:
        return text
    command, stderr = m.group(1), m.group(2).strip()
    return f"{Path(command).name} failed: {stderr or text}"


@contextlib.contextmanager
def _connect_jobqueue(config: JobQueueClusterConfig) -> Iterator[Client]:
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(make_jobqueue_cluster(config))

        async def submit() -> None:
            # what scale(jobs=...) does, but scale() submits in a callback whose errors are
            # only logged; awaiting the cluster's state correction raises them to us
            while len(cluster.worker_spec) < config.jobs:
                cluster.worker_spec.update(cluster.new_worker_spec())
            await cluster._correct_state()

        try:
            cluster.sync(submit)
        except RuntimeError as e:  # the submit command failed (sbatch/qsub/bsub)
            for name, job in list(cluster.workers.items()):  # never submitted: nothing to close
                if job.job_id is None:
                    job.status = Status.failed
                    del cluster.workers[name]
                    cluster.worker_spec.pop(name, None)
            raise ClusterError(
                f"cannot submit the {config.kind} worker jobs: {_submit_error(e)}\n"
                f"The job script was:\n{cluster.job_script()}"
            ) from None
        client = stack.enter_context(Client(cluster))
        n = config.jobs * cluster._dummy_job.worker_processes
        jobs = ", ".join(str(j.job_id) for j in cluster.workers.values() if j.job_id) or "none"
        _wait_for_workers(
            client,
            n,
            config.wait_timeout,
            f"{config.kind} (job ids {jobs})",
            "Check the jobs with the batch system (squeue/sacct, qstat, bjobs) and their "
            f"logs (cluster.log_directory; default: where dkm runs). The job script was:\n"
            f"{cluster.job_script()}",
        )
        yield client


def kubernetes_kwargs(config: KubernetesClusterConfig) -> dict[str, Any]:
    """Keyword arguments of dask-kubernetes' operator ``KubeCluster``."""
    if config.existing:
        return {"name": config.name, "namespace": config.namespace}
    kwargs: dict[str, Any] = {
        "name": config.name,
        "namespace": config.namespace,
        "image": config.image or default_image(),
        "n_workers": config.n_workers,
        # the scheduler pod's dashboard gets the dkm page (the workers ignore the key)
        "env": {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": DASHBOARD_PRELOAD, **config.env},
        "shutdown_on_close": True,
    }
    if config.resources is not None:
        kwargs["resources"] = {k: dict(v) for k, v in config.resources.items()}
    return kwargs


@contextlib.contextmanager
def _connect_kubernetes(config: KubernetesClusterConfig) -> Iterator[Client]:
    operator = _import_extra("dask_kubernetes.operator", "kubernetes", "kubernetes")
    kwargs = kubernetes_kwargs(config)
    where = f"DaskCluster {config.name!r}" + (
        f" in namespace {config.namespace!r}" if config.namespace else ""
    )
    try:
        if config.existing:
            cluster = operator.KubeCluster.from_name(**kwargs)
        else:
            cluster = operator.KubeCluster(**kwargs)
    except Exception as e:  # kr8s/kopf raise many kinds; all mean the same to the user
        raise ClusterError(
            f"cannot {'find' if config.existing else 'create'} the {where} "
            f"({type(e).__name__}: {str(e).strip() or 'no detail'}). Check that kubectl "
            "reaches the cluster (KUBECONFIG, or the pod's service account), that the Dask "
            "operator is installed (deploy/README.md) and, with existing: true, that "
            "deploy/kubernetes/daskcluster.yaml was applied."
        ) from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(cluster)
        client = stack.enter_context(Client(cluster))
        n = 1 if config.existing else config.n_workers
        _wait_for_workers(
            client,
            n,
            config.wait_timeout,
            where,
            f"Check the worker pods: kubectl get pods -l dask.org/cluster-name={config.name}.",
        )
        yield client


@contextlib.contextmanager
def connect(
    config: LocalClusterConfig
    | AddressClusterConfig
    | JobQueueClusterConfig
    | KubernetesClusterConfig,
    *,
    hints: Hints | None = None,
) -> Iterator[Client]:
    """A client for the run; a cluster started for it is shut down afterwards.

    ``hints``: what the errors of a scheduler address suggest (default: config keys).
    """
    quiet_closed_comm_tracebacks()
    if isinstance(config, AddressClusterConfig):
        with _connect_address(config, hints or Hints()) as client:
            yield client
        return
    if isinstance(config, JobQueueClusterConfig):
        with _connect_jobqueue(config) as client:
            yield client
        return
    if isinstance(config, KubernetesClusterConfig):
        with _connect_kubernetes(config) as client:
            yield client
        return
    try:
        cluster = _LocalCluster(
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
            memory_limit=config.memory_limit,
            dashboard_address=config.dashboard_address,
            processes=config.processes,
            scheduler_kwargs=scheduler_preloads(),
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
