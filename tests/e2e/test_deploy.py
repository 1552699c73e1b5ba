"""deploy/ and jobs/: every manifest validates, names the image and a config that exist.

Built-in Kubernetes kinds are checked with kubernetes-validate (strict: unknown fields are
errors), the Dask operator's DaskCluster and DaskJob against the CRD schemas shipped in
the dask-kubernetes package (made strict the same way). Every ``dkm`` command that a
manifest, batch script or crontab runs is parsed by the real command line and its config,
with the overrides, validated. A SLURM run of jobs/slurm/dkm.sbatch is in test_slurm.py.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import dask
import dask_kubernetes
import jsonschema
import kubernetes_validate
import pytest
import yaml

import dkm
from dkm.cli import main as dkm_cli
from dkm.cluster import default_image, jobqueue_kwargs, kubernetes_kwargs, make_jobqueue_cluster
from dkm.config import (
    JobQueueClusterConfig,
    KubernetesClusterConfig,
    load_config,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY, JOBS, CONFIGS = ROOT / "deploy", ROOT / "jobs", ROOT / "configs"
K8S_FILES = sorted([*DEPLOY.glob("kubernetes/*.yaml"), *JOBS.glob("kubernetes/*.yaml")])
CRDS = (
    Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
)
CONFIGMAP = "dkm-configs"  # kubectl create configmap dkm-configs --from-file=configs/
CONFIG_MOUNT = "/etc/dkm/configs/"
#: What the operator and Kubernetes put into $(VAR) references of the manifests.
K8S_ENV = {
    "DASK_SCHEDULER_ADDRESS": "tcp://dkm-kmeans-scheduler.default.svc.cluster.local:8786",
    "DASK_WORKER_NAME": "dkm-default-worker-0",
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.relative_to(ROOT)}:{doc['kind']}", doc))
    return docs


DOCS = _documents()
BUILTIN = [(name, doc) for name, doc in DOCS if "dask.org" not in doc["apiVersion"]]
DASK = [(name, doc) for name, doc in DOCS if "dask.org" in doc["apiVersion"]]


def _walk(node: Any, key: str) -> list[Any]:
    """Every value of ``key`` anywhere in a nested document."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_walk(v, key))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item, key))
    return found


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for cs in _walk(doc, "containers") for c in cs]


