"""Run configs: YAML to validated, typed objects. The only place YAML is parsed."""

from __future__ import annotations

import difflib
import logging
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

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

from dkm import covariance
from dkm._typing import (
    KMEANS_FIT_INIT,
    Assignment,
    ConfigInit,
    CovarianceType,
    Criterion,
    Mode,
    NanPolicy,
    OnDegenerate,
    PersistPolicy,
    ScheduleName,
)
from dkm.errors import UserError

log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
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
    nan_policy: NanPolicy = Field(
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

    mode: Mode = Field("kmeans", description="kmeans or gmm")
    n_clusters: PositiveInt | list[PositiveInt] | KRange = Field(
        8,
        description="number of clusters / components; or candidates to choose from by "
        "`criterion`: a list [8, 16, 32] or a range {min: 2, max: 20, step: 2}",
    )
    criterion: Criterion = Field(
        "bic", description="how a list or range of n_clusters is decided (lower wins)"
    )
    covariance_type: CovarianceType | None = Field(
        None, description="kmeans: identity; gmm: full (default), tied, diag or spherical"
    )
    assignment: Assignment | None = Field(
        None, description="hard (kmeans default) or soft (gmm default)"
    )
    init: ConfigInit | ModelInit | None = Field(
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
    on_degenerate: OnDegenerate = Field(
        "error", description="gmm: a collapsed component is an error, re-seeded or dropped"
    )
    seed: int | None = Field(0, description="random seed of the initialisation")
    init_sample_size: PositiveInt | None = Field(
        None, description="points sampled for k-means++/random init; default max(10000, 100k)"
    )
    schedule: ScheduleName = Field(
        "auto",
        description="sampled: first iterations on growing samples, then all the data; "
        "auto: sampled on data of at least 8 times the largest sample",
    )
    sample_trials: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="when sampled: initialisations tried on the first sample per run, the "
        "best goes on; auto: as many as cost about one pass (at most 16)",
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
            if self.covariance_type is not None and not covariance.of(self.covariance_type).unit:
                raise ValueError(
                    f"covariance_type {self.covariance_type!r} needs mode: gmm "
                    "(k-means has identity covariances)"
                )
            if self.init == KMEANS_FIT_INIT:
                raise ValueError("init 'kmeans' is for mode: gmm; use k-means++ or random")
        elif self.covariance_type is not None and covariance.of(self.covariance_type).unit:
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
    split_every: int = Field(
        8, ge=2, description="fan-in of the client's merge of a pass's task results"
    )
    persist: PersistPolicy = Field(
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


#: Sections whose ``kind`` chooses the keys they take, and the kind when they do not say.
_KIND_SECTIONS: dict[str, str | None] = {"data": None, "cluster": "local"}

#: Allowed values in words where the type alone does not say it.
_ALLOWED_WORDS: dict[tuple[type[BaseModel], str], str] = {
    (RegistryConfig, "name"): "a name of letters, digits, '.', '_' and '-' that starts with "
    "a letter or digit",
}


def _number(value: float) -> str:
    return f"{value:g}"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + ", or " + words[-1]


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The annotation without ``Annotated``, and the constraints it carried."""
    metadata: list[Any] = []
    while get_origin(annotation) is Annotated:
        annotation, *more = get_args(annotation)
        metadata += more
    return annotation, metadata


def _members(annotation: Any) -> list[Any]:
    """The members of a union (None included), or the annotation itself."""
    if get_origin(annotation) in (Union, types.UnionType):
        return list(get_args(annotation))
    return [annotation]


def _allowed(annotation: Any, metadata: list[Any] | None = None) -> str:
    """What a field takes, in words: ``an integer ≥ 1, a list of them, or {min, max, step}``."""
    annotation, more = _unwrap(annotation)
    metadata = [*(metadata or []), *more]
    bounds = {
        k: getattr(m, k)
        for m in metadata
        for k in ("gt", "ge", "lt", "le", "min_length")
        if getattr(m, k, None) is not None
    }
    members = _members(annotation)
    if len(members) > 1 and all(_tagged(m) for m in members if m is not type(None)):
        return "a mapping with a 'kind' key" + (", or null" if type(None) in members else "")
    if len(members) > 1:
        words: list[str] = []
        for member in members:
            if member is type(None):
                continue
            member, inner = _unwrap(member)
            if get_origin(member) is Literal:
                words += [str(v) for v in get_args(member)]
                continue
            word = _allowed(member, [*metadata, *inner])
            if words and word == f"a list, each {words[-1]}":
                word = "a list of them"
            words.append(word)
        if type(None) in members:
            words.append("null")
        return _join(words)
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(v) for v in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        each = _allowed(item)
        if each == "a string":
            return (
                "a non-empty list of strings" if bounds.get("min_length") else "a list of strings"
            )
        return f"a list, each {each}"
    if origin is dict or annotation is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = list(annotation.model_fields)
        return "{" + ", ".join(fields) + "}" if len(fields) <= 3 else "a mapping"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        low = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else None)
        return "an integer" if low is None else f"an integer ≥ {low}"
    if annotation is float:
        if "ge" in bounds and "le" in bounds:
            return f"a number from {_number(bounds['ge'])} to {_number(bounds['le'])}"
        if "gt" in bounds:
            return f"a number > {_number(bounds['gt'])}"
        if "ge" in bounds:
            return f"a number ≥ {_number(bounds['ge'])}"
        return "a number"
    if annotation is str:
        return "a string"
    return "a value of the documented form"


def _branch(members: list[Any], tag: Any) -> Any:
    """The union member that pydantic's loc part ``tag`` names, or None."""
    if not isinstance(tag, str):
        return None
    name = tag.rstrip("]").split(", ")[-1] if tag.startswith("function-") else tag
    for member in members:
        base, _ = _unwrap(member)
        if isinstance(base, type) and issubclass(base, BaseModel):
            kind = base.model_fields.get("kind")
            if base.__name__ == name or (
                kind is not None and name in get_args(_unwrap(kind.annotation)[0])
            ):
                return member
        elif name.startswith(("list[", "literal[")) and get_origin(base) in (list, Literal):
            if name.startswith("list[") == (get_origin(base) is list):
                return member
        elif getattr(base, "__name__", None) in (name, name.removeprefix("constrained-")):
            return member
    return None


class _Where:
    """Where a pydantic error is: the key path as the user wrote it, and that key's type."""

    def __init__(self, loc: tuple[Any, ...]) -> None:
        self.path: list[str | int] = []
        self.annotation: Any = JobConfig
        self.metadata: list[Any] = []
        self.union_at: tuple[str | int, ...] | None = None  # key of a union the error is in
        self.union_allowed = ""  # what that key takes
        self.parent: type[BaseModel] | None = None  # the model of an unknown key
        self.owner: tuple[type[BaseModel], str] | None = None
        key_type: Any = Any
        for part in loc:
            base, more = _unwrap(self.annotation)
            self.metadata += more
            members = [m for m in _members(base) if m is not type(None)]
            if len(members) > 1:
                member = _branch(members, part)
                if member is not None:
                    if self.union_at is None and not all(_tagged(m) for m in members):
                        self.union_at, self.union_allowed = tuple(self.path), self.allowed()
                    self.annotation = member
                    continue
            elif members:
                base, more = _unwrap(members[0])
                self.metadata += more
            if part == "[key]":  # the key just passed is wrong, not its value
                self.annotation, self.metadata = key_type, []
                continue
            self.path.append(part)
            self.parent = None
            if isinstance(base, type) and issubclass(base, BaseModel):
                field = base.model_fields.get(str(part))
                if field is None:
                    self.parent, self.annotation = base, Any
                    continue
                self.owner = (base, str(part))
                self.annotation, self.metadata = field.annotation, list(field.metadata)
            elif get_origin(base) is list:
                self.annotation, self.metadata = get_args(base)[0], []
            elif get_origin(base) is dict:
                key_type, self.annotation = get_args(base)
                self.metadata = []
            else:
                self.annotation, self.metadata = Any, []

    def allowed(self) -> str:
        if self.owner in _ALLOWED_WORDS and self.annotation is not Any:
            return _ALLOWED_WORDS[self.owner]
        return _allowed(self.annotation, self.metadata)


def _tagged(member: Any) -> bool:
    base, _ = _unwrap(member)
    return isinstance(base, type) and issubclass(base, BaseModel) and "kind" in base.model_fields


def _key(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _suggest(word: Any, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Problem:
    """One problem of a config: its key path and what is wrong, in words."""

    def __init__(
        self, path: Sequence[str | int], text: str, unknown: str = "", missing: bool = False
    ) -> None:
        self.path = tuple(path)
        self.text = text
        self.unknown = unknown  # for an unknown key: "model has no key 'x' (did you mean …)"
        self.missing = missing  # a required key is missing

    def line(self, from_set: bool) -> str:
        if self.unknown and from_set:
            return self.unknown
        return f"{_key(self.path)}: {self.text}" if self.path else self.text


def _got(err: dict[str, Any]) -> str:
    value = err.get("input")
    return "" if isinstance(value, dict) else f", got {value!r}"


def _problem(err: dict[str, Any], where: _Where) -> _Problem:
    kind, msg = err["type"], err["msg"]
    path = where.path
    if kind == "extra_forbidden":
        name = path[-1]
        parent = _key(path[:-1]) or "the config"
        hint = _suggest(name, where.parent.model_fields if where.parent else ())
        return _Problem(path, f"unknown key{hint}", f"{parent} has no key {name!r}{hint}")
    if kind == "union_tag_invalid":
        expected = str(err.get("ctx", {}).get("expected_tags", "")).replace("'", "")
        tag = err["ctx"].get("tag")
        hint = _suggest(tag, expected.split(", "))
        return _Problem([*path, "kind"], f"expected one of {expected}, got {tag!r}{hint}")
    if kind == "invalid_key":
        return _Problem(path[:-1], f"keys are names, got {err.get('input')!r}")
    if kind == "union_tag_not_found":
        return _Problem(path, "needs a 'kind' key")
    if kind == "missing":
        return _Problem(path, msg, missing=True)
    if kind in ("value_error", "assertion_error"):
        return _Problem(path, msg.removeprefix("Value error, ") + _got(err))
    if kind == "literal_error":
        values = [
            v
            for m in _members(_unwrap(where.annotation)[0])
            if get_origin(_unwrap(m)[0]) is Literal
            for v in get_args(_unwrap(m)[0])
        ]
        hint = _suggest(err.get("input"), values)
        return _Problem(path, f"expected one of {', '.join(values)}{_got(err)}{hint}")
    return _Problem(path, f"expected {where.allowed()}{_got(err)}")


def _problems(errors: list[dict[str, Any]]) -> list[_Problem]:
    """Every problem once, in words; a union reports the member that fits the value's shape."""
    out: list[_Problem] = []
    unions: dict[tuple[str | int, ...], list[tuple[dict[str, Any], _Where]]] = {}
    for err in errors:
        where = _Where(err["loc"])
        if where.union_at is None:
            out.append(_problem(err, where))
        else:
            unions.setdefault(where.union_at, []).append((err, where))
    for at, group in unions.items():
        # errors inside the value (a list item, a key of a mapping, a check of the member
        # that took the value) come from the member the value was meant for
        specific = [
            (err, where)
            for err, where in group
            if len(where.path) > len(at) or err["type"] in ("value_error", "assertion_error")
        ]
        if specific:
            out += [_problem(err, where) for err, where in specific]
            continue
        err, where = group[0]
        literals = [
            v
            for _, w in group
            if get_origin(_unwrap(w.annotation)[0]) is Literal
            for v in get_args(_unwrap(w.annotation)[0])
        ]
        hint = _suggest(err.get("input"), literals) if isinstance(err.get("input"), str) else ""
        out.append(_Problem(at, f"expected {where.union_allowed}{_got(err)}{hint}"))
    return out


#: An override as applied: its key path and the ``--set`` argument as given.
_Override = tuple[tuple[str, ...], str]


def _starts(path: Sequence[Any], prefix: Sequence[Any]) -> bool:
    return len(path) >= len(prefix) and all(
        str(a) == str(b) for a, b in zip(path, prefix, strict=False)
    )


def _in_file(raw: Any, path: Sequence[Any]) -> bool:
    for part in path:
        found = (isinstance(raw, dict) and part in raw) or (
            isinstance(raw, list) and isinstance(part, int) and part < len(raw)
        )
        if not found:
            return False
        raw = raw[part]
    return True


def _report(
    problems: list[_Problem], source: str, file_raw: Any, overrides: list[_Override]
) -> str:
    """Problems of the file by key path, problems of an override by its ``--set``."""
    lines: list[tuple[bool, str]] = []  # (from --set, line)
    for p in problems:
        owner = [
            (path, item)
            for path, item in overrides
            if _starts(p.path, path) or (p.missing and path == (*p.path[:-1], "kind"))
        ]
        inside = [item for path, item in overrides if _starts(path, p.path) and path != p.path]
        if owner:
            path, item = owner[-1]
            same = path == p.path and not p.unknown  # the option's own key
            lines.append((True, f"--set {item}: {p.text if same else p.line(from_set=True)}"))
        elif inside and not _in_file(file_raw, p.path):
            lines.append((True, f"--set {inside[-1]}: {p.line(from_set=True)}"))
        elif inside:
            sets = ", ".join(f"--set {item}" for item in inside)
            lines.append((False, f"{p.line(from_set=False)} (with {sets})"))
        else:
            lines.append((False, p.line(from_set=False)))
    if all(from_set for from_set, _ in lines):
        head = f"invalid --set for {source}:"
    elif any(from_set for from_set, _ in lines):
        head = f"{source} with its --set options is not a valid dkm config:"
        lines = [(s, line if s else f"{source}: {line}") for s, line in lines]
    else:
        head = f"{source} is not a valid dkm config:"
    return head + "".join(f"\n  {line}" for _, line in lines)


def validate_config(
    raw: Any,
    source: str = "config",
    *,
    file_raw: Any = None,
    overrides: list[_Override] | None = None,
) -> JobConfig:
    """A validated JobConfig from plain data; ConfigError lists every problem by key path.

    With ``overrides`` (from :func:`apply_overrides`), a problem in a key an override set
    is reported by its ``--set`` option instead of by the file.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        problems = _problems([dict(err) for err in e.errors()])
        raise ConfigError(_report(problems, source, file_raw, overrides or [])) from None


def _kind_keys() -> dict[str, dict[str, set[str]]]:
    """Per section with a ``kind``: the keys each kind takes."""
    out: dict[str, dict[str, set[str]]] = {}
    for section in _KIND_SECTIONS:
        annotation = _unwrap(JobConfig.model_fields[section].annotation)[0]
        for member in _members(annotation):
            for tag in get_args(_unwrap(member.model_fields["kind"].annotation)[0]):
                out.setdefault(section, {})[tag] = set(member.model_fields)
    return out


def _drop_other_kinds(raw: dict[str, Any], out: dict[str, Any], applied: list[_Override]) -> None:
    """After ``--set SECTION.kind=…``: drop the file's keys that the new kind does not take.

    Keys an override set stay, so that they are reported if the kind does not take them.
    """
    for section, kinds in _kind_keys().items():
        before, after = raw.get(section), out.get(section)
        if not isinstance(before, dict) or not isinstance(after, dict):
            continue
        old = before.get("kind", _KIND_SECTIONS[section])
        new = after.get("kind", _KIND_SECTIONS[section])
        if old == new or not isinstance(new, str) or new not in kinds:
            continue
        if any(path == (section,) for path, _ in applied):
            continue  # the section was replaced: none of its keys is the file's
        explicit = {path[1] for path, _ in applied if len(path) > 1 and path[0] == section}
        dropped = sorted(k for k in after if k not in kinds[new] and k not in explicit)
        for k in dropped:
            del after[k]
        if dropped:
            item = next(item for path, item in reversed(applied) if path == (section, "kind"))
            log.info(
                "--set %s: dropped %s from the file (a %s %s does not take them)",
                item,
                ", ".join(f"{section}.{k}" for k in dropped),
                new,
                section,
            )


def _apply_overrides(
    raw: dict[str, Any], overrides: list[str]
) -> tuple[dict[str, Any], list[_Override]]:
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    applied: list[_Override] = []
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
        applied.append((tuple(parts), item))
    _drop_other_kinds(raw, out, applied)
    return out, applied


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML: 32, 1e-3, null, [1, 2]).

    Setting ``data.kind`` or ``cluster.kind`` to another kind drops the file's keys of that
    section that the new kind does not take (``cluster.kind=address`` on a local cluster
    drops ``n_workers``, …); keys set by overrides are kept.
    """
    return _apply_overrides(raw, overrides)[0]


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
    file_raw = read_yaml(path)
    raw, applied = _apply_overrides(file_raw, overrides or [])
    return validate_config(raw, str(path), file_raw=file_raw, overrides=applied)
