"""Configs: every shipped config validates; bad ones name the key path."""

from __future__ import annotations

import logging
import re
import shlex
import signal
from pathlib import Path

import pytest

from dkm.config import ConfigError, JobConfig, apply_overrides, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MINIMAL = {"data": {"kind": "synthetic"}, "output": {"path": "out"}}


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"kmeans.yaml", "gmm.yaml", "zarr.yaml", "scheduler.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert validate_config(cfg.to_dict()) == cfg  # round trip


def test_defaults_follow_the_mode():
    km = validate_config(MINIMAL)
    assert km.model.resolved("covariance_type") == "identity"
    assert km.model.resolved("assignment") == "hard"
    assert km.model.resolved("tol") == 1e-4 and km.cluster.kind == "local"
    gm = validate_config({**MINIMAL, "model": {"mode": "gmm"}})
    assert gm.model.resolved("covariance_type") == "full"
    assert gm.model.resolved("init") == "kmeans" and gm.model.resolved("max_iter") == 100


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {**MINIMAL, "model": {"mode": "gmm", "covariance_type": "ful"}},
            "model.covariance_type: expected one of identity, full, tied, diag, spherical, "
            "got 'ful'",
        ),
        ({**MINIMAL, "model": {"n_clusters": "many"}}, "model.n_clusters: "),
        ({**MINIMAL, "model": {"n_clusters": 0}}, "model.n_clusters: "),
        ({**MINIMAL, "modle": {}}, "modle: unknown key"),
        ({**MINIMAL, "model": {"n_cluster": 3}}, "model.n_cluster: unknown key"),
        ({"data": {"kind": "synthetic"}}, "output: Field required"),
        ({**MINIMAL, "data": {"kind": "zar"}}, "data.kind: expected one of synthetic, zarr"),
        ({**MINIMAL, "data": {"kind": "zarr"}}, "data.url: Field required"),
        ({**MINIMAL, "data": {"n": 5}}, "data: needs a 'kind' key"),
        (
            {**MINIMAL, "cluster": {"kind": "address", "address": "localhost"}},
            "cluster.address: expected a scheduler address",
        ),
        ({**MINIMAL, "model": {"mode": "kmeans", "covariance_type": "full"}}, "needs mode: gmm"),
        ({**MINIMAL, "runtime": {"split_every": 1}}, "runtime.split_every"),
        ({**MINIMAL, "runtime": {"persist": "sometimes"}}, "runtime.persist: expected one of"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        validate_config(raw, "test.yaml")
    assert message in str(e.value)


def test_overrides():
    raw = apply_overrides(
        MINIMAL,
        [
            "model.n_clusters=32",
            "model.tol=1e-3",
            "runtime.persist=never",
            "cluster.kind=address",
            "cluster.address=tcp://h:1",
        ],
    )
    cfg = validate_config(raw)
    assert cfg.model.n_clusters == 32 and cfg.model.tol == 1e-3
    assert cfg.runtime.persist == "never" and cfg.cluster.kind == "address"
    assert MINIMAL["data"] == {"kind": "synthetic"}  # not modified in place
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        apply_overrides(MINIMAL, ["model.n_clusters"])
    with pytest.raises(ConfigError, match=r"output\.path is not a section"):
        apply_overrides(MINIMAL, ["output.path.x=1"])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  kind: synthetic\n  n: [1, 2\noutput: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo owned']\noutput: {path: x}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_readme_documents_every_config_key():
    from dkm import config as c

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    models = [
        c.SyntheticData,
        c.ZarrData,
        c.NpyData,
        c.ParquetData,
        c.ModelConfig,
        c.LocalClusterConfig,
        c.AddressClusterConfig,
        c.JobQueueClusterConfig,
        c.KubernetesClusterConfig,
        c.TLSConfig,
        c.ModelInit,
        c.KRange,
        c.OutputConfig,
        c.RuntimeConfig,
    ]
    missing = {name for m in models for name in m.model_fields if f"`{name}" not in readme}
    assert not missing, f"README's config reference lacks {sorted(missing)}"


# --------------------------------------------------------------------------- --set


def test_setting_another_kind_drops_the_file_keys_of_the_old_one(caplog):
    kmeans = ROOT / "configs" / "kmeans.yaml"  # a local cluster with n_workers, ...
    with caplog.at_level(logging.INFO, logger="dkm.config"):
        cfg = load_config(kmeans, ["cluster.kind=address", "cluster.address=tcp://h:8786"])
    assert cfg.cluster.kind == "address" and cfg.cluster.address == "tcp://h:8786"
    assert "--set cluster.kind=address: dropped cluster.dashboard_address, " in caplog.text
    assert "cluster.n_workers, cluster.threads_per_worker from the file" in caplog.text
    # the order of the options does not matter
    cfg = load_config(kmeans, ["cluster.address=tcp://h:8786", "cluster.kind=address"])
    assert cfg.cluster.kind == "address"
    # a key of the old kind set explicitly is still an error, named by its option
    with pytest.raises(ConfigError) as e:
        load_config(
            kmeans, ["cluster.kind=address", "cluster.address=tcp://h:1", "cluster.n_workers=3"]
        )
    assert "--set cluster.n_workers=3: cluster has no key 'n_workers'" in str(e.value)
    # data sections too; keys the new kind takes stay
    cfg = load_config(ROOT / "configs" / "zarr.yaml", ["data.kind=synthetic", "data.n=50"])
    assert cfg.data.kind == "synthetic" and cfg.data.n == 50
    # the new kind's required keys are asked of the option that set the kind
    with pytest.raises(ConfigError) as e:
        load_config(kmeans, ["cluster.kind=address"])
    assert "--set cluster.kind=address: cluster.address: Field required" in str(e.value)


def _documented_commands() -> list[tuple[str, list[str]]]:
    """``dkm validate …`` and ``dkm run|recluster … --set …`` shown in the docs and configs.

    ``sbatch jobs/slurm/dkm.sbatch CONFIG ARGS`` counts as the ``dkm run`` it executes.
    """
    script = (ROOT / "jobs" / "slurm" / "dkm.sbatch").read_text()
    (exec_line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    sbatch_args = shlex.split(exec_line.partition('"$config"')[2].replace('"$@"', ""))
    sources = [ROOT / "README.md", ROOT / "deploy" / "README.md", *CONFIGS]
    out = []
    for path in sources:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # continuation lines
        for line in text.splitlines():
            if path.suffix == ".yaml":
                if not line.lstrip().startswith("#"):
                    continue
                line = line.lstrip().lstrip("#")
            pattern = r"\b(?:dkm (run|validate|recluster)|sbatch jobs/slurm/dkm\.sbatch) ([^`\n]*)"
            for m in re.finditer(pattern, line):
                words = []
                for word in shlex.split(m.group(2), comments=True):
                    if word in ("&&", "||", ";", "|", "&") or word.startswith((">", "2>")):
                        break
                    words.append(word)
                if not words or not (ROOT / words[0]).is_file():
                    continue  # CONFIG and the like: a placeholder, not a shipped file
                config, options = words[0], words[1:]
                if m.group(1) is None:
                    options = [*sbatch_args, *options]
                elif m.group(1) != "validate" and "--set" not in options:
                    continue
                sets = [options[i + 1] for i, o in enumerate(options) if o == "--set"]
                where = f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
                out.append((where, [config, *(a for s in sets for a in ("--set", s))]))
    return out


def test_documented_commands_validate(monkeypatch):
    from click.testing import CliRunner

    from dkm.cli import main

    commands = _documented_commands()
    shown = {" ".join(args) for _, args in commands}
    # the README's kind switch, the scheduler and batch examples, deploy/README's job
    assert {
        "configs/kmeans.yaml --set cluster.kind=address --set cluster.address=tcp://h:8786",
        "configs/scheduler.yaml --set cluster.address=tcp://HOST:8786",
        "configs/kmeans.yaml --set cluster={kind: slurm, jobs: 4}",
        "configs/zarr.yaml --set cluster={kind: slurm} --set cluster.jobs=4",
        "configs/kmeans.yaml --set cluster={kind: slurm, jobs: 4} --set cluster.queue=compute",
    } <= shown, shown
    monkeypatch.chdir(ROOT)
    handler = signal.getsignal(signal.SIGTERM)  # dkm's main sets its own
    try:
        for where, args in commands:
            result = CliRunner().invoke(main, ["validate", *args])
            assert result.exit_code == 0, f"{where}\n{result.output}"
    finally:
        signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "model, message",
    [
        (
            {"n_clusters": 0},
            "model.n_clusters: expected an integer ≥ 1, a list of them, or {min, max, step}, got 0",
        ),
        (
            {"n_clusters": "four"},
            "model.n_clusters: expected an integer ≥ 1, a list of them, or {min, max, step}, "
            "got 'four'",
        ),
        ({"n_clusters": [0, 3]}, "model.n_clusters[0]: expected an integer ≥ 1, got 0"),
        ({"n_clusters": {"min": 5, "max": 2}}, "model.n_clusters: min (5) must not exceed max (2)"),
        ({"n_clusters": {"min": 5}}, "model.n_clusters.max: Field required"),
        ({"tol": -1}, "model.tol: expected a number ≥ 0, or null, got -1"),
        ({"max_iter": 1.5}, "model.max_iter: expected an integer ≥ 0, or null, got 1.5"),
        ({"oversampling_factor": 0}, "model.oversampling_factor: expected a number > 0, got 0"),
        ({"mode": "kmean"}, "model.mode: expected one of kmeans, gmm, got 'kmean' (did you mean"),
        (
            {"mode": "gmm", "covariance_type": "ful"},
            "model.covariance_type: expected one of identity, full, tied, diag, spherical, "
            "got 'ful' (did you mean 'full'?)",
        ),
        (
            {"init": "kmeans++"},
            "model.init: expected k-means++, k-means||, random, kmeans, {model}, or null, "
            "got 'kmeans++' (did you mean 'k-means++'?)",
        ),
        ({"nclusters": 3}, "model.nclusters: unknown key (did you mean 'n_clusters'?)"),
    ],
)
def test_errors_say_what_is_allowed(model, message):
    with pytest.raises(ConfigError) as e:
        validate_config({**MINIMAL, "model": model}, "test.yaml")
    text = str(e.value)
    assert message in text
    for internal in ("constrained-int", "KRange", "Input should", "list["):
        assert internal not in text
    assert len(text.splitlines()) == 2  # one problem, one line


@pytest.mark.parametrize(
    "section, message",
    [
        ({"runtime": {"split_every": 1}}, "runtime.split_every: expected an integer ≥ 2, got 1"),
        (
            {"registry": {"location": "r", "name": "x", "guards": {"max_weight_loss": 2}}},
            "registry.guards.max_weight_loss: expected a number from 0 to 1, or null, got 2",
        ),
        (
            {"registry": {"location": "r", "name": "-x"}},
            "registry.name: expected a name of letters, digits, '.', '_' and '-' that starts",
        ),
        ({"cluster": {"kind": "slurm", "jobs": 0}}, "cluster.jobs: expected an integer ≥ 1, got 0"),
        ({"cluster": {"kind": "slurmm"}}, "got 'slurmm' (did you mean 'slurm'?)"),
        ({"output": {"path": "o", "labels": "maybe"}}, "output.labels: expected true or false"),
        (
            {"cluster": {"kind": "kubernetes", "resources": {"limit": {}}}},
            "cluster.resources.limit: expected one of requests, limits, got 'limit' "
            "(did you mean 'limits'?)",
        ),
        ({"model": {4: 1}}, "model: keys are names, got 4"),
        (
            {"data": {"kind": "parquet", "url": "u", "columns": []}},
            "data.columns: expected a non-empty list of strings, got []",
        ),
    ],
)
def test_constraints_of_other_sections_in_words(section, message):
    with pytest.raises(ConfigError) as e:
        validate_config({**MINIMAL, **section}, "test.yaml")
    assert message in str(e.value)


def test_set_errors_name_the_option_and_file_errors_the_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {kind: synthetic}\noutput: {path: out}\n")
    with pytest.raises(ConfigError) as e:
        load_config(base, ["model.nclusters=3"])
    assert str(e.value) == (
        f"invalid --set for {base}:\n"
        "  --set model.nclusters=3: model has no key 'nclusters' (did you mean 'n_clusters'?)"
    )
    with pytest.raises(ConfigError) as e:
        load_config(base, ["modle.n_clusters=3", "model.n_clusters=0"])
    assert str(e.value) == (
        f"invalid --set for {base}:\n"
        "  --set modle.n_clusters=3: the config has no key 'modle' (did you mean 'model'?)\n"
        "  --set model.n_clusters=0: expected an integer ≥ 1, a list of them, or "
        "{min, max, step}, got 0"
    )
    with pytest.raises(ConfigError) as e:
        load_config(base, ["cluster={kind: slurm, jobz: 4}"])
    assert (
        "--set cluster={kind: slurm, jobz: 4}: cluster has no key 'jobz' (did you mean 'jobs'?)"
        in str(e.value)
    )
    # a problem of the file names the file and the key path, also beside a --set one
    base.write_text("data: {kind: synthetic}\noutput: {path: out}\nmodel: {tol: -1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(base)
    assert str(e.value) == (
        f"{base} is not a valid dkm config:\n  model.tol: expected a number ≥ 0, or null, got -1"
    )
    with pytest.raises(ConfigError) as e:
        load_config(base, ["model.n_init=0"])
    assert str(e.value) == (
        f"{base} with its --set options is not a valid dkm config:\n"
        "  --set model.n_init=0: expected an integer ≥ 1, got 0\n"
        f"  {base}: model.tol: expected a number ≥ 0, or null, got -1"
    )
    # a check of a whole section that a --set took part in says so
    base.write_text("data: {kind: synthetic}\noutput: {path: out}\nmodel: {mode: kmeans}\n")
    with pytest.raises(ConfigError) as e:
        load_config(base, ["model.covariance_type=full"])
    assert "model: covariance_type 'full' needs mode: gmm" in str(e.value)
    assert "(with --set model.covariance_type=full)" in str(e.value)


def test_what_the_shipped_configs_write_is_ignored_by_git():
    ignored = {
        line.strip().strip("/")
        for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    written = set()
    for path in CONFIGS:
        cfg = load_config(path)
        written.add(cfg.output.path)
        if cfg.registry is not None:
            written.add(cfg.registry.location)
        for key in ("url", "path"):  # the data the configs' comments make
            written.add(getattr(cfg.data, key, None) or "")
    tops = {Path(p).parts[0] for p in written if p and "://" not in p}
    assert tops == {"out", "registry", "data"}, tops
    assert tops <= ignored, f".gitignore lacks {sorted(tops - ignored)}"


def test_sample_trials_reach_the_estimator():
    from dkm import job

    config = load_config(ROOT / "configs" / "kmeans.yaml", ["model.sample_trials=3"])
    assert job.build_estimator(config.model, 8, None).sample_trials == 3
    gmm = load_config(ROOT / "configs" / "gmm.yaml", [])
    assert job.build_estimator(gmm.model, 8, None).sample_trials == "auto"
    with pytest.raises(ConfigError, match="sample_trials"):
        load_config(ROOT / "configs" / "kmeans.yaml", ["model.sample_trials=0"])