def test_the_manifests_are_there():
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == ["CronJob", "DaskCluster", "DaskJob", "PersistentVolumeClaim"]
    assert (DEPLOY / "Dockerfile").is_file() and (DEPLOY / "README.md").is_file()
    assert (DEPLOY / "slurm" / "jobqueue.yaml").is_file()
    for name in ("slurm/dkm.sbatch", "slurm/recluster.scrontab", "cron/recluster.cron"):
        assert (JOBS / name).is_file(), name


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name, doc", BUILTIN, ids=[n for n, _ in BUILTIN])
def test_builtin_kinds_validate(name, doc):
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_catches_a_wrong_field():
    """The check above is not vacuous: a misspelt field fails."""
    (doc,) = [d for n, d in BUILTIN if d["kind"] == "CronJob"]
    bad = copy.deepcopy(doc)
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def _strict(schema: Any) -> Any:
    """An OpenAPI CRD schema where unknown fields are errors (as kubectl --validate=strict)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(kind: str) -> tuple[jsonschema.Draft7Validator, str]:
    crd = yaml.safe_load((CRDS / f"{kind.lower()}.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["served"]]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"].update(
        apiVersion={"const": f"{crd['spec']['group']}/{version['name']}"},
        kind={"const": kind},
        metadata={"type": "object"},
    )
    schema.setdefault("required", []).extend(["apiVersion", "kind", "metadata"])
    return jsonschema.Draft7Validator(_strict(schema)), version["name"]


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    validator, _ = _crd_validator(doc["kind"])
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("name, doc", DASK, ids=[n for n, _ in DASK])
def test_dask_operator_kinds_validate_against_the_shipped_crds(name, doc):
    assert _crd_errors(doc) == []
    # metadata as the API server wants it
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
        kubernetes_validate.latest_version(),
        strict=True,
    )


def test_crd_check_catches_a_wrong_field():
    (doc,) = [d for n, d in DASK if d["kind"] == "DaskJob"]
    bad = copy.deepcopy(doc)
    bad["spec"]["cluster"]["spec"]["worker"]["replica"] = 2
    bad["spec"]["job"]["spec"]["containers"][0]["args"] = "dkm run"
    errors = _crd_errors(bad)
    assert any("replica" in e for e in errors) and any("args" in e for e in errors), errors


def test_the_cluster_dkm_would_create_validates_against_the_crd():
    """cluster: {kind: kubernetes} asks the operator for a DaskCluster the CRD accepts."""
    from dask_kubernetes.operator import make_cluster_spec

    cfg = KubernetesClusterConfig(
        kind="kubernetes",
        name="nightly",
        n_workers=3,
        resources={"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        env={"OMP_NUM_THREADS": "1"},
    )
    kwargs = kubernetes_kwargs(cfg)
    assert kwargs["image"] == default_image() == f"dkm:{dkm.__version__}"
    spec_kwargs = {k: kwargs[k] for k in ("name", "image", "n_workers", "resources", "env")}
    spec = make_cluster_spec(**spec_kwargs)
    assert _crd_errors(spec) == []
    assert spec["spec"]["worker"]["replicas"] == 3
    assert {c["image"] for c in _containers(spec)} == {"dkm:0.1.0"}
    # the scheduler pod preloads the dkm page of the dashboard; the user's env is kept
    assert kwargs["env"] == {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": "dkm.dashboard", **cfg.env}


def test_the_manifests_schedulers_preload_the_dkm_page():
    schedulers = [
        [*c.get("command", []), *c.get("args", [])]
        for _, doc in DOCS
        for c in _containers(doc)
        if c["name"] == "scheduler"
    ]
    assert len(schedulers) == 2, schedulers  # the standing DaskCluster and the DaskJob's
    for argv in schedulers:
        assert argv[:2] == ["dask", "scheduler"]
        assert argv[argv.index("--preload") + 1] == "dkm.dashboard"
    existing = kubernetes_kwargs(KubernetesClusterConfig(kind="kubernetes", existing=True))
    assert existing == {"name": "dkm", "namespace": None}


# --------------------------------------------------------------------------- references


def test_every_manifest_names_the_dkm_image():
    images = {name: _walk(doc, "image") for name, doc in DOCS if _containers(doc)}
    assert all(images.values()), images
    assert {i for found in images.values() for i in found} == {default_image()}
    # ... the one deploy/README.md builds from deploy/Dockerfile
    readme = (DEPLOY / "README.md").read_text()
    assert f"docker build -f deploy/Dockerfile -t {default_image()} ." in readme
    assert f"-t {default_image()} ." in (DEPLOY / "Dockerfile").read_text()


def test_volumes_refer_to_what_is_deployed():
    claims = {
        doc["metadata"]["name"] for _, doc in BUILTIN if doc["kind"] == "PersistentVolumeClaim"
    }
    for name, doc in DOCS:
        for volume in (v for vs in _walk(doc, "volumes") for v in vs):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            if "configMap" in volume:
                assert volume["configMap"]["name"] == CONFIGMAP, name
        for container in _containers(doc):
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            declared = {v["name"] for vs in _walk(doc, "volumes") for v in vs}
            assert mounted <= declared, (name, container["name"])


def test_the_configmap_made_from_configs_validates():
    """deploy/README.md: kubectl create configmap dkm-configs --from-file=configs/"""
    assert (
        f"kubectl create configmap {CONFIGMAP} --from-file=configs/"
        in (DEPLOY / "README.md").read_text()
    )
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP},
        "data": {p.name: p.read_text() for p in sorted(CONFIGS.glob("*.yaml"))},
    }
    kubernetes_validate.validate(configmap, kubernetes_validate.latest_version(), strict=True)
    assert sum(len(v) for v in configmap["data"].values()) < 1 << 20  # a ConfigMap's limit


def _substitute(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _check_dkm_command(argv: list[str], where: str) -> str:
    """Parse ``dkm SUBCOMMAND CONFIG ...`` with the real CLI and validate the config.

    Returns the config's file name (in configs/).
    """
    assert Path(argv[0]).name == "dkm", (where, argv)
    subcommand, config, *rest = argv[1:]
    assert subcommand in ("run", "recluster"), (where, argv)
    local = CONFIGS / Path(config).name
    assert local.is_file(), f"{where}: {config} is not in configs/"
    if config.startswith(CONFIG_MOUNT):
        pass  # mounted from the ConfigMap made of configs/
    else:
        assert (ROOT / config).resolve() == local.resolve(), (where, config)
    ctx = dkm_cli.make_context("dkm", [subcommand, str(local), *rest])
    with ctx:
        sub = dkm_cli.get_command(ctx, subcommand)
        assert sub is not None, f"{where}: dkm has no {subcommand} command"
        sub_ctx = sub.make_context(subcommand, [str(local), *rest], parent=ctx)
    overrides = list(sub_ctx.params["overrides"])
    load_config(local, overrides)
    return local.name


def _k8s_commands() -> list[tuple[str, list[str]]]:
    out = []
    for name, doc in DOCS:
        for container in _containers(doc):
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv and Path(argv[0]).name == "dkm":
                out.append((f"{name}/{container['name']}", _substitute(argv, K8S_ENV)))
    return out


def test_kubernetes_jobs_run_shipped_configs():
    commands = dict(_k8s_commands())
    assert len(commands) == 2, commands  # the DaskJob and the CronJob
    configs = {where: _check_dkm_command(argv, where) for where, argv in commands.items()}
    assert sorted(configs.values()) == ["kmeans.yaml", "recluster.yaml"]
    for where, argv in commands.items():
        assert argv[2].startswith(CONFIG_MOUNT), where


def test_the_daskjob_talks_to_its_own_cluster():
    (doc,) = [d for _, d in DASK if d["kind"] == "DaskJob"]
    ((_, argv),) = [c for c in _k8s_commands() if "DaskJob" in c[0]]
    cfg = load_config(CONFIGS / "kmeans.yaml", [argv[argv.index("--set") + 1]])
    assert cfg.cluster.kind == "address"
    assert cfg.cluster.address == K8S_ENV["DASK_SCHEDULER_ADDRESS"]
    selector = doc["spec"]["cluster"]["spec"]["scheduler"]["service"]["selector"]
    assert selector["dask.org/cluster-name"] == doc["metadata"]["name"]


def test_the_cronjob_uses_the_standing_cluster():
    (cluster,) = [d for _, d in DASK if d["kind"] == "DaskCluster"]
    ((_, argv),) = [c for c in _k8s_commands() if "CronJob" in c[0]]
    cfg = load_config(CONFIGS / "recluster.yaml", [argv[argv.index("--set") + 1]])
    assert cfg.cluster.address == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    (cron,) = [d for _, d in BUILTIN if d["kind"] == "CronJob"]
    _check_schedule(cron["spec"]["schedule"].split())


_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _check_schedule(fields: list[str]) -> None:
    assert len(fields) == 5, fields
    for field, (lo, hi) in zip(fields, _CRON_RANGES, strict=True):
        for part in field.split(","):
            base, _, step = part.partition("/")
            assert not step or step.isdigit(), field
            if base == "*":
                continue
            ends = base.split("-")
            assert all(e.isdigit() and lo <= int(e) <= hi for e in ends), field


def _crontab_commands(path: Path) -> list[tuple[list[str], list[str]]]:
    """(schedule fields, the dkm argv) of each entry of a crontab file."""
    entries = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert "%" not in line, "cron turns % into a newline"
        fields = line.split(None, 5)
        lexer = shlex.shlex(fields[5], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        start = next(
            i
            for i, t in enumerate(tokens[:-1])
            if Path(t).name == "dkm" and tokens[i + 1] in ("run", "recluster")
        )
        end = next(
            (i for i, t in enumerate(tokens) if i > start and t in ("&&", ";", "|", ">>", ">")),
            len(tokens),
        )
        entries.append((fields[:5], tokens[start:end]))
    return entries


@pytest.mark.parametrize("name", ["slurm/recluster.scrontab", "cron/recluster.cron"])
def test_crontab_lines_run_shipped_configs(name):
    entries = _crontab_commands(JOBS / name)
    assert len(entries) == 1
    for schedule, argv in entries:
        _check_schedule(schedule)
        assert _check_dkm_command(argv, name) == "recluster.yaml"


def test_scrontab_options_are_sbatch_options():
    lines = (JOBS / "slurm/recluster.scrontab").read_text().splitlines()
    options = [line.removeprefix("#SCRON").strip() for line in lines if line.startswith("#SCRON")]
    assert options and all(o.startswith("--") for o in options)


def test_sbatch_script_runs_a_shipped_config():
    script = (JOBS / "slurm/dkm.sbatch").read_text()
    assert script.startswith("#!/usr/bin/env bash\n")
    default = re.search(r'config="\$\{1:-([^}]+)\}"', script)
    assert default, "the script names a default config"
    cluster = re.search(r'--set "(cluster=\{kind: slurm\})"', script)
    assert cluster
    argv = ["dkm", "run", default.group(1), "--set", cluster.group(1)]
    assert _check_dkm_command(argv, "dkm.sbatch") == "kmeans.yaml"
    assert "DASK_CONFIG" in script and "deploy/slurm" in script
    result = subprocess.run(["bash", "-n", str(JOBS / "slurm/dkm.sbatch")], capture_output=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- dask-jobqueue


def test_the_slurm_jobqueue_config_shapes_the_worker_jobs():
    import dask
    import dask_jobqueue

    ours = yaml.safe_load((DEPLOY / "slurm/jobqueue.yaml").read_text())
    defaults = yaml.safe_load((Path(dask_jobqueue.__file__).parent / "jobqueue.yaml").read_text())
    unknown = set(ours["jobqueue"]["slurm"]) - set(defaults["jobqueue"]["slurm"])
    assert not unknown, f"keys dask-jobqueue does not know: {unknown}"

    merged = dask.config.merge(defaults, ours)
    with dask.config.set(merged):
        cfg = JobQueueClusterConfig(kind="slurm")
        with make_jobqueue_cluster(cfg) as cluster:
            script = cluster.job_script()
        assert "#SBATCH --cpus-per-task=8" in script
        assert "#SBATCH --mem=32G" in script and "#SBATCH -t 04:00:00" in script
        assert "#SBATCH -J dkm-worker" in script
        # what the run config says wins over the deploy config
        cfg = JobQueueClusterConfig(
            kind="slurm", cores=2, memory="4GiB", processes=1, queue="short", account="proj"
        )
        with make_jobqueue_cluster(cfg) as cluster:
            script = cluster.job_script()
    assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH --mem=4G" in script
    assert "#SBATCH -p short" in script and "#SBATCH -A proj" in script


def test_jobqueue_keys_reach_dask_jobqueue():
    cfg = JobQueueClusterConfig(kind="sge", cores=4, memory="8GiB", account="p", walltime="1:00:00")
    kwargs = jobqueue_kwargs(cfg)
    scheduler = kwargs.pop("scheduler_options")
    assert kwargs == {"cores": 4, "memory": "8GiB", "walltime": "1:00:00", "project": "p"}
    assert scheduler == {"preload": ["dkm.dashboard"], "preload_argv": []}
    assert jobqueue_kwargs(JobQueueClusterConfig(kind="pbs", account="p"))["account"] == "p"


def test_the_dashboard_preload_joins_the_schedulers_own_options():
    """dask-jobqueue takes scheduler_options instead of its configuration's, and a
    scheduler's preload argument instead of Dask's: dkm's page is added to both."""
    cfg = JobQueueClusterConfig(kind="slurm", dashboard_address="127.0.0.1:0")
    with dask.config.set(
        {
            "jobqueue.slurm.scheduler-options": {"interface": "lo"},
            "distributed.scheduler.preload": ["mine.py"],
            "distributed.scheduler.preload-argv": ["--flag"],
        }
    ):
        options = jobqueue_kwargs(cfg)["scheduler_options"]
    assert options == {
        "interface": "lo",
        "dashboard_address": "127.0.0.1:0",
        "preload": ["mine.py", "dkm.dashboard"],
        "preload_argv": [["--flag"], []],
    }


