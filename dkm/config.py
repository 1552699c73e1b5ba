"""Run configs: YAML to validated, typed objects. The only place YAML is parsed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config that cannot be run: the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data


class _DataBase(_Strict):
    chunk_rows: PositiveInt | None = Field(
        None, description="rows per chunk; default: the store's own chunking (synthetic: 100000)"
    )
    dtype: Literal["float32", "float64"] | None = Field(
        None, description="cast the points to this dtype; default: keep float32/float64"
    )
    nan_policy: Literal["raise", "drop"] = Field(
        "raise", description="rows with NaN/inf: an error, or dropped (counted, labelled -1)"
    )


class SyntheticData(_DataBase):
    """Gaussian blobs generated on the workers, for demos and benchmarks."""

    kind: Literal["synthetic"]
    n: PositiveInt = Field(200_000, description="number of points")
    d: PositiveInt = Field(8, description="number of features")
    k: PositiveInt = Field(12, description="number of true clusters")
    seed: int = Field(0, description="random seed of the generator")
    spread: PositiveFloat = Field(10.0, description="scale of the cluster centres")


class ZarrData(_DataBase):
    """A 2-D zarr array: a local path or an fsspec URL, and the array path inside it."""

    kind: Literal["zarr"]
    url: str = Field(description="zarr store: a local path or an fsspec URL")
    array: str | None = Field(None, description="array path inside the group, if url is a group")
    weights: str | None = Field(None, description="array path of per-point sample weights")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options")


class NpyData(_DataBase):
    """A 2-D .npy file (memory-mapped)."""

    kind: Literal["npy"]
    path: str = Field(description="the .npy file")
    weights: str | None = Field(None, description="a 1-D .npy file of sample weights")


class ParquetData(_DataBase):
    """Numeric columns of a parquet file or dataset (needs the parquet extra)."""

    kind: Literal["parquet"]
    url: str = Field(description="parquet file or directory: a local path or an fsspec URL")
    columns: list[str] = Field(min_length=1, description="the feature columns")
    weights: str | None = Field(None, description="column of sample weights")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options")


DataConfig = Annotated[
    SyntheticData | ZarrData | NpyData | ParquetData, Field(discriminator="kind")
]


# --------------------------------------------------------------------------- model

_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "kmeans": {
        "covariance_type": "identity",
        "assignment": "hard",
        "init": "k-means++",
        "tol": 1e-4,
        "max_iter": 300,
    },
    "gmm": {
        "covariance_type": "full",
        "assignment": "soft",
        "init": "kmeans",
        "tol": 1e-3,
        "max_iter": 100,
    },
}


class ModelInit(_Strict):
    """Warm start: begin from a model saved by an earlier run."""

    model: str = Field(description="a model directory written by dkm run (output.path/model)")


class KRange(_Strict):
    """Candidate numbers of clusters ``min, min + step, …`` up to ``max`` (inclusive)."""

    min: PositiveInt = Field(description="smallest candidate")
    max: PositiveInt = Field(description="largest candidate (included)")
    step: PositiveInt = Field(1, description="spacing of the candidates")

    @model_validator(mode="after")
    def _check_order(self) -> KRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ModelConfig(_Strict):
    """What to fit. ``kmeans`` is (identity, hard); ``gmm`` defaults to (full, soft)."""

    mode: Literal["kmeans", "gmm"] = Field("kmeans", description="kmeans or gmm")
    n_clusters: PositiveInt | list[PositiveInt] | KRange = Field(
        8,
        description="number of clusters / components; or candidates to choose from by "
        "`criterion`: a list [8, 16, 32] or a range {min: 2, max: 20, step: 2}",
    )
    criterion: Literal["bic", "aic"] = Field(
        "bic", description="how a list or range of n_clusters is decided (lower wins)"
    )
    covariance_type: Literal["identity", "full", "tied", "diag", "spherical"] | None = Field(
        None, description="kmeans: identity; gmm: full (default), tied, diag or spherical"
    )
    assignment: Literal["hard", "soft"] | None = Field(
        None, description="hard (kmeans default) or soft (gmm default)"
    )
    init: Literal["k-means++", "k-means||", "random", "kmeans"] | ModelInit | None = Field(
        None,
        description="kmeans: k-means++ (default), k-means|| or random; gmm: kmeans "
        "(default), ...; or {model: PATH} to warm-start from a saved model",
    )
    oversampling_factor: PositiveFloat = Field(
        2.0, description="k-means||: expected candidates per round, times n_clusters"
    )
    init_rounds: PositiveInt = Field(5, description="k-means||: sampling rounds (passes)")
    n_init: PositiveInt = Field(1, description="restarts; the best objective wins")
    tol: NonNegativeFloat | None = Field(None, description="kmeans 1e-4 (relative), gmm 1e-3")
    max_iter: NonNegativeInt | None = Field(None, description="kmeans 300, gmm 100")
    reg_covar: NonNegativeFloat = Field(1e-6, description="added to covariance diagonals")
    on_degenerate: Literal["error", "reseed", "drop"] = Field(
        "error", description="gmm: a collapsed component is an error, re-seeded or dropped"
    )
    seed: int | None = Field(0, description="random seed of the initialisation")
    init_sample_size: PositiveInt | None = Field(
        None, description="points sampled for k-means++/random init; default max(10000, 100k)"
    )

    @field_validator("n_clusters")
    @classmethod
    def _check_candidates(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one candidate")
            if len(set(value)) != len(value):
                raise ValueError(f"candidates repeat: {value}")
        return value

    def candidates(self) -> list[int] | None:
        """The candidate numbers of clusters of a sweep; None for a single ``n_clusters``."""
        k = self.n_clusters
        if isinstance(k, KRange):
            return list(range(k.min, k.max + 1, k.step))
        return list(k) if isinstance(k, list) else None

    @property
    def k(self) -> int:
        """The number of clusters of a run without a sweep (the first candidate of one)."""
        candidates = self.candidates()
        return candidates[0] if candidates else int(cast(int, self.n_clusters))

    @model_validator(mode="after")
    def _check_mode(self) -> ModelConfig:
        if self.mode == "kmeans":
            if self.covariance_type not in (None, "identity"):
                raise ValueError(
                    f"covariance_type {self.covariance_type!r} needs mode: gmm "
                    "(k-means has identity covariances)"
                )
            if self.init == "kmeans":
                raise ValueError("init 'kmeans' is for mode: gmm; use k-means++ or random")
        elif self.covariance_type == "identity":
            raise ValueError("covariance_type identity is mode: kmeans (soft: assignment soft)")
        return self

    def resolved(self, key: str) -> Any:
        """A setting with the mode's default applied."""
        value = getattr(self, key)
        return _MODE_DEFAULTS[self.mode][key] if value is None else value