def test_missing_cores_and_memory_are_a_clear_error(tmp_path):
    from dkm.cluster import ClusterError

    env_config = tmp_path / "empty"
    env_config.mkdir()
    with pytest.raises(ClusterError, match=r"Set cluster\.cores and cluster\.memory"):
        make_jobqueue_cluster(JobQueueClusterConfig(kind="lsf"))


# --------------------------------------------------------------------------- extras


def _run_without(
    module: str, tmp_path: Path, cluster: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """dkm run where ``module`` cannot be imported, as when its extra is not installed."""
    blocker = tmp_path / "blocker"
    (blocker / module).mkdir(parents=True)
    (blocker / module / "__init__.py").write_text(
        f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n'
    )
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"data": {"kind": "synthetic", "n": 100}, "cluster": cluster, "output": {"path": "o"}}
        )
    )
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "dkm.cli", "run", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "module, cluster, extra",
    [
        ("dask_jobqueue", {"kind": "slurm", "cores": 1, "memory": "1GiB"}, "slurm"),
        ("dask_jobqueue", {"kind": "pbs", "cores": 1, "memory": "1GiB"}, "slurm"),
        ("dask_kubernetes", {"kind": "kubernetes"}, "kubernetes"),
    ],
)
def test_a_missing_extra_names_the_install_command(monkeypatch, module, cluster, extra):
    from dkm.cluster import ClusterError, connect

    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, module, None)
    cfg = validate_config(
        {"data": {"kind": "synthetic"}, "output": {"path": "o"}, "cluster": cluster}
    )
    with pytest.raises(ClusterError) as e, connect(cfg.cluster):
        pass
    assert f"pip install 'dkm[{extra}]'" in str(e.value)
    assert f"cluster.kind {cluster['kind']} needs {module.replace('_', '-')}" in str(e.value)


def test_a_missing_extra_exits_2_from_the_command(tmp_path):
    result = _run_without(
        "dask_jobqueue", tmp_path, {"kind": "slurm", "cores": 1, "memory": "1GiB"}
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'dkm[slurm]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_extras_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("dask-jobqueue") for r in extras["slurm"])
    assert any(r.startswith("dask-kubernetes") for r in extras["kubernetes"])
    test = " ".join(extras["test"])
    for needed in ("dask-jobqueue", "dask-kubernetes", "kubernetes-validate", "jsonschema"):
        assert needed in test, needed


# --------------------------------------------------------------------------- config keys


def test_new_cluster_kinds_validate_and_are_documented():
    base = {"data": {"kind": "synthetic"}, "output": {"path": "o"}}
    for kind in ("slurm", "pbs", "sge", "lsf"):
        cfg = validate_config({**base, "cluster": {"kind": kind, "jobs": 2, "cores": 4}})
        assert isinstance(cfg.cluster, JobQueueClusterConfig) and cfg.cluster.jobs == 2
    readme = (ROOT / "README.md").read_text()
    for model in (JobQueueClusterConfig, KubernetesClusterConfig):
        missing = [name for name in model.model_fields if f"`{name}`" not in readme]
        assert not missing, f"README's config reference lacks {missing}"


@pytest.mark.parametrize(
    "cluster, message",
    [
        ({"kind": "slurm", "cors": 4}, "cluster.cors: unknown key"),
        ({"kind": "slurm", "jobs": 0}, "cluster.jobs: "),
        ({"kind": "kubernetes", "name": "My_Cluster"}, "cluster.name: a DaskCluster name is"),
        (
            {"kind": "kubernetes", "existing": True, "n_workers": 3},
            "n_workers describes a cluster to create",
        ),
        ({"kind": "kubernets"}, "cluster.kind: expected one of local, address, slurm, pbs"),
    ],
)
def test_bad_cluster_config_names_the_key(cluster, message):
    from dkm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        validate_config(
            {"data": {"kind": "synthetic"}, "output": {"path": "o"}, "cluster": cluster}
        )
    assert message in str(e.value)


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def _readme_install_command() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(python -m pip install -e [^\n]*?) && dkm run", readme)
    assert block, "README's install command"
    return block.group(1)


def test_dockerfile_installs_with_the_readme_command():
    readme_cmd = shlex.split(_readme_install_command())  # python -m pip install -e .
    runs = [shlex.split(args) for ins, args in _dockerfile() if ins == "RUN"]
    installs = [r for r in runs if r[: len(readme_cmd) - 1] == readme_cmd[:-1]]
    assert len(installs) == 1, runs
    target = installs[0][len(readme_cmd) - 1]
    m = re.fullmatch(r"\.\[([a-z,]+)\]", target)
    assert m, f"installs {target!r}, not the README's target {readme_cmd[-1]!r} with extras"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"kubernetes", "slurm"} <= set(m.group(1).split(",")) <= set(extras)