# --------------------------------------------------------------------------- cluster


class LocalClusterConfig(_Strict):
    """An embedded ``distributed.LocalCluster`` started for the run."""

    kind: Literal["local"] = "local"
    n_workers: PositiveInt | None = Field(None, description="worker processes; default: cores")
    threads_per_worker: PositiveInt = Field(1, description="threads per worker")
    memory_limit: str = Field("auto", description="per worker, e.g. '4GiB', or 'auto'")
    dashboard_address: str = Field(
        "127.0.0.1:8787", description="host:port of the dashboard (':0' picks a free port)"
    )
    processes: bool = Field(True, description="workers as processes (false: threads)")


#: Address schemes whose connections are encrypted with Dask's TLS settings.
TLS_SCHEMES = ("tls", "wss")


class TLSConfig(_Strict):
    """Certificates for a TLS scheduler, as Dask's ``Security`` takes them (PEM files)."""

    ca_file: str = Field(description="CA certificate(s) that signed the scheduler's certificate")
    cert: str = Field(description="this client's certificate (may hold the key too)")
    key: str | None = Field(None, description="this client's private key; default: in cert")

    @field_validator("ca_file", "cert", "key")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError("file not found (a relative path is taken from where dkm runs)")
        return value


class AddressClusterConfig(_Strict):
    """A running Dask scheduler."""

    kind: Literal["address"]
    address: str = Field(description="scheduler address, tcp://host:port (or tls://)")
    security: TLSConfig | None = Field(
        None, description="TLS certificates; default: Dask's distributed.comm.tls config"
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("tcp", "tls", "ws", "wss", "ucx") or not rest:
            raise ValueError("expected a scheduler address like tcp://host:8786")
        return value

    @field_validator("security")
    @classmethod
    def _check_security(cls, value: TLSConfig | None, info: ValidationInfo) -> TLSConfig | None:
        address = info.data.get("address")
        if value is not None and address and address.partition("://")[0] not in TLS_SCHEMES:
            raise ValueError(
                f"TLS certificates need a tls:// scheduler address, but cluster.address is "
                f"{address!r}; use tls://host:port or remove cluster.security"
            )
        return value


#: Batch systems whose workers dask-jobqueue submits (``pip install 'dkm[slurm]'``).
JOBQUEUE_KINDS = ("slurm", "pbs", "sge", "lsf")


class JobQueueClusterConfig(_Strict):
    """Dask workers submitted as batch jobs by dask-jobqueue; the scheduler runs in the job.

    A key left out (null) takes its value from Dask's ``jobqueue.<kind>`` configuration
    (e.g. ``deploy/slurm/jobqueue.yaml``), then from dask-jobqueue's defaults.
    """

    kind: Literal["slurm", "pbs", "sge", "lsf"]
    jobs: PositiveInt = Field(1, description="batch jobs to submit, each running the workers")
    cores: PositiveInt | None = Field(None, description="cores per job")
    memory: str | None = Field(None, description="memory per job, e.g. '16GiB'")
    processes: PositiveInt | None = Field(None, description="worker processes per job")
    queue: str | None = Field(None, description="partition / queue")
    account: str | None = Field(None, description="account (project) charged")
    walltime: str | None = Field(None, description="time limit per job, e.g. '01:00:00'")
    job_extra_directives: list[str] | None = Field(
        None, description="more scheduler options, e.g. ['--qos=normal'] (SLURM)"
    )
    job_script_prologue: list[str] | None = Field(
        None, description="shell lines run before the worker starts (module load, ...)"
    )
    interface: str | None = Field(None, description="network interface, e.g. 'ib0'")
    python: str | None = Field(None, description="python on the compute nodes; default: this one")
    local_directory: str | None = Field(None, description="node-local scratch for spilling")
    log_directory: str | None = Field(None, description="where the worker jobs write their logs")
    dashboard_address: str | None = Field(
        None, description="where the scheduler's dashboard listens; default ':8787'"
    )
    wait_timeout: PositiveFloat = Field(
        600.0, description="seconds to wait for the workers to start (queued jobs included)"
    )


_K8S_NAME = r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$"


class KubernetesClusterConfig(_Strict):
    """A DaskCluster created (or, with ``existing``, found) by the Dask Kubernetes operator."""

    kind: Literal["kubernetes"]
    name: str = Field("dkm", description="the DaskCluster's name (a DNS label)")
    namespace: str | None = Field(None, description="namespace; default: the context's")
    existing: bool = Field(
        False, description="connect to the running DaskCluster `name` instead of creating one"
    )
    image: str | None = Field(None, description="scheduler and worker image; default dkm:VERSION")
    n_workers: PositiveInt = Field(2, description="workers to start")
    resources: dict[Literal["requests", "limits"], dict[str, str]] | None = Field(
        None, description="per container, e.g. {requests: {cpu: '1', memory: 4Gi}}"
    )
    env: dict[str, str] = Field(default_factory=dict, description="environment of the pods")
    wait_timeout: PositiveFloat = Field(600.0, description="seconds to wait for the workers")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(_K8S_NAME, value):
            raise ValueError(
                "a DaskCluster name is 1-40 lowercase letters, digits or '-', starting and "
                "ending with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _check_existing(self) -> KubernetesClusterConfig:
        if self.existing:
            unused = sorted({"image", "n_workers", "resources", "env"} & self.model_fields_set)
            if unused:
                verb = "describes" if len(unused) == 1 else "describe"
                raise ValueError(
                    f"{', '.join(unused)} {verb} a cluster to create; with existing: true "
                    f"the running DaskCluster {self.name!r} is used as it is (remove them)"
                )
        return self


ClusterConfig = Annotated[
    LocalClusterConfig | AddressClusterConfig | JobQueueClusterConfig | KubernetesClusterConfig,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------- output


class OutputConfig(_Strict):
    """Where the results go; written under a temporary name and moved into place."""

    path: str = Field(description="output directory: a local path or an fsspec URL")
    overwrite: bool = Field(
        False, description="replace an earlier dkm output at path (never anything else)"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options")
    model: bool = Field(True, description="write the model (a zarr group)")
    labels: bool = Field(True, description="write labels.zarr (row-chunked like the input)")
    responsibilities: bool = Field(False, description="gmm: write responsibilities.zarr")
    metrics: bool = Field(True, description="write metrics.jsonl, one record per iteration")
    report: bool = Field(True, description="write report/ (PNG images and index.html)")


class RuntimeConfig(_Strict):
    split_every: int = Field(8, ge=2, description="fan-in of the reduction tree")
    persist: Literal["auto", "always", "never"] = Field(
        "auto", description="keep the points in cluster memory (auto: if under half of it)"
    )
    checkpoint_every: NonNegativeInt = Field(
        1, description="checkpoint the fit every this many iterations (0: never)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")


# --------------------------------------------------------------------------- registry


class GuardsConfig(_Strict):
    """When ``dkm recluster`` refuses to promote a new model (null disables a guard)."""

    max_objective_increase: NonNegativeFloat | None = Field(
        0.05,
        description="refuse when the new model's objective on the new data is worse than the "
        "old model's on the same data by more than this fraction",
    )
    max_weight_loss: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="refuse when a component (matched old to new) lost more than this "
        "fraction of its weight",
    )


class RegistryConfig(_Strict):
    """The model registry ``dkm recluster`` and ``dkm models`` work on."""

    location: str = Field(description="registry root: a local path or an fsspec URL")
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="model name; versions live in <location>/<name>/vN",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options")
    keep: PositiveInt = Field(5, description="versions kept (the current one always is)")
    half_life: PositiveFloat | None = Field(
        None,
        description="recluster --update: the old statistics' weight halves every this many "
        "updates (null: no decay)",
    )
    churn_sample: PositiveInt = Field(10_000, description="points sampled for the label churn")
    drift_threshold: NonNegativeFloat = Field(
        1.0,
        description="a component 'moved' when its centre shifted by more than this many of "
        "its standard deviations",
    )
    guards: GuardsConfig = Field(default_factory=GuardsConfig)


class JobConfig(_Strict):
    """One run: what to cluster, how, on which cluster, and where to write."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    cluster: ClusterConfig = Field(default_factory=LocalClusterConfig)
    output: OutputConfig
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    registry: RegistryConfig | None = Field(
        None, description="the model registry (dkm recluster, dkm models)"
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


_UNION_TAGS = {
    "data": {"synthetic", "zarr", "npy", "parquet"},
    "cluster": {"local", "address", "kubernetes", *JOBQUEUE_KINDS},
}


def _describe_error(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    if len(parts) > 1 and parts[1] in _UNION_TAGS.get(parts[0], ()):
        del parts[1]  # pydantic names the union member; the user wrote data.url, not data.zarr.url
    loc = ".".join(parts)
    kind, msg = err["type"], err["msg"]
    if kind == "literal_error":
        expected = str(err.get("ctx", {}).get("expected", "")).replace("'", "")
        msg = "expected one of " + expected.replace(" or ", ", ")
    elif kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "union_tag_invalid":
        expected = str(err.get("ctx", {}).get("expected_tags", "")).replace("'", "")
        return f"{loc}.kind: expected one of {expected}, got {err['ctx'].get('tag')!r}"
    elif kind == "union_tag_not_found":
        return f"{loc}: needs a 'kind' key"
    elif kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    if kind not in ("missing", "extra_forbidden") and not isinstance(err.get("input", {}), dict):
        msg += f", got {err['input']!r}"
    return f"{loc}: {msg}" if loc else msg


def validate_config(raw: Any, source: str = "config") -> JobConfig:
    """A validated JobConfig from plain data; ConfigError lists every problem by key path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        problems = "\n".join("  " + _describe_error(dict(err)) for err in e.errors())
        raise ConfigError(f"{source} is not a valid dkm config:\n{problems}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML: 32, 1e-3, null, [1, 2])."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. model.n_clusters=32")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
        node = out
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                section = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item!r}: {section} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file safely; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p} is not valid YAML{where}: {problem}") from None
    if raw is None:
        raise ConfigError(f"config file {p} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a run config."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(raw, str(path))