def test_dockerfile_lint():
    instructions = _dockerfile()
    names = [ins for ins, _ in instructions]
    assert names[0] == "FROM"
    base = instructions[0][1]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base), base
    assert names.count("HEALTHCHECK") == 1 and "CMD" in dict(instructions)["HEALTHCHECK"]
    users = [args for ins, args in instructions if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    assert names.index("USER") < names.index("CMD")
    for ins, args in instructions:
        if ins == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
        if ins == "RUN":
            assert "apt-get install" not in args or "--no-install-recommends" in args
            assert "sudo" not in args
    env = " ".join(args for ins, args in instructions if ins == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env
    # the healthcheck it runs is copied into the image
    health = dict(instructions)["HEALTHCHECK"]
    assert "/opt/dkm/deploy/healthcheck.py" in health
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!dkm/**" in ignore and "!deploy/**" in ignore


def test_the_healthcheck(tmp_path):
    from distributed import LocalCluster

    script = [sys.executable, str(DEPLOY / "healthcheck.py")]

    def run(urls: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DKM_HEALTH_URLS": urls}
        return subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)

    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        port = cluster.scheduler.http_server.port
        ok = run(f"http://127.0.0.1:{port}/health")
        assert ok.returncode == 0 and ok.stdout.strip().endswith(": ok"), ok
        wrong = run(f"http://127.0.0.1:{port}/no-such-page")
        assert wrong.returncode == 1, wrong
    nothing = run("http://127.0.0.1:9/health")  # nothing listens: a job container
    assert nothing.returncode == 0 and "dkm 0.1.0 imports" in nothing.stdout
